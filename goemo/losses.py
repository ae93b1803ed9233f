"""Multi-label losses over logits (B, L) and float multi-hot targets (B, L), each a mean over all B*L terms."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from goemo.errors import GoemoError

Loss = Literal["bce", "bce_pos_weight", "focal"]


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), as torchvision's `sigmoid_focal_loss`:

    `FL = alpha_t * (1 - p_t)^gamma * BCE`, with p_t = p for a positive and 1 - p for a negative, and
    alpha_t = alpha for a positive, 1 - alpha for a negative (no alpha_t factor when alpha is None).
    gamma = 0 without alpha is plain BCE.
    """

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None) -> None:
        super().__init__()
        check_focal(gamma, alpha)
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # under fp16 autocast, (1 - p_t)^gamma of a confident row underflows
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, L)
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        # (1 - p_t) is exactly 0 once |logit| > ~17 in float32; x^gamma has an infinite slope at 0 for gamma < 1,
        # and inf * sigmoid's zero slope is NaN: clamp, which leaves the loss as it is and its gradient 0 there.
        loss = bce * (1 - p_t).clamp(min=torch.finfo(torch.float32).tiny) ** self.gamma
        if self.alpha is not None:
            loss = loss * (self.alpha * targets + (1 - self.alpha) * (1 - targets))
        return loss.mean()


class WeightedBCE(nn.Module):
    """BCE whose positives of label j weigh `pos_weight[j]` (w), on the logits shifted by log w.

    Plain weighted BCE is lowest where sigmoid(logit) = w p / (w p + 1 - p) for a label of probability p: its
    probabilities overstate every label (GoEmotions, w up to 100: most tuned thresholds at 0.95-0.99, the top of
    their grid). Adding log w inside the loss (logit adjustment, Menon et al. 2021) leaves the gradients those of
    weighted BCE while the model's own logits stay log(p / (1 - p)), so probabilities, the fixed threshold, the
    tuned thresholds and exports read as under plain BCE.
    """

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        # A buffer, so checkpoints carry it (state key loss_fn.pos_weight); 1 until fit fills it in.
        # float32 under precision bf16-true too (EmotionClassifier._apply): in bf16, 559 would be 560.
        self.register_buffer("pos_weight", torch.ones(num_labels, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = self.pos_weight.float()  # (L,) float32
        shift = w.clamp(min=1e-12).log()  # a label positive in every row has weight 0
        return F.binary_cross_entropy_with_logits(logits + shift, targets, pos_weight=w)  # float32: model_step casts


def pos_weight_from_frequencies(frequencies: torch.Tensor, max_weight: float) -> torch.Tensor:
    """BCE pos_weight per label: negatives / positives = (1 - f) / f, capped at `max_weight`.

    f is the label's fraction of training rows. The cap keeps the rarest labels (GoEmotions' grief:
    77 of 43,410 rows, neg/pos ~560) from dominating the loss; a label with no positives gets the cap (1 when the
    cap is inf: an infinite weight's log shift would make its loss inf * 0 = NaN).
    """
    f = frequencies.double()
    fallback = max_weight if math.isfinite(max_weight) else 1.0
    ratio = torch.where(f > 0, (1 - f) / f.clamp(min=1e-12), torch.full_like(f, fallback))
    return ratio.clamp(max=max_weight).float()


def check_focal(gamma: float, alpha: float | None) -> None:
    """One-line errors for focal settings out of range."""
    if not 0 <= gamma < math.inf:  # NaN gives a NaN loss, inf a loss of 0
        raise GoemoError(f"model.focal_gamma must be a number >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise GoemoError(f"model.focal_alpha must be within 0..1 or null, got {alpha}")


def build_loss(name: Loss, num_labels: int, focal_gamma: float, focal_alpha: Optional[float]) -> nn.Module:
    """The loss module for `model.loss`; `bce_pos_weight` starts at weight 1, filled in at fit. The focal settings
    are checked whatever the loss: they are saved with the run, and a sweep may switch the loss to focal."""
    check_focal(focal_gamma, focal_alpha)
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "bce_pos_weight":
        return WeightedBCE(num_labels)
    if name == "focal":
        return FocalLoss(focal_gamma, focal_alpha)
    raise GoemoError(f"model.loss {name!r}: unknown; use bce, bce_pos_weight or focal")


class SelfDistillTargets:
    """Soft training targets from the model's own predictions of the epoch before (progressive self-knowledge
    distillation, PS-KD: Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets").

    In epoch e a row's target is `(1 - a) * labels + a * p`, with p the probabilities (L,) the model gave that row
    during epoch e - 1 (with dropout, before that batch's update) and `a` growing with e (the model's `self_distill`).
    Rows without a prediction (epoch 0, or a gap) keep their labels. Two (N, L) tables of training rows: `prev` is read,
    `next` is filled; they swap when epoch e + 1 starts, so a fit resumed mid-epoch reads and fills the same ones.
    """

    def __init__(self, num_rows: int, num_labels: int) -> None:
        self.prev = torch.full((num_rows, num_labels), float("nan"))  # on the CPU; NaN: no prediction
        self.next = torch.full_like(self.prev, float("nan"))
        self.epoch = 0  # the epoch whose predictions `next` holds

    def start_epoch(self, epoch: int, merge=None) -> None:
        """Before epoch `epoch`: the last epoch's predictions become the targets' (`merge`: combine ranks' tables)."""
        if epoch == self.epoch:  # the first epoch, or resumed within this one
            return
        filled = merge(self.next) if merge is not None else self.next
        self.prev = filled if epoch == self.epoch + 1 else torch.full_like(self.next, float("nan"))
        self.next = torch.full_like(self.next, float("nan"))
        self.epoch = epoch

    def targets(self, rows: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
        """(B,) row indices, (B, L) float labels -> (B, L) soft targets."""
        prev = self.prev[rows.to(self.prev.device)].to(labels)
        seen = ~prev.isnan().any(1, keepdim=True)  # (B, 1)
        return torch.where(seen, (1 - alpha) * labels + alpha * prev.nan_to_num(), labels)

    def record(self, rows: torch.Tensor, probs: torch.Tensor) -> None:
        self.next[rows.to(self.next.device)] = probs.detach().to(self.next)

    def state_dict(self) -> dict:
        return {"prev": self.prev.cpu(), "next": self.next.cpu(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["prev"].shape) != tuple(self.prev.shape):
            raise GoemoError(
                f"the checkpoint's self-distillation targets are for {tuple(state['prev'].shape)} (rows, labels), "
                f"the training data has {tuple(self.prev.shape)}; resume with the data the fit started with"
            )
        self.prev, self.next = state["prev"].to(self.prev), state["next"].to(self.next)
        self.epoch = int(state["epoch"])
