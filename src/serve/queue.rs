//! The server's micro-batching queue ([`MicroBatcher`]): sequences from all requests wait in
//! one queue; dedicated worker threads (never the async runtime) take micro-batches from it
//! under a token budget and score them. (Offline inference batches a whole input at once
//! instead: `crate::infer`.)
//!
//! Batch selection: the oldest waiting sequence always goes into the next batch (so nothing
//! starves), together with the waiting sequences closest to it in length, as many as fit in
//! `max_batch_tokens` padded tokens (members x longest) and `max_batch_size`. A worker waits
//! up to `max_wait` for more work when the queue holds less than one full batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::options::Limits;
use crate::model::Answer;
use crate::tokenize::Encoded;

/// What the model says about one sequence: its answer (see [`crate::model::answer`]) and its
/// raw location logits in label order (an ensemble's: the means over its members).
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub answer: Answer,
    pub logits: Vec<f32>,
}

/// What runs a batch. Built inside its worker thread, so it need not be `Send`.
pub trait Engine {
    /// Scores `items` (already sorted by length), one row per item, in order.
    fn score(&mut self, items: &[&Encoded]) -> Result<Vec<Scored>>;
}

/// A finished request: its rows in input order and where its time went.
#[derive(Debug)]
pub struct JobOutput {
    pub rows: Vec<Scored>,
    /// From submission to the start of the first batch holding one of its sequences.
    pub queue_time: Duration,
    /// Summed compute time of the batches holding its sequences.
    pub inference_time: Duration,
    /// Number of batches its sequences were spread over.
    pub batches: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull { waiting: usize, capacity: usize },
    ShuttingDown,
}

struct JobState {
    rows: Vec<Option<Scored>>,
    remaining: usize,
    submitted: Instant,
    first_start: Option<Instant>,
    inference: Duration,
    last_batch: u64,
    batches: usize,
    tx: Option<oneshot::Sender<Result<JobOutput, String>>>,
}

struct Job {
    state: Mutex<JobState>,
    cancelled: AtomicBool,
}

/// Cancels the request's waiting sequences when dropped (client gone, timeout).
pub struct JobGuard(Arc<Job>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0.cancelled.store(true, Ordering::Relaxed);
    }
}

struct Entry {
    encoded: Encoded,
    job: Arc<Job>,
    index: usize,
    enqueued: Instant,
}

