//! `protloc serve` end to end: a real server on a loopback port with a small trained model,
//! every route, content type and error.

mod serve_support;

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;
use serve_support::*;

use protloc::serve::ServerHandle;

/// One server shared by the tests that do not need special options.
fn server() -> &'static ServerHandle {
    static S: OnceLock<ServerHandle> = OnceLock::new();
    S.get_or_init(|| {
        let mut o = options();
        o.limits.max_body_bytes = 64 * 1024;
        o.limits.max_sequences = 50;
        start(o)
    })
}

fn predict_url() -> String {
    server().url("/v1/predict")
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-5, "{what}: {a} vs {b}");
}

/// Checks one prediction object against the offline probabilities of its sequence.
fn check_prediction(p: &serde_json::Value, id: &str, offline: &[f32], labels: &[String]) {
    assert_eq!(p["id"], id);
    let probs = p["probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), labels.len());
    let mut prev = f64::INFINITY;
    let mut total = 0.0;
    for entry in probs {
        let label = entry["label"].as_str().unwrap();
        let prob = entry["probability"].as_f64().unwrap();
        assert!(prob <= prev, "not sorted: {probs:?}");
        prev = prob;
        total += prob;
        let i = labels.iter().position(|l| l == label).unwrap();
        assert_close(prob, offline[i] as f64, label);
    }
    assert_close(total, 1.0, "sum");
    let best = protloc::infer::argmax(offline);
    assert_eq!(p["prediction"], labels[best].as_str());
    assert_close(
        p["confidence"].as_f64().unwrap(),
        offline[best] as f64,
        "confidence",
    );
}

#[test]
fn ping_health_info_metrics_openapi() {
    let a = agent();
    let r = get(&a, &server().url("/ping"));
    assert_eq!(r.status, 200);
    let r = get(&a, &server().url("/health"));
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("ok")));

    let info = get(&a, &server().url("/v1/info")).json();
    assert_eq!(info["labels"].as_array().unwrap().len(), 10);
    assert_eq!(info["labels"][0], labels()[0].as_str());
    assert_eq!(info["max_residues"], MAX_RESIDUES);
    assert_eq!(info["truncate"], "head-tail");
    assert_eq!(info["limits"]["max_sequences"], 50);
    assert_eq!(info["limits"]["auth"], false);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["model_type"], "bert");
    assert_eq!(info["ensemble_members"], 1);
    // Where the model runs: the CPU, unless this is a CUDA build on a machine with a GPU.
    let device = info["device"].as_str().unwrap();
    assert!(
        device == "cpu" || (protloc::device::CUDA_BUILT && device.starts_with("cuda:")),
        "{device}"
    );
    // Fine-tuned single-label, without the membrane output (see tests/answers.rs for the rest).
    assert_eq!(info["membrane_head"], false);
    assert_eq!(info["multi_label"], false);
    assert!(info.get("thresholds").is_none());

    // A prediction first, so the batch metrics are non-empty.
    let r = post_json(&a, &predict_url(), &json!("MKTAYIAKQR"));
    assert_eq!(r.status, 200, "{}", r.body);
    let m = get(&a, &server().url("/metrics"));
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        metric(
            &m.body,
            "protloc_requests_total{route=\"/v1/predict\",status=\"200\"}"
        )
        .unwrap()
            >= 1.0,
        "{}",
        m.body
    );
    assert!(metric(&m.body, "protloc_batch_size_count").unwrap() >= 1.0);
    assert!(metric(&m.body, "protloc_sequences_total").unwrap() >= 1.0);
    assert!(m
        .body
        .contains("protloc_request_duration_seconds_bucket{route=\"/ping\",le=\"+Inf\"}"));
    assert!(m.body.contains("# TYPE protloc_queue_depth gauge"));

    let doc = get(&a, &server().url("/openapi.json")).json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/invocations"]["post"].is_object());
    assert!(doc["components"]["schemas"]["PredictResponse"].is_object());
}

