//! The server's life: binding, the accept loop with its header timeout, graceful shutdown,
//! and [`ServerHandle`] for a server running in the background.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::metrics::Metrics;
use super::options::ServeOptions;
use super::routes;
use super::state::{build_state, AppState};

/// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests and
/// drains the queue.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let router = routes::router(Arc::clone(&app));
    // An explicit accept loop instead of `axum::serve`, for two protections it lacks: a
    // header-read timeout (a slow-loris client that never finishes its headers is
    // disconnected instead of holding a connection forever) and a bound on how long a
    // graceful shutdown waits for open connections.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(app.limits.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    app.draining.store(true, Ordering::Relaxed);
    let grace = (app.limits.request_timeout.as_millis() as u64).max(1000);
    if tokio::time::timeout(Duration::from_millis(grace), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after {grace} ms; closing them");
    }
    let app3 = Arc::clone(&app);
    tokio::task::spawn_blocking(move || app3.batcher.shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}

fn bind(opts: &ServeOptions) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("protloc-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `protloc serve`: blocks until SIGTERM or Ctrl-C, then shuts down gracefully.
pub fn run(opts: ServeOptions) -> Result<()> {
    let t0 = Instant::now();
    let listener = bind(&opts)?;
    let addr = listener.local_addr()?;
    let rt = runtime(opts.http_threads)?;
    let app = build_state(opts)?;
    tracing::info!(
        model = %app.info.model,
        labels = app.info.labels.len(),
        load_ms = t0.elapsed().as_millis() as u64,
        "model loaded"
    );
    tracing::info!("listening on http://{addr}");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        serve_on(listener, app, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A server running on its own threads (for tests, benchmarks and embedding).
pub struct ServerHandle {
    pub addr: SocketAddr,
    app: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

/// Loads the model, binds and starts serving in the background; returns once ready.
pub fn spawn(opts: ServeOptions) -> Result<ServerHandle> {
    let listener = bind(&opts)?;
    let addr = listener.local_addr()?;
    let rt = runtime(opts.http_threads)?;
    let app = build_state(opts)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app2 = Arc::clone(&app);
    let thread = std::thread::Builder::new()
        .name("protloc-serve".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                serve_on(listener, app2, async {
                    let _ = stopped.await;
                })
                .await
            })
        })?;
    Ok(ServerHandle {
        addr,
        app,
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl ServerHandle {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.app.metrics
    }

    pub fn queue_depth(&self) -> usize {
        self.app.batcher.depth()
    }

    /// Holds inference back (tests use it to fill the queue deterministically).
    #[doc(hidden)]
    pub fn set_paused(&self, paused: bool) {
        self.app.batcher.set_paused(paused);
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Whether the server has stopped accepting new work.
    pub fn is_draining(&self) -> bool {
        self.app.draining.load(Ordering::Relaxed)
    }

    /// Shuts down gracefully and waits until in-flight work is done.
    pub fn shutdown(mut self) -> Result<()> {
        self.begin_shutdown();
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.begin_shutdown();
        let _ = self.join();
    }
}
