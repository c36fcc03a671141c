//! Prometheus metrics. Request metrics are recorded as requests complete; key, usage, reload
//! and log figures are read from the live keyring and counters by a collector when `/metrics`
//! is scraped, so they cost nothing on the request path and concurrent scrapes cannot race.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::keyring::SharedKeyring;
use crate::keystore::KeyState;
use crate::reload::ReloadCounters;

/// `localkms_requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `v1` or `v2`.
    pub api: &'static str,
    /// RPC name.
    pub method: &'static str,
    /// gRPC code name as grpc-go prints it.
    pub code: &'static str,
}

/// `localkms_request_duration_seconds` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `v1` or `v2`.
    pub api: &'static str,
    /// RPC name.
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 10 µs to ~5 s.
    Histogram::new(exponential_buckets(0.000_01, 2.5, 15))
}

/// Every metric localkms exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    rejected_peers: Counter,
    share_refusals: Counter,
    evictions: Counter,
    cluster_nodes: Gauge,
    cluster_converged: Gauge,
    backend_last_success: Gauge,
    /// The request series resolved once per label set, so the hot path is an index and an
    /// atomic add: no label hashing, no family lock (see [`Metrics::observe_request`]).
    hot_counters: Box<[OnceLock<Counter>]>,
    hot_histograms: Box<[OnceLock<Histogram>]>,
}

/// The APIs and methods the request path reports; others take the (hashing) family path.
const APIS: [&str; 2] = ["v1", "v2"];
const METHODS: [&str; 4] = ["Status", "Encrypt", "Decrypt", "Version"];
/// tonic's codes are 0..=16.
const CODES: usize = 17;

