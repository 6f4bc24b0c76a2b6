#!/usr/bin/env python3
"""PyTorch `transformers` side of bench/compare.sh (the mirror of bench/rust/encoder.rs).

Prints one JSON object per measurement on stdout. Modes:

  gemm     --m 4096 --k 1024 --n 4096
  forward  --model DIR --batch B --len T
  train    --model DIR --batch B --len T
  e2e      --model DIR --data FASTA [--subset N] [--max-residues 510]
           --style reference   (input order, batch 4, padded to 512 tokens, no_grad)
           --style best        (length-sorted, dynamic padding, token budget, inference_mode)
  scale    --model DIR --len T (one sequence; time and peak RSS)
  make-protbert --out DIR      (the random 4-layer ProtBERT-shaped BERT, saved as safetensors)

Inputs are built from the same residue string as the Rust side; token ids come from the
model's own vocab.txt (one token per residue, cls/eos or [CLS]/[SEP] around them).
"""

import argparse
import json
import os
import resource
import time

import torch
import transformers

RESIDUES = (
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSA"
    "GEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSR"
    "YPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQL"
    "ALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRESVPALL"
)

PROTBERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("LAGVESIKRDTPNQFYMHCWXUBZO")


class Vocab:
    """Tokenizer equivalent to protloc's for these inputs (head-tail truncation included)."""

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "vocab.txt")) as f:
            self.tokens = [line.rstrip("\n") for line in f]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if "<cls>" in self.index:
            self.cls, self.eos, self.pad = self.index["<cls>"], self.index["<eos>"], self.index["<pad>"]
            self.unk = self.index["<unk>"]
        else:
            self.cls, self.eos, self.pad = self.index["[CLS]"], self.index["[SEP]"], self.index["[PAD]"]
            self.unk = self.index["[UNK]"]

    def encode(self, seq, max_residues):
        if len(seq) > max_residues:  # head-tail: keep both ends
            head = (max_residues + 1) // 2
            seq = seq[:head] + seq[len(seq) - (max_residues - head):]
        return [self.cls] + [self.index.get(c, self.unk) for c in seq] + [self.eos]


def synthetic(vocab, batch, length):
    res = (RESIDUES * (length // len(RESIDUES) + 1))[: length - 2]
    ids = torch.tensor([vocab.encode(res, 10**9)] * batch)
    return ids, torch.ones_like(ids)


def load(model_dir):
    model = transformers.AutoModel.from_pretrained(model_dir, add_pooling_layer=False)
    return model.float()


def best_of(iters, f):
    f()
    best = float("inf")
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mode_gemm(a):
    x = torch.randn(a.m, a.k)
    w = torch.randn(a.n, a.k)
    secs = best_of(a.iters, lambda: x @ w.T)
    return {"kind": "gemm", "m": a.m, "k": a.k, "n": a.n, "seconds": secs,
            "gflops": 2 * a.m * a.n * a.k / secs / 1e9}


def mode_forward(a):
    model = load(a.model).eval()
    ids, mask = synthetic(Vocab(a.model), a.batch, a.len)
    with torch.inference_mode():
        secs = best_of(a.iters, lambda: model(input_ids=ids, attention_mask=mask))
    return {"kind": "forward", "model": a.model, "batch": a.batch, "len": a.len, "seconds": secs,
            "tokens_per_s": a.batch * a.len / secs, "peak_rss_mib": peak_rss_mib(),
            "attn_implementation": model.config._attn_implementation}


def mode_train(a):
    torch.manual_seed(0)
    model = load(a.model).train()
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(model.config.hidden_size, 10))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    ids, mask = synthetic(Vocab(a.model), a.batch, a.len)
    targets = torch.arange(a.batch) % 10

    def step():
        opt.zero_grad(set_to_none=True)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden[:, 0]), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    secs = best_of(a.iters, step)
    return {"kind": "train", "model": a.model, "batch": a.batch, "len": a.len, "seconds": secs,
            "tokens_per_s": a.batch * a.len / secs, "peak_rss_mib": peak_rss_mib()}


def warm_up(model, vocab):
    """One short forward pass first (lazy initialisation, thread pool start-up), as the Rust
    side does: the timed runs then measure steady-state work."""
    ids, mask = synthetic(vocab, 1, 64)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)


