"""Read DeepLoc 1.0 FASTA records and mean-pool their embeddings from a protloc cache.

Shared by the scripts in bench/ that fit scikit-learn models on protloc's per-residue
embedding caches (`protloc embed --per-residue`, or the layer caches that
`protloc train --train-top-layers K` fills).
"""
import json

import numpy as np
from safetensors.numpy import load_file
from sklearn.model_selection import train_test_split


def sequence_key(seq):
    """The cache's key of a sequence: FNV-1a 64 of its upper-case bytes, and its length."""
    h = 0xCBF29CE484222325
    for b in seq.upper().encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}-{len(seq)}"


def deeploc_records(path):
    """(location, sequence, is_test) for every record of a DeepLoc 1.0 FASTA, in file order.

    Headers read `>ACCESSION Location-M [test]`; the membrane flag is dropped.
    """
    records, header, seq = [], None, []
    for line in list(open(path)) + [">"]:
        line = line.strip()
        if line.startswith(">"):
            if header:
                is_test = len(header) > 2 and header[2] == "test"
                records.append((header[1].rsplit("-", 1)[0], "".join(seq), is_test))
            header, seq = line[1:].split(), []
        elif line:
            seq.append(line)
    return records


def mean_embeddings(cache, sequences):
    """One mean residue embedding (float32) per sequence, stacked in the order given."""
    manifest = json.load(open(f"{cache}/manifest.json"))
    # A layer cache (`layer` in its spec) holds every token: drop the first and last.
    specials = manifest["spec"].get("layer") is not None
    shards, out = {}, []
    for seq in sequences:
        e = manifest["entries"][sequence_key(seq)]
        if e["shard"] not in shards:
            shards[e["shard"]] = load_file(f"{cache}/{manifest['shards'][e['shard']]}")["embeddings"]
        rows = shards[e["shard"]][e["row"] : e["row"] + e["len"]].astype(np.float32)
        out.append((rows[1:-1] if specials else rows).mean(0))
    return np.stack(out)


def validation_split(y):
    """Indices (fit, validation): the stratified 10% split (seed 0) every bench script uses."""
    return train_test_split(np.arange(len(y)), test_size=0.1, stratify=y, random_state=0)
