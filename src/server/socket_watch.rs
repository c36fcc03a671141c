//! Keeps the socket path this server's own. A socket file can be removed (a cleanup script,
//! `rm -rf /var/run/localkms/*`) or replaced (another process bound the path) while the server
//! runs; its listener then still looks healthy, but the apiserver can no longer reach it. So
//! every [`CHECK_INTERVAL`] the path is compared with the file this server bound:
//!
//! - gone: the server binds it again and hands the new listener to the accept loop;
//! - another file or socket there: the server goes unready (`/healthz` and `/readyz` answer
//!   503), logs the takeover, and stops with an error, so that its supervisor restarts it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;

use super::socket::{self, FileId, SocketGuard};

/// How often the socket path is checked.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the watch shares with the rest of the server.
#[derive(Clone, Debug)]
pub(super) struct SocketHealth {
    ours: Arc<AtomicBool>,
    taken_over: Arc<tokio::sync::Notify>,
    taken: Arc<AtomicBool>,
}

impl Default for SocketHealth {
    fn default() -> Self {
        SocketHealth {
            ours: Arc::new(AtomicBool::new(true)),
            taken_over: Arc::default(),
            taken: Arc::default(),
        }
    }
}

impl SocketHealth {
    /// Whether the socket path is still this server's socket, as the health endpoints read it.
    pub(super) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ours)
    }

    /// Whether another file took the path over (the server then stops with an error).
    pub(super) fn taken_over(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Resolves once another file has taken the path over.
    pub(super) async fn wait_taken_over(&self) {
        // Registered before the flag is read, so a notification in between is not missed.
        let notified = self.taken_over.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.taken_over() {
            return;
        }
        notified.await
    }
}

/// Watches the socket `file` (path and identity, as its guard has them) until `stop`, binding
/// it again (with `mode` and `group`) when it is gone and sending the new listener on
/// `rebound`.
pub(super) async fn watch(
    file: Option<(PathBuf, FileId)>,
    mode: u32,
    group: Option<u32>,
    health: SocketHealth,
    rebound: tokio::sync::mpsc::Sender<UnixListener>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some((path, ident)) = file else {
        // An abstract socket has no file to lose.
        return;
    };
    let mut ident = ident;
    // Guards of sockets bound again: each removes its file when the server stops.
    let mut guards: Vec<SocketGuard> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if FileId::of(&meta) == ident => {
                health.ours.store(true, Ordering::Release);
            }
            Ok(_) => {
                health.ours.store(false, Ordering::Release);
                health.taken.store(true, Ordering::Release);
                tracing::error!(socket = %path.display(), "the socket path now holds another file or another process's socket: the apiserver's calls no longer reach this server. Going unready and stopping, so that the supervisor restarts it");
                // The file is the other process's: no guard may remove it.
                for g in &mut guards {
                    g.disarm();
                }
                health.taken_over.notify_waiters();
                return;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                health.ours.store(false, Ordering::Release);
                match rebind(&path, mode, group) {
                    Ok((listener, g)) => {
                        if let Some((_, new_ident)) = g.file() {
                            ident = *new_ident;
                        }
                        guards.push(g);
                        if rebound.send(listener).await.is_err() {
                            return;
                        }
                        health.ours.store(true, Ordering::Release);
                        tracing::warn!(socket = %path.display(), "the socket file was removed while serving: bound it again");
                    }
                    Err(e) => {
                        tracing::error!(socket = %path.display(), error = %e, "the socket file was removed and cannot be bound again; retrying every second (unready meanwhile)");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot check the socket file");
            }
        }
    }
}

fn rebind(
    path: &std::path::Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(UnixListener, SocketGuard), socket::SocketError> {
    socket::bind(&socket::Endpoint::Path(PathBuf::from(path)), mode, group)
}
