//! Throughput and latency of `protloc serve` under concurrent clients, next to sequential
//! single-protein prediction and batched `protloc predict` through the library.
//!
//! ```text
//! cargo bench --bench serve_load -- --model RUN_DIR --data deeploc_data.fasta \
//!     [--limit 200] [--requests 200] [--concurrency 1,8,64] [--url http://host:port]
//!     [--max-batch-tokens N] [--max-batch-size N] [--skip-baseline]
//! ```
//!
//! Uses the `test`-tagged proteins of a DeepLoc FASTA (all records when none are tagged).
//! Without `--url` the server runs in this process on a loopback port with default options.
//! Each request carries one protein; proteins are cycled through in file order.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use protloc::data::{read_dataset, ReadOptions};
use protloc::infer::{class_probabilities, BatchLimits};
use protloc::model::SequenceClassifier;

struct Args {
    model: PathBuf,
    data: PathBuf,
    limit: usize,
    requests: usize,
    concurrency: Vec<usize>,
    url: Option<String>,
    skip_baseline: bool,
    max_batch_tokens: usize,
    max_batch_size: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: PathBuf::new(),
        data: PathBuf::new(),
        limit: 200,
        requests: 200,
        concurrency: vec![1, 8, 64],
        url: None,
        skip_baseline: false,
        max_batch_tokens: protloc::serve::Limits::default().max_batch_tokens,
        max_batch_size: protloc::serve::Limits::default().max_batch_size,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = val()?.into(),
            "--data" => a.data = val()?.into(),
            "--limit" => a.limit = val()?.parse()?,
            "--requests" => a.requests = val()?.parse()?,
            "--concurrency" => {
                a.concurrency = val()?
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--url" => a.url = Some(val()?),
            "--skip-baseline" => a.skip_baseline = true,
            "--max-batch-tokens" => a.max_batch_tokens = val()?.parse()?,
            "--max-batch-size" => a.max_batch_size = val()?.parse()?,
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown argument {other}"),
        }
    }
    if a.model.as_os_str().is_empty() || a.data.as_os_str().is_empty() {
        bail!("usage: serve_load --model RUN_DIR --data FASTA [--limit N] [--requests N] [--concurrency 1,8,64] [--url URL] [--skip-baseline] [--max-batch-tokens N] [--max-batch-size N]");
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

struct Row {
    name: String,
    sequences: usize,
    residues: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Row {
    fn print(&self) {
        let mut l = self.latencies.clone();
        l.sort();
        let s = self.wall.as_secs_f64();
        println!(
            "| {} | {} | {:.1} | {:.0} | {} | {} |",
            self.name,
            self.sequences,
            self.sequences as f64 / s,
            self.residues as f64 / s,
            if l.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", percentile(&l, 0.5))
            },
            if l.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", percentile(&l, 0.99))
            },
        );
    }
}

