"""Averaging the weights of the last training epochs (stochastic weight averaging over epoch ends).

From epoch `start_epoch` on, the trained weights at the end of each training epoch (or, with `updates_per_epoch` k,
after each k-th of it) join a running mean. That mean is what validation scores (and the per-label thresholds are
tuned on), what the checkpoints hold as `state_dict`, and so what `test`, `predict`, `goemo.load` and the export use.
Training itself goes on from its own weights, which each checkpoint keeps under `current_model_state` for resuming
(the key Lightning's WeightAveraging uses).

Why not Lightning's `WeightAveraging` (2.6) with epoch-end updates: it updates after the epoch's validation, so the
validation and checkpoint of an epoch see the average of the epochs before; before its first update it validates the
initial weights (Lightning #21724); and it swaps and saves the buffers of its own copy of the module, where goemo's
tuned `thresholds` live. The mean here is over the trainable parameters only: buffers stay the live ones.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

from goemo.errors import GoemoError


class EpochAveraging(Callback):
    def __init__(self, start_epoch: Optional[int] = None, updates_per_epoch: int = 1) -> None:
        """Validate, save and test the mean of the weights at the ends of the training epochs from `start_epoch` on.

        Args:
            start_epoch: First epoch whose final weights join the mean, counted from 0 as in the checkpoint names
                (`epoch01-...` is the second epoch). With `trainer.max_epochs 4`, `1` averages the weights at the
                ends of epochs 2, 3 and 4. Until then validation sees the weights as trained. Unset: no averaging.
            updates_per_epoch: How many times per epoch the weights join the mean, after evenly spaced optimizer steps,
                the last of them the epoch's last: 4 adds the weights after each quarter of every averaged epoch.
        """
        if start_epoch is not None and start_epoch < 0:
            raise GoemoError(f"weight_averaging.start_epoch must be >= 0 (or unset: no averaging), got {start_epoch}")
        if updates_per_epoch < 1:
            raise GoemoError(f"weight_averaging.updates_per_epoch must be >= 1, got {updates_per_epoch}")
        self.start_epoch, self.updates_per_epoch = start_epoch, updates_per_epoch
        self._mean: dict[str, torch.Tensor] = {}  # parameter name -> running mean, float32, on the parameter's device
        self._count = 0  # weights averaged so far
        self._last = (-1, -1)  # (epoch, batch index) of the last weights averaged: a resumed fit adds none twice
        self._raw: Optional[dict[str, torch.Tensor]] = None  # the trained weights while the mean is swapped in

    def _params(self, pl_module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.start_epoch is None:
            return
        if any(getattr(cb, "save_weights_only", False) for cb in trainer.checkpoint_callbacks):
            # Lightning skips callbacks' on_save_checkpoint for weights-only saves: the files would hold the
            # trained weights, not the mean that validation scored and the thresholds were tuned for.
            raise GoemoError("weight averaging needs full checkpoints: unset checkpoint.save_weights_only (or weight_averaging.start_epoch)")
        if trainer.max_epochs is not None and 0 < trainer.max_epochs <= self.start_epoch and trainer.is_global_zero:
            # Said, not refused: a quick `--trainer.max_epochs 1` of configs/minilm.yaml is a fair smoke test.
            print(f"note: weight_averaging.start_epoch {self.start_epoch} averages no epoch of trainer.max_epochs "
                  f"{trainer.max_epochs} (epochs count from 0: {trainer.max_epochs - 1} averages the last one)", file=sys.stderr)  # fmt: skip

    # -- the running mean --------------------------------------------------------------------
    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # After the batch's optimizer step. The epoch's last update runs before the epoch-end validation, which then
        # scores the mean including this epoch.
        epoch = trainer.current_epoch
        if self.start_epoch is None or epoch < self.start_epoch or (epoch, batch_idx) <= self._last:
            return
        if not (trainer.is_last_batch or batch_idx + 1 in self._update_points(trainer.num_training_batches, trainer.accumulate_grad_batches)):
            return
        self._count += 1
        for name, p in self._params(pl_module).items():
            if name not in self._mean:
                self._mean[name] = p.detach().float().clone()
            else:  # mean += (p - mean) / count
                self._mean[name].lerp_(p.detach().float(), 1.0 / self._count)
        self._last = (epoch, batch_idx)

    def _update_points(self, num_batches: float, accumulate: int = 1) -> set[int]:
        """The batch numbers (from 1) after which the weights join the mean: k evenly spaced optimizer steps, the
        epoch's last step last. Steps, not batches: with gradients accumulated over a batches, a batch that ends no
        step would add the weights of the step before a second time."""
        if math.isinf(num_batches):  # an iterable dataset of unknown length: its last batch only
            return set()
        n, k, a = int(num_batches), self.updates_per_epoch, accumulate
        steps = -(-n // a)  # optimizer steps in the epoch: after every a-th batch and after the last
        return {min(-(-i * steps // k) * a, n) for i in range(1, k + 1)}  # after step ceil(i steps / k), in integers

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed mean was read from the checkpoint on the CPU, before the model moved to its device.
        params = self._params(pl_module)
        epoch = trainer.current_epoch
        if self.start_epoch is not None and not self._count and epoch > self.start_epoch and trainer.is_global_zero:
            # A fit resumed with averaging turned on later than its start: the epochs it ended without averaging are gone.
            print(f"note: weight_averaging.start_epoch {self.start_epoch}, but this fit resumes in epoch {epoch} with no "
                  f"mean begun: the mean starts with epoch {epoch}'s weights", file=sys.stderr)  # fmt: skip
        self._mean = {name: mean.to(params[name].device) for name, mean in self._mean.items() if name in params}

    # -- the mean in place of the trained weights --------------------------------------------
    @torch.no_grad()
    def _swap_in(self, pl_module) -> None:
        if not self._count or self._raw is not None:
            return
        params = self._params(pl_module)
        self._raw = {name: params[name].detach().clone() for name in self._mean}
        for name, mean in self._mean.items():
            params[name].copy_(mean)

    @torch.no_grad()
    def _swap_out(self, pl_module) -> None:
        if self._raw is None:
            return
        params = self._params(pl_module)
        for name, raw in self._raw.items():
            params[name].copy_(raw)
        self._raw = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Callbacks' epoch-end hooks run before the module's, which then tunes the thresholds on the outputs of
        # the mean gathered during this validation. Only fit's validation swapped: a `trainer.validate(model)`
        # after `fit` must leave the mean that `on_train_end` put in place.
        if trainer.state.fn == "fit":
            self._swap_out(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)  # a `trainer.test(model)` after `fit` tests the mean, as the checkpoints would

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"count": self._count, "last_epoch": self._last[0], "last_batch": self._last[1],
                "start_epoch": self.start_epoch, "updates_per_epoch": self.updates_per_epoch}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        if self.start_epoch is None:  # averaging turned off for the rest of a resumed fit: start no mean
            return
        # A mean under way goes on only as it began: another start or spacing would mix in (or miss) weights that
        # the config says are not (or are) in it. Checkpoints from before these keys: an averaged epoch before the
        # start is the one mismatch they show; those from before updates_per_epoch averaged epoch ends only.
        count, last_epoch = state_dict["count"], state_dict["last_epoch"]
        was = (state_dict.get("start_epoch", self.start_epoch), state_dict.get("updates_per_epoch", self.updates_per_epoch))
        if count and (was != (self.start_epoch, self.updates_per_epoch) or last_epoch < self.start_epoch):
            began = f"start_epoch {was[0]}" if "start_epoch" in state_dict else f"epoch {last_epoch} or earlier"
            raise GoemoError(f"weight_averaging: this fit's mean began at {began} with updates_per_epoch {was[1]}, now "
                             f"start_epoch {self.start_epoch} with updates_per_epoch {self.updates_per_epoch}; resume "
                             "with the settings it started with, or start a new fit")  # fmt: skip
        self._count = count
        self._last = (last_epoch, state_dict.get("last_batch", math.inf))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self._count:  # nothing averaged yet: the checkpoint holds the trained weights, as without averaging
            return
        state = checkpoint["state_dict"]
        swapped = self._raw or {}
        checkpoint["current_model_state"] = {k: swapped.get(k, v) for k, v in state.items()}
        checkpoint["state_dict"] = {k: self._mean[k].to(v.dtype) if k in self._mean else v for k, v in state.items()}
        # Under a half precision (bf16-true) the state_dict rounds the float32 mean: keep it exact for a resume.
        exact = {k: m.cpu() for k, m in self._mean.items() if k in state and m.dtype != state[k].dtype}
        if exact:
            checkpoint["averaging_mean"] = exact

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # `test` and `predict` use the checkpoint's `state_dict` (the mean); a resumed fit trains on from the
        # trained weights, and carries on the mean unless averaging was turned off.
        raw = checkpoint.get("current_model_state")
        if raw is None or trainer.state.fn != "fit":
            return
        if self.start_epoch is not None:
            state, params = {**checkpoint["state_dict"], **checkpoint.get("averaging_mean", {})}, self._params(pl_module)
            self._mean = {name: state[name].float().clone() for name in params if name in state}
        pl_module.load_state_dict(raw)
