"""Which ESM-2 layer's residue embeddings predict location best? Validation data only.

Reads two protloc embedding caches of the same encoder (the output layer, filled by
`protloc embed --per-residue`, and an earlier layer's states, filled by
`protloc train --train-top-layers K`), mean-pools every training record of a DeepLoc FASTA
(test-tagged records are never read) and scores logistic regression on a stratified 10%
validation split for each layer, their mean and their concatenation.
bench/ACCURACY.md (row M2) has the numbers. Needs numpy, safetensors, scikit-learn.

    python bench/layers_validation.py ../shared/data/deeploc_data.fasta cache/esm8m cache/esm8m-l5
"""
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from deeploc_cache import deeploc_records, mean_embeddings, validation_split


def main(data, output_cache, layer_cache):
    records = [(loc, seq) for loc, seq, is_test in deeploc_records(data) if not is_test]
    labels = sorted({loc for loc, _ in records})
    y = np.array([labels.index(loc) for loc, _ in records])
    sequences = [seq for _, seq in records]
    last, earlier = mean_embeddings(output_cache, sequences), mean_embeddings(layer_cache, sequences)
    train, val = validation_split(y)
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