def deeploc_test(path, subset):
    out, keep = [], False
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if len(out) == subset:
                    break
                keep = line.endswith("test")
                if keep:
                    out.append([])
            elif keep:
                out[-1].append(line)
    return ["".join(s) for s in out if s]


def mean_pool(hidden, mask):
    # Residue tokens only: drop the leading special and the trailing one.
    m = mask.clone().float()
    m[:, 0] = 0
    lengths = mask.sum(1)
    m[torch.arange(len(m)), lengths - 1] = 0
    return (hidden * m.unsqueeze(2)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)


def mode_e2e(a):
    t0 = time.perf_counter()
    seqs = deeploc_test(a.data, a.subset)
    model = load(a.model).eval()
    vocab = Vocab(a.model)
    load_s = time.perf_counter() - t0
    warm_up(model, vocab)
    t1 = time.perf_counter()
    enc = [vocab.encode(s, a.max_residues) for s in seqs]
    out = [None] * len(enc)
    if a.style == "reference":
        # The reference workflow: tokenizer(padding="max_length", max_length=512), batch 4,
        # input order, torch.no_grad().
        with torch.no_grad():
            for i in range(0, len(enc), 4):
                chunk = enc[i:i + 4]
                ids = torch.full((len(chunk), 512), vocab.pad)
                mask = torch.zeros((len(chunk), 512), dtype=torch.long)
                for r, e in enumerate(chunk):
                    e = e[:512]
                    ids[r, :len(e)] = torch.tensor(e)
                    mask[r, :len(e)] = 1
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                for r, v in enumerate(mean_pool(h, mask)):
                    out[i + r] = v
    elif a.style == "best":
        # Length-sorted, padded to each batch's longest, under a token budget.
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        batches, cur, longest = [], [], 0
        for i in order:
            new_longest = max(longest, len(enc[i]))
            if cur and ((len(cur) + 1) * new_longest > a.max_batch_tokens or len(cur) >= 64):
                batches.append(cur)
                cur, new_longest = [], len(enc[i])
            cur.append(i)
            longest = new_longest
        if cur:
            batches.append(cur)
        with torch.inference_mode():
            for b in batches:
                t = max(len(enc[i]) for i in b)
                ids = torch.full((len(b), t), vocab.pad)
                mask = torch.zeros((len(b), t), dtype=torch.long)
                for r, i in enumerate(b):
                    ids[r, :len(enc[i])] = torch.tensor(enc[i])
                    mask[r, :len(enc[i])] = 1
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                for r, v in zip(b, mean_pool(h, mask)):
                    out[r] = v
    else:
        raise SystemExit(f"unknown --style {a.style}")
    assert all(v is not None for v in out)
    secs = time.perf_counter() - t1
    return {"kind": "e2e", "model": a.model, "style": a.style, "proteins": len(seqs),
            "max_residues": a.max_residues, "real_tokens": sum(len(e) for e in enc),
            "seconds": secs, "load_seconds": load_s, "proteins_per_s": len(seqs) / secs}


def mode_scale(a):
    model = load(a.model).eval()
    warm_up(model, Vocab(a.model))
    rss_loaded = peak_rss_mib()
    ids, mask = synthetic(Vocab(a.model), 1, a.len)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(max(a.iters, 1)):
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().item()
            best = min(best, time.perf_counter() - t)
    return {"kind": "scale", "model": a.model, "len": a.len, "seconds": best,
            "tokens_per_s": a.len / best, "peak_rss_mib": peak_rss_mib(),
            "rss_after_load_mib": rss_loaded}


def mode_make_protbert(a):
    """ProtBERT's width (hidden 1024, 16 heads, FFN 4096, vocab 30) at 4 layers, random
    weights from a fixed seed, written as model.safetensors + config.json + vocab.txt so both
    sides load the same file."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=2048, hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=0)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    with open(os.path.join(a.out, "vocab.txt"), "w") as f:
        f.write("\n".join(PROTBERT_VOCAB) + "\n")
    return {"kind": "make-protbert", "out": a.out}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--subset", type=int, default=10**9)
    p.add_argument("--max-residues", type=int, default=510)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--style", default="best")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    f = {"gemm": mode_gemm, "forward": mode_forward, "train": mode_train, "e2e": mode_e2e,
         "scale": mode_scale, "make-protbert": mode_make_protbert}[a.mode]
    rec = f(a)
    rec.update(side="pytorch", threads=a.threads, torch=torch.__version__,
               transformers=transformers.__version__)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
