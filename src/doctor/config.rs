//! Checks of the apiserver's EncryptionConfiguration: the everyday ways KMS encryption is
//! silently off or data becomes unreadable (identity first, secrets not listed, a renamed
//! provider, a KMS v1 provider, an odd timeout).

use std::path::Path;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use super::Check;

/// What the rest of the doctor needs from the configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigFacts {
    /// The socket path of the KMS provider that encrypts secrets (`unix://` stripped).
    pub socket: Option<String>,
    /// Every KMS provider name in the file (a stored object's prefix must name one).
    pub kms_names: Vec<String>,
}

fn str_of(y: &Yaml) -> Option<&str> {
    y.as_str()
}

/// Whether a `resources` entry covers Secrets.
fn covers_secrets(entry: &Yaml) -> bool {
    entry["resources"].as_vec().is_some_and(|rs| {
        rs.iter()
            .filter_map(str_of)
            .any(|r| matches!(r, "secrets" | "*." | "*.*"))
    })
}

/// The provider type of a `providers` item (`kms`, `identity`, `aescbc`, …).
fn provider_type(p: &Yaml) -> String {
    p.as_hash()
        .and_then(|h| h.keys().next())
        .and_then(str_of)
        .unwrap_or("?")
        .to_owned()
}

/// `unix:///run/x.sock` or `unix:/run/x.sock` → `/run/x.sock`; an abstract socket keeps `@`.
pub fn socket_of_endpoint(endpoint: &str) -> String {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    path.to_owned()
}

fn same_socket(a: &str, b: &str) -> bool {
    let norm = |s: &str| socket_of_endpoint(s).trim_start_matches("//").to_owned();
    norm(a) == norm(b)
}

