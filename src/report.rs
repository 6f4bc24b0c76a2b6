//! `protloc report RUN_DIR`: one self-contained HTML page (plots embedded) plus the PNGs, for
//! a run directory: training curves from `metrics.jsonl`, and, when the run has been
//! evaluated, the confusion matrix, per-class F1 and the metric table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;

use crate::eval::plot;
use crate::eval::run::EvalOutput;
use crate::train::EpochMetrics;

/// What `report` produced.
pub struct ReportFiles {
    pub html: PathBuf,
    pub images: Vec<PathBuf>,
}

/// Reads `RUN_DIR/metrics.jsonl` (one JSON object per epoch).
pub fn read_metrics(run_dir: &Path) -> Result<Vec<EpochMetrics>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: is {} a run directory written by `protloc train`?",
            path.display(),
            run_dir.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics line", path.display(), i + 1))
        })
        .collect()
}

/// Writes the report into `out_dir` (created). `eval` adds the test-set section.
pub fn write(run_dir: &Path, eval: Option<&EvalOutput>, out_dir: &Path) -> Result<ReportFiles> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let metrics = read_metrics(run_dir)?;
    let mut images = Vec::new();
    let curves = out_dir.join("training_curves.png");
    plot::plot_training_curves(&crate::train::curve_points(&metrics), &curves)?;
    images.push(curves.clone());

    let args = std::fs::read_to_string(run_dir.join("training_args.json")).unwrap_or_default();
    let mut html = String::new();
    html.push_str(&format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>protloc report: {}</title>\
         <style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}\
         img{{max-width:100%}}pre{{background:#f7f7f7;padding:8px;overflow-x:auto}}</style></head><body>\
         <h1>protloc report</h1><p>Run directory: <code>{}</code></p>",
        escape(&run_dir.display().to_string()),
        escape(&run_dir.display().to_string())
    ));
    html.push_str("<h2>Training</h2><table><tr><th>epoch</th><th>step</th><th>training loss</th><th>validation loss</th><th>validation accuracy</th><th>validation Q2</th><th>elapsed (s)</th></tr>");
    let opt = |v: Option<f64>, digits: usize| v.map_or("–".into(), |v| format!("{v:.digits$}"));
    for m in &metrics {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td></tr>",
            // Ensemble members train one after another; each counts its own epochs.
            match m.member {
                Some(k) => format!("member {k}: {}", m.epoch),
                None => m.epoch.to_string(),
            },
            m.step,
            m.train_loss,
            opt(m.val_loss, 4),
            opt(m.val_accuracy, 4),
            opt(m.val_membrane_accuracy, 4),
            m.elapsed_s
        ));
    }
    html.push_str("</table>");
    html.push_str(&img_tag(&curves, "training curves")?);

    if let Some(eval) = eval {
        html.push_str(&format!(
            "<h2>Evaluation</h2><p>{} proteins from <code>{}</code> ({:?} split).</p>",
            eval.records,
            escape(&eval.data),
            eval.split
        ));
        if let Some(ci) = &eval.ci95 {
            html.push_str(&format!(
                "<p>{}</p>",
                escape(&ci.describe(&eval.accuracy_name()))
            ));
        }
        if let Some(q2) = eval.membrane_accuracy {
            html.push_str(&format!(
                "<p>Membrane/soluble accuracy (Q2): <b>{:.1}%</b> on {} proteins with a known flag.</p>",
                q2 * 100.0,
                eval.membrane_records.unwrap_or(0)
            ));
        }
        if let Some(r) = &eval.report {
            html.push_str(&format!(
                "<p>Accuracy (Q{}): <b>{:.1}%</b> &nbsp; MCC: <b>{:.3}</b> &nbsp; macro-F1: {:.3}</p>",
                r.labels.len(),
                r.accuracy * 100.0,
                r.mcc,
                r.macro_f1
            ));
            html.push_str("<table><tr><th>location</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>");
            for c in &r.per_class {
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
                    escape(&c.label),
                    c.precision,
                    c.recall,
                    c.f1,
                    c.support
                ));
            }
            html.push_str("</table>");
            let confusion = out_dir.join("confusion.png");
            plot::plot_confusion(r, &confusion, true)?;
            let f1 = out_dir.join("per_class_f1.png");
            plot::plot_per_class_f1(r, &f1)?;
            html.push_str(&img_tag(&confusion, "confusion matrix")?);
            html.push_str(&img_tag(&f1, "per-class F1")?);
            images.push(confusion);
            images.push(f1);
        }
        if let Some(m) = &eval.multi_label {
            html.push_str(&format!(
                "<p>Multi-label: accuracy {:.3}, Jaccard {:.3}, micro-F1 {:.3}, macro-F1 {:.3}</p>\
                 <table><tr><th>location</th><th>MCC</th><th>F1</th><th>support</th><th>threshold</th></tr>",
                m.accuracy, m.jaccard, m.micro_f1, m.macro_f1
            ));
            for l in &m.per_label {
                html.push_str(&format!(
                    "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{:.2}</td></tr>",
                    escape(&l.label),
                    l.mcc,
                    l.f1,
                    l.support,
                    l.threshold
                ));
            }
            html.push_str("</table>");
        }
    } else {
        html.push_str("<p>No evaluation yet: run <code>protloc report RUN_DIR --data FILE</code> to score the model and add the confusion matrix and per-class F1.</p>");
    }
    if !args.is_empty() {
        html.push_str(&format!(
            "<h2>Training arguments</h2><pre>{}</pre>",
            escape(&args)
        ));
    }
    html.push_str(&format!(
        "<p style=\"color:#888\">protloc {}</p></body></html>\n",
        env!("CARGO_PKG_VERSION")
    ));
    let html_path = out_dir.join("index.html");
    crate::artifacts::write_atomic(&html_path, html.as_bytes())?;
    Ok(ReportFiles {
        html: html_path,
        images,
    })
}

/// An `<img>` with the PNG embedded as a data URI, so the page is one file.
fn img_tag(png: &Path, alt: &str) -> Result<String> {
    let bytes = std::fs::read(png).with_context(|| format!("cannot read {}", png.display()))?;
    Ok(format!(
        "<p><img alt=\"{alt}\" src=\"data:image/png;base64,{}\"></p>",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
