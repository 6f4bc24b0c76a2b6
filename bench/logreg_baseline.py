"""Issue 16's baseline: logistic regression on frozen ESM-2 mean embeddings.

Mean-pools every DeepLoc 1.0 record's residue embeddings from a protloc cache (filled by
`protloc embed --per-residue`) and fits scikit-learn's logistic regression with C = 0.01,
as the issue states it. The issue does not say whether the features were standardised, so
both are compared on a stratified 10% validation split of the training records
(`deeploc_cache.validation_split`, as in bench/layers_validation.py); the better one is
refitted on all training records and scores the test-tagged records once: Q10 and MCC,
the numbers the issue quotes (69.3% / 0.628) and bench/ACCURACY.md compares every row
with. Needs numpy, safetensors, scikit-learn.

    python bench/logreg_baseline.py ../shared/data/deeploc_data.fasta cache/esm8m
"""
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import matthews_corrcoef
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from deeploc_cache import deeploc_records, mean_embeddings, validation_split


def main(data, cache):
    records = deeploc_records(data)
    labels = sorted({loc for loc, _, _ in records})
    train = [(loc, seq) for loc, seq, is_test in records if not is_test]
    test = [(loc, seq) for loc, seq, is_test in records if is_test]

    def xy(rows):
        x = mean_embeddings(cache, [seq for _, seq in rows])
        return x, np.array([labels.index(loc) for loc, _ in rows])

    def model(standardised):
        clf = LogisticRegression(C=0.01, max_iter=5000)
        return make_pipeline(StandardScaler(), clf) if standardised else clf

    x_train, y_train = xy(train)
    fit, val = validation_split(y_train)
    scores = {}
    for standardised in (False, True):
        m = model(standardised).fit(x_train[fit], y_train[fit])
        scores[standardised] = (m.predict(x_train[val]) == y_train[val]).mean()
        print(f"validation ({'standardised' if standardised else 'raw'} features): "
              f"{scores[standardised]:.2%}")
    standardised = scores[True] > scores[False]
    x_test, y_test = xy(test)
    predicted = model(standardised).fit(x_train, y_train).predict(x_test)
    right = int((predicted == y_test).sum())
    print(f"{'standardised' if standardised else 'raw'} features, refitted on {len(train)} "
          f"records, scored {len(test)} test records")
    print(f"Q10 {right / len(test):.2%} ({right} of {len(test)})   "
          f"MCC {matthews_corrcoef(y_test, predicted):.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
