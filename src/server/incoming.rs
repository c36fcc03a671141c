//! The accept loop: every connection is wrapped in the `:authority` shim before tonic sees it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::authority::{AuthorityShim, ConnTicket};

/// How long a new connection has to get its HTTP/2 preface read before it may be evicted to
/// make room for another.
const EVICTION_GRACE: Duration = Duration::from_millis(100);
/// How long a handshaken connection must have had no request open before it may be evicted
/// to make room for another (a client that just connected sends its first request at once).
const IDLE_EVICTION_GRACE: Duration = Duration::from_millis(500);

/// Who is on the other end of a connection, from SO_PEERCRED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Effective uid of the connecting process.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Process id, when the kernel reports one.
    pub pid: Option<i32>,
}

/// A connection as tonic sees it.
pub(super) type Connection = AuthorityShim<UnixStream>;

/// What the request guard learns about the connection a request came on (tonic puts it in
/// every request's extensions).
#[derive(Clone)]
pub(super) struct ConnInfo {
    /// The peer, from SO_PEERCRED.
    pub peer: Option<PeerInfo>,
    /// The connection's ticket, where the guard counts open requests.
    pub ticket: Option<Arc<ConnTicket>>,
}

impl Connected for AuthorityShim<UnixStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            peer: self
                .ticket()
                .and_then(|t| t.peer)
                .or_else(|| peer_of(self.get_ref())),
            ticket: self.ticket().cloned(),
        }
    }
}

/// Picks the connection to evict when every slot is taken: the oldest one still in its
/// handshake after [`EVICTION_GRACE`], else the one idle longest (at least
/// [`IDLE_EVICTION_GRACE`], with no request open). Connections that are gone are dropped from
/// `open` on the way.
fn pick_victim(open: &mut VecDeque<Arc<ConnTicket>>) -> Option<Arc<ConnTicket>> {
    open.retain(|t| !t.closed.load(Ordering::Relaxed));
    let handshaking = open.iter().position(|t| {
        !t.handshaken.load(Ordering::Relaxed) && t.accepted.elapsed() >= EVICTION_GRACE
    });
    let pos = handshaking.or_else(|| {
        open.iter()
            .enumerate()
            .filter_map(|(i, t)| t.idle_for().map(|idle| (i, idle)))
            .filter(|(_, idle)| *idle >= IDLE_EVICTION_GRACE)
            .max_by_key(|(_, idle)| *idle)
            .map(|(i, _)| i)
    })?;
    open.remove(pos)
}

/// Who may connect, and how many at once.
#[derive(Clone, Debug)]
pub struct AcceptPolicy {
    /// Peers whose uid is listed are served.
    pub allow_uids: Vec<u32>,
    /// Peers whose gid is listed are served.
    pub allow_gids: Vec<u32>,
    /// Connections open at once; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// A client must send the HTTP/2 preface within this time or is disconnected.
    pub handshake_timeout: Duration,
    /// A connection with no new request for this long is closed (clients reconnect on their
    /// next call; kube-apiserver polls Status every minute, so its connection never idles).
    pub idle_timeout: Duration,
}

