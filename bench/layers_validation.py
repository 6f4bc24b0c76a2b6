"""Which ESM-2 layer's residue embeddings predict location best? Validation data only.

Reads two protloc embedding caches of the same encoder (the output layer, filled by
`protloc embed --per-residue`, and an earlier layer's states, filled by
`protloc train --train-top-layers K`), mean-pools every training record of a DeepLoc FASTA
(test-tagged records are never read) and scores logistic regression on a stratified 10%
validation split for each layer, their mean and their concatenation.
bench/ACCURACY.md (row M2) has the numbers. Needs numpy, safetensors, scikit-learn.

    python bench/layers_validation.py ../shared/data/deeploc_data.fasta cache/esm8m cache/esm8m-l5
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def sequence_key(seq):
    """The cache's key of a sequence: FNV-1a 64 of its upper-case bytes, and its length."""
    h = 0xCBF29CE484222325
    for b in seq.upper().encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}-{len(seq)}"


def training_records(path):
    records, header, seq = [], None, []
    for line in list(open(path)) + [">"]:
        line = line.strip()
        if line.startswith(">"):
            if header and not (len(header) > 2 and header[2] == "test"):
                records.append((header[1].rsplit("-", 1)[0], "".join(seq)))
            header, seq = line[1:].split(), []
        elif line:
            seq.append(line)
    return records


def mean_embeddings(cache, records):
    manifest = json.load(open(f"{cache}/manifest.json"))
    # A layer cache (`layer` in its spec) holds every token: drop the first and last.
    specials = manifest["spec"].get("layer") is not None
    shards, out = {}, []
    for _, seq in records:
        e = manifest["entries"][sequence_key(seq)]
        if e["shard"] not in shards:
            shards[e["shard"]] = load_file(f"{cache}/{manifest['shards'][e['shard']]}")["embeddings"]
        rows = shards[e["shard"]][e["row"] : e["row"] + e["len"]].astype(np.float32)
        out.append((rows[1:-1] if specials else rows).mean(0))
    return np.stack(out)


def main(data, output_cache, layer_cache):
    records = training_records(data)
    labels = sorted({loc for loc, _ in records})
    y = np.array([labels.index(loc) for loc, _ in records])
    last, earlier = mean_embeddings(output_cache, records), mean_embeddings(layer_cache, records)
    train, val = train_test_split(np.arange(len(y)), test_size=0.1, stratify=y, random_state=0)
    features = {
        "output layer": last,
        "earlier layer": earlier,
        "mean of both": (last / last.std() + earlier / earlier.std()) / 2,
        "concatenation": np.hstack([earlier, last]),
    }
    for name, x in features.items():
        scaler = StandardScaler().fit(x[train])
        scores = []
        for c in (0.01, 0.1, 1.0):
            clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x[train]), y[train])
            scores.append(f"C={c}: {(clf.predict(scaler.transform(x[val])) == y[val]).mean():.4f}")
        print(f"{name:14} " + "  ".join(scores), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
