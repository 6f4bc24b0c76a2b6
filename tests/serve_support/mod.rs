//! Helpers for the `serve_*` integration tests: a small trained model (trained once per test
//! binary), a loopback server, and a tiny HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use protloc::serve::{ServeOptions, ServerHandle};

/// Residue budget of the test model, small so truncation is easy to trigger.
pub const MAX_RESIDUES: usize = 64;

struct Trained {
    _dir: tempfile::TempDir,
    run: PathBuf,
    data: PathBuf,
}

fn trained() -> &'static Trained {
    static T: OnceLock<Trained> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("demo.fasta");
        protloc::demo::write_dataset(&data, 4, 11).unwrap();
        let run = dir.path().join("run");
        let mut args = protloc::train::TrainArgs::new("scratch:tiny", data.clone(), run.clone());
        args.max_steps = Some(2);
        args.epochs = 1;
        args.max_residues = Some(MAX_RESIDUES);
        protloc::train::train(&args).unwrap();
        Trained {
            _dir: dir,
            run,
            data,
        }
    })
}

/// Run directory of a tiny BERT fine-tuned for two steps on synthetic DeepLoc data.
pub fn model_dir() -> &'static Path {
    &trained().run
}

/// The synthetic DeepLoc FASTA the model was trained on (40 proteins of all locations).
pub fn data_file() -> &'static Path {
    &trained().data
}

/// (id, sequence) of the synthetic proteins.
pub fn proteins() -> Vec<(String, String)> {
    protloc::data::fasta::read_fasta(data_file(), Default::default())
        .unwrap()
        .records
        .into_iter()
        .map(|r| (r.id, r.sequence))
        .collect()
}

pub fn options() -> ServeOptions {
    let mut o = ServeOptions::new(model_dir());
    o.port = 0;
    o
}

pub fn start(o: ServeOptions) -> ServerHandle {
    protloc::serve::spawn(o).expect("server starts")
}

/// Class probabilities from the library directly (what `protloc predict` computes).
pub fn offline_probabilities(seqs: &[&str]) -> Vec<Vec<f32>> {
    let model =
        protloc::model::SequenceClassifier::load(model_dir(), &candle_core::Device::Cpu).unwrap();
    let enc: Vec<_> = seqs
        .iter()
        .map(|s| {
            model
                .base
                .tokenizer
                .encode(s, model.task.max_residues, model.task.truncate)
        })
        .collect();
    protloc::infer::class_probabilities(&model, &enc, Default::default(), None).unwrap()
}

pub fn labels() -> Vec<String> {
    protloc::model::SequenceClassifier::load(model_dir(), &candle_core::Device::Cpu)
        .unwrap()
        .task
        .labels
}

/// A finished HTTP exchange.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts an error reply: the status and the JSON `code`; returns the message.
    pub fn expect_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        assert_eq!(v["code"], code, "{}", self.body);
        v["error"].as_str().expect("error message").to_string()
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

fn finish(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = resp.header(&n).unwrap_or("").to_string();
            (n, v)
        })
        .collect();
    let body = resp.into_string().unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    finish(agent.get(url).call())
}

/// POSTs `body` with `content_type` (none when `None`) and extra headers.
pub fn post(
    agent: &ureq::Agent,
    url: &str,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = agent.post(url);
    if let Some(ct) = content_type {
        req = req.set("Content-Type", ct);
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    finish(req.send_string(body))
}

pub fn post_json(agent: &ureq::Agent, url: &str, body: &serde_json::Value) -> Reply {
    post(agent, url, Some("application/json"), &[], &body.to_string())
}

/// Polls `cond` up to ~60 s (a guard against hanging, not a timing assertion).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("gave up waiting for {what}");
}

/// A metric's value from Prometheus text (`name` includes any labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