impl Default for AcceptPolicy {
    fn default() -> Self {
        AcceptPolicy {
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            max_connections: 128,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl AcceptPolicy {
    /// Whether any allow list is set.
    pub fn restricts_peers(&self) -> bool {
        !self.allow_uids.is_empty() || !self.allow_gids.is_empty()
    }

    /// Whether `peer` may talk to the plugin. Without allow lists, everyone who can open the
    /// socket may.
    pub fn allows(&self, peer: &PeerInfo) -> bool {
        !self.restricts_peers()
            || self.allow_uids.contains(&peer.uid)
            || self.allow_gids.contains(&peer.gid)
    }
}

fn peer_of(stream: &UnixStream) -> Option<PeerInfo> {
    stream.peer_cred().ok().map(|c| PeerInfo {
        uid: c.uid(),
        gid: c.gid(),
        pid: c.pid(),
    })
}

/// Accepts on `listener` in a task of its own and yields shimmed connections. The peer check
/// runs before a single byte is read; refused peers are closed, logged once and counted by
/// `on_reject`. At most `max_connections` are open at once. Accept errors (for example running
/// out of file descriptors) back off instead of spinning. The task ends when the server drops
/// the stream.
pub(super) fn accept_stream(
    listener: UnixListener,
    mut rebound: Option<mpsc::Receiver<UnixListener>>,
    policy: AcceptPolicy,
    on_reject: impl Fn() + Send + 'static,
) -> ReceiverStream<Result<Connection, std::io::Error>> {
    let mut listener = listener;
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(policy.max_connections.max(1)));
    tokio::spawn(async move {
        let mut open: VecDeque<Arc<ConnTicket>> = VecDeque::new();
        // Evictions are logged at most once a second, with a count, so a flood cannot flood
        // the log too.
        let mut last_eviction_log: Option<std::time::Instant> = None;
        let mut unlogged_evictions = 0u64;
        loop {
            let slot = loop {
                if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
                    break slot;
                }
                // Every slot is taken: make room by evicting a connection that is doing
                // nothing, then wait for a slot to free up (or for the next candidate).
                if let Some(victim) = pick_victim(&mut open) {
                    unlogged_evictions += 1;
                    if last_eviction_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last_eviction_log = Some(std::time::Instant::now());
                        let peer = victim.peer;
                        tracing::warn!(
                            uid = peer.map(|p| p.uid),
                            pid = peer.and_then(|p| p.pid),
                            in_handshake = !victim.handshaken.load(Ordering::Relaxed),
                            evictions = unlogged_evictions,
                            max_connections = policy.max_connections,
                            "every connection slot is taken: closed the longest-idle connection to make room (evictions counts those since the last such message)"
                        );
                        unlogged_evictions = 0;
                    }
                    victim
                        .evicted
                        .store(true, std::sync::atomic::Ordering::Release);
                    victim.evict.notify_one();
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => break slot,
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(EVICTION_GRACE) => {}
                }
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
                // The socket file was removed and bound again (see `socket_watch`): accept
                // from the new listener from now on.
                Some(next) = async {
                    match rebound.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    listener = next;
                    drop(slot);
                    continue;
                }
            };
            match accepted {
                Ok((stream, _)) => {
                    let peer = peer_of(&stream);
                    let allowed = peer.as_ref().is_some_and(|p| policy.allows(p))
                        || (!policy.restricts_peers() && peer.is_none());
                    if !allowed {
                        match peer {
                            Some(p) => tracing::warn!(
                                uid = p.uid,
                                gid = p.gid,
                                pid = p.pid.unwrap_or(0),
                                "refused a connection from a peer not in --allow-uid/--allow-gid"
                            ),
                            None => tracing::warn!(
                                "refused a connection whose peer credentials cannot be read"
                            ),
                        }
                        on_reject();
                        drop(stream);
                        continue;
                    }
                    let ticket = Arc::new(ConnTicket::new(peer));
                    if open.len() >= 2 * policy.max_connections {
                        open.retain(|t| !t.closed.load(Ordering::Relaxed));
                    }
                    open.push_back(Arc::clone(&ticket));
                    let conn = AuthorityShim::new(
                        stream,
                        policy.handshake_timeout,
                        policy.idle_timeout,
                        slot,
                        ticket,
                    );
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists() {
        let peer = PeerInfo {
            uid: 1000,
            gid: 50,
            pid: Some(1),
        };
        let open = AcceptPolicy::default();
        assert!(open.allows(&peer));
        let by_uid = AcceptPolicy {
            allow_uids: vec![0, 1000],
            ..Default::default()
        };
        assert!(by_uid.allows(&peer));
        let by_gid = AcceptPolicy {
            allow_gids: vec![50],
            ..Default::default()
        };
        assert!(by_gid.allows(&peer));
        let neither = AcceptPolicy {
            allow_uids: vec![0],
            allow_gids: vec![0],
            ..Default::default()
        };
        assert!(!neither.allows(&peer));
    }
}
