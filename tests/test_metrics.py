"""The logged metrics agree with scikit-learn on fixed arrays."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from goemo.model import multilabel_metrics
from goemo.thresholds import apply_thresholds

rng = np.random.default_rng(0)
TARGETS = (rng.random((64, 5)) < 0.3).astype(int)
PROBS = np.clip(TARGETS * 0.35 + rng.random((64, 5)) * 0.65, 0, 1)
TARGETS[:, 4] = 0  # a label never present: sklearn's zero_division=0 case
PROBS[:, 3] = 0.1  # a label never predicted


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_metrics_match_sklearn(threshold):
    m = multilabel_metrics(5, "val/")
    for chunk in np.array_split(np.arange(64), 3):  # several batches, as in an epoch
        probs = torch.tensor(PROBS[chunk], dtype=torch.float32)
        m.update(apply_thresholds(probs, threshold).float(), torch.tensor(TARGETS[chunk]))  # as the model feeds it
    out = {k: float(v) for k, v in m.compute().items()}
    preds = (PROBS > threshold).astype(int)
    assert out["val/f1_micro"] == pytest.approx(f1_score(TARGETS, preds, average="micro", zero_division=0), abs=1e-6)
    assert out["val/f1_macro"] == pytest.approx(f1_score(TARGETS, preds, average="macro", zero_division=0), abs=1e-6)
    assert out["val/exact_match"] == pytest.approx(np.mean(np.all(preds == TARGETS, axis=1)), abs=1e-6)
    assert 0 < out["val/f1_macro"] < out["val/f1_micro"] < 1  # the arrays are not trivial
