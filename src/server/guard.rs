//! The request guard: a tower layer around every RPC that bounds requests in flight (shedding
//! the excess with `ResourceExhausted` rather than queueing without bound), enforces a
//! per-request deadline, reports an oversized message as `ResourceExhausted`, and records each
//! request's metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::telemetry::metrics::Metrics;

/// Shared limits and sinks for every connection's guard.
pub struct GuardConfig {
    /// Requests allowed in flight across all connections.
    pub max_in_flight: usize,
    /// Longest a request may take.
    pub timeout: Duration,
    /// Where request metrics go.
    pub metrics: Arc<Metrics>,
}

/// The layer; clone it freely.
#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
    config: Arc<GuardConfig>,
}

impl GuardLayer {
    /// A guard with `config`'s limits.
    pub fn new(config: GuardConfig) -> Self {
        GuardLayer {
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            permits: Arc::clone(&self.permits),
            config: Arc::clone(&self.config),
        }
    }
}

/// The service the layer produces.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    permits: Arc<Semaphore>,
    config: Arc<GuardConfig>,
}

/// `(api, method)` for a gRPC path, with static strings for metric labels.
pub fn classify(path: &str) -> (&'static str, &'static str) {
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
        // The ready service goes with this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (api, method) = classify(req.uri().path());
        let permit = Arc::clone(&self.permits).try_acquire_owned();
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let start = Instant::now();
            let response = match permit {
                Err(_) => Status::resource_exhausted(format!(
                    "server busy: {} requests already in flight; retry shortly",
                    config.max_in_flight
                ))
                .into_http(),
                Ok(_permit) => match tokio::time::timeout(config.timeout, inner.call(req)).await {
                    Ok(result) => result?,
                    Err(_) => Status::deadline_exceeded(format!(
                        "request took longer than {} ms",
                        config.timeout.as_millis()
                    ))
                    .into_http(),
                },
            };
            let response = oversized_is_resource_exhausted(response);
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(Code::Ok, Code::from_i32);
            config
                .metrics
                .observe_request(api, method, code, start.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// tonic answers a message over the size limit with `OutOfRange` before reading it; localkms
/// promises `ResourceExhausted` (what grpc-go sends for the same case). None of localkms's own
/// handlers return `OutOfRange`, so the mapping cannot hide anything else.
fn oversized_is_resource_exhausted(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if out_of_range {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
