//! A small etcd v3 client for the etcd keystore backend: get, compare-and-swap put, prefix
//! listing, leases and watches, over tonic (TLS with client certificates, as a control plane's
//! etcd requires).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcd::kv_client::KvClient;
use crate::proto::etcd::lease_client::LeaseClient;
use crate::proto::etcd::request_op::Request as Op;
use crate::proto::etcd::watch_client::WatchClient;
use crate::proto::etcd::watch_request::RequestUnion;
use crate::proto::etcd::{
    Compare, KeyValue, LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};

/// How long one etcd request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call keeps going round the members while none can answer (an election after a
/// member died takes a few seconds on a loaded machine).
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(6);

/// A member that could not be connected to at all (as opposed to one that answered badly).
fn unreachable(status: &tonic::Status) -> bool {
    let m = status.message();
    status.code() == tonic::Code::Unavailable
        && (m.contains("connect") || m.contains("transport error") || m.contains("refused"))
}

/// What a set of per-endpoint errors points at, for the end of the message: a TLS hint only
/// when TLS is in use and an error looks like a TLS failure, a quorum hint when members are
/// up but have no leader, a reachability hint when none could be connected to.
fn rpc_hint(tls: bool, statuses: &[&tonic::Status]) -> &'static str {
    let said = |needles: &[&str]| {
        statuses.iter().any(|s| {
            let m = s.message().to_ascii_lowercase();
            needles.iter().any(|n| m.contains(n))
        })
    };
    // Under TLS a refused handshake reaches us as a bare "transport error", like a refused
    // connection: the hint then names both.
    if tls
        && said(&[
            "certificate",
            "tls",
            "handshake",
            "unknownissuer",
            "badsignature",
            "transport error",
        ])
    {
        " (is etcd reachable, and are --etcd-cacert, --etcd-cert and --etcd-key right for it?)"
    } else if said(&["leader", "timed out", "timeout", "deadline"]) {
        " (the members are up but not answering: has etcd lost quorum? localkms keeps serving what it loaded)"
    } else if !statuses.is_empty() && statuses.iter().all(|s| unreachable(s)) {
        " (is etcd running, and are the endpoints right?)"
    } else {
        ""
    }
}

/// Errors another member (or the same one, a moment later) may not give: unreachable, timed
/// out, or no leader yet.
fn retryable(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => true,
        Code::Unknown => {
            let m = status.message();
            m.contains("leader") || m.contains("timed out") || m.contains("Timeout")
        }
        _ => false,
    }
}

/// Why etcd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The `etcd://` URL is malformed.
    #[error("{0:?} is not an etcd keystore URL: write etcd://HOST:PORT[,HOST:PORT...]/PREFIX")]
    BadUrl(String),
    /// A TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Only part of a client certificate pair was given.
    #[error("--etcd-cert and --etcd-key go together; pass both or neither")]
    HalfIdentity,
    /// The endpoint could not be set up.
    #[error("etcd endpoint {endpoint}: {source}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// An etcd call failed.
    #[error("etcd {call} failed: {each}{hint}")]
    Rpc {
        /// Which call.
        call: &'static str,
        /// Each endpoint tried and its own error (`HOST:PORT: message; …`).
        each: String,
        /// What the errors point at, when they point somewhere (see [`rpc_hint`]).
        hint: &'static str,
        /// The last gRPC status.
        status: tonic::Status,
    },
    /// A watch or keep-alive stream ended.
    #[error("etcd {0} stream ended")]
    StreamEnded(&'static str),
    /// No member answered in time (what was asked, and how long was waited).
    #[error("etcd did not answer {0} (is it reachable, and does it have quorum?)")]
    NoAnswer(&'static str),
    /// No TLS was configured and plaintext was not asked for.
    #[error("refusing to reach {0} without TLS: the sealed keystore, the node records and decrypt usage would cross the network in clear. Pass --etcd-cacert, --etcd-cert and --etcd-key (a control plane's etcd requires them), or --etcd-insecure for an etcd on this host's loopback")]
    Plaintext(String),
    /// `--etcd-insecure` with an endpoint off loopback.
    #[error("--etcd-insecure allows plaintext to loopback endpoints only, and {0} is not one; use --etcd-cacert, --etcd-cert and --etcd-key")]
    InsecureRemote(String),
    /// The client key file is not private.
    #[error("etcd client key: {0}")]
    KeyFile(String),
}

/// Where in etcd a keystore lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTarget {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash (e.g. `/localkms`).
    pub prefix: String,
}

