//! `protloc serve`: an HTTP prediction endpoint for a run directory.
//!
//! - `routes`: axum handlers, content negotiation, auth, limits, JSON errors.
//! - `parse`: request bodies (JSON forms, FASTA, CSV) to validated sequences.
//! - `queue`: the token-budget dynamic batcher on dedicated inference threads.
//! - `metrics`: Prometheus text. `openapi`: the OpenAPI document.
//!
//! The async runtime only parses, queues and answers; inference runs on its own threads,
//! so `/ping` and `/metrics` answer at once while a big batch computes.

pub mod metrics;
pub mod openapi;
pub mod parse;
pub mod queue;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{answer, AnswerRule, SequenceClassifier};
use crate::tokenize::{Batch, Encoded, Tokenizer, Truncation};
use metrics::Metrics;
use queue::{Batcher, Engine, QueueConfig, Scored};

/// Everything `protloc serve` takes.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Run directory written by `protloc train`.
    pub model: PathBuf,
    pub host: String,
    /// 0 picks a free port (see [`ServerHandle::addr`]).
    pub port: u16,
    /// Padded tokens (sequences x longest) per inference batch.
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    /// How long a worker waits for more sequences when less than a batch is queued.
    pub max_wait: Duration,
    /// Sequences allowed to wait at once (429 beyond).
    pub max_queue: usize,
    /// Request body limit (413 beyond).
    pub max_body_bytes: usize,
    /// Sequences per request (413 beyond).
    pub max_sequences: usize,
    /// Override the run's truncation policy.
    pub truncate: Option<Truncation>,
    /// Reject sequences longer than the model's budget (422) instead of truncating.
    pub no_truncate: bool,
    /// A request still unanswered after this gets 503 (its waiting sequences are dropped).
    pub request_timeout: Duration,
    /// A client must send its complete request headers within this time.
    pub header_timeout: Duration,
    /// Bearer token required on the prediction routes.
    pub api_key: Option<String>,
    /// Inference threads, each with its own copy of the model.
    pub workers: usize,
    /// Async runtime threads (HTTP, parsing).
    pub http_threads: usize,
}

impl ServeOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            host: "127.0.0.1".into(),
            port: 8080,
            max_batch_tokens: 1024,
            max_batch_size: 64,
            max_wait: Duration::from_millis(2),
            max_queue: 4096,
            max_body_bytes: 8 << 20,
            max_sequences: 1024,
            truncate: None,
            no_truncate: false,
            request_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            api_key: None,
            workers: 1,
            http_threads: 2,
        }
    }
}

/// `GET /v1/info`: the model and the server's limits.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Info {
    /// The run directory served.
    pub model: String,
    /// `bert` or `esm`.
    pub model_type: String,
    /// What the run was fine-tuned from.
    pub base_model: String,
    /// Locations, in the model's output order.
    pub labels: Vec<String>,
    /// Whether the model predicts membrane-bound/soluble: predictions then carry
    /// `membrane_probability` and `membrane_label`.
    pub membrane_head: bool,
    /// P(membrane) from which a protein is called membrane-bound, for models with the
    /// membrane output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membrane_threshold: Option<f32>,
    /// Whether the model names every location over its threshold (`"A|B"`) instead of the
    /// single most probable one.
    #[serde(default)]
    pub multi_label: bool,
    /// The per-location decision thresholds of a multi-label model, in label order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<routes::ClassThreshold>>,
    /// Heads whose probabilities are averaged: 1 for a single model, N for an ensemble
    /// (`protloc train --frozen --ensemble N` or `--folds N`).
    pub ensemble_members: usize,
    pub max_residues: usize,
    /// `head` or `head-tail`.
    #[schema(value_type = String, example = "head-tail")]
    pub truncate: Truncation,
    /// Longer sequences are rejected (422) instead of truncated.
    pub no_truncate: bool,
    pub limits: Limits,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    pub max_wait_ms: u64,
    pub max_queue: usize,
    pub max_body_bytes: usize,
    pub max_sequences: usize,
    pub request_timeout_ms: u64,
    pub workers: usize,
    pub auth: bool,
}