/// Checks the file's text. `socket` is this plugin's socket, when known; `stored_names` the
/// KMS provider names a scan found in etcd (to catch a rename), when known.
pub fn check(
    text: &str,
    path: &Path,
    socket: Option<&str>,
    stored_names: Option<&[String]>,
) -> (Vec<Check>, ConfigFacts) {
    let file = path.display();
    let mut out = Vec::new();
    let mut facts = ConfigFacts::default();
    if let Err(why) = super::yaml_bounds::check(text) {
        out.push(Check::fail(
            format!("{file}: {why}"),
            "point --encryption-config at the apiserver's EncryptionConfiguration (deploy/kubernetes/encryption-config.yaml is one)",
        ));
        return (out, facts);
    }
    let docs = match YamlLoader::load_from_str(text) {
        Ok(d) if !d.is_empty() => d,
        Ok(_) => {
            out.push(Check::fail(
                format!("{file} is empty"),
                "write an EncryptionConfiguration (deploy/kubernetes/encryption-config.yaml is one)",
            ));
            return (out, facts);
        }
        Err(e) => {
            out.push(Check::fail(
                format!("{file} is not valid YAML: {e}"),
                "fix the syntax; kube-apiserver will not start with it",
            ));
            return (out, facts);
        }
    };
    let doc = &docs[0];
    if str_of(&doc["kind"]) != Some("EncryptionConfiguration") {
        out.push(Check::fail(
            format!(
                "{file} is not an EncryptionConfiguration (kind: {:?})",
                str_of(&doc["kind"]).unwrap_or("none")
            ),
            "set `kind: EncryptionConfiguration` and `apiVersion: apiserver.config.k8s.io/v1`",
        ));
        return (out, facts);
    }
    out.push(Check::pass(format!(
        "{file} parses as an EncryptionConfiguration"
    )));
    let entries = doc["resources"].as_vec().cloned().unwrap_or_default();
    for entry in &entries {
        for p in entry["providers"].as_vec().into_iter().flatten() {
            if let Some(name) = str_of(&p["kms"]["name"]) {
                if !facts.kms_names.iter().any(|n| n == name) {
                    facts.kms_names.push(name.to_owned());
                }
            }
        }
    }
    let Some(entry) = entries.iter().find(|e| covers_secrets(e)) else {
        out.push(Check::fail(
            "no resources entry lists secrets: Secrets are stored unencrypted",
            "add `secrets` to the `resources` of the entry whose first provider is the localkms kms provider",
        ));
        return (out, facts);
    };
    out.push(Check::pass("secrets are covered"));
    let providers = entry["providers"].as_vec().cloned().unwrap_or_default();
    let ours = providers.iter().position(|p| {
        let endpoint = str_of(&p["kms"]["endpoint"]);
        match (endpoint, socket) {
            (Some(e), Some(s)) => same_socket(e, s),
            (Some(_), None) => true,
            _ => false,
        }
    });
    let Some(idx) = ours else {
        out.push(Check::fail(
            match socket {
                Some(s) => format!("no kms provider for secrets points at this plugin's socket {s}"),
                None => "no kms provider is listed for secrets".to_owned(),
            },
            "add a `kms` provider with `apiVersion: v2`, a `name`, `endpoint: unix://<the --socket of localkms serve>` and `timeout: 3s`, first in the list",
        ));
        return (out, facts);
    };
    let kms = &providers[idx]["kms"];
    let endpoint = str_of(&kms["endpoint"]).unwrap_or_default();
    facts.socket = Some(socket_of_endpoint(endpoint));
    let name = str_of(&kms["name"]).unwrap_or_default().to_owned();
    out.push(Check::pass(format!(
        "kms provider {name:?} points at {endpoint}"
    )));
    if idx == 0 {
        out.push(Check::pass(format!(
            "{name:?} is first: every new write is encrypted with localkms"
        )));
    } else {
        let first = provider_type(&providers[0]);
        out.push(if first == "identity" {
            Check::fail(
                "identity is listed before the kms provider: nothing is being encrypted (new writes are stored in clear)",
                format!("move the kms provider {name:?} first and keep identity last (for reading old plaintext objects), then rewrite every secret"),
            )
        } else {
            Check::fail(
                format!("{first} is listed before the kms provider {name:?}: new writes are encrypted with {first}, not localkms"),
                format!("put {name:?} first if localkms should encrypt; keep {first} after it until every object is rewritten"),
            )
        });
    }
    match str_of(&kms["apiVersion"]) {
        Some("v2") => out.push(Check::pass("apiVersion: v2")),
        other => out.push(Check::fail(
            format!("the kms provider has apiVersion {} (KMS v1 is deprecated and off by default since Kubernetes 1.29)", other.unwrap_or("unset, meaning v1")),
            "set `apiVersion: v2` (keep a v1 provider with the old name after it until objects are rewritten)",
        )),
    }
    match str_of(&kms["timeout"]).map(crate::cli::parse_duration) {
        None => out.push(Check::pass("timeout unset (kube-apiserver's default, 3s)")),
        Some(Ok(t)) if (Duration::from_secs(1)..=Duration::from_secs(10)).contains(&t) => {
            out.push(Check::pass(format!("timeout {}", humantime::format_duration(t))))
        }
        Some(Ok(t)) => out.push(Check::fail(
            format!("timeout {} is outside 1s–10s: too short fails requests under load, too long stalls the apiserver when the plugin is down", humantime::format_duration(t)),
            "set `timeout: 3s`",
        )),
        Some(Err(e)) => out.push(Check::fail(
            format!("timeout is not a duration ({e})"),
            "set `timeout: 3s`",
        )),
    }
    if let Some(stored) = stored_names {
        let missing: Vec<&String> = stored
            .iter()
            .filter(|n| !facts.kms_names.contains(n))
            .collect();
        if missing.is_empty() {
            out.push(Check::pass(
                "every KMS provider name found in etcd is still configured",
            ));
        } else {
            out.push(Check::fail(
                format!("etcd holds objects written by KMS provider(s) {missing:?} that this file no longer lists (a renamed provider?): kube-apiserver cannot read them"),
                "add those providers back, after the first one, with their old names and the same endpoint, until `localkms scan` shows no objects under them",
            ));
        }
    }
    (out, facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../../deploy/kubernetes/encryption-config.yaml");

    fn fails(text: &str, socket: Option<&str>, stored: Option<&[String]>) -> Vec<String> {
        check(text, Path::new("enc.yaml"), socket, stored)
            .0
            .into_iter()
            .filter(|c| !c.ok())
            .map(|c| c.line())
            .collect()
    }

    #[test]
    fn the_shipped_configuration_passes() {
        let (checks, facts) = check(
            GOOD,
            Path::new("enc.yaml"),
            Some("unix:///var/run/localkms/kms.sock"),
            Some(&["localkms".to_owned()]),
        );
        assert!(checks.iter().all(Check::ok), "{checks:?}");
        assert_eq!(facts.socket.as_deref(), Some("/var/run/localkms/kms.sock"));
    }

    #[test]
    fn each_misconfiguration_is_named_with_a_fix() {
        let identity_first = GOOD.replacen("      - kms:", "      - identity: {}\n      - kms:", 1);
        assert!(fails(&identity_first, None, None)
            .iter()
            .any(|f| f.contains("nothing is being encrypted")));
        let aescbc_first = GOOD.replacen(
            "      - kms:",
            "      - aescbc:\n          keys: []\n      - kms:",
            1,
        );
        assert!(fails(&aescbc_first, None, None)
            .iter()
            .any(|f| f.contains("aescbc is listed before")));
        let no_secrets = GOOD.replace("      - secrets\n", "");
        assert!(fails(&no_secrets, None, None)
            .iter()
            .any(|f| f.contains("stored unencrypted")));
        let v1 = GOOD.replace("apiVersion: v2", "apiVersion: v1");
        assert!(fails(&v1, None, None).iter().any(|f| f.contains("KMS v1")));
        let slow = GOOD.replace("timeout: 3s", "timeout: 60s");
        assert!(fails(&slow, None, None)
            .iter()
            .any(|f| f.contains("outside 1s")));
        let other_socket = fails(GOOD, Some("/run/other.sock"), None);
        assert!(
            other_socket.iter().any(|f| f.contains("/run/other.sock")),
            "{other_socket:?}"
        );
        let renamed = fails(GOOD, None, Some(&["old-name".to_owned()]));
        assert!(
            renamed.iter().any(|f| f.contains("old-name")),
            "{renamed:?}"
        );
        assert!(!fails("kind: Pod", None, None).is_empty());
        assert!(!fails("a: [", None, None).is_empty());
        for f in fails(&identity_first, None, None) {
            assert!(f.contains("fix:"), "{f}");
        }
    }
}