#[test]
fn json_forms_match_offline_predictions() {
    let a = agent();
    let labels = labels();
    let prots = proteins();
    let (id0, s0) = &prots[0];
    let (id1, s1) = &prots[13];
    let offline = offline_probabilities(&[s0, s1]);

    // A bare string; lower case and whitespace are tolerated.
    let messy = format!("  {}\n{} ", s0[..20].to_lowercase(), &s0[20..]);
    for url in [server().url("/invocations"), predict_url()] {
        let r = post_json(&a, &url, &json!(messy));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["predictions"].as_array().unwrap().len(), 1);
        check_prediction(&v["predictions"][0], "seq1", &offline[0], &labels);
    }
    // {"sequence", "id"}
    let v = post_json(&a, &predict_url(), &json!({"sequence": s1, "id": id1})).json();
    check_prediction(&v["predictions"][0], id1, &offline[1], &labels);
    // {"inputs": [strings]}
    let v = post_json(&a, &predict_url(), &json!({"inputs": [s0, s1]})).json();
    check_prediction(&v["predictions"][0], "seq1", &offline[0], &labels);
    check_prediction(&v["predictions"][1], "seq2", &offline[1], &labels);
    // {"inputs": [{id, sequence}]}, order kept
    let v = post_json(
        &a,
        &predict_url(),
        &json!({"inputs": [{"id": id1, "sequence": s1}, {"id": id0, "sequence": s0}]}),
    );
    assert_eq!(v.status, 200);
    let v = v.json();
    check_prediction(&v["predictions"][0], id1, &offline[1], &labels);
    check_prediction(&v["predictions"][1], id0, &offline[0], &labels);
    assert_eq!(v["predictions"][0]["length"], s1.len());
    // No Content-Type at all is read as JSON.
    let r = post(&a, &predict_url(), None, &[], &json!(s0).to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    // Timing headers.
    let r = post_json(&a, &predict_url(), &json!(s0));
    for h in ["x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms"] {
        let v: f64 = r
            .header(h)
            .unwrap_or_else(|| panic!("{h}"))
            .parse()
            .unwrap();
        assert!(v >= 0.0);
    }
    assert_eq!(r.header("x-batches"), Some("1"));
}

