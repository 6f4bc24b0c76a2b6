#!/usr/bin/env python3
"""Checks directories written by `protloc export --format hf` in transformers.

For each DIR: loads it with AutoModelForSequenceClassification (trust_remote_code=True when
it carries modeling_protloc.py) and AutoTokenizer, asserts that no weight was left
uninitialised, tokenizes the sample proteins of protloc_export.json as its `preprocessing`
says, and compares transformers' logits (and probabilities / membrane probability, from the
custom code) with protloc's, each protein run alone: max |difference| <= --tol (1e-5).

Needs torch and transformers (tools/requirements-fixtures.txt). Exit status 1 on any
mismatch. `tools/check_export.sh` builds models of every head kind, exports and checks them.

    python tools/check_export.py EXPORTED_DIR [EXPORTED_DIR ...]
"""

import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def protein_text(seq, pre):
    # U/Z/O/B stay as they are: a model that reads them as X exports their embedding rows
    # as X's (preprocessing.rare_residue_rows_as_x).
    seq = seq.upper()
    n = pre["max_residues"]
    if len(seq) > n:
        if pre["truncation"] == "head":
            seq = seq[:n]
        else:
            head = (n + 1) // 2
            seq = seq[:head] + seq[len(seq) - (n - head) :]
    return " ".join(seq) if pre["spaced"] else seq


def check_dir(d, tol):
    meta = json.load(open(os.path.join(d, "protloc_export.json")))
    custom = os.path.exists(os.path.join(d, "modeling_protloc.py"))
    assert custom == meta["trust_remote_code"], "modeling_protloc.py vs trust_remote_code"
    model, info = AutoModelForSequenceClassification.from_pretrained(
        d, trust_remote_code=custom, output_loading_info=True, attn_implementation="eager"
    )
    model.eval()
    assert not info["missing_keys"], f"weights not in the directory: {info['missing_keys']}"
    assert not info["mismatched_keys"], f"shape mismatches: {info['mismatched_keys']}"
    arch = type(model).__name__
    assert arch == meta["architecture"], f"{arch} != {meta['architecture']}"
    tok = AutoTokenizer.from_pretrained(d)
    check, pre = meta["check"], meta["preprocessing"]
    worst = 0.0
    for i, seq in enumerate(check["sequences"]):
        enc = tok(protein_text(seq, pre), return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        pairs = [("logits", out.logits[0], check["logits"][i])]
        if custom:
            pairs.append(("probabilities", out.probabilities[0], check["probabilities"][i]))
            if check.get("membrane_probability") is not None:
                pairs.append(
                    ("membrane_probability", out.membrane_probability[0:1], [check["membrane_probability"][i]])
                )
        else:
            multi = model.config.problem_type == "multi_label_classification"
            p = torch.sigmoid(out.logits[0]) if multi else torch.softmax(out.logits[0], -1)
            pairs.append(("probabilities", p, check["probabilities"][i]))
        for name, got, want in pairs:
            diff = (got - torch.tensor(want)).abs().max().item()
            worst = max(worst, diff)
            if diff > tol:
                raise AssertionError(f"protein {i} {name}: transformers {got.tolist()} vs protloc {want} (diff {diff:.2e})")
    unexpected = info["unexpected_keys"]
    print(f"ok  {d}: {arch} ({'custom code' if custom else 'transformers class'}, head {meta['head']}), "
          f"{len(check['sequences'])} proteins, max diff {worst:.2e}"
          + (f", unused tensors {unexpected}" if unexpected else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    failed = 0
    for d in args.dirs:
        try:
            check_dir(d, args.tol)
        except Exception as e:  # report every directory, fail at the end
            failed += 1
            print(f"FAIL {d}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
