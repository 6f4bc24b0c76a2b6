//! Prometheus metrics in the text exposition format (version 0.0.4), kept by hand: a few
//! counters, gauges and fixed-bucket histograms behind short-lived locks.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A histogram with fixed upper bounds (`le`), cumulative on output.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

const SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_SIZES: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKENS: [f64; 10] = [
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
];

/// Everything `/metrics` reports.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    queue_time: Mutex<Histogram>,
    inference_time: Mutex<Histogram>,
    batch_size: Mutex<Histogram>,
    batch_tokens: Mutex<Histogram>,
    pub sequences: AtomicU64,
    pub residues: AtomicU64,
    pub queue_depth: AtomicU64,
    pub queue_rejections: AtomicU64,
    pub timeouts: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            latency: Mutex::default(),
            queue_time: Mutex::new(Histogram::new(&SECONDS)),
            inference_time: Mutex::new(Histogram::new(&SECONDS)),
            batch_size: Mutex::new(Histogram::new(&BATCH_SIZES)),
            batch_tokens: Mutex::new(Histogram::new(&TOKENS)),
            sequences: AtomicU64::new(0),
            residues: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            queue_rejections: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves consistent-enough numbers behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16, elapsed: Duration) {
        *lock(&self.requests)
            .entry((route.to_string(), status))
            .or_insert(0) += 1;
        lock(&self.latency)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(&SECONDS))
            .observe(elapsed.as_secs_f64());
    }

    /// One inference batch: members, padded tokens (members x longest), compute time.
    pub fn record_batch(&self, size: usize, padded_tokens: usize, residues: usize, took: Duration) {
        lock(&self.batch_size).observe(size as f64);
        lock(&self.batch_tokens).observe(padded_tokens as f64);
        lock(&self.inference_time).observe(took.as_secs_f64());
        self.sequences.fetch_add(size as u64, Ordering::Relaxed);
        self.residues.fetch_add(residues as u64, Ordering::Relaxed);
    }

    pub fn record_queue_time(&self, waited: Duration) {
        lock(&self.queue_time).observe(waited.as_secs_f64());
    }

    /// Batches run so far and their mean size.
    pub fn batch_stats(&self) -> (u64, f64) {
        let h = lock(&self.batch_size);
        let mean = if h.count() == 0 {
            0.0
        } else {
            h.sum() / h.count() as f64
        };
        (h.count(), mean)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        header(
            &mut out,
            "protloc_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "protloc_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        header(
            &mut out,
            "protloc_request_duration_seconds",
            "histogram",
            "End-to-end request latency by route.",
        );
        for (route, h) in lock(&self.latency).iter() {
            h.render(
                &mut out,
                "protloc_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        let hists: [(&str, &str, &Mutex<Histogram>); 4] = [
            (
                "protloc_queue_duration_seconds",
                "Time a sequence waited in the queue before its batch started.",
                &self.queue_time,
            ),
            (
                "protloc_inference_duration_seconds",
                "Compute time of one inference batch.",
                &self.inference_time,
            ),
            (
                "protloc_batch_size",
                "Sequences per inference batch.",
                &self.batch_size,
            ),
            (
                "protloc_batch_tokens",
                "Padded tokens (sequences x longest) per inference batch.",
                &self.batch_tokens,
            ),
        ];
        for (name, help, h) in hists {
            header(&mut out, name, "histogram", help);
            lock(h).render(&mut out, name, "");
        }
        let scalars = [
            (
                "protloc_sequences_total",
                "counter",
                "Sequences scored.",
                &self.sequences,
            ),
            (
                "protloc_residues_total",
                "counter",
                "Residues scored (after truncation).",
                &self.residues,
            ),
            (
                "protloc_queue_depth",
                "gauge",
                "Sequences waiting for a batch.",
                &self.queue_depth,
            ),
            (
                "protloc_queue_rejections_total",
                "counter",
                "Requests refused because the queue was full (429).",
                &self.queue_rejections,
            ),
            (
                "protloc_request_timeouts_total",
                "counter",
                "Requests that ran past --request-timeout-ms.",
                &self.timeouts,
            ),
        ];
        for (name, kind, help, v) in scalars {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_renders() {
        let m = Metrics::default();
        m.record_batch(3, 300, 290, Duration::from_millis(20));
        m.record_batch(1, 50, 48, Duration::from_millis(2));
        m.record_request("/v1/predict", 200, Duration::from_millis(30));
        m.record_request("/v1/predict", 422, Duration::from_millis(1));
        assert_eq!(m.batch_stats(), (2, 2.0));
        let text = m.render();
        assert!(text.contains("protloc_requests_total{route=\"/v1/predict\",status=\"422\"} 1"));
        assert!(
            text.contains("protloc_batch_size_bucket{le=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("protloc_batch_size_bucket{le=\"4\"} 2"),
            "{text}"
        );
        assert!(text.contains("protloc_batch_size_sum 4"), "{text}");
        assert!(text.contains("protloc_residues_total 338"), "{text}");
        assert!(text.contains("# TYPE protloc_queue_depth gauge"));
    }
}
