//! `localkms scan`: what the apiserver's etcd still holds under each KEK, so an old key is
//! destroyed on evidence, not on decrypt counts (under KMS v2 an object that is never read is
//! never decrypted by the plugin).
//!
//! The scan reads etcd read-only, one bounded page at a time at one revision (a consistent
//! view; a million keys never sit in memory), classifies each value ([`classify`]) and keeps
//! only counts: per KEK, per storage format, per resource. Values are never printed or kept.

pub mod classify;

use std::collections::BTreeMap;
use std::io::IsTerminal;

use serde::{Deserialize, Serialize};

use crate::keystore::backend::etcd::client::prefix_end;
use crate::keystore::backend::etcd::{Etcd, EtcdError};
use crate::keystore::Keystore;
use crate::timefmt::rfc3339;
use classify::{classify, Stored};

/// The `format` field of a report.
pub const REPORT_FORMAT: &str = "localkms-scan";
/// Default page size: keys read per etcd request.
pub const DEFAULT_PAGE: i64 = 500;

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// etcd refused or could not be reached.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A single value is larger than etcd's response can carry to us.
    #[error("etcd key {0:?} holds a value too large to read even alone")]
    TooLarge(String),
}

/// Objects under one KEK.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KekCount {
    /// The KEK id.
    pub key_id: String,
    /// Its state in the keystore given with `--keystore` (`not in keystore` when it is not
    /// there; absent without `--keystore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Stored objects whose DEK (or seed) is sealed under it.
    pub objects: u64,
    /// The same, per resource (the path segment after the prefix).
    pub by_resource: BTreeMap<String, u64>,
}

/// What a scan found (the `--json` output, and what `keys destroy --scan-report` reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanReport {
    /// Always [`REPORT_FORMAT`].
    pub format: String,
    /// Report version (1).
    pub version: u32,
    /// When the scan finished, RFC 3339.
    pub scanned_at: String,
    /// The same, Unix seconds.
    pub scanned_unix: i64,
    /// Every key in the range was read.
    pub complete: bool,
    /// The etcd endpoints read.
    pub endpoints: String,
    /// The key prefix scanned.
    pub prefix: String,
    /// The etcd revision read.
    pub revision: i64,
    /// `--provider`: only KMS values of this provider were attributed to KEKs.
    pub provider: Option<String>,
    /// The keystore id of `--keystore` (hex), when given.
    pub keystore_id: Option<String>,
    /// Keys read.
    pub objects: u64,
    /// Objects per storage format (`kms:v2:NAME`, `kms:v1:NAME`, `aescbc`, `identity`, …).
    pub formats: BTreeMap<String, u64>,
    /// Objects per resource and format.
    pub resources: BTreeMap<String, BTreeMap<String, u64>>,
    /// Objects per KEK, oldest KEK first when the keystore is known.
    pub keks: Vec<KekCount>,
    /// KMS v2 values whose clear keyID disagrees with the KEK inside the envelope.
    pub mismatched_key_ids: u64,
    /// KMS values whose body does not parse (they may depend on any KEK).
    pub malformed: u64,
}

impl ScanReport {
    /// Objects that depend on `key_id`.
    pub fn references(&self, key_id: &str) -> u64 {
        self.keks
            .iter()
            .find(|k| k.key_id == key_id)
            .map_or(0, |k| k.objects)
    }

    /// The human-readable table.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "scanned {} keys under {} at etcd revision {} ({}){}\n\n{:<32} {:>10}\n",
            self.objects,
            self.prefix,
            self.revision,
            self.endpoints,
            if self.complete { "" } else { " INCOMPLETE" },
            "FORMAT",
            "OBJECTS"
        );
        for (format, n) in &self.formats {
            let _ = writeln!(out, "{format:<32} {n:>10}");
        }
        let _ = write!(
            out,
            "\n{:<24} {:<16} {:>10}  RESOURCES\n",
            "KEK", "STATE", "OBJECTS"
        );
        for k in &self.keks {
            let resources: Vec<String> = k
                .by_resource
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            let _ = writeln!(
                out,
                "{:<24} {:<16} {:>10}  {}",
                k.key_id,
                k.state.as_deref().unwrap_or("-"),
                k.objects,
                resources.join(", ")
            );
        }
        if self.keks.is_empty() {
            out.push_str("(no KMS-encrypted objects)\n");
        }
        if self.mismatched_key_ids > 0 {
            let _ = writeln!(out, "\nWARNING: {} KMS v2 object(s) name a keyID other than the KEK inside their envelope (counted under the envelope's KEK): written by something other than kube-apiserver, or tampered with", self.mismatched_key_ids);
        }
        if self.malformed > 0 {
            let _ = writeln!(out, "\nWARNING: {} object(s) have a KMS prefix but a body that does not parse; they may depend on any KEK", self.malformed);
        }
        if let Some(identity) = self.formats.get("identity") {
            let _ = writeln!(out, "\nnote: {identity} object(s) are stored unencrypted (identity); every resource the EncryptionConfiguration lists is encrypted only once rewritten");
        }
        out
    }
}

