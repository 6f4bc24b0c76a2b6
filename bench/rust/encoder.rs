//! protloc side of `bench/compare.sh`: encoder forward throughput, a training step,
//! end-to-end DeepLoc embedding, scaling with sequence length and the GEMM peak. Prints one
//! JSON object per measurement on stdout (`bench/torch_bench.py` prints the same for
//! PyTorch). A benchmark, not a test: nothing is asserted.
//!
//! ```text
//! cargo bench --bench encoder -- MODE [--threads N] [options]
//!   gemm     --m 4096 --k 1024 --n 4096 [--layout in-out|out-in]  (in-out: the weight
//!            layout inference uses, see kernels::buffers::WeightLayout)
//!   scores   --rows 256 --keys 256 --d 64   (the attention score kernel, single-threaded,
//!            once per kernel this CPU has: one record per kernel in a JSON array)
//!   forward  --model DIR --batch B --len T [--path fast|general] [--iters N]
//!   train    --model DIR --batch B --len T [--iters N]
//!   e2e      --model DIR --data FASTA [--subset N] [--max-residues 510]
//!            [--style budget|fixed512] [--max-batch-tokens 2048]
//!   scale    --model DIR --len T      (one sequence; reports time and peak RSS)
//!   la       --batch 32 --len 400 --hidden 320 [--kernel 9] [--iters N]  (a light-attention
//!            head's training step on random residue rows, as `train --frozen` takes it;
//!            reports the share of the GEMM peak its convolutions' FLOPs represent)
//! ```

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use protloc::infer::BatchLimits;
use protloc::kernels::{self, buffers, gemm};
use protloc::model::{self, load_base, Pool, Purpose, SequenceClassifier, TaskConfig};
use protloc::tokenize::{Encoded, TokenBatch, Truncation};
use serde_json::json;

/// Residues used to build synthetic inputs (a real protein, repeated to any length), the
/// same string as `bench/torch_bench.py`.
const RESIDUES: &str = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRESVPALL";

struct Args {
    mode: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Self> {
        // `cargo bench` appends `--bench`; ignore it.
        let raw: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let mode = raw
            .first()
            .context("missing MODE (see the file header)")?
            .clone();
        let mut opts = HashMap::new();
        let mut it = raw[1..].iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .with_context(|| format!("unexpected {k}"))?;
            let v = it.next().with_context(|| format!("{k} needs a value"))?;
            opts.insert(key.to_string(), v.clone());
        }
        Ok(Self { mode, opts })
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.opts.get(k).map(String::as_str)
    }
    fn req(&self, k: &str) -> Result<&str> {
        self.get(k).with_context(|| format!("--{k} is required"))
    }
    fn num(&self, k: &str, default: usize) -> Result<usize> {
        self.get(k)
            .map_or(Ok(default), |v| v.parse().with_context(|| format!("--{k}")))
    }
}

fn main() -> Result<()> {
    protloc::runtime::tune_for_tensors();
    let args = Args::parse()?;
    let threads = args.num("threads", 2)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    if args.get("path") == Some("general") {
        model::packed::set_packed_inference(false);
    }
    let record = match args.mode.as_str() {
        "gemm" => gemm(&args)?,
        "scores" => scores(&args)?,
        "forward" => forward(&args)?,
        "train" => train(&args)?,
        "e2e" => e2e(&args)?,
        "scale" => scale(&args)?,
        "la" => light_attention(&args)?,
        m => bail!("unknown mode {m}"),
    };
    let mut record = record;
    record["side"] = json!("protloc");
    record["threads"] = json!(threads);
    println!("{record}");
    Ok(())
}

