//! `localkms bench`: a load generator for any KMS v2 or v1 plugin socket.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;

use super::{connect, ClientError};
use crate::cli::{BenchApi, BenchOp};
use crate::proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
use crate::proto::v2::key_management_service_client::KeyManagementServiceClient as V2Client;
use crate::telemetry::metrics::code_name;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Socket.
    pub endpoint: String,
    /// API.
    pub api: BenchApi,
    /// Operation.
    pub op: BenchOp,
    /// Concurrent requests.
    pub concurrency: usize,
    /// Connections.
    pub connections: usize,
    /// Time limit (used when `requests` is `None`).
    pub duration: Duration,
    /// Request limit.
    pub requests: Option<u64>,
    /// Plaintext bytes per Encrypt.
    pub plaintext_size: usize,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// The server's process id: its CPU time over the run is read from `/proc` and reported
    /// per request (steadier than requests per second on a shared, noisy machine).
    pub server_pid: Option<u32>,
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn process_cpu_seconds(pid: u32) -> Result<f64, ClientError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| {
        ClientError::Contract(format!("cannot read {path}: {e} (is --server-pid right?)"))
    })?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(utime), Some(stime)) => {
            Ok((utime + stime) as f64 / rustix::param::clock_ticks_per_second() as f64)
        }
        _ => Err(ClientError::Contract(format!(
            "{path} is not in the expected format"
        ))),
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latencies {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
}

/// The result, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Requests completed (successes and errors).
    pub requests: u64,
    /// Errors by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// Wall time.
    pub elapsed_s: f64,
    /// Completed requests per second.
    pub requests_per_sec: f64,
    /// Latency of every completed request.
    pub latency_us: Latencies,
    /// With `--server-pid`: the server's CPU microseconds per completed request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_request: Option<f64>,
}

impl BenchReport {
    /// The human-readable summary.
    pub fn text(&self) -> String {
        let errors: u64 = self.errors.values().sum();
        let mut out = format!(
            "requests: {} in {:.2} s = {:.0} req/s\nlatency (µs): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\nerrors: {}",
            self.requests,
            self.elapsed_s,
            self.requests_per_sec,
            self.latency_us.p50,
            self.latency_us.p90,
            self.latency_us.p99,
            self.latency_us.p999,
            self.latency_us.max,
            errors
        );
        if let Some(cpu) = self.server_cpu_us_per_request {
            out.push_str(&format!("\nserver CPU: {cpu:.1} µs per request"));
        }
        for (code, n) in &self.errors {
            out.push_str(&format!("\n  {code}: {n}"));
        }
        out
    }
}

enum Client {
    V2(V2Client<Channel>),
    V1(V1Client<Channel>),
}

struct Shared {
    opts: BenchOptions,
    issued: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
    ciphertext: Vec<u8>,
    key_id: String,
}

impl Shared {
    fn next(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match self.opts.requests {
            Some(limit) => self.issued.fetch_add(1, Ordering::Relaxed) < limit,
            None => true,
        }
    }
}

/// The deadline kube-apiserver gives each KMS call by default (the provider's `timeout`, 3 s),
/// sent as `grpc-timeout` like grpc-go does, so the server sees what it sees in a cluster.
const APISERVER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

fn as_apiserver<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(APISERVER_DEADLINE);
    request
}

async fn one(
    client: &mut Client,
    shared: &Shared,
    op: BenchOp,
) -> Result<Option<(Vec<u8>, String)>, tonic::Status> {
    let plaintext = vec![0x5au8; shared.opts.plaintext_size];
    match (client, op) {
        (Client::V2(c), BenchOp::Status) => c
            .status(as_apiserver(crate::proto::v2::StatusRequest {}))
            .await
            .map(|_| None),
        (Client::V2(c), BenchOp::Encrypt | BenchOp::Mixed) => c
            .encrypt(as_apiserver(crate::proto::v2::EncryptRequest {
                plaintext,
                uid: "localkms-bench".into(),
            }))
            .await
            .map(|r| {
                let r = r.into_inner();
                Some((r.ciphertext, r.key_id))
            }),
        (Client::V2(c), BenchOp::Decrypt) => c
            .decrypt(as_apiserver(crate::proto::v2::DecryptRequest {
                ciphertext: shared.ciphertext.clone(),
                uid: "localkms-bench".into(),
                key_id: shared.key_id.clone(),
                annotations: Default::default(),
            }))
            .await
            .map(|_| None),
        (Client::V1(c), BenchOp::Status) => c
            .version(as_apiserver(crate::proto::v1beta1::VersionRequest {
                version: "v1beta1".into(),
            }))
            .await
            .map(|_| None),
        (Client::V1(c), BenchOp::Encrypt | BenchOp::Mixed) => c
            .encrypt(as_apiserver(crate::proto::v1beta1::EncryptRequest {
                version: "v1beta1".into(),
                plain: plaintext,
            }))
            .await
            .map(|r| Some((r.into_inner().cipher, String::new()))),
        (Client::V1(c), BenchOp::Decrypt) => c
            .decrypt(as_apiserver(crate::proto::v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher: shared.ciphertext.clone(),
            }))
            .await
            .map(|_| None),
    }
}