fn method_slot(api: &str, method: &str) -> Option<usize> {
    let a = APIS.iter().position(|x| *x == api)?;
    let m = METHODS.iter().position(|x| *x == method)?;
    Some(a * METHODS.len() + m)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The gRPC code names grpc-go prints, which kube-apiserver's own KMS metrics use.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

impl Metrics {
    /// Registers every metric for a file keystore (no cluster metrics).
    pub fn new() -> Self {
        Self::for_store(false)
    }

    /// Registers every metric; the cluster ones (`localkms_cluster_*`) only for an etcd
    /// keystore, where they mean something.
    pub fn for_store(etcd: bool) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "localkms_requests",
            "KMS requests by API, method and gRPC code",
            requests.clone(),
        );
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "localkms_request_duration_seconds",
            "KMS request latency by API and method",
            duration.clone(),
        );
        let share_refusals = Counter::default();
        registry.register(
            "localkms_connection_share_refusals",
            "Connections closed at once because their peer uid already held its share of the connection slots (--max-in-flight-share of --max-connections)",
            share_refusals.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "localkms_connection_evictions",
            "Idle or handshaking connections closed to make room for a new one when every slot was taken",
            evictions.clone(),
        );
        let rejected_peers = Counter::default();
        registry.register(
            "localkms_rejected_peers",
            "Connections refused by the --allow-uid/--allow-gid check",
            rejected_peers.clone(),
        );
        let cluster_nodes = Gauge::default();
        let cluster_converged = Gauge::default();
        let backend_last_success = Gauge::default();
        if etcd {
            registry.register(
                "localkms_cluster_nodes",
                "etcd keystores: live nodes publishing their keystore state",
                cluster_nodes.clone(),
            );
            registry.register(
                "localkms_cluster_converged",
                "etcd keystores: 1 when every live node has loaded the same keystore generation",
                cluster_converged.clone(),
            );
            registry.register(
                "localkms_backend_last_success_timestamp_seconds",
                "etcd keystores: when this node last reached etcd (published its record), Unix seconds; the cluster gauges are only as fresh as this",
                backend_last_success.clone(),
            );
        }
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "localkms_build_info",
            "Build information (value is always 1)",
            build,
        );
        Metrics {
            registry,
            requests,
            duration,
            rejected_peers,
            share_refusals,
            evictions,
            cluster_nodes,
            cluster_converged,
            backend_last_success,
            hot_counters: (0..APIS.len() * METHODS.len() * CODES)
                .map(|_| OnceLock::new())
                .collect(),
            hot_histograms: (0..APIS.len() * METHODS.len())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Records that the backend answered just now (`unix`: the time, Unix seconds).
    pub fn backend_reached(&self, unix: i64) {
        self.backend_last_success.set(unix);
    }

    /// Records what the etcd node records say.
    pub fn set_cluster(&self, nodes: usize, converged: bool) {
        self.cluster_nodes.set(nodes as i64);
        self.cluster_converged.set(i64::from(converged));
    }

    /// Records one finished request.
    pub fn observe_request(
        &self,
        api: &'static str,
        method: &'static str,
        code: tonic::Code,
        seconds: f64,
    ) {
        let labels = || RequestLabels {
            api,
            method,
            code: code_name(code),
        };
        let Some(slot) = method_slot(api, method) else {
            self.requests.get_or_create(&labels()).inc();
            self.duration
                .get_or_create(&MethodLabels { api, method })
                .observe(seconds);
            return;
        };
        let code_idx = usize::try_from(code as i32).unwrap_or(0).min(CODES - 1);
        self.hot_counters[slot * CODES + code_idx]
            .get_or_init(|| self.requests.get_or_create(&labels()).clone())
            .inc();
        self.hot_histograms[slot]
            .get_or_init(|| {
                self.duration
                    .get_or_create(&MethodLabels { api, method })
                    .clone()
            })
            .observe(seconds);
    }

    /// Counts a connection refused by the peer check.
    pub fn rejected_peer(&self) {
        self.rejected_peers.inc();
    }

    /// Counts a connection refused for its uid's connection share.
    pub fn share_refused(&self) {
        self.share_refusals.inc();
    }

    /// Counts a connection evicted to make room.
    pub fn evicted(&self) {
        self.evictions.inc();
    }

    /// Current value of `localkms_requests_total` for one label set (for tests).
    pub fn requests(&self, api: &'static str, method: &'static str, code: tonic::Code) -> u64 {
        self.requests
            .get(&RequestLabels {
                api,
                method,
                code: code_name(code),
            })
            .map_or(0, |c| c.get())
    }

    /// Adds the figures read from live state at each scrape: keys by state, the primary,
    /// decrypt usage per KEK, reload results and dropped log lines. Read, never stored, so
    /// concurrent scrapes cannot race.
    pub fn with_state(mut self, keyring: SharedKeyring, reloads: Arc<ReloadCounters>) -> Self {
        self.registry
            .register_collector(Box::new(StateCollector { keyring, reloads }));
        self
    }

    /// Adds the backup figures (`serve --backup-dir`): the generation last backed up, when,
    /// and failed writes, so an alert can fire when backups fall behind the keystore.
    pub fn with_backups(mut self, status: Arc<crate::recovery::backup::BackupStatus>) -> Self {
        self.registry
            .register_collector(Box::new(BackupCollector { status }));
        self
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the keyring and counters at scrape time.
struct StateCollector {
    keyring: SharedKeyring,
    reloads: Arc<ReloadCounters>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ring = self.keyring.load();
        let generation = encoder.encode_descriptor(
            "localkms_keystore_generation",
            "Generation of the keystore loaded (compare with localkms_backup_generation)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(ring.generation()).unwrap_or(i64::MAX)).encode(generation)?;
        let info = ring.key_info();
        let mut keys = encoder.encode_descriptor(
            "localkms_keys",
            "KEKs in the loaded keyring by state",
            None,
            MetricType::Gauge,
        )?;
        for state in KeyState::ALL {
            let n = info.iter().filter(|k| k.state == state).count();
            ConstGauge::new(n as i64).encode(keys.encode_family(&StateLabels {
                state: state.as_str(),
            })?)?;
        }
        if let Some(p) = info.iter().find(|k| k.state == KeyState::Primary) {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let age = encoder.encode_descriptor(
                "localkms_primary_key_age_seconds",
                "Seconds since the primary KEK became primary",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(now - p.changed_at).encode(age)?;
            let mut primary = encoder.encode_descriptor(
                "localkms_primary_key_info",
                "The primary KEK's id (value is always 1)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64).encode(primary.encode_family(&KeyLabels {
                key_id: p.id.to_string(),
            })?)?;
        }
        let usage = ring.usage().snapshot();
        let mut decrypts = encoder.encode_descriptor(
            "localkms_key_decrypts",
            "Decrypts served per KEK (cumulative across restarts via the usage file)",
            None,
            MetricType::Counter,
        )?;
        for (id, n, _) in &usage {
            ConstCounter::new(*n).encode(decrypts.encode_family(&KeyLabels {
                key_id: id.to_string(),
            })?)?;
        }
        let mut last = encoder.encode_descriptor(
            "localkms_key_last_decrypt_timestamp_seconds",
            "Unix time of the last decrypt per KEK",
            None,
            MetricType::Gauge,
        )?;
        for (id, _, at) in usage.iter().filter(|u| u.2 > 0) {
            ConstGauge::new(*at).encode(last.encode_family(&KeyLabels {
                key_id: id.to_string(),
            })?)?;
        }
        let legacy = encoder.encode_descriptor(
            "localkms_legacy_envelope_decrypts",
            "Decrypts of legacy format-1 ciphertexts (openable through both APIs) since start; once it stays at 0 after a full rewrite, serve with --refuse-legacy-envelopes",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(ring.legacy().decrypts()).encode(legacy)?;
        let mut reloads = encoder.encode_descriptor(
            "localkms_keystore_reloads",
            "Keystore reloads by result (ok, refused, failed)",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [
            ("ok", &self.reloads.ok),
            ("refused", &self.reloads.refused),
            ("failed", &self.reloads.failed),
        ] {
            ConstCounter::new(n.load(Ordering::Relaxed))
                .encode(reloads.encode_family(&ResultLabels { result })?)?;
        }
        let dropped = encoder.encode_descriptor(
            "localkms_log_write_errors",
            "Log lines dropped because stderr could not be written (a closed pipe, a full disk)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(crate::telemetry::log_write_errors()).encode(dropped)?;
        // The standard process metric, so CPU per request can be read off /metrics too.
        if let Ok(cpu) = crate::client::bench::process_cpu_seconds(std::process::id()) {
            let counter = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(counter)?;
        }
        Ok(())
    }
}

/// Reads the backup progress at scrape time.
#[derive(Debug)]
struct BackupCollector {
    status: Arc<crate::recovery::backup::BackupStatus>,
}

impl Collector for BackupCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.status;
        let generation = encoder.encode_descriptor(
            "localkms_backup_generation",
            "Keystore generation of the newest backup written (0 before the first)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.generation.load(Ordering::Relaxed) as i64).encode(generation)?;
        let last = encoder.encode_descriptor(
            "localkms_backup_last_success_timestamp_seconds",
            "Unix time of the last successful backup (0 before the first)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.last_success_unix.load(Ordering::Relaxed)).encode(last)?;
        let failures = encoder.encode_descriptor(
            "localkms_backup_failures",
            "Backup writes that failed",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.failures.load(Ordering::Relaxed)).encode(failures)?;
        Ok(())
    }
}

/// Shared handle passed to the server pieces.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::usage::UsageTracker;
    use crate::keyring::Keyring;

    #[test]
    fn renders_every_documented_metric() {
        let ring = SharedKeyring::new(Keyring::from_keystore(
            crate::keystore::model::tests::fresh(),
            Arc::new(UsageTracker::default()),
        ));
        let reloads = Arc::new(ReloadCounters::default());
        let m = Metrics::new().with_state(ring.clone(), Arc::clone(&reloads));
        m.observe_request("v2", "Encrypt", tonic::Code::Ok, 0.0001);
        m.observe_request("v2", "Decrypt", tonic::Code::InvalidArgument, 0.0001);
        m.rejected_peer();
        reloads.refused.fetch_add(2, Ordering::Relaxed);
        let text = m.render();
        for needle in [
            "localkms_requests_total{api=\"v2\",method=\"Encrypt\",code=\"OK\"} 1",
            "localkms_requests_total{api=\"v2\",method=\"Decrypt\",code=\"InvalidArgument\"} 1",
            "localkms_request_duration_seconds_bucket",
            "localkms_keys{state=\"primary\"} 1",
            "localkms_keys{state=\"retired\"} 0",
            "localkms_primary_key_age_seconds",
            "localkms_primary_key_info{key_id=\"kek-",
            "localkms_keystore_generation 1",
            "localkms_keystore_reloads_total{result=\"failed\"} 0",
            "localkms_keystore_reloads_total{result=\"refused\"} 2",
            "localkms_rejected_peers_total 1",
            "localkms_build_info{version=",
            "localkms_log_write_errors_total",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(
            !text.contains("localkms_cluster_converged"),
            "file keystores have no cluster"
        );
        let etcd = Metrics::for_store(true).with_state(ring, reloads).render();
        assert!(etcd.contains("localkms_cluster_converged"), "{etcd}");
        assert_eq!(m.requests("v2", "Encrypt", tonic::Code::Ok), 1);
    }
}