/// Best of `iters` timed runs after one warm-up, in seconds.
fn best_of(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// `n` deterministic operand values: a zero-centred sawtooth of `period` steps of `step`
/// (co-prime periods for the two operands of a product, so no row repeats another).
fn sawtooth(n: usize, period: usize, step: f32) -> Vec<f32> {
    let mid = (period / 2) as f32;
    (0..n).map(|i| ((i % period) as f32 - mid) * step).collect()
}

fn gemm(a: &Args) -> Result<serde_json::Value> {
    let (m, k, n) = (a.num("m", 4096)?, a.num("k", 1024)?, a.num("n", 4096)?);
    let (x, w) = (sawtooth(m * k, 97, 1e-3), sawtooth(n * k, 89, 1e-3));
    // The layout the encoders' inference GEMMs read (`in-out`) unless told otherwise.
    let layout = match a.get("layout").unwrap_or("in-out") {
        "in-out" => buffers::WeightLayout::InOut,
        "out-in" => buffers::WeightLayout::OutIn,
        other => bail!("--layout {other}: expected in-out or out-in"),
    };
    let mut out = vec![0f32; m * n];
    let secs = best_of(a.num("iters", 3)?, || {
        gemm::gemm_acc_wt(&x, &w, layout, &mut out, k, n);
        Ok(())
    })?;
    let gflops = 2.0 * (m * n * k) as f64 / secs / 1e9;
    Ok(
        json!({"kind": "gemm", "m": m, "k": k, "n": n, "layout": format!("{layout:?}"),
        "seconds": secs, "gflops": gflops}),
    )
}

/// The attention score product `Q K^T` with the row maxima (inference's epilogue), as one
/// attention block computes it, repeated over 64 blocks so a run lasts long enough to time.
fn scores(a: &Args) -> Result<serde_json::Value> {
    use protloc::kernels::tiles::{self, Epilogue, Strided, WideKernel};
    let (rows, keys, d) = (a.num("rows", 256)?, a.num("keys", 256)?, a.num("d", 64)?);
    let (q, k) = (sawtooth(rows * d, 97, 1e-2), sawtooth(keys * d, 89, 1e-2));
    let mut k_t = Vec::new();
    // SAFETY: `k` holds `keys` rows of `d` floats.
    unsafe { tiles::pack_transposed(k.as_ptr(), d, keys, d, &mut k_t) };
    let ld = tiles::padded(keys);
    let mut out = vec![0f32; rows * ld];
    let mut row_max = vec![0f32; rows];
    let mut records = Vec::new();
    for kernel in WideKernel::available() {
        let secs = best_of(a.num("iters", 5)?, || {
            for _ in 0..64 {
                let epi = Epilogue::StoreMax {
                    valid: keys,
                    row_max: &mut row_max,
                };
                // SAFETY: sizes as allocated above.
                unsafe {
                    tiles::wide_with(
                        kernel,
                        rows,
                        d,
                        Strided::rows(q.as_ptr(), d),
                        &k_t,
                        out.as_mut_ptr(),
                        ld,
                        epi,
                    )
                };
            }
            Ok(())
        })?;
        let gflops = 64.0 * 2.0 * (rows * keys * d) as f64 / secs / 1e9;
        records.push(json!({"kernel": format!("{kernel:?}"), "seconds": secs, "gflops": gflops}));
    }
    Ok(json!({"kind": "scores", "rows": rows, "keys": keys, "d": d, "kernels": records}))
}

/// `batch` copies of a `len`-token input (specials included) built from [`RESIDUES`].
fn synthetic(tok: &protloc::tokenize::Tokenizer, batch: usize, len: usize) -> Vec<Encoded> {
    let residues: String = RESIDUES
        .chars()
        .cycle()
        .take(len.saturating_sub(2))
        .collect();
    let e = tok.encode(&residues, usize::MAX, Truncation::Head);
    vec![e; batch]
}

fn batch_of(items: &[Encoded], pad: u32) -> Result<TokenBatch> {
    let refs: Vec<&Encoded> = items.iter().collect();
    Ok(TokenBatch::collate(&refs, pad, &Device::Cpu)?)
}

/// How inference benchmarks load their model: the packed path as protloc runs it (weights
/// column-major), the general path as it ran before issue 4 (row-major trainable weights).
fn inference_purpose(a: &Args) -> Purpose {
    if a.get("path") == Some("general") {
        Purpose::Training
    } else {
        Purpose::Inference
    }
}

fn forward(a: &Args) -> Result<serde_json::Value> {
    let model_dir = a.req("model")?;
    let (b, t) = (a.num("batch", 8)?, a.num("len", 512)?);
    let base = load_base(model_dir, 0, &Device::Cpu, inference_purpose(a))?;
    let enc = synthetic(&base.tokenizer, b, t);
    let batch = batch_of(&enc, base.tokenizer.pad_id)?;
    let encoder = base.encoder.detached();
    let secs = best_of(a.num("iters", 3)?, || {
        encoder.forward(&batch.ids, &batch.attention_mask, None)?;
        Ok(())
    })?;
    Ok(json!({
        "kind": "forward", "model": model_dir, "batch": b, "len": t,
        "path": a.get("path").unwrap_or("fast"),
        "seconds": secs, "tokens_per_s": (b * t) as f64 / secs, "peak_rss_mib": peak_rss_mib(),
    }))
}

fn train(a: &Args) -> Result<serde_json::Value> {
    use protloc::train::optim::{clip_scale, no_decay, Optimizer, OptimizerConfig};
    use rand::SeedableRng;
    let model_dir = a.req("model")?;
    let (b, t) = (a.num("batch", 8)?, a.num("len", 256)?);
    let base = load_base(model_dir, 0, &Device::Cpu, Purpose::Training)?;
    let labels = protloc::train::default_labels();
    let task = TaskConfig {
        pool: Pool::Cls,
        truncate: Truncation::HeadTail,
        max_residues: t - 2,
        head_dropout: 0.1,
        ..TaskConfig::new(labels.clone(), model_dir)
    };
    let pad = base.tokenizer.pad_id;
    let enc = synthetic(&base.tokenizer, b, t);
    let model = SequenceClassifier::new(base, task)?;
    let params = model
        .base
        .store
        .vars()
        .into_iter()
        .map(|(name, var)| {
            let wd = if no_decay(&name) { 0.0 } else { 0.01 };
            (name, var, 1.0, wd)
        })
        .collect();
    let mut opt = Optimizer::new(OptimizerConfig::default(), params)?;
    let batch = batch_of(&enc, pad)?;
    let targets = Tensor::new(
        (0..b as u32)
            .map(|i| i % labels.len() as u32)
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let secs = best_of(a.num("iters", 2)?, || {
        let logits = model.forward(&batch, Some(&mut rng))?;
        let loss = kernels::ops::cross_entropy(&logits, &targets)?;
        let grads = loss.backward()?;
        let grads = opt.collect_grads(&grads);
        let norm = opt.grad_norm(&grads)?;
        opt.step(&grads, 1e-5, clip_scale(norm, 1.0))?;
        Ok(())
    })?;
    Ok(json!({
        "kind": "train", "model": model_dir, "batch": b, "len": t,
        "seconds": secs, "tokens_per_s": (b * t) as f64 / secs, "peak_rss_mib": peak_rss_mib(),
    }))
}

fn light_attention(a: &Args) -> Result<serde_json::Value> {
    use protloc::model::{Head, HeadKind, HeadSpec, ParamStore};
    use protloc::train::optim::{clip_scale, Optimizer, OptimizerConfig};
    use rand::SeedableRng;
    let (b, l) = (a.num("batch", 32)?, a.num("len", 400)?);
    let (h, k) = (a.num("hidden", 320)?, a.num("kernel", 9)?);
    let store = ParamStore::new(
        Default::default(),
        "bench",
        0,
        &Device::Cpu,
        candle_core::DType::F32,
    );
    let spec = HeadSpec {
        kind: HeadKind::LightAttention,
        pool: Pool::Mean,
        input_dim: h,
        encoder_prefix: "esm",
        num_labels: 10,
        hidden: 32,
        kernel: k,
        dropout: 0.25,
        membrane: true,
    };
    let head = Head::new(&store.initialising(), spec)?;
    let params = store
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v, 1.0, 0.01))
        .collect();
    let mut opt = Optimizer::new(OptimizerConfig::default(), params)?;
    let x = Tensor::randn(0f32, 1.0, (b, l, h), &Device::Cpu)?;
    // Ragged lengths from l/2 to l, as in a length-bucketed batch.
    let mask: Vec<f32> = (0..b)
        .flat_map(|i| {
            let n = l / 2 + (l / 2) * i / b.max(1);
            (0..l).map(move |j| f32::from(u8::from(j < n)))
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b, l), &Device::Cpu)?;
    let x = x.broadcast_mul(&mask.unsqueeze(2)?)?;
    let targets = Tensor::new(
        (0..b as u32).map(|i| i % 10).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let secs = best_of(a.num("iters", 5)?, || {
        let out = head.forward_residues(&x, &mask, Some(&mut rng))?;
        let loss = kernels::ops::cross_entropy(&out.logits, &targets)?;
        let grads = opt.collect_grads(&loss.backward()?);
        let norm = opt.grad_norm(&grads)?;
        opt.step(&grads, 1e-3, clip_scale(norm, 1.0))?;
        Ok(())
    })?;
    // Two convolutions forward and their weight gradients backward: 4 products of
    // [B*L, k*H] x [k*H, H] (padded rows included, as computed).
    let flops = 4.0 * 2.0 * (b * l) as f64 * (k * h) as f64 * h as f64;
    Ok(json!({
        "kind": "la", "batch": b, "len": l, "hidden": h, "kernel": k,
        "seconds": secs, "conv_gflops_per_s": flops / secs / 1e9, "peak_rss_mib": peak_rss_mib(),
    }))
}

/// DeepLoc records tagged `test` (header ends with `test`), first `subset` of them.
fn deeploc_test(path: &str, subset: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| path.to_string())?;
    let mut out = Vec::new();
    let mut keep = false;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('>') {
            if out.len() == subset {
                break;
            }
            keep = h.trim_end().ends_with("test");
            if keep {
                out.push(String::new());
            }
        } else if keep {
            out.last_mut().expect("pushed").push_str(line.trim());
        }
    }
    if out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    Ok(out)
}

