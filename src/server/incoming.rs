//! The accept loop: every connection is wrapped in the `:authority` shim before tonic sees it.

use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::authority::AuthorityShim;

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
        self.get_ref().peer_cred().ok().map(|c| PeerInfo {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        })
    }
}

/// Accepts on `listener` in a task of its own and yields shimmed connections. Accept errors
/// (for example running out of file descriptors) back off instead of spinning. The task ends
/// when the server drops the stream.
pub fn accept_stream(listener: UnixListener) -> ReceiverStream<Result<Connection, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    if tx.send(Ok(AuthorityShim::new(stream))).await.is_err() {
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
