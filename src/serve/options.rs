//! What `protloc serve` takes: [`ServeOptions`], and the server's [`Limits`], declared once
//! with their defaults and read by the CLI (`#[command(flatten)]`), the queue, the routes and
//! `GET /v1/info`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::tokenize::Truncation;

/// Everything `protloc serve` takes.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model (see [`crate::model::import`]).
    pub model: PathBuf,
    /// The encoder of a reference `model.pth` given as `model` (see
    /// [`crate::model::import`]); `None` for a directory.
    pub base: Option<String>,
    pub host: String,
    /// 0 picks a free port (see `ServerHandle::addr`).
    pub port: u16,
    /// Batching, queue, request-size and time limits.
    pub limits: Limits,
    /// Override the run's truncation policy.
    pub truncate: Option<Truncation>,
    /// Reject sequences longer than the model's budget (422) instead of truncating.
    pub no_truncate: bool,
    /// Bearer token required on the prediction routes.
    pub api_key: Option<String>,
    /// Async runtime threads (HTTP, parsing).
    pub http_threads: usize,
    /// Where the model runs.
    pub device: crate::device::DeviceSpec,
}

impl ServeOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            base: None,
            host: "127.0.0.1".into(),
            port: 8080,
            limits: Limits::default(),
            truncate: None,
            no_truncate: false,
            api_key: None,
            http_threads: 2,
            device: Default::default(),
        }
    }
}

/// The server's limits: micro-batching, queue, request size and time. `GET /v1/info` reports
/// them (times in milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Padded tokens (sequences x longest) per inference batch. On CPU small budgets are
    /// fastest for long proteins (docs/performance.md); raise it on a GPU.
    #[arg(long, default_value_t = 1024)]
    pub max_batch_tokens: usize,
    /// Sequences per inference batch at most.
    #[arg(long, default_value_t = 64)]
    pub max_batch_size: usize,
    /// How long to wait for more sequences when less than a full batch is queued.
    #[arg(long = "max-wait-ms", value_name = "MAX_WAIT_MS", default_value = "2", value_parser = millis)]
    #[serde(rename = "max_wait_ms", with = "as_millis")]
    #[schema(value_type = u64)]
    pub max_wait: Duration,
    /// Sequences allowed to wait at once; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    pub max_queue: usize,
    /// Request body limit in bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Sequences per request at most (413 beyond).
    #[arg(long, default_value_t = 1024)]
    pub max_sequences: usize,
    /// Answer 503 when a request is not done after this long.
    #[arg(long = "request-timeout-ms", value_name = "REQUEST_TIMEOUT_MS", default_value = "60000", value_parser = millis)]
    #[serde(rename = "request_timeout_ms", with = "as_millis")]
    #[schema(value_type = u64)]
    pub request_timeout: Duration,
    /// Disconnect clients that do not finish sending their request headers within this
    /// time (slow-loris protection).
    #[arg(long = "header-timeout-ms", value_name = "HEADER_TIMEOUT_MS", default_value = "10000", value_parser = millis)]
    #[serde(skip, default = "default_header_timeout")]
    pub header_timeout: Duration,
    /// Inference threads, each with its own copy of the model (1 is best on CPU: one batch
    /// already uses every core).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_tokens: 1024,
            max_batch_size: 64,
            max_wait: Duration::from_millis(2),
            max_queue: 4096,
            max_body_bytes: 8 << 20,
            max_sequences: 1024,
            request_timeout: Duration::from_secs(60),
            header_timeout: default_header_timeout(),
            workers: 1,
        }
    }
}

impl Limits {
    /// The limits the server runs with: counts that must be positive raised to 1, timeouts
    /// to 1 ms.
    pub fn normalized(self) -> Self {
        let ms = Duration::from_millis(1);
        Self {
            max_batch_tokens: self.max_batch_tokens.max(1),
            max_batch_size: self.max_batch_size.max(1),
            max_queue: self.max_queue.max(1),
            request_timeout: self.request_timeout.max(ms),
            header_timeout: self.header_timeout.max(ms),
            workers: self.workers.max(1),
            ..self
        }
    }
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Parses a command-line value in milliseconds.
fn millis(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_millis)
}

/// Serializes a [`Duration`] as whole milliseconds.
mod as_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: Limits,
    }

    #[test]
    fn command_line_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        assert_eq!(cli.limits, Limits::default());
        let cli = Cli::try_parse_from(["serve", "--max-wait-ms", "7", "--request-timeout-ms", "0"])
            .unwrap();
        assert_eq!(cli.limits.max_wait, Duration::from_millis(7));
        assert_eq!(
            cli.limits.normalized().request_timeout,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn reported_in_milliseconds() {
        let v = serde_json::to_value(Limits::default()).unwrap();
        assert_eq!(v["max_wait_ms"], 2);
        assert_eq!(v["request_timeout_ms"], 60_000);
        assert!(v.get("header_timeout").is_none());
        let back: Limits = serde_json::from_value(v).unwrap();
        assert_eq!(back, Limits::default());
    }
}