fn client_for(channel: Channel, api: BenchApi) -> Client {
    match api {
        BenchApi::V2 => Client::V2(V2Client::new(channel)),
        BenchApi::V1 => Client::V1(V1Client::new(channel)),
    }
}

type WorkerResult = (Histogram<u64>, BTreeMap<String, u64>);

async fn worker(mut client: Client, shared: Arc<Shared>) -> WorkerResult {
    let mut hist = new_histogram();
    let mut errors = BTreeMap::new();
    let mut record =
        |start: Instant, result: &Result<_, tonic::Status>, hist: &mut Histogram<u64>| {
            let us = (start.elapsed().as_micros() as u64).clamp(1, MAX_US);
            let _ = hist.record(us);
            shared.done.fetch_add(1, Ordering::Relaxed);
            if let Err(status) = result {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                *errors
                    .entry(code_name(status.code()).to_owned())
                    .or_insert(0) += 1;
            }
        };
    while shared.next() {
        let op = shared.opts.op;
        let start = Instant::now();
        let result = one(&mut client, &shared, op).await;
        record(start, &result, &mut hist);
        if op == BenchOp::Mixed {
            if let Ok(Some((ct, key_id))) = result {
                let start = Instant::now();
                let result = match &mut client {
                    Client::V2(c) => c
                        .decrypt(crate::proto::v2::DecryptRequest {
                            ciphertext: ct,
                            uid: "localkms-bench".into(),
                            key_id,
                            annotations: Default::default(),
                        })
                        .await
                        .map(|_| None::<(Vec<u8>, String)>),
                    Client::V1(c) => c
                        .decrypt(crate::proto::v1beta1::DecryptRequest {
                            version: "v1beta1".into(),
                            cipher: ct,
                        })
                        .await
                        .map(|_| None),
                };
                record(start, &result, &mut hist);
            }
        }
    }
    (hist, errors)
}

/// Longest latency recorded; slower requests are clamped to it.
const MAX_US: u64 = 60_000_000;

/// 1 µs to 60 s at 3 significant figures.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Runs the benchmark.
pub async fn bench(opts: BenchOptions) -> Result<BenchReport, ClientError> {
    let mut channels = Vec::new();
    for _ in 0..opts.connections.max(1) {
        channels.push(connect(&opts.endpoint).await?);
    }
    // Decrypt needs one real ciphertext from the plugin itself.
    let (ciphertext, key_id) = if opts.op == BenchOp::Decrypt {
        let mut c = client_for(channels[0].clone(), opts.api);
        let probe = Shared {
            opts: opts.clone(),
            issued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            ciphertext: Vec::new(),
            key_id: String::new(),
        };
        match one(&mut c, &probe, BenchOp::Encrypt).await {
            Ok(Some(pair)) => pair,
            Ok(None) => return Err(ClientError::Contract("Encrypt returned nothing".into())),
            Err(s) => {
                return Err(ClientError::rpc(
                    "Encrypt (to make a ciphertext to decrypt)",
                    s,
                ))
            }
        }
    } else {
        (Vec::new(), String::new())
    };
    let shared = Arc::new(Shared {
        opts: opts.clone(),
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ciphertext,
        key_id,
    });
    let cpu_before = opts.server_pid.map(process_cpu_seconds).transpose()?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..opts.concurrency.max(1) {
        let client = client_for(channels[i % channels.len()].clone(), opts.api);
        tasks.push(tokio::spawn(worker(client, Arc::clone(&shared))));
    }
    let timer = {
        let shared = Arc::clone(&shared);
        let limit = opts.requests.is_none().then_some(opts.duration);
        let progress = opts.progress;
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                if progress {
                    let mut err = std::io::stderr();
                    let _ = write!(
                        err,
                        "\r{:>6.1} s  {done} requests  {} req/s  {} errors   ",
                        start.elapsed().as_secs_f64(),
                        done - last,
                        shared.failed.load(Ordering::Relaxed)
                    );
                    let _ = err.flush();
                }
                last = done;
                if limit.is_some_and(|d| start.elapsed() >= d) {
                    shared.stop.store(true, Ordering::Relaxed);
                    return;
                }
            }
        })
    };
    let mut hist = new_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        if let Ok((h, e)) = t.await {
            let _ = hist.add(&h);
            for (code, n) in e {
                *errors.entry(code).or_insert(0) += n;
            }
        }
    }
    timer.abort();
    if opts.progress {
        crate::telemetry::eprint_lossy("\n");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let requests = hist.len();
    let server_cpu_us_per_request = match (opts.server_pid, cpu_before) {
        (Some(pid), Some(before)) if requests > 0 => {
            Some((process_cpu_seconds(pid)? - before) * 1e6 / requests as f64)
        }
        _ => None,
    };
    Ok(BenchReport {
        server_cpu_us_per_request,
        requests,
        errors,
        elapsed_s: elapsed,
        requests_per_sec: if elapsed > 0.0 {
            requests as f64 / elapsed
        } else {
            0.0
        },
        latency_us: Latencies {
            p50: hist.value_at_quantile(0.50),
            p90: hist.value_at_quantile(0.90),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
        },
    })
}

