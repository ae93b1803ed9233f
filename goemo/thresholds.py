"""Per-label decision thresholds, tuned on validation to maximise each label's F1.

A label is predicted when its probability is strictly above its threshold (`p > t`), the same rule
torchmetrics applies to the fixed `threshold`, so a tuned vector equal to it gives the same metrics.
Comparisons are made in float32 everywhere (tuning, applying, the report), so they agree to the bit.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multilabel_exact_match, multilabel_f1_score

from goemo.errors import GoemoError

# The candidates searched: 0.01, 0.02, ..., 0.99. A fixed grid (not the distinct probabilities) keeps the
# search O(99 N L) and keeps tiny probability differences from moving the threshold.
GRID = (torch.arange(1, 100, dtype=torch.float64) / 100).float()

Array = Union[np.ndarray, torch.Tensor]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b elementwise, 0 where b == 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 from counts of any shape (..., L); 0 where undefined."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    return _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)


def tune_thresholds(
    probs: Array, targets: Array, fallback: float = 0.5, resamples: int = 0, seed: int = 0, shrink: float = 0.0
) -> torch.Tensor:
    """For each label, the grid threshold with the highest F1 on (probs, targets); ties -> the lowest.

    With `resamples`, that choice is made on each of that many bootstrap resamples of the rows (of each label's
    column, in an order that does not depend on the rows') and the chosen thresholds are averaged (bagging). A rare
    label's best threshold on a few dozen positives is a noisy pick from a flat, jagged F1 curve; the average over
    resamples moves less between validation and test (docs/results.md).

    Args:
        probs: (N, L) probabilities.
        targets: (N, L) 0/1 labels.
        fallback: Threshold for labels whose best F1 is 0 (no positives, or none ever ranked above a
            negative) on the rows, or on every resample: with nothing to learn from, the lowest grid value would
            predict nearly every row. Resamples where it is 0 for a label do not count in that label's mean.
        resamples: Bootstrap resamples to average over; 0: tune once on the rows as given.
        seed: Seed of the resampling's own generator (the global random state is neither used nor advanced).
        shrink: Pull each label's threshold toward g, the one grid threshold with the best macro-F1 on the rows:
            label j's becomes `w t_j + (1 - w) g`, `w = n_j / (n_j + shrink)`, n_j its positives among the rows.
            A label with a few dozen positives leans on the threshold all labels share (docs/results.md), one
            without positives takes g (not `fallback`; g is `fallback` where no threshold gives any F1). 0: no pull.

    Returns:
        (L,) float32 thresholds, on the device of `probs`.
    """
    probs, targets = torch.as_tensor(probs), torch.as_tensor(targets)
    if probs.ndim != 2 or probs.shape != targets.shape or len(probs) == 0:
        raise GoemoError(
            f"tune_thresholds needs probs and targets of one shape (N, L), N > 0; "
            f"got {tuple(probs.shape)} and {tuple(targets.shape)}"
        )
    if resamples < 0:
        raise GoemoError(f"threshold resamples must be >= 0 (0: no resampling), got {resamples}")
    if not 0 <= shrink < float("inf"):
        raise GoemoError(f"threshold shrink must be a number >= 0 (0: none), got {shrink}")
    # On the CPU in float64 (exact weighted counts; MPS has no float64): the (N, L) outputs of an epoch are small.
    device, probs, y = probs.device, probs.detach().cpu().float(), targets.cpu().bool().double()
    n, num_labels = probs.shape
    # (B, N): how often each row is drawn into each resample; one resample of weight 1 per row without resampling.
    weights = torch.ones(1, n, dtype=torch.float64)
    if resamples:
        # Each label's (probability, target) pairs in one canonical order (by probability, ties by target), so the
        # draws do not depend on the rows' order: DDP gathers them rank by rank. A label's threshold reads its own
        # column only, so resampling each column on its own is the same bootstrap for it as resampling whole rows.
        order = torch.argsort(y, dim=0, stable=True)  # (N, L)
        probs, y = probs.gather(0, order), y.gather(0, order)
        order = torch.argsort(probs, dim=0, stable=True)
        probs, y = probs.gather(0, order), y.gather(0, order)
        rows = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))  # (B, N)
        weights = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.float64))
    if shrink and resamples:  # the rows themselves as one more "resample" (last), for the shared threshold g
        weights = torch.cat([weights, torch.ones(1, n, dtype=torch.float64)])
    pos = weights @ y  # (B, L) tp + fn, the same at every threshold; weighted counts are whole numbers
    tp = torch.empty(len(GRID), len(weights), num_labels, dtype=torch.float64)  # (G, B, L)
    predicted = torch.empty_like(tp)  # (G, B, L) tp + fp
    for g, t in enumerate(GRID):  # a loop over 99 thresholds keeps memory at one (N, L) mask
        pred = apply_thresholds(probs, t.expand(num_labels)).double()  # (N, L)
        tp[g], predicted[g] = weights @ (pred * y), weights @ pred
    f1 = torch.from_numpy(prf(tp.numpy(), (predicted - tp).numpy(), (pos - tp).numpy())[2])  # (G, B, L), as in the report
    if shrink:
        macro = f1[:, -1].mean(1)  # (G,) the rows' macro-F1 at each single threshold
        # the best, ties -> the lowest; with no F1 at any threshold (no positives), the fallback, as for each label
        shared = GRID[macro.argmax()] if macro.max() > 0 else torch.tensor(fallback)
        if resamples:
            f1 = f1[:, :-1]
    chosen = GRID[f1.argmax(0)]  # (B, L) the first maximum, i.e. the lowest threshold among ties
    # A resample where a label's best F1 is 0 (it drew none of a rare label's few positives) has nothing to say
    # about its threshold: the mean is over the others, and the fallback only where no resample had any F1.
    found = f1.max(0).values > 0  # (B, L)
    count = found.sum(0)  # (L,)
    mean = (chosen.double() * found).sum(0) / count.clamp(min=1)
    tuned = torch.where(count > 0, mean, torch.full_like(mean, fallback)).float()  # (L,)
    if shrink:  # in float64 from the float32 thresholds, as benchmarks/ensemble_cv.py measured it
        w = y.sum(0) / (y.sum(0) + shrink)  # (L,) each label's positives among the rows
        tuned = (w * tuned.double() + (1 - w) * shared.double()).float()
    return tuned.to(device)


def apply_thresholds(probs: Array, thresholds: Array) -> Array:
    """(N, L) probabilities, (L,) thresholds -> (N, L) bool predictions: `p > t`, compared in float32.

    goemo's one decision rule (metrics, tuning, reports, predictions and the dashboard all use it); numpy in,
    numpy out; torch in, torch out."""
    if isinstance(probs, np.ndarray):
        return probs.astype(np.float32, copy=False) > np.asarray(thresholds, dtype=np.float32)
    return probs.float() > torch.as_tensor(thresholds).float().to(probs.device)


def thresholded_metrics(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
    """F1 micro/macro and exact match at per-label thresholds, as the fixed-threshold metrics compute them."""
    # torchmetrics takes one threshold; 0/1 predictions at 0.5 give the per-label decisions unchanged.
    preds = apply_thresholds(probs, thresholds).float()
    kw = dict(num_labels=probs.shape[1], threshold=0.5)
    t = targets.int()
    return {
        "f1_micro": multilabel_f1_score(preds, t, average="micro", zero_division=0, **kw),
        "f1_macro": multilabel_f1_score(preds, t, average="macro", zero_division=0, **kw),
        "exact_match": multilabel_exact_match(preds, t, **kw),
    }


class ProbsAndTargets(Metric):
    """Collects (B, L) probabilities and targets over an epoch; `compute()` gathers them from all ranks.

    A torchmetrics cat state, so DDP syncing is torchmetrics' job; not saved in checkpoints. With each row's index in
    its split, the rows come back in split order whatever the number of processes (gathered rank by rank otherwise),
    so what depends on the order (the test report's bootstrap intervals) is the same on one GPU or eight.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().to(torch.uint8))
        if rows is not None:
            self.rows.append(rows.detach().long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) float32 probabilities and (N, L) uint8 targets: in split order where the rows' indices were given,
        else in batch order per rank."""
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # a tensor already after a DDP sync
        probs, targets = cat(self.probs), cat(self.targets)
        rows = cat(self.rows) if len(self.rows) else None
        if rows is not None:
            if len(rows) != len(probs):  # some batches without "row": no order would be right
                raise GoemoError(f"{len(rows)} row indices for {len(probs)} rows of outputs: give every batch its rows or none")
            order = torch.argsort(rows.to(probs.device), stable=True)
            probs, targets = probs[order], targets[order]
        return probs, targets