fn e2e(a: &Args) -> Result<serde_json::Value> {
    let model_dir = a.req("model")?;
    let subset = a.num("subset", usize::MAX)?;
    let max_res = a.num("max-residues", 510)?;
    let style = a.get("style").unwrap_or("budget");
    let t0 = Instant::now();
    let seqs = deeploc_test(a.req("data")?, subset)?;
    let base = load_base(model_dir, 0, &Device::Cpu, inference_purpose(a))?;
    let load_s = t0.elapsed().as_secs_f64();
    warm_up(&base)?;
    let t1 = Instant::now();
    let enc: Vec<Encoded> = seqs
        .iter()
        .map(|s| base.tokenizer.encode(s, max_res, Truncation::HeadTail))
        .collect();
    let pad = base.tokenizer.pad_id;
    let tokens: usize = enc.iter().map(|e| e.ids.len()).sum();
    let n_out = match style {
        "budget" => {
            let limits = BatchLimits {
                max_batch_tokens: a.num("max-batch-tokens", 2048)?,
                max_batch_size: 64,
            };
            protloc::infer::mean_embeddings(&base.encoder, pad, &Device::Cpu, &enc, limits, None)?
                .len()
        }
        "fixed512" => {
            // The reference pipeline's batching: input order, batch 4, every sequence padded
            // to 512 tokens.
            let encoder = base.encoder.detached();
            let mut n = 0;
            for chunk in enc.chunks(4) {
                let mut ids = vec![pad; chunk.len() * 512];
                let mut attn = vec![0f32; chunk.len() * 512];
                let mut res = vec![0f32; chunk.len() * 512];
                for (r, e) in chunk.iter().enumerate() {
                    let l = e.ids.len().min(512);
                    ids[r * 512..r * 512 + l].copy_from_slice(&e.ids[..l]);
                    attn[r * 512..r * 512 + l].fill(1.0);
                    res[r * 512 + 1..r * 512 + l - 1].fill(1.0);
                }
                let dims = (chunk.len(), 512);
                let ids = Tensor::from_vec(ids, dims, &Device::Cpu)?;
                let attn = Tensor::from_vec(attn, dims, &Device::Cpu)?;
                let res = Tensor::from_vec(res, dims, &Device::Cpu)?;
                let hidden = encoder.forward(&ids, &attn, None)?;
                n += kernels::ops::masked_mean(&hidden, &res)?
                    .to_vec2::<f32>()?
                    .len();
            }
            n
        }
        s => bail!("unknown --style {s}"),
    };
    assert_eq!(n_out, seqs.len());
    let secs = t1.elapsed().as_secs_f64();
    Ok(json!({
        "kind": "e2e", "model": model_dir, "style": style, "proteins": seqs.len(),
        "max_residues": max_res, "real_tokens": tokens, "seconds": secs, "load_seconds": load_s,
        "proteins_per_s": seqs.len() as f64 / secs, "path": a.get("path").unwrap_or("fast"),
    }))
}