impl EtcdTarget {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
    pub fn parse(url: &str) -> Result<Self, EtcdError> {
        let bad = || EtcdError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("etcd://").ok_or_else(bad)?;
        let (hosts, prefix) = rest.split_once('/').ok_or_else(bad)?;
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        if endpoints.iter().any(|e| e.is_empty() || !e.contains(':')) {
            return Err(bad());
        }
        let prefix = format!("/{}", prefix.trim_end_matches('/'));
        if prefix == "/" {
            return Err(bad());
        }
        Ok(EtcdTarget { endpoints, prefix })
    }

    /// The key holding the sealed keystore blob.
    pub fn keystore_key(&self) -> String {
        format!("{}/keystore", self.prefix)
    }

    /// The prefix under which servers publish what they loaded.
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// The prefix under which servers publish their release and capability, beside (not
    /// under) [`Self::nodes_prefix`]: release 0.3.0 reads every key under that one as a node
    /// record.
    pub fn capabilities_prefix(&self) -> String {
        format!("{}/node-capabilities/", self.prefix)
    }

    /// The prefix of the known-node registry: every node that has published to this
    /// keystore, kept (without a lease) until `localkms nodes forget`.
    pub fn known_prefix(&self) -> String {
        format!("{}/known-nodes/", self.prefix)
    }
}

impl std::fmt::Display for EtcdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

/// TLS material for etcd. With none, the client refuses to connect unless `insecure` is set
/// and every endpoint is on loopback: the sealed keystore, node records and usage must never
/// cross a network in clear by accident.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// CA bundle that signed the etcd server certificates.
    pub cacert: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client key (owner-only, like a root key file).
    pub key: Option<PathBuf>,
    /// `--etcd-insecure`: allow plaintext, to loopback endpoints only.
    pub insecure: bool,
}

/// Whether `endpoint` (`host:port`) is on this host's loopback.
fn is_loopback(endpoint: &str) -> bool {
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl EtcdTls {
    fn enabled(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Refuses plaintext unless asked for, and then anywhere but loopback.
    fn check_plaintext(&self, target: &EtcdTarget) -> Result<(), EtcdError> {
        if self.enabled() {
            return Ok(());
        }
        if !self.insecure {
            return Err(EtcdError::Plaintext(target.to_string()));
        }
        match target.endpoints.iter().find(|e| !is_loopback(e)) {
            Some(remote) => Err(EtcdError::InsecureRemote(remote.clone())),
            None => Ok(()),
        }
    }

    fn config(&self) -> Result<ClientTlsConfig, EtcdError> {
        let read = |p: &PathBuf| {
            crate::keystore::read_regular(p, 1024 * 1024).map_err(|source| EtcdError::TlsFile {
                path: p.clone(),
                source,
            })
        };
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.cacert {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key_path)) => {
                let meta = std::fs::metadata(key_path).map_err(|source| EtcdError::TlsFile {
                    path: key_path.clone(),
                    source,
                })?;
                crate::keystore::root_key::check_private(key_path, &meta)
                    .map_err(|e| EtcdError::KeyFile(e.to_string()))?;
                let key = zeroize::Zeroizing::new(read(key_path)?);
                tls = tls.identity(Identity::from_pem(read(cert)?, &*key));
            }
            (None, None) => {}
            _ => return Err(EtcdError::HalfIdentity),
        }
        Ok(tls)
    }
}

/// What a compare-and-swap expects the key to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key's last modification must be this revision.
    ModRevision(i64),
}

/// A live watch: responses arrive on `stream`; dropping it cancels the watch.
pub struct Watch {
    /// Watch responses, each carrying the events since the last.
    pub stream: tonic::Streaming<WatchResponse>,
    /// Closing the request side would end the watch, so it lives as long as the stream.
    _requests: tokio::sync::mpsc::Sender<WatchRequest>,
}

/// A connected client (the connection is made lazily and re-made after failures).
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    /// One lazily connected channel per member, built on first use (inside the runtime).
    channels: std::sync::Arc<tokio::sync::OnceCell<Vec<Channel>>>,
    /// The member that answered last; tried first next time.
    preferred: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    target: EtcdTarget,
    /// Whether TLS is in use: only then can an error be a TLS problem.
    tls: bool,
}

