//! A fresh look at the keystore for a Decrypt that names a key the loaded keyring lacks.
//!
//! A node that was frozen (SIGSTOP, a long GC pause of its VM) past a promote can be asked to
//! decrypt under the new key a few milliseconds before its watch delivers the change. Rather
//! than answer NOT_FOUND at once, the request asks the reload task for a reload and waits,
//! at most [`MISS_WAIT`], for one that started after it asked. Every waiter shares the same
//! reload, and the reload task runs at most one such reload per [`MIN_INTERVAL`], so a flood
//! of random key ids costs a few reads a second and no more.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The longest a Decrypt waits for the reload before it answers NOT_FOUND.
pub const MISS_WAIT: Duration = Duration::from_secs(2);
/// At most one miss-triggered reload per this interval, however many requests miss.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// Shared between the request handlers and the reload task.
#[derive(Debug)]
pub struct Refresh {
    /// Whether a reload task listens; without one (a server run in-process by tests, with no
    /// keystore), a miss answers at once.
    listening: AtomicBool,
    wake: tokio::sync::Notify,
    /// Tickets of reloads started and finished.
    started: AtomicU64,
    finished: tokio::sync::watch::Sender<u64>,
}

impl Default for Refresh {
    fn default() -> Self {
        Refresh {
            listening: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            started: AtomicU64::new(0),
            finished: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Refresh {
    /// Request side: asks for a reload and waits, at most `wait`, until one that started after
    /// this call has finished. Whether one did (false: no reload task, or it took too long).
    pub async fn reload_and_wait(&self, wait: Duration) -> bool {
        if !self.listening.load(Ordering::Acquire) {
            return false;
        }
        let mut finished = self.finished.subscribe();
        let ticket = self.started.load(Ordering::Acquire) + 1;
        // One stored permit however many ask: the waiters share the next reload.
        self.wake.notify_one();
        let outcome = tokio::time::timeout(wait, finished.wait_for(|done| *done >= ticket))
            .await
            .map(|r| r.is_ok());
        outcome.unwrap_or(false)
    }

    /// Reload side: resolves when a request has asked for a reload.
    pub async fn requested(&self) {
        self.listening.store(true, Ordering::Release);
        self.wake.notified().await
    }

    /// Reload side: a reload starts now; its ticket goes to [`Self::finish`].
    pub fn begin(&self) -> u64 {
        self.started.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Reload side: the reload with `ticket` has finished (whatever its outcome).
    pub fn finish(&self, ticket: u64) {
        self.finished
            .send_modify(|done| *done = (*done).max(ticket));
    }

    /// Reload side: no reload task listens any more (it stopped).
    pub fn stop_listening(&self) {
        self.listening.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn without_a_reload_task_a_miss_answers_at_once() {
        let r = Refresh::default();
        let started = std::time::Instant::now();
        assert!(!r.reload_and_wait(Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn many_waiters_share_one_reload_that_started_after_they_asked() {
        let r = Arc::new(Refresh::default());
        let reloads = Arc::new(AtomicU64::new(0));
        let task = {
            let (r, reloads) = (Arc::clone(&r), Arc::clone(&reloads));
            tokio::spawn(async move {
                loop {
                    r.requested().await;
                    let t = r.begin();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    reloads.fetch_add(1, Ordering::Relaxed);
                    r.finish(t);
                }
            })
        };
        // Let the task start listening.
        while !r.listening.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let r = Arc::clone(&r);
                tokio::spawn(async move { r.reload_and_wait(Duration::from_secs(5)).await })
            })
            .collect();
        for w in waiters {
            assert!(w.await.expect("join"), "every waiter saw a reload finish");
        }
        let n = reloads.load(Ordering::Relaxed);
        assert!((1..=2).contains(&n), "50 misses shared {n} reloads");
        // A waiter that asks while a reload runs waits for the next one, not that one.
        let r2 = Arc::clone(&r);
        let before = r.started.load(Ordering::Acquire);
        assert!(r2.reload_and_wait(Duration::from_secs(5)).await);
        assert!(*r.finished.borrow() > before);
        task.abort();
    }
}