struct State {
    /// FIFO order.
    pending: Vec<Entry>,
    closed: bool,
    paused: bool,
    next_batch: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Read: `max_batch_tokens`, `max_batch_size`, `max_wait`, `max_queue`, `workers`.
    limits: Limits,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The queue plus its worker threads.
pub struct MicroBatcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl MicroBatcher {
    /// Starts `limits.workers` threads, each building its engine with `make` (e.g. loading
    /// the model); returns once all are ready, with what the first `make` reported.
    pub fn start<E, I, F>(limits: Limits, metrics: Arc<Metrics>, make: F) -> Result<(Self, I)>
    where
        E: Engine + 'static,
        I: Send + 'static,
        F: Fn() -> Result<(E, I)> + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                closed: false,
                paused: false,
                next_batch: 0,
            }),
            wake: Condvar::new(),
            limits,
            metrics,
        });
        let make = Arc::new(make);
        let mut handles = Vec::new();
        let mut info = None;
        let batcher = |handles: Vec<JoinHandle<()>>| MicroBatcher {
            shared: Arc::clone(&shared),
            workers: Mutex::new(handles),
        };
        for w in 0..limits.workers.max(1) {
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<I>>(1);
            let make = Arc::clone(&make);
            let sh = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("protloc-infer-{w}"))
                .spawn(move || match make() {
                    Ok((engine, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        worker_loop(&sh, engine);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })?;
            handles.push(handle);
            let ready = ready_rx.recv().unwrap_or_else(|_| {
                Err(anyhow::anyhow!("inference worker {w} died while starting"))
            });
            match ready {
                Ok(i) => {
                    if info.is_none() {
                        info = Some(i);
                    }
                }
                Err(e) => {
                    let b = batcher(handles);
                    b.shutdown();
                    return Err(e);
                }
            }
        }
        Ok((batcher(handles), info.expect("at least one worker")))
    }

    /// Queues a request's sequences. The receiver yields the rows in input order.
    pub fn submit(
        &self,
        encoded: Vec<Encoded>,
    ) -> Result<(JobGuard, oneshot::Receiver<Result<JobOutput, String>>), SubmitError> {
        let n = encoded.len();
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Arc::new(Job {
            state: Mutex::new(JobState {
                rows: vec![None; n],
                remaining: n,
                submitted: now,
                first_start: None,
                inference: Duration::ZERO,
                last_batch: u64::MAX,
                batches: 0,
                tx: Some(tx),
            }),
            cancelled: AtomicBool::new(false),
        });
        let mut st = lock(&self.shared.state);
        if st.closed {
            return Err(SubmitError::ShuttingDown);
        }
        let capacity = self.shared.limits.max_queue;
        if st.pending.len() + n > capacity {
            return Err(SubmitError::QueueFull {
                waiting: st.pending.len(),
                capacity,
            });
        }
        st.pending.extend(
            encoded
                .into_iter()
                .enumerate()
                .map(|(index, encoded)| Entry {
                    encoded,
                    job: Arc::clone(&job),
                    index,
                    enqueued: now,
                }),
        );
        self.shared
            .metrics
            .queue_depth
            .store(st.pending.len() as u64, Ordering::Relaxed);
        drop(st);
        self.shared.wake.notify_all();
        Ok((JobGuard(job), rx))
    }

    /// Sequences waiting now.
    pub fn depth(&self) -> usize {
        lock(&self.shared.state).pending.len()
    }

    /// Holds batches back (tests use it to make a queue fill up deterministically).
    #[doc(hidden)]
    pub fn set_paused(&self, paused: bool) {
        lock(&self.shared.state).paused = paused;
        self.shared.wake.notify_all();
    }

    /// Refuses new work, lets the workers finish everything queued, and joins them.
    pub fn shutdown(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.closed = true;
            st.paused = false;
        }
        self.shared.wake.notify_all();
        let handles = std::mem::take(&mut *lock(&self.workers));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for MicroBatcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker_loop<E: Engine>(shared: &Shared, mut engine: E) {
    let cfg = shared.limits;
    loop {
        let (batch, batch_id) = {
            let mut st = lock(&shared.state);
            loop {
                st.pending
                    .retain(|e| !e.job.cancelled.load(Ordering::Relaxed));
                shared
                    .metrics
                    .queue_depth
                    .store(st.pending.len() as u64, Ordering::Relaxed);
                if st.pending.is_empty() {
                    if st.closed {
                        return;
                    }
                    st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                if st.paused {
                    st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                let waiting_tokens: usize = st.pending.iter().map(|e| e.encoded.ids.len()).sum();
                let full = st.pending.len() >= cfg.max_batch_size
                    || waiting_tokens >= cfg.max_batch_tokens;
                let waited = st.pending[0].enqueued.elapsed();
                if full || st.closed || waited >= cfg.max_wait {
                    break;
                }
                st = shared
                    .wake
                    .wait_timeout(st, cfg.max_wait - waited)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let picked = select(&st.pending, cfg.max_batch_tokens, cfg.max_batch_size);
            let mut take = vec![false; st.pending.len()];
            for &i in &picked {
                take[i] = true;
            }
            let mut batch = Vec::with_capacity(picked.len());
            let mut rest = Vec::with_capacity(st.pending.len() - picked.len());
            for (e, t) in std::mem::take(&mut st.pending).into_iter().zip(take) {
                if t {
                    batch.push(e);
                } else {
                    rest.push(e);
                }
            }
            st.pending = rest;
            shared
                .metrics
                .queue_depth
                .store(st.pending.len() as u64, Ordering::Relaxed);
            st.next_batch += 1;
            // Length order inside the batch (collation does not care, but it is tidy).
            batch.sort_by_key(|e| e.encoded.ids.len());
            (batch, st.next_batch)
        };
        run_batch(shared, &mut engine, batch, batch_id);
    }
}

/// Indices (into FIFO-ordered `pending`) of the next batch: the oldest entry plus its
/// nearest neighbours in length, within the token and size budgets.
fn select(pending: &[Entry], max_tokens: usize, max_size: usize) -> Vec<usize> {
    let len = |i: usize| pending[i].encoded.ids.len();
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| (len(i), i));
    let anchor = order
        .iter()
        .position(|&i| i == 0)
        .expect("pending is not empty");
    let mut picked = vec![order[anchor]];
    let mut longest = len(order[anchor]);
    let (mut lo, mut hi) = (anchor, anchor);
    let target = longest;
    while picked.len() < max_size.max(1) {
        let below = lo.checked_sub(1).map(|p| (p, order[p]));
        let above = (hi + 1 < order.len()).then(|| (hi + 1, order[hi + 1]));
        let fits = |i: usize| (picked.len() + 1) * longest.max(len(i)) <= max_tokens;
        let below = below.filter(|&(_, i)| fits(i));
        let above = above.filter(|&(_, i)| fits(i));
        let choice = match (below, above) {
            (None, None) => break,
            (Some(b), None) => (b, true),
            (None, Some(a)) => (a, false),
            (Some(b), Some(a)) => {
                if target - len(b.1) <= len(a.1) - target {
                    (b, true)
                } else {
                    (a, false)
                }
            }
        };
        let ((pos, i), is_below) = choice;
        if is_below {
            lo = pos;
        } else {
            hi = pos;
        }
        longest = longest.max(len(i));
        picked.push(i);
    }
    picked
}

fn run_batch<E: Engine>(shared: &Shared, engine: &mut E, batch: Vec<Entry>, batch_id: u64) {
    let start = Instant::now();
    for e in &batch {
        shared.metrics.record_queue_time(start - e.enqueued);
    }
    let items: Vec<&Encoded> = batch.iter().map(|e| &e.encoded).collect();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.score(&items)));
    let took = start.elapsed();
    let result = match result {
        Ok(Ok(rows)) if rows.len() == batch.len() => Ok(rows),
        Ok(Ok(rows)) => Err(format!(
            "engine returned {} rows for {} sequences",
            rows.len(),
            batch.len()
        )),
        Ok(Err(e)) => Err(format!("inference failed: {e:#}")),
        Err(_) => Err("inference panicked".to_string()),
    };
    let longest = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let residues = items.iter().map(|e| e.used_residues).sum();
    shared
        .metrics
        .record_batch(batch.len(), longest * batch.len(), residues, took);
    match result {
        Ok(rows) => {
            for (e, row) in batch.into_iter().zip(rows) {
                let mut js = lock(&e.job.state);
                js.first_start.get_or_insert(start);
                if js.last_batch != batch_id {
                    js.last_batch = batch_id;
                    js.inference += took;
                    js.batches += 1;
                }
                if js.rows[e.index].is_none() {
                    js.rows[e.index] = Some(row);
                    js.remaining -= 1;
                }
                if js.remaining == 0 {
                    if let Some(tx) = js.tx.take() {
                        let rows = std::mem::take(&mut js.rows)
                            .into_iter()
                            .map(|r| r.expect("every row is set"))
                            .collect();
                        let out = JobOutput {
                            rows,
                            queue_time: js.first_start.unwrap_or(start) - js.submitted,
                            inference_time: js.inference,
                            batches: js.batches,
                        };
                        let _ = tx.send(Ok(out));
                    }
                }
            }
        }
        Err(msg) => {
            tracing::error!("{msg}");
            for e in batch {
                e.job.cancelled.store(true, Ordering::Relaxed);
                if let Some(tx) = lock(&e.job.state).tx.take() {
                    let _ = tx.send(Err(msg.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(n: usize, tag: u32) -> Encoded {
        Encoded {
            ids: vec![tag; n],
            total_residues: n - 2,
            used_residues: n - 2,
        }
    }

    /// Scores each item with its first id and length; records batch sizes.
    struct Echo(Arc<Mutex<Vec<usize>>>);

    impl Engine for Echo {
        fn score(&mut self, items: &[&Encoded]) -> Result<Vec<Scored>> {
            self.0.lock().unwrap().push(items.len());
            if items.iter().any(|e| e.ids[0] == 666) {
                anyhow::bail!("boom");
            }
            Ok(items
                .iter()
                .map(|e| Scored {
                    answer: crate::model::AnswerRule {
                        labels: vec!["x".into()],
                        thresholds: None,
                        membrane: false,
                    }
                    .answer(vec![e.ids[0] as f32], None),
                    logits: vec![e.ids.len() as f32],
                })
                .collect())
        }
    }

    fn entry(n: usize) -> Entry {
        let job = Arc::new(Job {
            state: Mutex::new(JobState {
                rows: vec![],
                remaining: 0,
                submitted: Instant::now(),
                first_start: None,
                inference: Duration::ZERO,
                last_batch: 0,
                batches: 0,
                tx: None,
            }),
            cancelled: AtomicBool::new(false),
        });
        Entry {
            encoded: enc(n, 1),
            job,
            index: 0,
            enqueued: Instant::now(),
        }
    }

    #[test]
    fn select_keeps_the_oldest_and_its_length_neighbours() {
        let pending: Vec<Entry> = [100, 10, 400, 98, 105, 12, 300]
            .iter()
            .map(|&n| entry(n))
            .collect();
        let picked = select(&pending, 330, 8);
        assert_eq!(picked[0], 0);
        let mut sorted = picked.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 3, 4]); // 100, 98, 105: 3 x 105 <= 330, a 4th would not fit
        let picked = select(&pending, 10_000, 2);
        assert_eq!(picked.len(), 2);
        assert!(picked.contains(&0) && picked.contains(&3));
        // A single over-budget entry still goes alone.
        let pending = vec![entry(500), entry(20)];
        assert_eq!(select(&pending, 100, 8), vec![0]);
    }

    fn config(max_queue: usize, workers: usize) -> Limits {
        Limits {
            max_batch_tokens: 1000,
            max_batch_size: 8,
            max_wait: Duration::from_millis(1),
            max_queue,
            workers,
            ..Limits::default()
        }
    }

    #[test]
    fn batches_requests_together_and_returns_rows_in_order() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sizes);
        let metrics = Arc::new(Metrics::default());
        let (b, info) = MicroBatcher::start(config(100, 1), Arc::clone(&metrics), move || {
            Ok((Echo(Arc::clone(&s2)), "ready"))
        })
        .unwrap();
        assert_eq!(info, "ready");
        b.set_paused(true);
        let (_g1, rx1) = b.submit(vec![enc(50, 7), enc(10, 8), enc(30, 9)]).unwrap();
        let (_g2, rx2) = b.submit(vec![enc(20, 3)]).unwrap();
        assert_eq!(b.depth(), 4);
        // Capacity 100, 4 waiting: 97 more do not fit.
        let full = b.submit((0..97).map(|_| enc(5, 1)).collect()).err();
        assert_eq!(
            full,
            Some(SubmitError::QueueFull {
                waiting: 4,
                capacity: 100
            })
        );
        b.set_paused(false);
        let out1 = rx1.blocking_recv().unwrap().unwrap();
        let firsts: Vec<f32> = out1
            .rows
            .iter()
            .map(|r| r.answer.probabilities[0])
            .collect();
        assert_eq!(firsts, vec![7.0, 8.0, 9.0]);
        assert_eq!(out1.rows[1].logits, vec![10.0]);
        let out2 = rx2.blocking_recv().unwrap().unwrap();
        assert_eq!(out2.rows[0].answer.probabilities, vec![3.0]);
        assert_eq!(*sizes.lock().unwrap(), vec![4]);
        assert_eq!(metrics.batch_stats(), (1, 4.0));
        b.shutdown();
        assert_eq!(
            b.submit(vec![enc(5, 1)]).err(),
            Some(SubmitError::ShuttingDown)
        );
    }

    #[test]
    fn engine_errors_fail_only_their_batch_and_cancelled_jobs_are_dropped() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sizes);
        let (b, _) = MicroBatcher::start(config(100, 1), Arc::new(Metrics::default()), move || {
            Ok((Echo(Arc::clone(&s2)), ()))
        })
        .unwrap();
        b.set_paused(true);
        let (g1, _rx1) = b.submit(vec![enc(10, 1), enc(10, 1)]).unwrap();
        drop(g1); // the client went away
        let (_g2, rx2) = b.submit(vec![enc(10, 666)]).unwrap();
        b.set_paused(false);
        let err = rx2.blocking_recv().unwrap().unwrap_err();
        assert!(err.contains("boom"), "{err}");
        let (_g3, rx3) = b.submit(vec![enc(10, 5)]).unwrap();
        assert_eq!(rx3.blocking_recv().unwrap().unwrap().rows.len(), 1);
        // The cancelled job's two sequences were never scored.
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1]);
    }

    #[test]
    fn shutdown_drains_the_queue() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sizes);
        let (b, _) = MicroBatcher::start(config(100, 2), Arc::new(Metrics::default()), move || {
            Ok((Echo(Arc::clone(&s2)), ()))
        })
        .unwrap();
        b.set_paused(true);
        let (_g, rx) = b.submit((0..20).map(|i| enc(10 + i, 2)).collect()).unwrap();
        b.shutdown();
        assert_eq!(rx.blocking_recv().unwrap().unwrap().rows.len(), 20);
        assert_eq!(sizes.lock().unwrap().iter().sum::<usize>(), 20);
    }
}
