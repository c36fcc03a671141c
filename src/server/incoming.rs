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

/// Open connections of `uid`.
fn held_by(open: &VecDeque<Arc<ConnTicket>>, uid: u32) -> usize {
    open.iter()
        .filter(|t| t.peer.is_some_and(|p| p.uid == uid))
        .count()
}

/// The connection to evict for a newcomer when every slot is taken, under a per-uid share of
/// `per_uid` slots. Connections of uids past their share go first: idle or stuck in their
/// handshake, and, for a newcomer within its share, even busy ones (the oldest), since a uid
/// that holds more than its share must not keep another uid out. A newcomer within its share
/// may then also take any idle connection ([`pick_victim`]); one at or past its share may not
/// displace a uid within its share at all.
fn pick_victim_for(
    open: &mut VecDeque<Arc<ConnTicket>>,
    per_uid: Option<usize>,
    within_share: bool,
) -> Option<Arc<ConnTicket>> {
    let Some(limit) = per_uid else {
        return pick_victim(open);
    };
    open.retain(|t| !t.closed.load(Ordering::Relaxed));
    let over = |t: &Arc<ConnTicket>, open: &VecDeque<Arc<ConnTicket>>| {
        t.peer.is_some_and(|p| held_by(open, p.uid) > limit)
    };
    let idle_over = open
        .iter()
        .enumerate()
        .filter(|(_, t)| over(t, open))
        .filter_map(|(i, t)| {
            let handshaking =
                !t.handshaken.load(Ordering::Relaxed) && t.accepted.elapsed() >= EVICTION_GRACE;
            if handshaking {
                return Some((i, Duration::MAX));
            }
            t.idle_for()
                .filter(|idle| *idle >= IDLE_EVICTION_GRACE)
                .map(|idle| (i, idle))
        })
        .max_by_key(|(_, idle)| *idle)
        .map(|(i, _)| i);
    if let Some(i) = idle_over {
        return open.remove(i);
    }
    if !within_share {
        return None;
    }
    if let Some(i) = open.iter().position(|t| over(t, open)) {
        return open.remove(i);
    }
    pick_victim(open)
}

/// Whether a connection of a uid past its share is idle or in its handshake, and so will be
/// evictable once its grace time is over.
fn soon_evictable(open: &VecDeque<Arc<ConnTicket>>, per_uid: Option<usize>) -> bool {
    let Some(limit) = per_uid else {
        return false;
    };
    open.iter().any(|t| {
        t.peer.is_some_and(|p| held_by(open, p.uid) > limit)
            && (!t.handshaken.load(Ordering::Relaxed) || t.idle_for().is_some())
    })
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

/// How many connections one peer uid may hold: `share` of `max_connections` (the same rule as
/// the in-flight share), or no limit when that is all of them.
fn per_uid_connections(max_connections: usize, share: f64) -> Option<usize> {
    let limit = ((max_connections as f64 * share).floor() as usize).max(1);
    (limit < max_connections).then_some(limit)
}

/// Rate-limits a warning to one a second, with the count of those not logged.
#[derive(Default)]
struct Throttled {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl Throttled {
    /// Counts one; the count to log when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last = Some(std::time::Instant::now());
            return Some(std::mem::take(&mut self.unlogged));
        }
        None
    }
}