/// One short forward pass first (thread pool start-up, first allocations), as
/// `torch_bench.py` does: the timed runs then measure steady-state work.
fn warm_up(base: &model::BaseModel) -> Result<()> {
    let batch = batch_of(&synthetic(&base.tokenizer, 1, 64), base.tokenizer.pad_id)?;
    base.encoder
        .detached()
        .forward(&batch.ids, &batch.attention_mask, None)?;
    Ok(())
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn scale(a: &Args) -> Result<serde_json::Value> {
    let model_dir = a.req("model")?;
    let t = a.num("len", 1024)?;
    let base = load_base(model_dir, 0, &Device::Cpu, inference_purpose(a))?;
    let enc = synthetic(&base.tokenizer, 1, t);
    let batch = batch_of(&enc, base.tokenizer.pad_id)?;
    let encoder = base.encoder.detached();
    warm_up(&base)?;
    let rss_loaded = peak_rss_mib();
    let iters = a.num("iters", 1)?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        let h = encoder.forward(&batch.ids, &batch.attention_mask, None)?;
        // Read a value so the result is used.
        let _ = h.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(json!({
        "kind": "scale", "model": model_dir, "len": t, "seconds": best,
        "tokens_per_s": t as f64 / best, "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": rss_loaded, "path": a.get("path").unwrap_or("fast"),
    }))
}
