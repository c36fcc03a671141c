//! The request guard: a tower layer around every RPC that bounds requests in flight, overall
//! and per peer uid (shedding the excess with `ResourceExhausted` rather than queueing without
//! bound), enforces a per-request deadline, answers what is not a well-formed gRPC call with
//! `InvalidArgument`/`Unimplemented` (not `Internal`), reports an oversized message as
//! `ResourceExhausted`, keeps each connection's open-request count (so an idle connection can
//! be told apart), and records each request's metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::authority::ConnTicket;
use super::incoming::ConnInfo;
use crate::telemetry::metrics::Metrics;

/// Shared limits and sinks for every connection's guard.
pub struct GuardConfig {
    /// Requests allowed in flight across all connections.
    pub max_in_flight: usize,
    /// The fraction of `max_in_flight` one peer uid may hold (1.0: no per-peer limit).
    pub max_in_flight_share: f64,
    /// Longest a request may take.
    pub timeout: Duration,
    /// Where request metrics go.
    pub metrics: Arc<Metrics>,
}

impl GuardConfig {
    /// Requests one peer uid may have in flight; `None` when the share does not limit
    /// anything beyond `max_in_flight` (then the per-peer count is not kept at all).
    pub fn per_peer_limit(&self) -> Option<usize> {
        let limit =
            ((self.max_in_flight as f64 * self.max_in_flight_share).floor() as usize).max(1);
        (limit < self.max_in_flight).then_some(limit)
    }
}

/// Requests in flight per peer uid.
type PeerCounts = Arc<Mutex<HashMap<u32, usize, std::hash::BuildHasherDefault<UidHasher>>>>;

/// Uids are small integers chosen by the system, not by the caller: they need no SipHash
/// (which this map paid twice per request), the value itself spreads well enough.
#[derive(Default)]
struct UidHasher(u64);

impl std::hash::Hasher for UidHasher {
    fn finish(&self) -> u64 {
        // Spread the low bits over the whole word for the table's top-bit grouping.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

/// The layer; clone it freely.
#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
    per_peer: PeerCounts,
    /// [`GuardConfig::per_peer_limit`], worked out once.
    per_peer_limit: Option<usize>,
    config: Arc<GuardConfig>,
}

impl GuardLayer {
    /// A guard with `config`'s limits.
    pub fn new(config: GuardConfig) -> Self {
        GuardLayer {
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            per_peer: PeerCounts::default(),
            per_peer_limit: config.per_peer_limit(),
            config: Arc::new(config),
        }
    }