impl Etcd {
    /// A client for `target`, balancing across its endpoints.
    pub fn connect(target: &EtcdTarget, tls: &EtcdTls) -> Result<Self, EtcdError> {
        tls.check_plaintext(target)?;
        let scheme = if tls.enabled() { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for e in &target.endpoints {
            let url = format!("{scheme}://{e}");
            let mut ep = Endpoint::from_shared(url.clone())
                .map_err(|source| EtcdError::Endpoint {
                    endpoint: url.clone(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(2))
                .timeout(REQUEST_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            if tls.enabled() {
                ep = ep
                    .tls_config(tls.config()?)
                    .map_err(|source| EtcdError::Endpoint {
                        endpoint: url.clone(),
                        source,
                    })?;
            }
            endpoints.push(ep);
        }
        Ok(Etcd {
            endpoints,
            channels: std::sync::Arc::new(tokio::sync::OnceCell::new()),
            preferred: std::sync::Arc::default(),
            target: target.clone(),
            tls: tls.enabled(),
        })
    }

    /// Runs `call` against the members in turn, starting with the one that answered last,
    /// moving on when a member is unreachable, timed out, or has no leader (an election after
    /// a member died). When every member failed that way it tries the round again after a
    /// pause, until [`FAILOVER_DEADLINE`] has passed. Any other error is final. Retrying is
    /// safe: reads are idempotent, and every keystore write is a compare-and-swap that a
    /// second attempt cannot apply twice.
    async fn failover<T, F, Fut>(&self, name: &'static str, call: F) -> Result<T, EtcdError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        use std::sync::atomic::Ordering;
        let channels = self
            .channels
            .get_or_init(|| async { self.endpoints.iter().map(Endpoint::connect_lazy).collect() })
            .await;
        let started = tokio::time::Instant::now();
        // Each member's latest error, for a message that names every one.
        let mut last: Vec<Option<tonic::Status>> = vec![None; channels.len()];
        loop {
            let start = self.preferred.load(Ordering::Relaxed);
            // Whether any member is up but cannot answer yet (no leader, timed out): only
            // then is another round worth waiting for. When none can even be connected to,
            // etcd is down and the caller hears so at once.
            let mut electing = false;
            for i in 0..channels.len() {
                let idx = (start + i) % channels.len();
                match call(channels[idx].clone()).await {
                    Ok(v) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(status) if retryable(&status) => {
                        electing |= !unreachable(&status);
                        last[idx] = Some(status);
                    }
                    Err(status) => {
                        last[idx] = Some(status);
                        return Err(self.rpc_error(name, last));
                    }
                }
            }
            if !electing || started.elapsed() >= FAILOVER_DEADLINE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(self.rpc_error(name, last))
    }

    /// The error for a stream of `call` on the member that answered last.
    fn rpc(&self, call: &'static str) -> impl Fn(tonic::Status) -> EtcdError + '_ {
        move |status| {
            let mut errors = vec![None; self.target.endpoints.len()];
            let idx = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
            if let Some(slot) = errors.get_mut(idx) {
                *slot = Some(status);
            }
            self.rpc_error(call, errors)
        }
    }

    /// The error for `call` from each member's latest error (`None`: not tried).
    fn rpc_error(&self, call: &'static str, errors: Vec<Option<tonic::Status>>) -> EtcdError {
        let tried: Vec<(&String, &tonic::Status)> = self
            .target
            .endpoints
            .iter()
            .zip(errors.iter())
            .filter_map(|(e, s)| s.as_ref().map(|s| (e, s)))
            .collect();
        let each = if tried.is_empty() {
            "no etcd endpoints".to_owned()
        } else {
            tried
                .iter()
                .map(|(e, s)| format!("{e}: {}", s.message()))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let statuses: Vec<&tonic::Status> = tried.iter().map(|(_, s)| *s).collect();
        let hint = rpc_hint(self.tls, &statuses);
        let status = errors
            .into_iter()
            .flatten()
            .last()
            .unwrap_or_else(|| tonic::Status::unavailable("no etcd endpoints"));
        EtcdError::Rpc {
            call,
            each,
            hint,
            status,
        }
    }

    /// Where this client points.
    pub fn target(&self) -> &EtcdTarget {
        &self.target
    }

    /// The value and modification revision of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        Ok(self.get_with_revision(key).await?.0)
    }

    /// As [`get`](Self::get), plus the store's current revision (where a watch that must not
    /// miss later changes starts).
    pub async fn get_with_revision(&self, key: &str) -> Result<(Option<KeyValue>, i64), EtcdError> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let resp = self.range(request).await?;
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        Ok((resp.kvs.into_iter().next(), revision))
    }

    /// One Range call, with failover.
    async fn range(
        &self,
        request: RangeRequest,
    ) -> Result<crate::proto::etcd::RangeResponse, EtcdError> {
        Ok(self
            .failover("Range", |ch| {
                let request = request.clone();
                async move { KvClient::new(ch).range(request).await }
            })
            .await?
            .into_inner())
    }

    /// Every key and value under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        Ok(self.range(request).await?.kvs)
    }

    /// One page of the keys in `[from, range_end)` at `revision` (0: the current one), at most
    /// `limit` of them: the keys and values, whether more follow, the total in the range and
    /// the revision read. Responses up to 256 MiB are accepted (a page of large objects); a
    /// caller that hits even that limit retries with a smaller `limit`.
    pub async fn page(
        &self,
        from: &[u8],
        range_end: &[u8],
        limit: i64,
        revision: i64,
    ) -> Result<Page, EtcdError> {
        let request = RangeRequest {
            key: from.to_vec(),
            range_end: range_end.to_vec(),
            limit,
            revision,
            ..Default::default()
        };
        let resp = self
            .failover("Range", |ch| {
                let request = request.clone();
                async move {
                    KvClient::new(ch)
                        .max_decoding_message_size(256 * 1024 * 1024)
                        .range(request)
                        .await
                }
            })
            .await?
            .into_inner();
        Ok(Page {
            revision: resp.header.as_ref().map_or(revision, |h| h.revision),
            more: resp.more,
            count: resp.count,
            kvs: resp.kvs,
        })
    }

    /// Writes `value` at `key` only if `expect` holds; `false` when another writer got there
    /// first.
    pub async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<bool, EtcdError> {
        let compare = match expect {
            Expect::Absent => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: key.as_bytes().to_vec(),
                target_union: Some(TargetUnion::CreateRevision(0)),
            },
            Expect::ModRevision(rev) => Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.as_bytes().to_vec(),
                target_union: Some(TargetUnion::ModRevision(rev)),
            },
        };
        let request = TxnRequest {
            compare: vec![compare],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: key.as_bytes().to_vec(),
                    value,
                    lease: 0,
                })),
            }],
            failure: Vec::new(),
        };
        let resp = self
            .failover("Txn", |ch| {
                let request = request.clone();
                async move { KvClient::new(ch).txn(request).await }
            })
            .await?
            .into_inner();
        Ok(resp.succeeded)
    }

    /// Writes `value` at `key`, attached to `lease` (0 for none).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
        };
        self.failover("Put", |ch| {
            let request = request.clone();
            async move { KvClient::new(ch).put(request).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let request = crate::proto::etcd::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        };
        let resp = self
            .failover("DeleteRange", |ch| {
                let request = request.clone();
                async move { KvClient::new(ch).delete_range(request).await }
            })
            .await?
            .into_inner();
        Ok(resp.deleted > 0)
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let resp = self
            .failover("LeaseGrant", |ch| async move {
                LeaseClient::new(ch)
                    .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                    .await
            })
            .await?
            .into_inner();
        Ok(resp.id)
    }

    /// Refreshes `lease` once; returns its remaining TTL (0 when it has expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let mut stream = self
            .failover("LeaseKeepAlive", |ch| async move {
                LeaseClient::new(ch)
                    .lease_keep_alive(tokio_stream::once(LeaseKeepAliveRequest { id: lease }))
                    .await
            })
            .await?
            .into_inner();
        match stream.message().await.map_err(self.rpc("LeaseKeepAlive"))? {
            Some(resp) => Ok(resp.ttl),
            None => Err(EtcdError::StreamEnded("LeaseKeepAlive")),
        }
    }

    /// Watches `key` for changes after `after_revision`.
    pub async fn watch(&self, key: &str, after_revision: i64) -> Result<Watch, EtcdError> {
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.as_bytes().to_vec(),
                range_end: Vec::new(),
                start_revision: after_revision + 1,
            })),
        };
        let senders = std::sync::Mutex::new(Vec::new());
        let stream = self
            .failover("Watch", |ch| {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let _ = tx.try_send(create.clone());
                senders.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
                async move {
                    WatchClient::new(ch)
                        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                }
            })
            .await?
            .into_inner();
        // The sender of the attempt that succeeded is the last one made.
        let tx = senders
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or(EtcdError::StreamEnded("Watch"))?;
        Ok(Watch {
            stream,
            _requests: tx,
        })
    }
}