/// Accepts on `listener` (and, once the socket file was bound again, on each listener from
/// `rebound`) in a task of its own and yields shimmed connections. The peer check runs before
/// a single byte is read; refused peers are closed, logged once and counted. At most
/// `max_connections` are open at once, and one peer uid holds at most `share` of them: a uid
/// at its share has further connections closed at once (logged with the uid, counted), so it
/// can never crowd out another uid, and a connection is evicted to make room only when it is
/// idle or stuck in its handshake. Accept errors (for example running out of file
/// descriptors) back off instead of spinning. The task ends when the server drops the stream.
pub(super) fn accept_stream(
    listener: UnixListener,
    mut rebound: Option<mpsc::Receiver<UnixListener>>,
    policy: AcceptPolicy,
    share: f64,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
) -> ReceiverStream<Result<Connection, std::io::Error>> {
    let mut listener = listener;
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(policy.max_connections.max(1)));
    let per_uid = per_uid_connections(policy.max_connections.max(1), share);
    tokio::spawn(async move {
        let mut open: VecDeque<Arc<ConnTicket>> = VecDeque::new();
        // Evictions and share refusals are logged at most once a second, with a count, so a
        // flood cannot flood the log too.
        let mut eviction_log = Throttled::default();
        let mut share_log = Throttled::default();
        loop {
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
                    continue;
                }
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
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
                    None => {
                        tracing::warn!("refused a connection whose peer credentials cannot be read")
                    }
                }
                metrics.rejected_peer();
                drop(stream);
                continue;
            }
            open.retain(|t| !t.closed.load(Ordering::Relaxed));
            // Whether this uid may take a slot from another: only while it holds less than
            // its share. A uid at or past its share may only displace idle connections of
            // uids past theirs (its own included), and is refused when there are none.
            let uid = peer.map(|p| p.uid);
            let within_share = match (per_uid, uid) {
                (Some(limit), Some(u)) => held_by(&open, u) < limit,
                _ => true,
            };
            let waited = std::time::Instant::now();
            let slot = loop {
                if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
                    break Some(slot);
                }
                // Every slot is taken: make room by evicting a connection (see
                // `pick_victim_for`), then wait for a slot to free up.
                match pick_victim_for(&mut open, per_uid, within_share) {
                    Some(victim) => {
                        metrics.evicted();
                        if let Some(evictions) = eviction_log.due() {
                            let vp = victim.peer;
                            tracing::warn!(
                                uid = vp.map(|p| p.uid),
                                pid = vp.and_then(|p| p.pid),
                                for_uid = uid,
                                in_handshake = !victim.handshaken.load(Ordering::Relaxed),
                                evictions,
                                max_connections = policy.max_connections,
                                "every connection slot is taken: closed the longest-idle connection (or one of a uid past its share of the slots) to make room (evictions counts those since the last such message)"
                            );
                        }
                        victim
                            .evicted
                            .store(true, std::sync::atomic::Ordering::Release);
                        victim.evict.notify_one();
                    }
                    // At or past its share, it waits only for connections past their share
                    // that are idle or in their handshake but still in their grace time
                    // (its own, typically), never for busy ones: a uid flooding busy
                    // connections is refused at once and cannot stall the accept loop.
                    None if !(within_share
                        || (waited.elapsed() < IDLE_EVICTION_GRACE + EVICTION_GRACE
                            && soon_evictable(&open, per_uid))) =>
                    {
                        break None
                    }
                    None => {}
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => break Some(slot),
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(EVICTION_GRACE) => {}
                }
            };
            let Some(slot) = slot else {
                metrics.share_refused();
                if let Some(refused) = share_log.due() {
                    tracing::warn!(
                        uid,
                        pid = peer.and_then(|p| p.pid).unwrap_or(0),
                        held = uid.map(|u| held_by(&open, u)),
                        share = per_uid,
                        refused,
                        "closed a new connection: every slot is taken and this uid already holds its share of the connection slots, so it may not displace another uid's (refused counts those since the last such message)"
                    );
                }
                drop(stream);
                continue;
            };
            let ticket = Arc::new(ConnTicket::new(peer));
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
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_uid_gets_the_in_flight_share_of_the_connection_slots() {
        assert_eq!(per_uid_connections(128, 0.5), Some(64));
        assert_eq!(per_uid_connections(128, 1.0), None);
        assert_eq!(per_uid_connections(3, 0.1), Some(1));
        assert_eq!(per_uid_connections(1, 0.5), None);
    }

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
