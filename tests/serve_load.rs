//! Load test: many concurrent clients on loopback. Every request must succeed (no 5xx, no
//! dropped connection), every answer must equal the library's own prediction, and requests
//! from different clients must have been batched together.

mod serve_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use serve_support::*;

const REQUESTS: usize = 2000;
const CONCURRENCY: usize = 32;

#[test]
fn two_thousand_requests_at_concurrency_32() {
    let s = start(options());
    let prots = Arc::new(proteins());
    let seqs: Vec<&str> = prots.iter().map(|(_, s)| s.as_str()).collect();
    let offline = Arc::new(offline_probabilities(&seqs));
    let labels = Arc::new(labels());
    let next = Arc::new(AtomicUsize::new(0));
    let url = s.url("/invocations");
    let clients: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (prots, offline, labels, next, url) = (
                Arc::clone(&prots),
                Arc::clone(&offline),
                Arc::clone(&labels),
                Arc::clone(&next),
                url.clone(),
            );
            std::thread::spawn(move || {
                let a = agent();
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        break;
                    }
                    let k = i % prots.len();
                    let (id, seq) = &prots[k];
                    let r = a
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .send_string(&json!({"id": id, "sequence": seq}).to_string());
                    let resp = match r {
                        Ok(r) => r,
                        Err(e) => {
                            failures.push(format!("request {i}: {e}"));
                            continue;
                        }
                    };
                    let v: serde_json::Value = resp.into_json().unwrap();
                    let p = &v["predictions"][0];
                    let want = &offline[k];
                    let best = protloc::infer::argmax(want);
                    let ok = p["id"] == id.as_str()
                        && p["prediction"] == labels[best].as_str()
                        && (p["confidence"].as_f64().unwrap() - want[best] as f64).abs() < 1e-5;
                    if !ok {
                        failures.push(format!("request {i}: {p} vs {want:?}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let m = get(&agent(), &s.url("/metrics")).body;
    let ok = metric(
        &m,
        "protloc_requests_total{route=\"/invocations\",status=\"200\"}",
    );
    assert_eq!(ok, Some(REQUESTS as f64), "{m}");
    assert!(!m.contains(",status=\"5"), "5xx responses: {m}");
    let batches = metric(&m, "protloc_batch_size_count").unwrap();
    let sequences = metric(&m, "protloc_batch_size_sum").unwrap();
    assert_eq!(sequences, REQUESTS as f64);
    let mean = sequences / batches;
    eprintln!("{REQUESTS} requests in {batches} batches, mean batch size {mean:.2}");
    assert!(
        mean > 1.0,
        "no batching happened: {batches} batches for {sequences} sequences"
    );
    s.shutdown().unwrap();
}