    /// Requests in flight right now, across every connection (what a drain waits for).
    pub fn in_flight(&self) -> usize {
        self.config
            .max_in_flight
            .saturating_sub(self.permits.available_permits())
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            permits: Arc::clone(&self.permits),
            per_peer: Arc::clone(&self.per_peer),
            per_peer_limit: self.per_peer_limit,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service the layer produces.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    permits: Arc<Semaphore>,
    per_peer: PeerCounts,
    per_peer_limit: Option<usize>,
    config: Arc<GuardConfig>,
}

/// One request's share of its peer's in-flight count, returned on drop.
struct PeerSlot {
    counts: PeerCounts,
    uid: u32,
}

impl PeerSlot {
    /// Takes a slot for `uid` unless it already holds `limit`.
    fn try_take(counts: &PeerCounts, uid: u32, limit: usize) -> Option<PeerSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: Arc::clone(counts),
            uid,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// A request open on a connection: counted on the connection's ticket while it lives.
struct OpenRequest(Option<Arc<ConnTicket>>);

impl OpenRequest {
    fn start(ticket: Option<Arc<ConnTicket>>) -> Self {
        if let Some(t) = &ticket {
            t.active.fetch_add(1, Ordering::Relaxed);
        }
        OpenRequest(ticket)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.mark_idle_now();
            t.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a request is not a gRPC call this server can take, if it is not.
fn not_grpc<B>(req: &http::Request<B>) -> Option<Status> {
    if req.method() != http::Method::POST {
        return Some(Status::unimplemented(format!(
            "{} is not a gRPC call: this socket serves only the KMS gRPC API (POST with content-type application/grpc)",
            req.method()
        )));
    }
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let grpc = content_type == b"application/grpc"
        || content_type.starts_with(b"application/grpc+")
        || content_type.starts_with(b"application/grpc;");
    (!grpc).then(|| {
        Status::invalid_argument(format!(
            "content-type {:?} is not a gRPC content type; send application/grpc",
            String::from_utf8_lossy(content_type)
                .chars()
                .take(64)
                .collect::<String>()
        ))
    })
}

/// `(api, method)` for a gRPC path, with static strings for metric labels.
pub(super) fn classify(path: &str) -> (&'static str, &'static str) {
    let api = if path.starts_with("/v2.KeyManagementService/") {
        "v2"
    } else if path.starts_with("/v1beta1.KeyManagementService/") {
        "v1"
    } else {
        return ("other", "other");
    };
    let method = match path.rsplit('/').next() {
        Some("Status") => "Status",
        Some("Encrypt") => "Encrypt",
        Some("Decrypt") => "Decrypt",
        Some("Version") => "Version",
        _ => "other",
    };
    (api, method)
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (api, method) = classify(req.uri().path());
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let open = OpenRequest::start(conn.as_ref().and_then(|c| c.ticket.clone()));
        let uid = conn.and_then(|c| c.peer).map_or(u32::MAX, |p| p.uid);
        let rejected = not_grpc(&req);
        let permit = Arc::clone(&self.permits).try_acquire_owned();
        let config = Arc::clone(&self.config);
        // Without a per-peer limit no slot is taken (and no lock touched): `Ok(None)`.
        let peer_slot = match (&rejected, &permit, self.per_peer_limit) {
            (None, Ok(_), None) => Ok(None),
            (None, Ok(_), Some(limit)) => PeerSlot::try_take(&self.per_peer, uid, limit)
                .map(Some)
                .ok_or(limit),
            (_, _, limit) => Err(limit.unwrap_or(0)),
        };
        // The inner service (tonic's router) is always ready, and this call was preceded by
        // our poll_ready, which polled it: call it here, without the clone-and-swap a
        // service that can be not-ready needs.
        let decision = match (rejected, permit, peer_slot) {
            (Some(status), _, _) => Err(status),
            (None, Err(_), _) => Err(Status::resource_exhausted(format!(
                "server busy: {} requests already in flight; retry shortly",
                config.max_in_flight
            ))),
            (None, Ok(_), Err(limit)) => Err(Status::resource_exhausted(format!(
                "server busy: peer uid {uid} already has {limit} requests in flight, its share (--max-in-flight-share) of --max-in-flight; retry shortly"
            ))),
            (None, Ok(permit), Ok(slot)) => {
                // A client deadline no later than ours is enforced by the client (it resets
                // the stream, which drops this future): no timer of our own is needed.
                let timer = !client_deadline_within(&req, config.timeout);
                Ok((self.inner.call(req), permit, slot, timer))
            }
        };
        Box::pin(async move {
            let _open = open;
            let start = Instant::now();
            let response = match decision {
                Err(status) => status.into_http(),
                Ok((call, _permit, _slot, false)) => call.await?,
                Ok((call, _permit, _slot, true)) => {
                    match tokio::time::timeout(config.timeout, call).await {
                        Ok(result) => result?,
                        Err(_) => Status::deadline_exceeded(format!(
                            "request took longer than {} ms",
                            config.timeout.as_millis()
                        ))
                        .into_http(),
                    }
                }
            };
            let (response, code) = caller_errors_named(response);
            config
                .metrics
                .observe_request(api, method, code, start.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// Whether the request carries a `grpc-timeout` no longer than `limit` (gRPC over HTTP/2:
/// up to 8 digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`).
pub(super) fn client_deadline_within<B>(
    req: &http::Request<B>,
    limit: std::time::Duration,
) -> bool {
    let Some(v) = req.headers().get(&GRPC_TIMEOUT).map(|v| v.as_bytes()) else {
        return false;
    };
    let Some((&unit, digits)) = v.split_last() else {
        return false;
    };
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let n: u64 = digits
        .iter()
        .fold(0, |acc, d| acc * 10 + u64::from(d - b'0'));
    let d = match unit {
        b'H' => std::time::Duration::from_secs(n.saturating_mul(3600)),
        b'M' => std::time::Duration::from_secs(n.saturating_mul(60)),
        b'S' => std::time::Duration::from_secs(n),
        b'm' => std::time::Duration::from_millis(n),
        b'u' => std::time::Duration::from_micros(n),
        b'n' => std::time::Duration::from_nanos(n),
        _ => return false,
    };
    d <= limit
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The response's gRPC code, with tonic's answers to the caller's own mistakes renamed to
/// what localkms promises (one header lookup; a successful call carries its status in the
/// trailers, so an absent header means OK):
/// - a message over the size limit: tonic says `OutOfRange` before reading it; localkms
///   answers `ResourceExhausted`, as grpc-go does. None of localkms's handlers return
///   `OutOfRange`, so the mapping hides nothing else.
/// - a body that is not valid protobuf, or a call with no message: tonic says `Internal`;
///   localkms answers `InvalidArgument` (its handlers never return `Internal` with these
///   messages).
fn caller_errors_named(
    mut response: http::Response<tonic::body::Body>,
) -> (http::Response<tonic::body::Body>, Code) {
    let code = match response.headers().get(&GRPC_STATUS) {
        None => return (response, Code::Ok),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(Code::Ok, Code::from_i32),
    };
    match code {
        Code::OutOfRange => {
            response
                .headers_mut()
                .insert(GRPC_STATUS, http::HeaderValue::from_static("8"));
            (response, Code::ResourceExhausted)
        }
        Code::Internal => {
            let message = response
                .headers()
                .get(&GRPC_MESSAGE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).replace("%20", " "))
                .unwrap_or_default();
            let replacement = if message.starts_with("failed to decode Protobuf message") {
                "request body is not a valid protobuf message for this method"
            } else if message.starts_with("Missing request message") {
                "request has no message: a unary call must send exactly one"
            } else {
                return (response, code);
            };
            let headers = response.headers_mut();
            headers.insert(GRPC_STATUS, http::HeaderValue::from_static("3"));
            if let Ok(v) = http::HeaderValue::from_str(&replacement.replace(' ', "%20")) {
                headers.insert(GRPC_MESSAGE, v);
            }
            (response, Code::InvalidArgument)
        }
        _ => (response, code),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_client_deadline_within_ours_replaces_our_timer() {
        let with = |v: &str| {
            http::Request::builder()
                .header("grpc-timeout", v)
                .body(())
                .expect("request")
        };
        let limit = std::time::Duration::from_secs(5);
        for ok in ["3S", "2999m", "100u", "5S", "1n"] {
            assert!(client_deadline_within(&with(ok), limit), "{ok}");
        }
        for no in ["6S", "1H", "1M", "S", "123456789S", "3x", "-1S"] {
            assert!(!client_deadline_within(&with(no), limit), "{no}");
        }
        let none = http::Request::builder().body(()).expect("request");
        assert!(!client_deadline_within(&none, limit));
    }

    use super::*;

    #[test]
    fn per_peer_limits() {
        let config = |share| GuardConfig {
            max_in_flight: 64,
            max_in_flight_share: share,
            timeout: Duration::from_secs(1),
            metrics: Arc::new(Metrics::new()),
        };
        assert_eq!(config(0.5).per_peer_limit(), Some(32));
        assert_eq!(config(1.0).per_peer_limit(), None);
        assert_eq!(config(0.001).per_peer_limit(), Some(1));
        let counts = PeerCounts::default();
        let a: Vec<_> = (0..2)
            .map(|_| PeerSlot::try_take(&counts, 7, 2).expect("slot"))
            .collect();
        assert!(
            PeerSlot::try_take(&counts, 7, 2).is_none(),
            "uid 7 is at its share"
        );
        assert!(PeerSlot::try_take(&counts, 8, 2).is_some(), "uid 8 is not");
        drop(a);
        assert!(
            PeerSlot::try_take(&counts, 7, 2).is_some(),
            "slots come back"
        );
    }

    #[test]
    fn non_grpc_requests_are_named() {
        let get = http::Request::get("/v2.KeyManagementService/Status")
            .body(())
            .expect("req");
        assert_eq!(not_grpc(&get).map(|s| s.code()), Some(Code::Unimplemented));
        let json = http::Request::post("/v2.KeyManagementService/Status")
            .header("content-type", "application/json")
            .body(())
            .expect("req");
        assert_eq!(
            not_grpc(&json).map(|s| s.code()),
            Some(Code::InvalidArgument)
        );
        let ok = http::Request::post("/v2.KeyManagementService/Status")
            .header("content-type", "application/grpc+proto")
            .body(())
            .expect("req");
        assert!(not_grpc(&ok).is_none());
    }

    #[test]
    fn paths_classify() {
        assert_eq!(
            classify("/v2.KeyManagementService/Encrypt"),
            ("v2", "Encrypt")
        );
        assert_eq!(
            classify("/v1beta1.KeyManagementService/Version"),
            ("v1", "Version")
        );
        assert_eq!(classify("/v2.KeyManagementService/Nope"), ("v2", "other"));
        assert_eq!(classify("/grpc.health.v1.Health/Check"), ("other", "other"));
    }
}
