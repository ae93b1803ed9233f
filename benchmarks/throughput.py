"""A Lightning callback that measures training and validation throughput, for the benchmark only.

Attach it to a CLI run without touching the framework:

    python main.py fit ... --trainer.callbacks+=benchmarks.throughput.Throughput \
        --trainer.callbacks.path out/goemo.json

Clocks (wall time, `time.perf_counter`; on a GPU the device is synchronised at each boundary):

- training: from `on_train_epoch_start` to the start of validation (or the end of the epoch when an
  epoch has no validation), summed over epochs. It covers fetching and collating batches, forward,
  backward, optimizer step and step logging; it excludes validation, checkpointing (both run after
  the epoch's last batch) and the dataloader's start (workers, first prefetch), which Lightning does
  before `on_train_epoch_start`. After a mid-epoch validation the clock restarts at the next batch.
- validation: `on_validation_start` to `on_validation_end` (metric computation included), sanity
  check excluded.

Rows and tokens: samples, real tokens (attention mask sum) and padded tokens (batch numel), so the
JSON also shows how much padding the batching leaves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class _Counter:
    """Rows, real and padded tokens of one stage, and the seconds spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self.padded_tokens = 0
        self.real_tokens: Any = 0  # a device tensor once counting starts: no per-batch sync on a GPU

    def add(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        self.samples += mask.shape[0]
        self.padded_tokens += mask.numel()
        self.real_tokens = self.real_tokens + mask.sum()

    def as_dict(self, prefix: str) -> dict[str, float]:
        real = int(self.real_tokens)
        rate = (lambda n: round(n / self.seconds, 3) if self.seconds > 0 else None)  # noqa: E731
        return {
            f"{prefix}_time_s": round(self.seconds, 3),
            f"{prefix}_samples": self.samples,
            f"{prefix}_samples_per_s": rate(self.samples),
            f"{prefix}_real_tokens": real,
            f"{prefix}_padded_tokens": self.padded_tokens,
            f"{prefix}_real_tokens_per_s": rate(real),
            f"{prefix}_padding_fraction": round(1 - real / self.padded_tokens, 4) if self.padded_tokens else None,
        }


class Throughput(Callback):
    def __init__(self, path: str) -> None:
        """Measure training-loop and validation throughput of a `fit` and write them as JSON.

        Args:
            path: JSON file written at the end of `fit` (folders are created).
        """
        self.path = Path(path)
        self.train, self.val = _Counter(), _Counter()
        self._train_mark: Optional[float] = None  # training clock running since this time
        self._val_mark: Optional[float] = None
        self._fit_start = 0.0

    def _now(self, pl_module: L.LightningModule) -> float:
        # CUDA kernels run asynchronously: wait for them so the time lands in the right clock.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _stop_train_clock(self, pl_module: L.LightningModule) -> None:
        if self._train_mark is not None:
            self.train.seconds += self._now(pl_module) - self._train_mark
            self._train_mark = None

    # -- training ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_mark = self._now(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._train_mark is None:  # resuming after a mid-epoch validation
            self._train_mark = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train.add(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_train_clock(pl_module)  # only when this epoch ran no validation

    # -- validation --------------------------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._stop_train_clock(pl_module)
        self._val_mark = self._now(pl_module)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.val.add(batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_mark is not None:
            self.val.seconds += self._now(pl_module) - self._val_mark
            self._val_mark = None

    # -- report ------------------------------------------------------------------------------
    def results(self, trainer: L.Trainer) -> dict[str, Any]:
        """Counts and rates so far, with the last logged validation metrics (after the final epoch)."""
        metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        return {
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "fit_time_s": round(time.perf_counter() - self._fit_start, 3),
            **self.train.as_dict("train"),
            **self.val.as_dict("val"),
            "val_f1_micro": metrics.get("val/f1_micro"),
            "val_f1_macro": metrics.get("val/f1_macro"),
            "val_metrics": metrics,
            "device": str(trainer.strategy.root_device),
            "precision": str(trainer.precision),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.results(trainer), indent=2) + "\n")