fn main() -> Result<()> {
    // The in-process server must run as `protloc serve` does (allocator, candle's pool).
    protloc::runtime::tune_for_tensors();
    let args = parse_args()?;
    let ds = read_dataset(&args.data, ReadOptions::default())?;
    let test: Vec<_> = ds.records.iter().filter(|r| r.is_test).collect();
    let records = if test.is_empty() {
        ds.records.iter().collect()
    } else {
        test
    };
    let seqs: Vec<(String, String)> = records
        .into_iter()
        .take(args.limit)
        .map(|r| (r.id.clone(), r.sequence.clone()))
        .collect();
    let model = SequenceClassifier::load(&args.model, &Device::Cpu)?;
    let max = model.task.max_residues;
    let used = |s: &str| s.len().min(max);
    let limits = BatchLimits {
        max_batch_tokens: args.max_batch_tokens,
        max_batch_size: args.max_batch_size,
    };
    eprintln!(
        "batch limits: {} tokens, {} sequences",
        args.max_batch_tokens, args.max_batch_size
    );
    eprintln!(
        "{} proteins (mean length {:.0}, max_residues {max}), {} threads",
        seqs.len(),
        seqs.iter().map(|(_, s)| s.len()).sum::<usize>() as f64 / seqs.len() as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| mode | sequences | sequences/s | residues/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|");

    if !args.skip_baseline {
        let encode = |s: &str| model.base.tokenizer.encode(s, max, model.task.truncate);
        // One protein at a time through the library (what a naive per-request handler does).
        let mut lat = Vec::new();
        let t0 = Instant::now();
        for (_, s) in &seqs {
            let t = Instant::now();
            class_probabilities(&model, &[encode(s)], limits, None)?;
            lat.push(t.elapsed());
        }
        Row {
            name: "library, sequential, 1 protein per call".into(),
            sequences: seqs.len(),
            residues: seqs.iter().map(|(_, s)| used(s)).sum(),
            wall: t0.elapsed(),
            latencies: lat,
        }
        .print();
        // `protloc predict`: the whole set at once, length-sorted token-budget batches.
        let t0 = Instant::now();
        let enc: Vec<_> = seqs.iter().map(|(_, s)| encode(s)).collect();
        class_probabilities(&model, &enc, limits, None)?;
        Row {
            name: "`protloc predict` path, whole set batched".into(),
            sequences: seqs.len(),
            residues: seqs.iter().map(|(_, s)| used(s)).sum(),
            wall: t0.elapsed(),
            latencies: Vec::new(),
        }
        .print();
    }
    drop(model);

    let (server, base) = match &args.url {
        Some(u) => (None, u.trim_end_matches('/').to_string()),
        None => {
            let mut o = protloc::serve::ServeOptions::new(&args.model);
            o.port = 0;
            o.limits.max_batch_tokens = args.max_batch_tokens;
            o.limits.max_batch_size = args.max_batch_size;
            let s = protloc::serve::spawn(o)?;
            let u = format!("http://{}", s.addr);
            (Some(s), u)
        }
    };
    let seqs = Arc::new(seqs);
    for &c in &args.concurrency {
        let next = Arc::new(AtomicUsize::new(0));
        let lat = Arc::new(Mutex::new(Vec::new()));
        let residues = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let url = format!("{base}/invocations");
        let t0 = Instant::now();
        let threads: Vec<_> = (0..c)
            .map(|_| {
                let (seqs, next, lat, residues, errors, url) = (
                    Arc::clone(&seqs),
                    Arc::clone(&next),
                    Arc::clone(&lat),
                    Arc::clone(&residues),
                    Arc::clone(&errors),
                    url.clone(),
                );
                let requests = args.requests;
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(300))
                        .build();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            break;
                        }
                        let (id, s) = &seqs[i % seqs.len()];
                        let body = serde_json::json!({"id": id, "sequence": s}).to_string();
                        let t = Instant::now();
                        match agent
                            .post(&url)
                            .set("Content-Type", "application/json")
                            .send_string(&body)
                        {
                            Ok(r) => {
                                let _ = r.into_string();
                                lat.lock().unwrap().push(t.elapsed());
                                residues.fetch_add(s.len().min(max), Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("request {i}: {e}");
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client thread");
        }
        let wall = t0.elapsed();
        let lat = std::mem::take(&mut *lat.lock().unwrap());
        Row {
            name: format!("serve, concurrency {c}"),
            sequences: lat.len(),
            residues: residues.load(Ordering::Relaxed),
            wall,
            latencies: lat,
        }
        .print();
        let e = errors.load(Ordering::Relaxed);
        if e > 0 {
            eprintln!("concurrency {c}: {e} failed requests");
        }
    }
    if let Some(s) = server {
        let (batches, mean) = s.metrics().batch_stats();
        eprintln!("server ran {batches} batches, mean batch size {mean:.2}");
        s.shutdown()?;
    }
    Ok(())
}