/// Shared by all handlers.
pub struct AppState {
    pub opts: ServeOptions,
    pub info: Info,
    /// How the model's outputs become answers (labels, thresholds, membrane output).
    pub rule: AnswerRule,
    pub tokenizer: Tokenizer,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    pub started: Instant,
}

/// Runs the classifier on the inference threads and turns its outputs into answers with the
/// rule `predict` and `eval` use.
struct ModelEngine {
    model: SequenceClassifier,
    rule: AnswerRule,
    device: Device,
}

impl Engine for ModelEngine {
    fn score(&mut self, items: &[&Encoded]) -> Result<Vec<Scored>> {
        let batch = Batch::collate(items, self.model.base.tokenizer.pad_id, &self.device)?;
        let p = self.model.inference_probabilities(&batch)?;
        let answers = self.rule.batch_answers(&p)?;
        let logits: Vec<Vec<f32>> = p.logits.to_vec2()?;
        Ok(answers
            .into_iter()
            .zip(logits)
            .map(|(answer, logits)| Scored { answer, logits })
            .collect())
    }
}

/// Loads the model on the worker threads, starts the batcher and builds the shared state.
pub fn build_state(opts: ServeOptions) -> Result<Arc<AppState>> {
    let metrics = Arc::new(Metrics::default());
    let config = QueueConfig {
        max_batch_tokens: opts.max_batch_tokens.max(1),
        max_batch_size: opts.max_batch_size.max(1),
        max_wait: opts.max_wait,
        max_queue: opts.max_queue.max(1),
    };
    let dir = opts.model.clone();
    let (batcher, (task, model_type, tokenizer)) =
        Batcher::start(config, Arc::clone(&metrics), opts.workers, move || {
            let device = Device::Cpu;
            let model = SequenceClassifier::load(&dir, &device)
                .with_context(|| format!("cannot load model {}", dir.display()))?;
            let info = (
                model.task.clone(),
                model.base.cfg.model_type.to_string(),
                model.base.tokenizer.clone(),
            );
            let rule = model.answer_rule();
            Ok((
                ModelEngine {
                    model,
                    rule,
                    device,
                },
                info,
            ))
        })?;
    let rule = AnswerRule::for_task(&task);
    let info = Info {
        model: opts.model.display().to_string(),
        model_type,
        base_model: task.base_model.clone(),
        labels: task.labels.clone(),
        membrane_head: rule.membrane,
        membrane_threshold: rule.membrane.then_some(answer::MEMBRANE_THRESHOLD),
        multi_label: rule.multi_label(),
        thresholds: rule
            .thresholds
            .as_deref()
            .map(|th| routes::ClassThreshold::list(&rule.labels, th)),
        ensemble_members: task.ensemble,
        max_residues: task.max_residues,
        truncate: opts.truncate.unwrap_or(task.truncate),
        no_truncate: opts.no_truncate,
        limits: Limits {
            max_batch_tokens: config.max_batch_tokens,
            max_batch_size: config.max_batch_size,
            max_wait_ms: opts.max_wait.as_millis() as u64,
            max_queue: config.max_queue,
            max_body_bytes: opts.max_body_bytes,
            max_sequences: opts.max_sequences,
            request_timeout_ms: opts.request_timeout.as_millis() as u64,
            workers: opts.workers.max(1),
            auth: opts.api_key.is_some(),
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok(Arc::new(AppState {
        opts,
        info,
        rule,
        tokenizer,
        batcher,
        metrics,
        draining: AtomicBool::new(false),
        started: Instant::now(),
    }))
}

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
        .header_read_timeout(app.opts.header_timeout);
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
    let grace = (app.opts.request_timeout.as_millis() as u64).max(1000);
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
