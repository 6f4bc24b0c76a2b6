//! The NCCL watchdog: ends a rank stuck in one collective (a dead peer blocks NCCL forever).

/// Ends this process when it has been stuck in one collective for longer than
/// `PROTLOC_DIST_TIMEOUT` seconds (default 1800: longer than any honest wait, such as rank 0
/// writing a large checkpoint while the others wait in the next collective). For transports
/// that block forever on a dead peer (NCCL); MPI launchers end the job themselves.
pub(crate) struct Watchdog {
    /// Milliseconds since `t0` when the current collective began; 0 when in none.
    since_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    what: std::sync::Arc<std::sync::Mutex<&'static str>>,
    t0: std::time::Instant,
}

impl Watchdog {
    pub(crate) fn start(rank: usize) -> Self {
        use std::sync::atomic::Ordering;
        let timeout_s: u64 = std::env::var("PROTLOC_DIST_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800);
        let t0 = std::time::Instant::now();
        let since_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let what = std::sync::Arc::new(std::sync::Mutex::new(""));
        let (s, w) = (since_ms.clone(), what.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let began = s.load(Ordering::Relaxed);
            let now = t0.elapsed().as_millis() as u64;
            if began > 0 && now.saturating_sub(began) > timeout_s * 1000 {
                let op = *w.lock().unwrap_or_else(|e| e.into_inner());
                tracing::error!(
                    "rank {rank}: stuck in {op} for over {timeout_s} s \
                     (PROTLOC_DIST_TIMEOUT): another rank probably died or hangs; exiting"
                );
                std::process::exit(3);
            }
        });
        Self { since_ms, what, t0 }
    }

    pub(crate) fn enter(&self, op: &'static str) -> WatchdogGuard<'_> {
        *self.what.lock().unwrap_or_else(|e| e.into_inner()) = op;
        let now = (self.t0.elapsed().as_millis() as u64).max(1);
        self.since_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        WatchdogGuard(self)
    }
}

pub(crate) struct WatchdogGuard<'a>(&'a Watchdog);

impl Drop for WatchdogGuard<'_> {
    fn drop(&mut self) {
        self.0
            .since_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}
