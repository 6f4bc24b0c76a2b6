//! Bounded fault injection against a live server on loopback: slow-loris clients, clients
//! that disconnect mid-request, random bytes, oversize bodies and a burst beyond the queue.
//! Afterwards the server must still answer `/ping` and give correct predictions, and no
//! well-formed request may have received a 5xx.

mod serve_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serve_support as support;

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Status code of the first response on `s`, or `None` when the server closed the
/// connection without answering.
fn status_of(s: &mut TcpStream) -> Option<u16> {
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

#[test]
fn server_survives_hostile_clients() {
    let mut o = support::options();
    o.limits.header_timeout = Duration::from_millis(400);
    o.limits.max_body_bytes = 32 * 1024;
    o.limits.max_queue = 16;
    let server = support::start(o);
    let addr = server.addr;
    let agent = support::agent();
    let ping = |agent: &ureq::Agent| support::get(agent, &server.url("/ping")).status;

    // 1. Slow-loris: connections that never finish their headers. The server keeps
    //    answering others meanwhile, and drops the slow ones after the header timeout.
    let mut slow: Vec<TcpStream> = (0..24)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
                .unwrap();
            s
        })
        .collect();
    assert_eq!(
        ping(&agent),
        200,
        "/ping must answer while slow clients hold connections"
    );
    let t0 = Instant::now();
    for s in &mut slow {
        let mut buf = [0u8; 256];
        // The server closes the connection (EOF, possibly after a 408) well before our 10 s
        // read timeout.
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break true,
                Ok(_) => continue,
            }
        };
        assert!(closed);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "slow clients were not disconnected"
    );

    // 2. Clients that disconnect mid-body and right after sending a full request.
    let body = serde_json::json!({ "inputs": vec!["MKVLAAGGLLLLKDEL"; 4] }).to_string();
    for i in 0..30 {
        let mut s = connect(addr);
        if i % 2 == 0 {
            let head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n";
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body.as_bytes()[..body.len() / 2]).unwrap();
        } else {
            let req = format!(
                "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).unwrap();
        }
        drop(s);
    }

    // 3. Random bytes: answered with a 4xx or a closed connection, never a 5xx.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..40 {
        let mut s = connect(addr);
        let n = rng.random_range(1..2048);
        let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        if let Some(code) = status_of(&mut s) {
            assert!((400..500).contains(&code), "random bytes got HTTP {code}");
        }
    }

    // 4. Oversize body: 413 with a JSON error.
    let big = "A".repeat(64 * 1024);
    let r = support::post(
        &agent,
        &server.url("/v1/predict"),
        Some("text/plain"),
        &[],
        &big,
    );
    r.expect_error(413, "payload_too_large");

    // 5. A burst beyond the queue: only 2xx or 429 for well-formed requests, then recovery.
    let proteins = support::proteins();
    let seqs: Vec<&str> = proteins.iter().take(8).map(|(_, s)| s.as_str()).collect();
    let req = serde_json::json!({ "inputs": seqs });
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..48)
            .map(|_| {
                let (agent, url, req) = (support::agent(), server.url("/v1/predict"), req.clone());
                scope.spawn(move || support::post_json(&agent, &url, &req).status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "burst statuses: {statuses:?}"
    );
    assert!(statuses.contains(&200), "no request of the burst succeeded");

    // The server is healthy and still right afterwards.
    assert_eq!(ping(&agent), 200);
    let want = support::offline_probabilities(&seqs);
    let mut got = None;
    support::wait_until("the queue drains and predictions succeed", || {
        let r = support::post_json(&agent, &server.url("/v1/predict"), &req);
        assert!(r.status < 500, "well-formed request got {}", r.status);
        if r.status == 200 {
            got = Some(r.json());
        }
        r.status == 200
    });
    let got = got.unwrap();
    let labels = support::labels();
    for (i, p) in want.iter().enumerate() {
        let probs = got["predictions"][i]["probabilities"].as_array().unwrap();
        assert_eq!(probs.len(), labels.len());
        for entry in probs {
            let label = entry["label"].as_str().unwrap();
            let v = entry["probability"].as_f64().unwrap();
            let j = labels.iter().position(|l| l == label).unwrap();
            assert!(
                (v - p[j] as f64).abs() < 1e-5,
                "protein {i} {label}: {v} vs {}",
                p[j]
            );
        }
    }
}