/// What to scan.
pub struct ScanRequest<'a> {
    /// The apiserver's etcd.
    pub etcd: &'a Etcd,
    /// The key prefix (`/registry/`).
    pub prefix: &'a str,
    /// Attribute only this KMS provider's values to KEKs.
    pub provider: Option<&'a str>,
    /// The keystore, for KEK states and the id.
    pub keystore: Option<&'a Keystore>,
    /// Keys per request.
    pub page: i64,
    /// Show progress on stderr when it is a terminal.
    pub progress: bool,
}

#[derive(Default)]
struct Tally {
    objects: u64,
    formats: BTreeMap<String, u64>,
    resources: BTreeMap<String, BTreeMap<String, u64>>,
    keks: BTreeMap<String, BTreeMap<String, u64>>,
    mismatched: u64,
    malformed: u64,
}

impl Tally {
    fn add(&mut self, key: &[u8], value: &[u8], prefix: &str, provider: Option<&str>) {
        let stored = classify(value);
        let format = stored.format();
        let resource = key
            .strip_prefix(prefix.as_bytes())
            .and_then(|rest| rest.split(|&b| b == b'/').find(|s| !s.is_empty()))
            .map_or_else(
                || "(other)".to_owned(),
                |r| String::from_utf8_lossy(r).into_owned(),
            );
        self.objects += 1;
        *self.formats.entry(format.clone()).or_default() += 1;
        *self
            .resources
            .entry(resource.clone())
            .or_default()
            .entry(format)
            .or_default() += 1;
        if matches!(stored, Stored::Malformed { .. }) {
            self.malformed += 1;
        }
        if stored.mismatched() {
            self.mismatched += 1;
        }
        let counted = provider.is_none_or(|p| stored.provider() == Some(p));
        if let (Some(kek), true) = (stored.kek(), counted) {
            *self
                .keks
                .entry(kek.to_owned())
                .or_default()
                .entry(resource)
                .or_default() += 1;
        }
    }
}