/// The range end that selects every key starting with `prefix`.
/// One page of a range read ([`Etcd::page`]).
#[derive(Debug)]
pub struct Page {
    /// The revision the page was read at: read later pages at it for one consistent view.
    pub revision: i64,
    /// Whether keys follow this page.
    pub more: bool,
    /// Keys in the whole range (at `revision`).
    pub count: i64,
    /// The keys and values.
    pub kvs: Vec<KeyValue>,
}

/// The end of the range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    fn client(tls: bool) -> Etcd {
        let target = EtcdTarget::parse("etcd://127.0.0.1:1,127.0.0.1:2/p").expect("url");
        let mut e = Etcd::connect(
            &target,
            &EtcdTls {
                insecure: true,
                ..Default::default()
            },
        )
        .expect("client");
        e.tls = tls;
        e
    }

    #[test]
    fn rpc_errors_name_each_endpoint_and_hint_only_at_the_likely_cause() {
        use tonic::Status;
        let refused = Status::unavailable("tcp connect error: Connection refused");
        let e =
            client(false).rpc_error("Range", vec![Some(refused.clone()), Some(refused.clone())]);
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.1:1: tcp connect error")
                && text.contains("127.0.0.1:2: tcp connect error"),
            "{text}"
        );
        assert!(text.contains("is etcd running"), "{text}");
        assert!(
            !text.contains("--etcd-cacert"),
            "no TLS hint without TLS: {text}"
        );

        let no_leader = Status::unknown("etcdserver: no leader");
        let text = client(true)
            .rpc_error("Range", vec![Some(no_leader.clone()), Some(no_leader)])
            .to_string();
        assert!(text.contains("lost quorum"), "{text}");
        assert!(
            !text.contains("--etcd-cacert"),
            "quorum loss is not a TLS problem: {text}"
        );

        let cert = Status::unavailable("transport error: invalid peer certificate: UnknownIssuer");
        let text = client(true)
            .rpc_error("Range", vec![Some(cert.clone()), None])
            .to_string();
        assert!(text.contains("--etcd-cacert"), "{text}");
        assert!(
            !text.contains("127.0.0.1:2:"),
            "an endpoint not tried is not named: {text}"
        );
        let text = client(false)
            .rpc_error("Range", vec![Some(cert), None])
            .to_string();
        assert!(!text.contains("--etcd-cacert"), "{text}");
    }

    use super::*;

    #[test]
    fn plaintext_only_on_request_and_only_to_loopback() {
        let target = |e: &str| EtcdTarget::parse(&format!("etcd://{e}/p")).expect("target");
        let plain = EtcdTls::default();
        let insecure = EtcdTls {
            insecure: true,
            ..EtcdTls::default()
        };
        let err = Etcd::connect(&target("127.0.0.1:2379"), &plain)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("--etcd-insecure"), "{err}");
        for ok in [
            "127.0.0.1:2379",
            "localhost:2379",
            "[::1]:2379",
            "127.0.0.2:1,localhost:2",
        ] {
            assert!(Etcd::connect(&target(ok), &insecure).is_ok(), "{ok}");
        }
        let err = Etcd::connect(&target("127.0.0.1:2379,10.0.0.5:2379"), &insecure)
            .err()
            .expect("remote refused");
        assert!(err.to_string().contains("10.0.0.5:2379"), "{err}");
    }

    #[test]
    fn urls_parse() {
        let t = EtcdTarget::parse("etcd://10.0.0.1:2379,10.0.0.2:2379/localkms").expect("url");
        assert_eq!(t.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(t.prefix, "/localkms");
        assert_eq!(t.keystore_key(), "/localkms/keystore");
        assert_eq!(t.nodes_prefix(), "/localkms/nodes/");
        assert_eq!(t.to_string(), "etcd://10.0.0.1:2379,10.0.0.2:2379/localkms");
        assert_eq!(
            EtcdTarget::parse("etcd://h:1/a/b/").expect("nested").prefix,
            "/a/b"
        );
        for bad in [
            "etcd://h:1",
            "etcd://h:1/",
            "etcd:///x",
            "etcd://host/x",
            "http://h:1/x",
        ] {
            assert!(EtcdTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[0x61, 0xff]), vec![0x62]);
    }
}
