//! The request path in-process, piece by piece: the `:authority` shim on a connection that
//! needs no rewriting and on one that does, the guard's per-call decision, and the metrics
//! update. (`benches/crypto.rs` covers sealing and opening.) Timings are reported here, never
//! asserted in tests.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use localkms::server::bench_support;
use localkms::telemetry::metrics::Metrics;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The client bytes of a connection carrying `n` unary Status calls with `authority`.
fn connection(authority: &[u8], n: usize) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let mut out = PREFACE.to_vec();
    for i in 0..n {
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/v2.KeyManagementService/Status"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"2999m"),
        ]);
        let stream = u32::try_from(2 * i + 1).expect("stream id");
        out.extend_from_slice(&u32::try_from(block.len()).expect("len").to_be_bytes()[1..]);
        out.push(0x1);
        out.push(0x4);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(&block);
        // DATA: an empty gRPC message, end of stream.
        out.extend_from_slice(&[0, 0, 5, 0x0, 0x1]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0]);
    }
    out
}

fn shim(c: &mut Criterion) {
    let valid = connection(b"localhost", 100);
    let invalid = connection(b"%2Fvar%2Frun%2Fkms.sock", 100);
    c.bench_function("shim: 100 calls, valid authority (passed through)", |b| {
        b.iter(|| bench_support::shim(black_box(&valid)))
    });
    c.bench_function("shim: 100 calls, socket-path authority (rewritten)", |b| {
        b.iter(|| bench_support::shim(black_box(&invalid)))
    });
}

fn guard_and_metrics(c: &mut Criterion) {
    let req = http::Request::builder()
        .method("POST")
        .uri("/v2.KeyManagementService/Encrypt")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "2999m")
        .body(())
        .expect("request");
    c.bench_function("guard: classify the call and read grpc-timeout", |b| {
        b.iter(|| bench_support::guard_decision(black_box(&req)))
    });
    let metrics = Metrics::new();
    c.bench_function("metrics: record one request", |b| {
        b.iter(|| metrics.observe_request("v2", black_box("Encrypt"), tonic::Code::Ok, 0.000_2))
    });
}

criterion_group!(benches, shim, guard_and_metrics);
criterion_main!(benches);
