//! HTTP handlers: routing, content negotiation, auth, limits and JSON errors.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::parse::{parse_body, BodyKind, Input};
use super::queue::{JobOutput, Scored, SubmitError};
use super::request::PredictParams;
use super::response::{
    ClassProbability, ClassScore, ClassThreshold, Info, MembraneLabel, PredictResponse,
    ProteinPrediction,
};
use super::state::AppState;
use crate::model::AnswerRule;
use crate::tokenize::Encoded;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/health", get(health))
        .route("/v1/info", get(info))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/invocations", post(predict))
        .route("/v1/predict", post(predict))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// Counts and times every request; logs it.
async fn track(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    app.metrics.record_request(&route, status, elapsed);
    tracing::debug!(%method, route, status, ms = elapsed.as_secs_f64() * 1e3, "request");
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route; see /openapi.json",
    )
}

/// The managed-endpoint health check: 200 once the model is loaded, 503 while draining.
async fn ping(State(app): State<Arc<AppState>>) -> Response {
    if app.draining.load(Ordering::Relaxed) {
        return ApiError::unavailable("shutting_down", "server is shutting down", 1)
            .into_response();
    }
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response()
}

async fn health(State(app): State<Arc<AppState>>) -> Response {
    let draining = app.draining.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "status": if draining { "shutting_down" } else { "ok" },
        "model_loaded": true,
        "queue_depth": app.batcher.depth(),
        "uptime_seconds": app.started.elapsed().as_secs_f64(),
    });
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn info(State(app): State<Arc<AppState>>) -> Json<Info> {
    Json(app.info.clone())
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        super::openapi::json(),
    )
        .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFormat {
    Json,
    Csv,
}

/// Picks the response format from `Accept`: the first listed type we can produce
/// (JSON for `*/*`, `application/*` or no header; CSV for `text/csv` or `text/*`).
fn negotiate(accept: Option<&str>) -> Result<OutFormat, ApiError> {
    let Some(accept) = accept.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(OutFormat::Json);
    };
    for part in accept.split(',') {
        let mut fields = part.split(';');
        let mime = fields.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = fields.any(|p| {
            let p = p.trim().replace(' ', "");
            p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
        });
        if refused {
            continue;
        }
        match mime.as_str() {
            "application/json" | "*/*" | "application/*" => return Ok(OutFormat::Json),
            m if m.ends_with("+json") => return Ok(OutFormat::Json),
            "text/csv" | "text/*" | "application/csv" => return Ok(OutFormat::Csv),
            _ => {}
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "not_acceptable",
        format!("cannot produce {accept:?}: responses are application/json or text/csv"),
    ))
}

fn authorized(app: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = app.opts.api_key.as_deref() else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(g) => constant_time_eq(g.as_bytes(), key.as_bytes()),
        None => false,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    let mut seen = 0usize;
    let mut over = declared.is_some_and(|n| n > limit as u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("invalid_body", format!("cannot read request body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > limit {
                over = true;
            }
            if over {
                // Keep reading (and discarding) a while, so the client finishes sending and
                // sees the 413 instead of a broken pipe; give up on absurd sizes.
                buf = Vec::new();
                if seen > DRAIN_LIMIT.max(limit) {
                    break;
                }
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    if over {
        return Err(ApiError::payload_too_large(
            "payload_too_large",
            format!("request body exceeds {limit} bytes (--max-body-bytes)"),
        ));
    }
    Ok(buf)
}

/// Bytes of an over-limit body read and discarded before answering 413.
const DRAIN_LIMIT: usize = 64 << 20;

/// `POST /invocations` and `POST /v1/predict`.
async fn predict(
    State(app): State<Arc<AppState>>,
    query: Result<Query<PredictParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    match predict_inner(&app, query, &headers, body).await {
        Ok((mut resp, out)) => {
            let h = resp.headers_mut();
            let ms = |d: Duration| HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3));
            if let Ok(v) = ms(out.queue_time) {
                h.insert("x-queue-time-ms", v);
            }
            if let Ok(v) = ms(out.inference_time) {
                h.insert("x-inference-time-ms", v);
            }
            if let Ok(v) = ms(start.elapsed()) {
                h.insert("x-total-time-ms", v);
            }
            h.insert("x-batches", HeaderValue::from(out.batches));
            resp
        }
        Err(e) => e.into_response(),
    }
}

async fn predict_inner(
    app: &AppState,
    query: Result<Query<PredictParams>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Response, JobOutput), ApiError> {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable(
            "shutting_down",
            "server is shutting down",
            1,
        ));
    }
    if !authorized(app, headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <api key>)",
        ));
    }
    let Query(params) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if params.top_k == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "top_k must be at least 1",
        ));
    }
    let format = negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let kind = BodyKind::from_content_type(content_type)?;
    let bytes = tokio::time::timeout(
        app.limits.request_timeout,
        read_body(body, headers, app.limits.max_body_bytes),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "request body not received within --request-timeout-ms",
        )
    })??;
    let inputs = parse_body(kind, &bytes, app.limits.max_sequences)?;
    drop(bytes);
    let encoded = encode(app, &inputs)?;
    let (guard, rx) = app.batcher.submit(encoded.clone()).map_err(|e| match e {
        SubmitError::QueueFull { waiting, capacity } => {
            app.metrics.queue_rejections.fetch_add(1, Ordering::Relaxed);
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!(
                        "{waiting} sequences are waiting (capacity {capacity}, --max-queue); retry later"
                    ),
                )
            }
        }
        SubmitError::ShuttingDown => {
            ApiError::unavailable("shutting_down", "server is shutting down", 1)
        }
    })?;
    let out = match tokio::time::timeout(app.limits.request_timeout, rx).await {
        Err(_) => {
            app.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            drop(guard);
            return Err(ApiError::unavailable(
                "timeout",
                format!(
                    "prediction did not finish within {} ms (--request-timeout-ms)",
                    app.limits.request_timeout.as_millis()
                ),
                1,
            ));
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the inference worker stopped",
            ))
        }
        Ok(Ok(Err(msg))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "inference_failed",
                msg,
            ))
        }
        Ok(Ok(Ok(out))) => out,
    };
    drop(guard);
    let rule = &app.rule;
    let resp = match format {
        OutFormat::Json => {
            let predictions = inputs
                .iter()
                .zip(&encoded)
                .zip(&out.rows)
                .map(|((inp, enc), row)| {
                    build_prediction(rule, inp, enc, row, params.top_k, params.raw_scores)
                })
                .collect();
            Json(PredictResponse { predictions }).into_response()
        }
        OutFormat::Csv => csv_response(rule, &inputs, &encoded, &out)?,
    };
    Ok((resp, out))
}