/// Runs the scan.
pub async fn scan(req: ScanRequest<'_>) -> Result<ScanReport, ScanError> {
    let mut prefix = req.prefix.to_owned();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut page = req.page.max(1);
    let mut tally = Tally::default();
    let show = req.progress && std::io::stderr().is_terminal();
    loop {
        let got = match req.etcd.page(&from, &end, page, revision).await {
            Ok(p) => p,
            // A page of large objects over the response limit: fewer per page.
            Err(EtcdError::Rpc { ref status, .. })
                if page > 1
                    && matches!(
                        status.code(),
                        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                    ) =>
            {
                page = (page / 2).max(1);
                continue;
            }
            Err(EtcdError::Rpc { ref status, .. })
                if matches!(
                    status.code(),
                    tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                ) =>
            {
                return Err(ScanError::TooLarge(
                    String::from_utf8_lossy(&from).into_owned(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if revision == 0 {
            revision = got.revision;
        }
        let total = got.count;
        let Some(last) = got.kvs.last().map(|kv| kv.key.clone()) else {
            break;
        };
        for kv in &got.kvs {
            tally.add(&kv.key, &kv.value, &prefix, req.provider);
        }
        if show {
            // `count` is what remains from this page's first key on.
            let done = tally.objects;
            let all = done
                + u64::try_from(total)
                    .unwrap_or(0)
                    .saturating_sub(got.kvs.len() as u64);
            crate::telemetry::eprint_lossy(&progress_bar(&prefix, done, all));
        }
        if !got.more {
            break;
        }
        from = last;
        from.push(0);
    }
    if show {
        crate::telemetry::eprint_lossy("\n");
    }
    Ok(report(tally, &req, &prefix, revision))
}

/// One redrawn line: `scanning /registry/ [#######.......]  48% 9600/20000 keys`.
fn progress_bar(prefix: &str, done: u64, all: u64) -> String {
    const WIDTH: u64 = 30;
    let all = all.max(done).max(1);
    let filled = (done * WIDTH / all) as usize;
    format!(
        "\rscanning {prefix} [{}{}] {:>3}% {done}/{all} keys ",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        done * 100 / all
    )
}

fn report(tally: Tally, req: &ScanRequest<'_>, prefix: &str, revision: i64) -> ScanReport {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut found = tally.keks;
    let mut keks = Vec::new();
    if let Some(ks) = req.keystore {
        // Every KEK of the keystore, with zero where nothing depends on it: an explicit zero
        // is what `keys destroy --scan-report` needs.
        for r in ks.records() {
            let by_resource = found.remove(r.id.as_str()).unwrap_or_default();
            keks.push(KekCount {
                key_id: r.id.to_string(),
                state: Some(r.state.to_string()),
                objects: by_resource.values().sum(),
                by_resource,
            });
        }
    }
    for (key_id, by_resource) in found {
        keks.push(KekCount {
            key_id,
            state: req.keystore.map(|_| "not in keystore".to_owned()),
            objects: by_resource.values().sum(),
            by_resource,
        });
    }
    ScanReport {
        format: REPORT_FORMAT.into(),
        version: 1,
        scanned_at: rfc3339(now),
        scanned_unix: now,
        complete: true,
        endpoints: req.etcd.target().endpoints.join(","),
        prefix: prefix.to_owned(),
        revision,
        provider: req.provider.map(str::to_owned),
        keystore_id: req
            .keystore
            .and_then(Keystore::keystore_id)
            .map(|id| crate::recovery::export::hex(&id)),
        objects: tally.objects,
        formats: tally.formats,
        resources: tally.resources,
        keks,
        mismatched_key_ids: tally.mismatched,
        malformed: tally.malformed,
    }
}

/// `--fail-on-key`: some object still depends on a KEK the caller wants gone (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}; rewrite the objects (`kubectl get secrets,configmaps -A -o json | kubectl replace -f -`) and scan again")]
pub struct StillReferenced(pub String);

/// Why a scan report is not evidence for destroying `key_id`.
pub fn refuse_as_evidence(
    report: &ScanReport,
    key_id: &str,
    keystore: &Keystore,
    max_age_s: i64,
    now: i64,
) -> Option<String> {
    let ours = keystore
        .keystore_id()
        .map(|id| crate::recovery::export::hex(&id));
    if report.format != REPORT_FORMAT || report.version != 1 {
        return Some("it is not a `localkms scan --json` report".into());
    }
    if !report.complete {
        return Some("the scan did not finish".into());
    }
    if report.keystore_id.is_none() || report.keystore_id != ours {
        return Some("it was not made with --keystore for this keystore; scan with `--keystore K --root-key-file R` so the report names every KEK of it".into());
    }
    if let Some(p) = &report.provider {
        return Some(format!("it counted only provider {p:?} (--provider); objects written under another (or a renamed) provider name were not attributed; scan without --provider"));
    }
    let age = now.saturating_sub(report.scanned_unix);
    if age > max_age_s || age < -300 {
        return Some(format!(
            "it is from {} ({} s ago), older than --max-scan-age ({} s); objects may have been written since. Scan again",
            report.scanned_at, age, max_age_s
        ));
    }
    if report.malformed > 0 {
        return Some(format!(
            "{} object(s) with a KMS prefix could not be parsed and may depend on {key_id}",
            report.malformed
        ));
    }
    if !report.keks.iter().any(|k| k.key_id == key_id) {
        return Some(format!("it does not list {key_id}"));
    }
    let refs = report.references(key_id);
    (refs > 0).then(|| {
        format!(
            "{refs} object(s) still depend on {key_id} ({})",
            report
                .keks
                .iter()
                .find(|k| k.key_id == key_id)
                .map(|k| {
                    k.by_resource
                        .iter()
                        .map(|(r, n)| format!("{r}={n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystore::model::tests::fresh;

    #[test]
    fn a_report_is_evidence_only_when_complete_fresh_unfiltered_and_for_this_keystore() {
        let ks = fresh();
        let id = ks.records()[0].id.to_string();
        let mut tally = Tally::default();
        tally.add(b"/registry/secrets/a/b", b"plain", "/registry/", None);
        let etcd = Etcd::connect(
            &crate::keystore::EtcdTarget::parse("etcd://127.0.0.1:1/x").expect("url"),
            &crate::keystore::EtcdTls {
                insecure: true,
                ..Default::default()
            },
        )
        .expect("client");
        let req = ScanRequest {
            etcd: &etcd,
            prefix: "/registry/",
            provider: None,
            keystore: Some(&ks),
            page: 10,
            progress: false,
        };
        let r = report(tally, &req, "/registry/", 5);
        let now = r.scanned_unix;
        assert_eq!(r.references(&id), 0);
        assert_eq!(refuse_as_evidence(&r, &id, &ks, 3600, now), None);
        assert!(refuse_as_evidence(&r, &id, &ks, 3600, now + 7200)
            .is_some_and(|m| m.contains("older than")));
        assert!(refuse_as_evidence(&r, &id, &fresh(), 3600, now)
            .is_some_and(|m| m.contains("--keystore")));
        let mut filtered = r.clone();
        filtered.provider = Some("x".into());
        assert!(refuse_as_evidence(&filtered, &id, &ks, 3600, now).is_some());
        let mut used = r.clone();
        used.keks[0].objects = 3;
        used.keks[0].by_resource.insert("secrets".into(), 3);
        assert!(refuse_as_evidence(&used, &id, &ks, 3600, now)
            .is_some_and(|m| m.contains("3 object(s) still depend")));
        assert_eq!(r.formats.get("identity"), Some(&1));
        assert!(progress_bar("/r/", 15, 30).contains("[###############...............]  50% 15/30"));
        assert!(r.text().contains("stored unencrypted"));
    }
}