#[test]
fn fasta_plain_text_and_csv_inputs_and_csv_output() {
    let a = agent();
    let labels = labels();
    let prots = proteins();
    let (id0, s0) = &prots[2];
    let (id1, s1) = &prots[27];
    let offline = offline_probabilities(&[s0, s1]);
    let wrap = |s: &str| {
        s.as_bytes()
            .chunks(30)
            .map(|c| std::str::from_utf8(c).unwrap().to_lowercase())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let fasta = format!(
        ">{id0} some description\n{}\n\n>{id1}\r\n{}\n",
        wrap(s0),
        wrap(s1)
    );
    for ct in ["text/x-fasta", "text/plain; charset=utf-8"] {
        let r = post(&a, &predict_url(), Some(ct), &[], &fasta);
        assert_eq!(r.status, 200, "{ct}: {}", r.body);
        let v = r.json();
        check_prediction(&v["predictions"][0], id0, &offline[0], &labels);
        check_prediction(&v["predictions"][1], id1, &offline[1], &labels);
    }
    // text/plain without a header: one bare sequence.
    let r = post(&a, &predict_url(), Some("text/plain"), &[], &wrap(s0));
    check_prediction(&r.json()["predictions"][0], "seq1", &offline[0], &labels);

    let csv_in = format!("id,sequence\n{id0},{s0}\n{id1},{}\n", s1.to_lowercase());
    let r = post(&a, &predict_url(), Some("text/csv"), &[], &csv_in);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    check_prediction(&v["predictions"][0], id0, &offline[0], &labels);
    check_prediction(&v["predictions"][1], id1, &offline[1], &labels);

    // Accept: text/csv gives a table with every label's probability in label order.
    let r = post(
        &a,
        &predict_url(),
        Some("text/csv"),
        &[("Accept", "text/csv")],
        &csv_in,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    let mut rows = csv::Reader::from_reader(r.body.as_bytes());
    let head: Vec<String> = rows.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        &head[..5],
        ["id", "prediction", "confidence", "length", "residues_used"]
    );
    assert_eq!(&head[5..], &labels[..]);
    let recs: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(recs.len(), 2);
    for (rec, (id, probs)) in recs.iter().zip([(id0, &offline[0]), (id1, &offline[1])]) {
        assert_eq!(&rec[0], id.as_str());
        assert_eq!(&rec[1], labels[protloc::infer::argmax(probs)].as_str());
        for (k, p) in probs.iter().enumerate() {
            assert_close(rec[5 + k].parse().unwrap(), *p as f64, &labels[k]);
        }
    }
    // Accept naming nothing we produce.
    let r = post(
        &a,
        &predict_url(),
        Some("text/csv"),
        &[("Accept", "application/xml")],
        &csv_in,
    );
    r.expect_error(406, "not_acceptable");
}

#[test]
fn top_k_and_raw_scores() {
    let a = agent();
    let (_, s) = &proteins()[5];
    let full = post_json(&a, &predict_url(), &json!(s)).json();
    let full = &full["predictions"][0];
    assert!(full.get("scores").is_none());
    let r = post_json(
        &a,
        &format!("{}?top_k=3&raw_scores=true", predict_url()),
        &json!(s),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let p = &v["predictions"][0];
    let probs = p["probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), 3);
    assert_eq!(probs[..], full["probabilities"].as_array().unwrap()[..3]);
    let scores = p["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 3);
    // Scores are the logits: same order, and softmax differences match.
    for (pr, sc) in probs.iter().zip(scores) {
        assert_eq!(pr["label"], sc["label"]);
    }
    let ratio = (probs[0]["probability"].as_f64().unwrap()
        / probs[1]["probability"].as_f64().unwrap())
    .ln();
    let diff = scores[0]["score"].as_f64().unwrap() - scores[1]["score"].as_f64().unwrap();
    assert!((ratio - diff).abs() < 1e-3, "{ratio} vs {diff}");

    let r = post_json(&a, &format!("{}?top_k=0", predict_url()), &json!(s));
    r.expect_error(400, "invalid_query");
    let r = post_json(&a, &format!("{}?top_k=many", predict_url()), &json!(s));
    r.expect_error(400, "invalid_query");
}

#[test]
fn long_sequences_are_truncated_per_policy() {
    let a = agent();
    let long: String = "MKT".repeat(40) + "KDEL"; // 124 residues > 64
    let v = post_json(&a, &predict_url(), &json!({"sequence": long})).json();
    let p = &v["predictions"][0];
    assert_eq!(p["length"], 124);
    assert_eq!(p["residues_used"], MAX_RESIDUES);
    assert_eq!(p["truncated"], true);
    // Same as the library's head-tail truncation.
    let offline = offline_probabilities(&[&long]);
    check_prediction(p, "seq1", &offline[0], &labels());
    let short = post_json(&a, &predict_url(), &json!("MKTKDEL")).json();
    assert_eq!(short["predictions"][0]["truncated"], false);
}

#[test]
fn client_errors_are_json_with_codes() {
    let a = agent();
    let url = predict_url();
    // Malformed JSON.
    post(
        &a,
        &url,
        Some("application/json"),
        &[],
        "{\"inputs\": [\"MKT\"",
    )
    .expect_error(400, "invalid_json");
    // Valid JSON of the wrong shape.
    post_json(&a, &url, &json!({"seq": "MKT"})).expect_error(400, "invalid_request");
    // Unsupported content type.
    post(&a, &url, Some("application/xml"), &[], "<seq>MKT</seq>")
        .expect_error(415, "unsupported_media_type");
    post(
        &a,
        &url,
        Some("application/x-www-form-urlencoded"),
        &[],
        "sequence=MKT",
    )
    .expect_error(415, "unsupported_media_type");
    // Body over --max-body-bytes (64 KiB here).
    let big = json!("A".repeat(70 * 1024));
    post_json(&a, &url, &big).expect_error(413, "payload_too_large");
    // Too many sequences (50 allowed here).
    let many: Vec<&str> = vec!["MKT"; 51];
    let msg = post_json(&a, &url, &json!({"inputs": many})).expect_error(413, "too_many_sequences");
    assert!(msg.contains("51"), "{msg}");
    // Invalid residue: names the sequence and position.
    let msg = post_json(
        &a,
        &url,
        &json!({"inputs": [{"id": "ok", "sequence": "MKT"}, {"id": "P99", "sequence": "MKTJAA"}]}),
    )
    .expect_error(422, "invalid_sequence");
    assert!(
        msg.contains("sequence 2") && msg.contains("P99") && msg.contains("position 4"),
        "{msg}"
    );
    let msg = post(&a, &url, Some("text/x-fasta"), &[], ">A\nMKT\n>B\nMK1\n")
        .expect_error(422, "invalid_sequence");
    assert!(msg.contains("\"B\"") && msg.contains("position 3"), "{msg}");
    // Empty sequence and empty request.
    let msg =
        post_json(&a, &url, &json!({"sequence": " \n "})).expect_error(422, "invalid_sequence");
    assert!(msg.contains("empty"), "{msg}");
    post_json(&a, &url, &json!({"inputs": []})).expect_error(422, "empty_input");
    post(&a, &url, Some("text/x-fasta"), &[], "").expect_error(422, "empty_input");
    // FASTA and CSV structure errors.
    post(&a, &url, Some("text/x-fasta"), &[], "MKT\n>A\nMK\n").expect_error(400, "invalid_fasta");
    post(&a, &url, Some("text/csv"), &[], "a,b,c\n1,2,3\n").expect_error(400, "invalid_csv");
    // Not UTF-8.
    let r = a
        .post(&url)
        .set("Content-Type", "text/x-fasta")
        .send_bytes(&[b'>', b'a', b'\n', 0xff, 0xfe]);
    let r = match r {
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        other => panic!("{other:?}"),
    };
    assert_eq!(r.0, 400, "{}", r.1);
    // Unknown route and wrong method: JSON too.
    get(&a, &server().url("/nope")).expect_error(404, "not_found");
    get(&a, &url).expect_error(405, "method_not_allowed");
    // The server is fine afterwards.
    assert_eq!(post_json(&a, &url, &json!("MKT")).status, 200);
    let m = get(&a, &server().url("/metrics")).body;
    assert!(
        metric(
            &m,
            "protloc_requests_total{route=\"/v1/predict\",status=\"422\"}"
        )
        .unwrap()
            >= 4.0
    );
}

#[test]
fn no_truncate_rejects_long_sequences() {
    let mut o = options();
    o.no_truncate = true;
    let s = start(o);
    let a = agent();
    let info = get(&a, &s.url("/v1/info")).json();
    assert_eq!(info["no_truncate"], true);
    let ok = "M".repeat(MAX_RESIDUES);
    assert_eq!(
        post_json(&a, &s.url("/invocations"), &json!(ok)).status,
        200
    );
    let long = "M".repeat(MAX_RESIDUES + 1);
    let msg = post_json(
        &a,
        &s.url("/invocations"),
        &json!({"inputs": ["MKT", {"id": "L", "sequence": long}]}),
    )
    .expect_error(422, "sequence_too_long");
    assert!(msg.contains("sequence 2") && msg.contains("65"), "{msg}");
    s.shutdown().unwrap();
}

#[test]
fn api_key_guards_prediction_routes_only() {
    let mut o = options();
    o.api_key = Some("s3cret".into());
    let s = start(o);
    let a = agent();
    let body = json!("MKT").to_string();
    let ct = Some("application/json");
    for url in [s.url("/invocations"), s.url("/v1/predict")] {
        post(&a, &url, ct, &[], &body).expect_error(401, "unauthorized");
        post(&a, &url, ct, &[("Authorization", "Bearer wrong")], &body)
            .expect_error(401, "unauthorized");
        let r = post(&a, &url, ct, &[("Authorization", "Bearer s3cret")], &body);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(get(&a, &s.url("/ping")).status, 200);
    assert_eq!(get(&a, &s.url("/v1/info")).json()["limits"]["auth"], true);
    s.shutdown().unwrap();
}

#[test]
fn queue_full_gives_429_and_ping_answers_while_inference_is_held() {
    let mut o = options();
    o.limits.max_queue = 3;
    let s = start(o);
    s.set_paused(true);
    let url = s.url("/v1/predict");
    let held = std::thread::spawn({
        let url = url.clone();
        move || post_json(&agent(), &url, &json!({"inputs": ["MKT", "MKTW"]}))
    });
    wait_until("two queued sequences", || s.queue_depth() == 2);
    let a = agent();
    // The inference thread is busy (held); the HTTP side still answers.
    assert_eq!(get(&a, &s.url("/ping")).status, 200);
    let h = get(&a, &s.url("/health")).json();
    assert_eq!(h["queue_depth"], 2);
    assert_eq!(
        metric(&get(&a, &s.url("/metrics")).body, "protloc_queue_depth"),
        Some(2.0)
    );
    // 2 waiting + 2 more > 3.
    let r = post_json(&a, &url, &json!({"inputs": ["MKT", "MKT"]}));
    r.expect_error(429, "queue_full");
    assert_eq!(r.header("retry-after"), Some("1"));
    // One more still fits.
    let one = std::thread::spawn({
        let url = url.clone();
        move || post_json(&agent(), &url, &json!("MKTAA"))
    });
    wait_until("three queued sequences", || s.queue_depth() == 3);
    s.set_paused(false);
    let r = held.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["predictions"].as_array().unwrap().len(), 2);
    assert_eq!(one.join().unwrap().status, 200);
    let m = get(&a, &s.url("/metrics")).body;
    assert_eq!(metric(&m, "protloc_queue_rejections_total"), Some(1.0));
    s.shutdown().unwrap();
}

#[test]
fn request_timeout_gives_503_and_drops_the_work() {
    let mut o = options();
    o.limits.request_timeout = Duration::from_millis(200);
    let s = start(o);
    s.set_paused(true);
    let a = agent();
    let r = post_json(
        &a,
        &s.url("/v1/predict"),
        &json!({"inputs": ["MKT", "MKTW"]}),
    );
    let msg = r.expect_error(503, "timeout");
    assert!(msg.contains("200 ms"), "{msg}");
    assert!(r.header("retry-after").is_some());
    s.set_paused(false);
    // The abandoned sequences are dropped rather than computed.
    wait_until("empty queue", || s.queue_depth() == 0);
    assert_eq!(s.metrics().batch_stats().0, 0);
    assert_eq!(
        post_json(&a, &s.url("/v1/predict"), &json!("MKT")).status,
        200
    );
    assert_eq!(s.metrics().batch_stats(), (1, 1.0));
    s.shutdown().unwrap();
}

#[test]
fn graceful_shutdown_finishes_in_flight_work_and_refuses_new() {
    let mut s = start(options());
    s.set_paused(true);
    let url = s.url("/v1/predict");
    let addr = s.addr;
    let in_flight = std::thread::spawn({
        let url = url.clone();
        move || post_json(&agent(), &url, &json!({"inputs": ["MKTAYIAK", "MKT"]}))
    });
    wait_until("queued work", || s.queue_depth() == 2);
    s.begin_shutdown();
    wait_until("draining", || s.is_draining());
    // New connections are refused (or, if one slips in, told we are shutting down).
    let refused = match agent().post(&url).send_string("\"MKT\"") {
        Err(ureq::Error::Transport(_)) => true,
        Err(ureq::Error::Status(503, _)) => true,
        other => panic!("new request during shutdown: {other:?}"),
    };
    assert!(refused);
    s.set_paused(false);
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["predictions"].as_array().unwrap().len(), 2);
    s.shutdown().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err());
}
