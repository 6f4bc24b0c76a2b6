#!/usr/bin/env python3
"""PyTorch `transformers` side of tools/gpu-check.sh, on the same GPU.

    train  ProtBERT-shaped BERT (30 layers, hidden 1024, 16 heads, random weights), linear
           head on the residue mean, AdamW, batch 8 x 512: training steps/s in fp32 and in
           bf16 autocast (fp32 master weights).
    embed  ESM-2 embeddings of a FASTA file: length-sorted batches under a token budget,
           mean of the last hidden states over residues (as `protloc embed`); proteins/s,
           and with --protloc JSONL the largest difference from protloc's embeddings of
           the same proteins (those short enough to need no truncation).

Writes one JSON object to --out. Needs torch and transformers only (no network).
"""

import argparse
import json
import time

import torch
import transformers


def sync():
    torch.cuda.synchronize()


def mode_train(a):
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=1024, num_hidden_layers=30, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=40000, hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=0)
    results = {}
    for precision in ["fp32", "bf16"]:
        model = transformers.BertModel(cfg, add_pooling_layer=False).cuda().train()
        head = torch.nn.Linear(1024, 10).cuda()
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
        ids = torch.randint(5, 30, (a.batch, a.len), device="cuda")
        ids[:, 0], ids[:, -1] = 2, 3
        mask = torch.ones_like(ids)
        targets = torch.arange(a.batch, device="cuda") % 10

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = head(hidden[:, 1:-1].mean(1))
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            loss.backward()
            opt.step()
            return loss.item()

        for _ in range(3):
            step()
        sync()
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        times.sort()
        ms = times[len(times) // 2] * 1e3
        results[precision] = {"step_ms": ms, "steps_per_s": 1e3 / ms,
                              "attention": model.config._attn_implementation}
        del model, head, opt
        torch.cuda.empty_cache()
    return {"kind": "train", "shape": "ProtBERT (30 x 1024, 16 heads, FFN 4096)",
            "batch": [a.batch, a.len], "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0), **results}


def read_fasta(path):
    out, name, seq = [], None, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if name is not None:
                    out.append((name, "".join(seq)))
                name, seq = line[1:].split()[0], []
            elif line:
                seq.append(line)
    if name is not None:
        out.append((name, "".join(seq)))
    return out


def mode_embed(a):
    torch.backends.cuda.matmul.allow_tf32 = False
    records = read_fasta(a.fasta)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.AutoModel.from_pretrained(a.model, add_pooling_layer=False).cuda().eval()
    enc = [tok(s, truncation=True, max_length=a.max_residues + 2)["input_ids"] for _, s in records]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    batches, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, len(enc[i]))
        if cur and ((len(cur) + 1) * new_longest > a.max_batch_tokens or len(cur) >= a.max_batch_size):
            batches.append(cur)
            cur, new_longest = [], len(enc[i])
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)

    def run():
        out = [None] * len(enc)
        with torch.inference_mode():
            for b in batches:
                t = max(len(enc[i]) for i in b)
                ids = torch.full((len(b), t), tok.pad_token_id)
                mask = torch.zeros((len(b), t), dtype=torch.long)
                for r, i in enumerate(b):
                    ids[r, :len(enc[i])] = torch.tensor(enc[i])
                    mask[r, :len(enc[i])] = 1
                ids, mask = ids.cuda(), mask.cuda()
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.clone().float()
                m[:, 0] = 0
                m[torch.arange(len(m)), mask.sum(1) - 1] = 0
                pooled = (h * m.unsqueeze(2)).sum(1) / m.sum(1, keepdim=True)
                for r, v in zip(b, pooled.cpu()):
                    out[r] = v
        return out

    run()  # warm-up (kernel selection, allocator)
    sync()
    t = time.perf_counter()
    out = run()
    sync()
    secs = time.perf_counter() - t
    result = {"kind": "embed", "model": a.model, "proteins": len(records),
              "max_residues": a.max_residues, "max_batch_tokens": a.max_batch_tokens,
              "seconds": secs, "proteins_per_s": len(records) / secs,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    if a.protloc:
        ours = {}
        with open(a.protloc) as f:
            for line in f:
                r = json.loads(line)
                ours[r["id"]] = r["embedding"]
        worst, compared = 0.0, 0
        for (name, seq), v in zip(records, out):
            # Same input only: no truncation, and no U/Z/O/B (protloc reads them as X).
            if len(seq) > a.max_residues or name not in ours or set(seq) & set("UZOB"):
                continue
            d = (torch.tensor(ours[name]) - v.float()).abs().max().item()
            worst, compared = max(worst, d), compared + 1
        result["vs_protloc"] = {"compared": compared, "max_abs_diff": worst}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "embed"])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model")
    p.add_argument("--fasta")
    p.add_argument("--protloc", help="protloc embed's JSON Lines, to compare")
    p.add_argument("--max-residues", type=int, default=510)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch-size", type=int, default=64)
    a = p.parse_args()
    r = mode_train(a) if a.mode == "train" else mode_embed(a)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