/// One side of a `bench --compare`: medians over the rounds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Side {
    /// The endpoint.
    pub endpoint: String,
    /// Median requests per second.
    pub requests_per_sec: f64,
    /// Median p50 latency, µs.
    pub p50_us: u64,
    /// Median p99 latency, µs.
    pub p99_us: u64,
    /// Median server CPU µs per request (with a pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_request: Option<f64>,
    /// Errors over every round.
    pub errors: u64,
}

/// `bench --compare`: the same load against two endpoints, interleaved round by round
/// (A B A B…), so both see the same machine; medians and the ratio B / A.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    /// Rounds run against each side.
    pub rounds: usize,
    /// The first endpoint (`--socket`).
    pub a: Side,
    /// The second endpoint (`--compare`).
    pub b: Side,
    /// B's median requests per second over A's.
    pub throughput_ratio: f64,
    /// B's median CPU per request over A's (with both pids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ratio: Option<f64>,
}

impl Comparison {
    /// The human-readable summary.
    pub fn text(&self) -> String {
        let side = |name: &str, s: &Side| {
            format!(
                "{name} {}: {:.0} req/s  p50 {} µs  p99 {} µs{}  errors {}",
                s.endpoint,
                s.requests_per_sec,
                s.p50_us,
                s.p99_us,
                s.server_cpu_us_per_request
                    .map(|c| format!("  server CPU {c:.1} µs/request"))
                    .unwrap_or_default(),
                s.errors
            )
        };
        let mut out = format!(
            "medians over {} interleaved rounds\n{}\n{}\nB/A throughput: {:.2}",
            self.rounds,
            side("A", &self.a),
            side("B", &self.b),
            self.throughput_ratio
        );
        if let Some(r) = self.cpu_ratio {
            out.push_str(&format!("\nB/A server CPU per request: {r:.2}"));
        }
        out
    }
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn side(endpoint: &str, reports: &[BenchReport]) -> Side {
    let cpu: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.server_cpu_us_per_request)
        .collect();
    Side {
        endpoint: endpoint.to_owned(),
        requests_per_sec: median_f64(reports.iter().map(|r| r.requests_per_sec).collect()),
        p50_us: median_u64(reports.iter().map(|r| r.latency_us.p50).collect()),
        p99_us: median_u64(reports.iter().map(|r| r.latency_us.p99).collect()),
        server_cpu_us_per_request: (!cpu.is_empty()).then(|| median_f64(cpu)),
        errors: reports.iter().map(|r| r.errors.values().sum::<u64>()).sum(),
    }
}

/// Runs `a` and `b` alternately for `rounds` rounds each and compares their medians.
pub async fn compare(
    a: BenchOptions,
    b: BenchOptions,
    rounds: usize,
) -> Result<Comparison, ClientError> {
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        ra.push(bench(a.clone()).await?);
        rb.push(bench(b.clone()).await?);
    }
    let (sa, sb) = (side(&a.endpoint, &ra), side(&b.endpoint, &rb));
    let ratio = |x: f64, y: f64| if x > 0.0 { y / x } else { 0.0 };
    Ok(Comparison {
        rounds: rounds.max(1),
        throughput_ratio: ratio(sa.requests_per_sec, sb.requests_per_sec),
        cpu_ratio: match (sa.server_cpu_us_per_request, sb.server_cpu_us_per_request) {
            (Some(x), Some(y)) => Some(ratio(x, y)),
            _ => None,
        },
        a: sa,
        b: sb,
    })
}
