//! The optional HTTP listener: `/metrics`, `/healthz`, `/readyz`, `/livez`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;
use crate::keyring::SharedKeyring;

/// Why the HTTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Refused a non-loopback address without the explicit flag.
    #[error("--metrics-addr {0} is not a loopback address; metrics and health carry key ids and usage, so pass --metrics-allow-non-loopback to expose them beyond this host")]
    NotLoopback(SocketAddr),
    /// Bind failed.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoints {
    /// The live keyring.
    pub keyring: SharedKeyring,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Whether the socket path is still this server's socket (none: not watched): readiness
    /// fails when the apiserver can no longer reach the server.
    pub socket_ours: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Binds `addr` (loopback only unless `allow_non_loopback`).
pub async fn bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<TcpListener, HttpError> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(HttpError::NotLoopback(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// Answers one request.
pub fn respond(ep: &Endpoints, path: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => text(
            StatusCode::OK,
            ep.metrics.render(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" | "/readyz" => {
            let socket_ours = ep
                .socket_ours
                .as_ref()
                .is_none_or(|f| f.load(std::sync::atomic::Ordering::Acquire));
            if !socket_ours {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the socket file is gone or no longer this server's\n".to_owned(),
                    PLAIN,
                );
            }
            let ring = ep.keyring.load();
            let status = if ring.healthy() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{}\n", ring.health()), PLAIN)
        }
        "/livez" => text(StatusCode::OK, "ok\n".to_owned(), PLAIN),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz or /livez\n".to_owned(),
            PLAIN,
        ),
    }
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ep: Endpoints,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ep = ep.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(&ep, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Keyring;

    fn endpoints(ring: Keyring) -> Endpoints {
        let keyring = SharedKeyring::new(ring);
        Endpoints {
            metrics: Arc::new(Metrics::new().with_state(keyring.clone(), Default::default())),
            keyring,
            socket_ours: None,
        }
    }

    async fn body(resp: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn health_is_503_with_the_reason_without_a_primary() {
        let ep = endpoints(Keyring::empty());
        for path in ["/healthz", "/readyz"] {
            let (status, text) = body(respond(&ep, path)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(text, "no primary key loaded\n");
        }
        assert_eq!(body(respond(&ep, "/livez")).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn health_is_200_with_a_primary() {
        let ring =
            Keyring::from_keystore(crate::keystore::model::tests::fresh(), Default::default());
        let ep = endpoints(ring);
        assert_eq!(
            body(respond(&ep, "/readyz")).await,
            (StatusCode::OK, "ok\n".to_owned())
        );
        let (status, text) = body(respond(&ep, "/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("localkms_keys{state=\"primary\"} 1"));
    }

    #[tokio::test]
    async fn non_loopback_needs_the_flag() {
        let addr: SocketAddr = "0.0.0.0:0".parse().expect("addr");
        assert!(matches!(
            bind(addr, false).await,
            Err(HttpError::NotLoopback(_))
        ));
    }
}
