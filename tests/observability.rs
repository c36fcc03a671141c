//! Metrics, health endpoints, JSON logs and `localkms bench` against a live server.

mod common;
mod support;

use std::process::Command;

use common::{bin, client, free_port, http_get as get, localkms, Server, Workspace};
use localkms::proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
use localkms::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_and_exact_metric_counts() {
    // The whole serve, in-process: keystore file, reloader and metrics endpoints.
    let ws = Workspace::new();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let server = support::Serving::start(
        ws.socket.clone(),
        ws.keystore.clone(),
        ws.root_key.clone(),
        |c| c.metrics_addr = Some(addr),
    )
    .await;
    let ep = server.endpoint();

    assert_eq!(get(port, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(port, "/readyz"), (200, "ok\n".to_owned()));
    assert_eq!(get(port, "/livez"), (200, "ok\n".to_owned()));
    assert_eq!(get(port, "/nope").0, 404);

    // A known sequence of requests.
    let mut c = client(&ep).await.expect("connect");
    for _ in 0..3 {
        c.status(StatusRequest {}).await.expect("status");
    }
    let mut last = None;
    for i in 0..2u8 {
        last = Some(
            c.encrypt(EncryptRequest {
                plaintext: vec![i; 32],
                uid: "m".into(),
            })
            .await
            .expect("encrypt")
            .into_inner(),
        );
    }
    let enc = last.expect("encrypted");
    c.decrypt(DecryptRequest {
        ciphertext: enc.ciphertext.clone(),
        uid: "m".into(),
        key_id: enc.key_id.clone(),
        annotations: Default::default(),
    })
    .await
    .expect("decrypt");
    c.decrypt(DecryptRequest {
        ciphertext: b"junk".to_vec(),
        uid: "m".into(),
        key_id: enc.key_id.clone(),
        annotations: Default::default(),
    })
    .await
    .expect_err("junk");
    let mut v1 = V1Client::new(localkms::client::connect(&ep).await.expect("connect"));
    v1.version(localkms::proto::v1beta1::VersionRequest {
        version: "v1beta1".into(),
    })
    .await
    .expect("version");

    let (code, text) = get(port, "/metrics");
    assert_eq!(code, 200);
    // The readiness probe above made no gRPC calls; Serving::start's own readiness Status call
    // made exactly one.
    let expect = [
        (
            "localkms_requests_total{api=\"v2\",method=\"Status\",code=\"OK\"}",
            4.0,
        ),
        (
            "localkms_requests_total{api=\"v2\",method=\"Encrypt\",code=\"OK\"}",
            2.0,
        ),
        (
            "localkms_requests_total{api=\"v2\",method=\"Decrypt\",code=\"OK\"}",
            1.0,
        ),
        (
            "localkms_requests_total{api=\"v2\",method=\"Decrypt\",code=\"InvalidArgument\"}",
            1.0,
        ),
        (
            "localkms_requests_total{api=\"v1\",method=\"Version\",code=\"OK\"}",
            1.0,
        ),
        (
            "localkms_request_duration_seconds_count{api=\"v2\",method=\"Encrypt\"}",
            2.0,
        ),
        ("localkms_keys{state=\"primary\"}", 1.0),
        ("localkms_keys{state=\"retired\"}", 0.0),
        (
            &format!("localkms_primary_key_info{{key_id=\"{}\"}}", enc.key_id),
            1.0,
        ),
        (
            &format!("localkms_key_decrypts_total{{key_id=\"{}\"}}", enc.key_id),
            1.0,
        ),
        ("localkms_keystore_reloads_total{result=\"ok\"}", 0.0),
        ("localkms_rejected_peers_total", 0.0),
    ];
    for (line, value) in expect {
        assert_eq!(metric(&text, line), Some(value), "{line} in\n{text}");
    }
    assert!(metric(&text, "localkms_primary_key_age_seconds").is_some());
    assert!(metric(
        &text,
        &format!(
            "localkms_key_last_decrypt_timestamp_seconds{{key_id=\"{}\"}}",
            enc.key_id
        )
    )
    .is_some_and(|t| t > 1.7e9));
    assert!(text.contains("localkms_build_info{version=\""));

    // A rotation moves the key gauges and the reload counter.
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success());
    let start = std::time::Instant::now();
    loop {
        let (_, text) = get(port, "/metrics");
        if metric(&text, "localkms_keystore_reloads_total{result=\"ok\"}") == Some(1.0) {
            assert_eq!(metric(&text, "localkms_keys{state=\"retired\"}"), Some(1.0));
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "reload not counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.stop().await.expect("a clean stop, as on SIGTERM");
}

#[test]
fn non_loopback_metrics_need_the_explicit_flag() {
    let ws = Workspace::new();
    let ks = ws.keystore_args();
    let out = localkms(&[
        "serve",
        "--socket",
        ws.socket.to_str().expect("utf8"),
        &ks[0],
        &ks[1],
        &ks[2],
        &ks[3],
        "--metrics-addr",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-allow-non-loopback"), "{err}");
}

#[test]
fn json_logs_parse_as_json() {
    let ws = Workspace::new();
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&ws.socket)
        .args(ws.keystore_args())
        .args(["--log-format", "json", "--log-level", "debug"]);
    let log = ws.dir.path().join("json.log");
    let mut server = Server::spawn(cmd, ws.socket.clone(), log);
    // --log-level debug: per-request lines are present too.
    let out = ws.keys(&["rotate"]);
    assert!(out.status.success());
    server.wait_log("keystore reloaded");
    assert_eq!(server.stop("TERM").code(), Some(0));
    let text = server.log_text();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{text}");
    assert!(text.contains("\"keystore reloaded\""), "{text}");
    let request = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "request" && v["method"] == "Status")
        .unwrap_or_else(|| panic!("no per-request line: {text}"));
    for field in ["api", "uid", "key_id", "code", "latency_us"] {
        assert!(request.get(field).is_some(), "{field} missing: {request}");
    }
    assert_eq!(request["code"], "OK");
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_reports_json_and_counts_errors() {
    // bench is the process under test; the server it drives can run in-process.
    let server = support::InProcess::start().await;
    let ep = server.endpoint();
    tokio::task::spawn_blocking(move || bench_against(&ep))
        .await
        .expect("bench");
}

fn bench_against(ep: &str) {
    let ep = ep.to_owned();
    // The server runs in this process: its CPU per request is read from /proc.
    let pid = std::process::id().to_string();
    let v = common::localkms_json(&[
        "bench",
        "--socket",
        &ep,
        "--requests",
        "2000",
        "--concurrency",
        "4",
        "--server-pid",
        &pid,
        "--json",
    ]);
    let cpu = v["server_cpu_us_per_request"]
        .as_f64()
        .expect("cpu per request");
    // CPU time is counted in 10 ms ticks; 2000 debug-build requests take well over one.
    assert!(cpu > 0.0 && cpu < 1e6, "{v}");
    let out = localkms(&[
        "bench",
        "--socket",
        &ep,
        "--requests",
        "50",
        "--server-pid",
        &pid,
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("µs per request"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = localkms(&[
        "bench",
        "--socket",
        &ep,
        "--requests",
        "5",
        "--server-pid",
        "999999999",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server-pid"));
    for op in ["encrypt", "decrypt", "status", "mixed"] {
        let v = common::localkms_json(&[
            "bench",
            "--socket",
            &ep,
            "--op",
            op,
            "--requests",
            "200",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--json",
        ]);
        let requests = v["requests"].as_u64().expect("requests");
        assert_eq!(requests, if op == "mixed" { 400 } else { 200 }, "{op}: {v}");
        assert_eq!(v["errors"], serde_json::json!({}), "{op}");
        assert!(v["elapsed_s"].as_f64().expect("elapsed") > 0.0);
        assert!(v["requests_per_sec"].as_f64().expect("rps") > 0.0);
        for k in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_us"][k].as_u64().expect(k) >= 1, "{op} {k}");
        }
        assert!(v["latency_us"]["p50"].as_u64() <= v["latency_us"]["max"].as_u64());
    }
    let out = localkms(&[
        "bench",
        "--socket",
        &ep,
        "--api",
        "v1",
        "--op",
        "mixed",
        "--requests",
        "50",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["requests"], 100);

    // Every Encrypt of a 2000-byte plaintext fails: bench counts, it does not fail.
    let v = common::localkms_json(&[
        "bench",
        "--socket",
        &ep,
        "--plaintext-size",
        "2000",
        "--requests",
        "30",
        "--json",
    ]);
    assert_eq!(v["errors"]["InvalidArgument"], 30, "{v}");
    let out = localkms(&[
        "bench",
        "--socket",
        &ep,
        "--duration",
        "1s",
        "--concurrency",
        "2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("req/s") && text.contains("p99.9"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requests"),
        "progress line expected"
    );
}

/// `bench --compare` runs the same load against two endpoints in interleaved rounds and
/// reports medians and the ratio, with CPU per request when both pids are given.
#[tokio::test(flavor = "multi_thread")]
async fn bench_compares_two_endpoints_in_interleaved_rounds() {
    let a = support::InProcess::start().await;
    let b = support::InProcess::start().await;
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let v = tokio::task::spawn_blocking(move || {
        // Both servers live in this process: the same pid for each side.
        let pid = std::process::id().to_string();
        common::localkms_json(&[
            "bench",
            "--socket",
            &ea,
            "--compare",
            &eb,
            "--rounds",
            "3",
            "--requests",
            "400",
            "--concurrency",
            "4",
            "--server-pid",
            &pid,
            "--compare-pid",
            &pid,
            "--json",
        ])
    })
    .await
    .expect("bench");
    assert_eq!(v["rounds"], 3, "{v}");
    for side in ["a", "b"] {
        assert!(
            v[side]["requests_per_sec"].as_f64().expect("rps") > 0.0,
            "{v}"
        );
        assert_eq!(v[side]["errors"], 0, "{v}");
        assert!(v[side]["server_cpu_us_per_request"].is_number(), "{v}");
    }
    let ratio = v["throughput_ratio"].as_f64().expect("ratio");
    assert!(ratio > 0.0 && ratio.is_finite(), "{v}");
    assert!(v["cpu_ratio"].is_number(), "{v}");
}
