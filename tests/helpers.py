"""Callbacks the tests put on the command line (`--trainer.callbacks+=tests.helpers.NAME`); not part of goemo."""

from __future__ import annotations

import json
import time

import torch
from lightning.pytorch.callbacks import Callback


class SlowSteps(Callback):
    def __init__(self, seconds: float = 0.3, started: str = "") -> None:
        """Sleeps after each training, validation, test and predict batch, so a test can signal the process mid-work.

        Args:
            seconds: Sleep per batch.
            started: If set, a file created after the first batch (the test waits for it before signalling).
        """
        self.seconds, self.started = seconds, started

    def _batch_end(self, *args, **kwargs) -> None:
        if self.started:
            open(self.started, "a").close()
        time.sleep(self.seconds)

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _batch_end


class RecordValidation(Callback):
    def __init__(self, path: str) -> None:
        """Appends one JSON line per validation epoch (rank 0): the step, every val/* metric and the tuned thresholds.

        Args:
            path: JSON-lines file to append to.
        """
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {"step": trainer.global_step, "metrics": metrics, "thresholds": pl_module.thresholds.tolist()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class NanLossAt(Callback):
    def __init__(self, step: int = 3) -> None:
        """Makes the training loss nan from optimizer step `step` on (scales the head's weights by nan).

        Args:
            step: Global step at which the weights become nan.
        """
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.head.weight.mul_(float("nan"))


class RecordCallbacks(Callback):
    def __init__(self, path: str) -> None:
        """Writes the class names of the trainer's callbacks (JSON list) when fit starts.

        Args:
            path: JSON file to write.
        """
        self.path = path

    def on_fit_start(self, trainer, pl_module) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump([type(cb).__name__ for cb in trainer.callbacks], f)


class RecordSaves(Callback):
    def __init__(self, path: str) -> None:
        """Appends the global step of every checkpoint save (one line each) to a text file.

        Args:
            path: Text file to append to.
        """
        self.path = path

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.global_step}\n")


class ExitInValidation(Callback):
    def __init__(self, step: int = 12, marker: str = "exited") -> None:
        """Ends the process at once (`os._exit(137)`, as kill -9 would) in the validation after optimizer step
        `step`, the first time only: it creates `marker` first and does nothing while that file exists.

        Args:
            step: Global step whose validation is cut short.
            marker: File that says the exit happened (a resumed fit runs the same callbacks).
        """
        self.step, self.marker = step, marker

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        import os

        if trainer.sanity_checking or trainer.global_step != self.step or os.path.exists(self.marker):
            return
        open(self.marker, "w").close()
        os._exit(137)


class TermRank0InSetup(Callback):
    """SIGTERM to rank 0 in `setup`: before Lightning's loops hold the signal, while the other ranks wait for it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        import os
        import signal

        if trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class NanWeightsOnRank0(Callback):
    """Makes rank 0's head weights nan after the first validation, so its epoch checkpoint's save refuses them (an
    error on rank 0 alone while the other ranks wait at the save's barrier)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            with torch.no_grad():
                pl_module.head.weight.fill_(float("nan"))


class SignalAtBatch(Callback):
    def __init__(self, batch: int = 3, signal: str = "SIGINT", marker: str = "signalled") -> None:
        """Sends a signal (SIGINT: Ctrl-C) to this process as training batch `batch` (counted over all epochs from 0)
        starts, the first time only: it creates `marker` first and does nothing while that file exists.

        Args:
            batch: Index of the training batch, over all epochs, during which the signal arrives.
            signal: Its name: SIGINT or SIGTERM.
            marker: File that says the signal was sent (a resumed fit runs the same callbacks).
        """
        self.batch, self.signal, self.marker = batch, signal, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os
        import signal

        if trainer.fit_loop.epoch_loop.total_batch_idx != self.batch or os.path.exists(self.marker):
            return
        open(self.marker, "w").close()
        os.kill(os.getpid(), getattr(signal, self.signal))