fn encode(app: &AppState, inputs: &[Input]) -> Result<Vec<Encoded>, ApiError> {
    let max = app.info.max_residues;
    inputs
        .iter()
        .enumerate()
        .map(|(i, inp)| {
            if app.opts.no_truncate && inp.sequence.len() > max {
                return Err(ApiError::unprocessable(
                    "sequence_too_long",
                    format!(
                        "sequence {} (id {:?}): {} residues, more than the model's {max} (truncation disabled by --no-truncate)",
                        i + 1,
                        inp.id,
                        inp.sequence.len()
                    ),
                ));
            }
            Ok(app
                .tokenizer
                .encode(&inp.sequence, max, app.info.truncate))
        })
        .collect()
}

fn build_prediction(
    rule: &AnswerRule,
    input: &Input,
    enc: &Encoded,
    row: &Scored,
    top_k: Option<usize>,
    raw_scores: Option<bool>,
) -> ProteinPrediction {
    let labels = &rule.labels;
    let a = &row.answer;
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by(|&x, &y| {
        a.probabilities[y]
            .total_cmp(&a.probabilities[x])
            .then(x.cmp(&y))
    });
    order.truncate(top_k.unwrap_or(usize::MAX));
    ProteinPrediction {
        id: input.id.clone(),
        prediction: a.prediction.clone(),
        locations: a.locations.iter().map(|&k| labels[k].clone()).collect(),
        confidence: a.confidence,
        probabilities: order
            .iter()
            .map(|&i| ClassProbability {
                label: labels[i].clone(),
                probability: a.probabilities[i],
            })
            .collect(),
        scores: raw_scores.unwrap_or(false).then(|| {
            order
                .iter()
                .map(|&i| ClassScore {
                    label: labels[i].clone(),
                    score: row.logits[i],
                })
                .collect()
        }),
        thresholds: rule
            .thresholds
            .as_deref()
            .map(|th| ClassThreshold::list(labels, th)),
        membrane_probability: a.membrane.map(|m| m.probability),
        membrane_label: a.membrane.as_ref().map(MembraneLabel::of),
        length: enc.total_residues,
        residues_used: enc.used_residues,
        truncated: enc.used_residues < enc.total_residues,
    }
}

/// `id,prediction,confidence,length,residues_used,<probability of every label>`, then
/// `membrane_probability,membrane_label` for models with a membrane output and
/// `threshold_<label>` for every label of a multi-label model.
fn csv_response(
    rule: &AnswerRule,
    inputs: &[Input],
    encoded: &[Encoded],
    out: &JobOutput,
) -> Result<Response, ApiError> {
    let internal =
        |e: csv::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    let labels = &rule.labels;
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut head = vec![
        "id".to_string(),
        "prediction".into(),
        "confidence".into(),
        "length".into(),
        "residues_used".into(),
    ];
    head.extend(labels.iter().cloned());
    if rule.membrane {
        head.extend(["membrane_probability".into(), "membrane_label".into()]);
    }
    let thresholds = rule.thresholds.as_deref().unwrap_or_default();
    head.extend(
        labels
            .iter()
            .take(thresholds.len())
            .map(|l| format!("threshold_{l}")),
    );
    w.write_record(&head).map_err(internal)?;
    for ((inp, enc), row) in inputs.iter().zip(encoded).zip(&out.rows) {
        let a = &row.answer;
        let mut rec = vec![
            inp.id.clone(),
            a.prediction.clone(),
            a.confidence.to_string(),
            enc.total_residues.to_string(),
            enc.used_residues.to_string(),
        ];
        rec.extend(a.probabilities.iter().map(|p| p.to_string()));
        if rule.membrane {
            let m = a.membrane.as_ref();
            rec.push(m.map(|m| m.probability.to_string()).unwrap_or_default());
            rec.push(m.map(|m| m.label().to_string()).unwrap_or_default());
        }
        rec.extend(thresholds.iter().map(|t| t.to_string()));
        w.write_record(&rec).map_err(internal)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        )],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert_eq!(negotiate(None).unwrap(), OutFormat::Json);
        assert_eq!(negotiate(Some("*/*")).unwrap(), OutFormat::Json);
        assert_eq!(negotiate(Some("text/csv")).unwrap(), OutFormat::Csv);
        assert_eq!(
            negotiate(Some("text/html, text/csv;q=0.9")).unwrap(),
            OutFormat::Csv
        );
        assert_eq!(
            negotiate(Some("text/csv;q=0, application/json")).unwrap(),
            OutFormat::Json
        );
        assert_eq!(negotiate(Some("application/xml")).unwrap_err().status, 406);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
    }
}
