//! The accept loop: every connection is wrapped in the `:authority` shim before tonic sees it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::authority::{AuthorityShim, HandshakeTicket};

/// How long a new connection has to get its HTTP/2 preface read before it may be evicted to
/// make room for another.
const EVICTION_GRACE: Duration = Duration::from_millis(100);

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
pub type Connection = AuthorityShim<UnixStream>;

impl Connected for AuthorityShim<UnixStream> {
    type ConnectInfo = Option<PeerInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        peer_of(self.get_ref())
    }
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
pub fn accept_stream(
    listener: UnixListener,
    policy: AcceptPolicy,
    on_reject: impl Fn() + Send + 'static,
) -> ReceiverStream<Result<Connection, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(policy.max_connections.max(1)));
    tokio::spawn(async move {
        let mut handshaking: VecDeque<Arc<HandshakeTicket>> = VecDeque::new();
        loop {
            let slot = loop {
                if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
                    break slot;
                }
                // Every slot is taken: make room by evicting the oldest connection that has
                // not sent its HTTP/2 preface in EVICTION_GRACE, then wait for a slot to free
                // up (or for the next candidate to come of age).
                handshaking.retain(|t| {
                    !t.done.load(Ordering::Relaxed) && !t.closed.load(Ordering::Relaxed)
                });
                if let Some(pos) = handshaking
                    .iter()
                    .position(|t| t.accepted.elapsed() >= EVICTION_GRACE)
                {
                    if let Some(victim) = handshaking.remove(pos) {
                        victim.evict.notify_one();
                    }
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
                    let ticket = Arc::new(HandshakeTicket::new());
                    if handshaking.len() >= 2 * policy.max_connections {
                        handshaking.retain(|t| {
                            !t.done.load(Ordering::Relaxed) && !t.closed.load(Ordering::Relaxed)
                        });
                    }
                    handshaking.push_back(Arc::clone(&ticket));
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
