"""Crash-safe training: atomic checkpoint files, `last.ckpt` every N steps, exact resume, interrupts, divergence.

- `SafeCheckpointIO` writes every checkpoint to a temp file beside it, fsyncs it and renames it over the old one,
  so a kill during a save leaves the previous file whole; it refuses to save non-finite weights, and loads only
  with `weights_only=True` (a checkpoint never runs code), turning failures into one-line errors.
- `LastCheckpoint` saves `last.ckpt` every N optimizer steps (the epoch checkpoints come only at epoch ends).
- `ExactResume` keeps the random states in every checkpoint and restores them, with the train loader's position
  (`goemo.batching.ResumableDataLoader`), when training resumes; Lightning restores weights, optimizer, scheduler and
  loop progress. A resumed fit then ends as an uninterrupted one would.
- `Interrupts` turns Ctrl-C and SIGTERM into a saved `last.ckpt` and a one-line "resume with" message.
- `StopOnNonFiniteLoss` stops training at a nan/inf loss before its backward pass, naming the step.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from goemo.errors import GoemoError
from goemo.files import AtomicFile, no_space
from goemo.runs import load_checkpoint, load_lightning_checkpoint, saved_step

DEFAULT_EVERY_N_TRAIN_STEPS = 500  # BERT-base on a GPU: about a minute of training between saves


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoint files for Lightning: atomic writes, finite weights only, `weights_only=True` loads.

    Lightning's own `TorchCheckpointIO` writes the final path directly (through a temp file in the system temp
    folder, then a move that is a copy across file systems, without fsync), so a kill can leave a truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Union[str, Path], storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        _check_finite(checkpoint.get("state_dict", {}), path)
        _check_finite(checkpoint.get("current_model_state", {}), path)  # the trained weights under weight averaging
        try:
            with AtomicFile(path, "wb") as f:  # a kill during the save leaves the previous file whole
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            if not no_space(e):
                if isinstance(e, OSError):  # a read-only or vanished folder, permissions
                    raise GoemoError(f"cannot save {path} ({e.strerror or e}); the previous file there is kept; make the folder "
                                     "writable and resume the fit (python main.py fit --ckpt_path last, or the run's folder)") from None  # fmt: skip
                raise
            last = path.with_name("last.ckpt")
            kept = f"the previous last.ckpt (step {saved_step(last)}) is kept" if last.is_file() else "no earlier checkpoint exists"
            raise GoemoError(f"no space left on device while saving {path}; {kept}; free space and resume with --ckpt_path last") from None

    def load_checkpoint(
        self, path: Union[str, Path], map_location: Optional[Callable] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise GoemoError("weights_only=False: goemo loads checkpoints with weights_only=True only (a checkpoint never runs code)")
        if Path(path).name == ".temp.ckpt":  # ddp_spawn/ddp_notebook: the trained weights alone, from rank 0 (Lightning's
            return load_checkpoint(Path(path), map_location=map_location or "cpu")  # _MultiProcessingLauncher)
        return load_lightning_checkpoint(Path(path), map_location=map_location or "cpu")


def _check_finite(state: dict, path: Path) -> None:
    """Raise a GoemoError if a floating-point tensor of the state dict holds nan or inf."""
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats:
        return
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()])  # one device sync, not one per tensor
    if not bool(finite.all()):
        first = next(k for k, ok in zip(floats, finite.tolist()) if not ok)
        raise GoemoError(
            f"not saving {path}: the weights are not finite (first: {first}); training diverged, "
            f"the checkpoints saved before are kept (lower --model.learning_rate)"
        )


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, every_n_train_steps: int = DEFAULT_EVERY_N_TRAIN_STEPS, dirpath: str | None = None) -> None:
        """Saves `last.ckpt` in the run's checkpoints folder every N optimizer steps, for resuming after a crash.

        The epoch checkpoints (`--checkpoint.*`) also write `last.ckpt` after each validation; this adds the saves
        in between. Each save is atomic (temp file, then rename), so a kill during a save keeps the previous one.

        Args:
            every_n_train_steps: Optimizer steps between saves; 0 turns them off (last.ckpt then comes only
                with a new best epoch checkpoint, so it holds the best epoch, not the end of training).
            dirpath: The folder of last.ckpt; linked from `checkpoint.dirpath` by the CLI, so there is one last.ckpt
                (unset: the run's checkpoints/ folder).
        """
        if every_n_train_steps < 0:
            raise GoemoError(f"last_checkpoint.every_n_train_steps must be >= 0 (0 = off), got {every_n_train_steps}")
        # save_top_k=0: only last.ckpt. No version counter: it must overwrite the last.ckpt that the epoch
        # checkpoints write too, never add last-v1.ckpt.
        super().__init__(
            dirpath=dirpath, save_top_k=0, save_last=every_n_train_steps > 0, every_n_train_steps=every_n_train_steps,
            every_n_epochs=0, enable_version_counter=False,
        )  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        # With trainer.accumulate_grad_batches, a batch that ends no optimizer step leaves gradients that no
        # checkpoint holds: a save there resumes with the group's step made from part of its gradients. Lightning
        # skips those only while the step was saved in this process (after a resume it was not): skip them here.
        if not step_ends(trainer):
            return
        # A save at a batch whose validation follows (the epoch's last, or every val_check_interval batches)
        # resumes past that validation: Lightning's loop skips it, and with it its thresholds, checkpoint and
        # ranking. Lightning defers such saves to the end of validation for monitored checkpoints only; do it here too.
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and validation_follows(trainer):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Only a deferred save lands here, not through ModelCheckpoint.on_validation_end, which does nothing when
        # saves are due at epoch ends (val_check_interval 1.0): the deferred save was dropped there. After an
        # epoch's last batch it waits further, for the epoch's end (the epoch checkpoint saves there at 1.0).
        if self._defer_save_until_validation and not getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False):
            self._save_deferred(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Not ModelCheckpoint's, which would write last.ckpt again after a save at this step: saves come every N
        # steps and at the end of training here; the epoch checkpoints write theirs.
        if self._defer_save_until_validation:
            self._save_deferred(trainer)

    def _save_deferred(self, trainer) -> None:
        self._defer_save_until_validation = False
        if any(
            cb is not self and cb.save_last and cb._last_global_step_saved == trainer.global_step
            for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
        ):  # the epoch checkpoint wrote last.ckpt at this step already (it runs first): not the same file twice
            return
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        # last.ckpt must hold the final step. Lightning's own end-of-training save runs only if this callback never
        # saved, and the epoch checkpoint writes last.ckpt only in an epoch that set a new best; so a fit whose
        # last epoch was not its best kept the last.ckpt of the last multiple of N steps. Write it unless a
        # checkpoint callback (this one at a multiple of N, or the epoch checkpoint) already did at this step:
        # never the same file twice (MiniLM-L6 with AdamW state: ~0.4 s, 180 MB; BERT-base: ~1.3 GB).
        step = trainer.global_step
        done = any(cb.save_last and getattr(cb, "_last_global_step_saved", None) == step for cb in trainer.checkpoint_callbacks)
        if self.save_last and not done and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # as Lightning's on_train_end


def step_ends(trainer) -> bool:
    """Whether the batch that just ended also ended an optimizer step: with trainer.accumulate_grad_batches k, the
    k-th batch of a group or the epoch's last (Lightning's training_epoch_loop decides so)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    ready = progress.current.ready  # batches of this epoch so far, this one included (restored on resume)
    return ready % trainer.accumulate_grad_batches == 0 or ready == trainer.num_training_batches or bool(progress.is_last_batch)


def validation_follows(trainer) -> bool:
    """Whether validation runs right after the batch that just ended: at its epoch's end, or every val_check_batch
    batches (val_check_interval 0.3, or an int), as Lightning's training_epoch_loop decides."""
    last = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
    if not trainer.enable_validation:
        return False
    n = trainer.num_val_batches
    every = trainer.check_val_every_n_epoch
    if not (bool(sum(n) if isinstance(n, list) else n) and (every is None or (trainer.current_epoch + 1) % every == 0)):
        return False
    # A time interval (Trainer's private _val_check_time_interval, from a val_check_interval given as a time; no public
    # getter): when it falls cannot be told beforehand; the epoch's last batch is taken to validate.
    interval = trainer.val_check_batch
    if interval is None or interval == float("inf") or getattr(trainer, "_val_check_time_interval", None) is not None:
        return last
    loop = trainer.fit_loop.epoch_loop
    done = loop.total_batch_idx if every is None else loop.batch_idx  # counted over all epochs when every is None
    return (done + 1) % interval == 0


def rng_states() -> dict:
    """The torch (CPU and CUDA), numpy and Python random states, as tensors and plain data (`weights_only`-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: one state per visible GPU would not restore where fewer are visible.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state; this device's, if saved
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class ExactResume(Callback):
    """What a resumed fit needs beyond Lightning's restore, applied when training starts again.

    - The random states: saved in every checkpoint, restored at `on_train_start`, after Lightning's sanity
      check (which isolates the random state anyway) and just before the first batch. Between there and the
      save point nothing else draws random numbers (the loaders have their own generators), so the next
      dropout masks are those of the uninterrupted run.
    - The train loader's position: Lightning saves it (`goemo.batching.ResumableDataLoader`) but restores it only
      when the loader is built after the loop state is loaded, and `configure_optimizers` asking for
      `trainer.estimated_stepping_batches` builds it before (Lightning issue #20550). Applied here instead; the
      loader reads it when the epoch's first batch is taken, which comes after this hook.
    """

    def __init__(self) -> None:
        self._rng: Optional[dict] = None

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng = state_dict

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # ModelCheckpoint keeps its ranking (best_k_models, best score) only if its folder is spelled as when it
        # saved: a run resumed from another working folder has the same folder by another path (relative then,
        # absolute now), and Lightning would drop the ranking with a warning, and `best` then named a later,
        # worse epoch. Resuming from a file in the callback's own folder, its state describes that folder: the
        # saved paths are re-rooted there (callbacks' on_load_checkpoint runs before their load_state_dict).
        here = Path(trainer.ckpt_path).resolve().parent if trainer.ckpt_path else None
        for cb in trainer.checkpoint_callbacks:
            state = (checkpoint.get("callbacks") or {}).get(cb.state_key)
            if not (isinstance(cb, ModelCheckpoint) and cb.dirpath and state) or Path(cb.dirpath).resolve() != here:
                continue
            if state.get("dirpath") == cb.dirpath or Path(str(state.get("dirpath"))).name != Path(cb.dirpath).name:
                continue
            moved = lambda p: str(Path(cb.dirpath) / Path(p).name) if p else p  # noqa: E731
            state["dirpath"] = cb.dirpath
            state["best_k_models"] = {moved(k): v for k, v in (state.get("best_k_models") or {}).items()}
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = moved(state[key])

    def on_train_start(self, trainer, pl_module) -> None:
        fit_loop = trainer.fit_loop
        if fit_loop.restarting and fit_loop._combined_loader_states_to_load:  # not applied by Lightning (#20550)
            fit_loop._load_combined_loader_states()
        if self._rng:
            set_rng_states(self._rng)
        self._rng = None


def _checkpoint_dir(trainer) -> Optional[Path]:
    """The folder of the run's last.ckpt: LastCheckpoint's (the `checkpoint` section's dirpath, linked), not that of
    another ModelCheckpoint in trainer.callbacks, which come first."""
    found = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    own = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint) and cb.dirpath]
    return (own or found or [None])[0]


def _last_saved_step(trainer) -> int:
    """The global step of the newest last.ckpt saved in this process into the run's folder (0 also when none was)."""
    folder = _checkpoint_dir(trainer)
    steps = [cb._last_global_step_saved for cb in trainer.checkpoint_callbacks
             if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and Path(cb.dirpath) == folder]  # fmt: skip
    return max((s for s in steps if s is not None), default=0)


def resume_hint(run_dir: Path) -> str:
    """The command that resumes the fit logged in `run_dir`: `--ckpt_path last` when it is the newest run."""
    from goemo.runs import RUNS_DIR, checkpoint_dir, resolve_checkpoint

    try:
        newest = resolve_checkpoint("last", RUNS_DIR, resume=True)[1].resolve() == run_dir.resolve()
    except GoemoError:
        newest = False
    # Its last.ckpt; a run whose checkpoint.dirpath put it elsewhere by its folder (a bare file there names no run).
    own = run_dir / "checkpoints"
    return f"python main.py fit --ckpt_path {'last' if newest else own / 'last.ckpt' if checkpoint_dir(run_dir) == own else run_dir}"


class OutsideLoopsSIGTERM(BaseException):  # as KeyboardInterrupt: no `except Exception` on the way swallows it
    """SIGTERM while Lightning's loops do not hold the signal: parsing, loading the model, tokenizing, restoring
    (raised by goemo.cli.main's handler)."""


class Interrupts(Callback):
    """Ctrl-C and SIGTERM during `fit` save `last.ckpt` and stop with a one-line message saying how to resume.

    Both stop training at the end of the current batch, so the saved state is that of a finished step (what a
    step checkpoint holds) and resuming from it gives the same result as never stopping. Ctrl-C waits where a save
    would not resume so: with trainer.accumulate_grad_batches, for the batch that ends the optimizer step; at an
    epoch's last batch or one that a validation follows, for that validation and the checkpoints. It waits once:
    the next step end stops even where a validation follows it too (validating every step, or accumulating over a
    whole epoch), and the resumed fit then goes on past that one validation. A second Ctrl-C stops at once and
    saves nothing (landing in the save, it leaves the previous last.ckpt whole and the message names it).
    Lightning raises SIGTERM as a `SIGTERMException` itself after each training batch (after the validation that
    follows it, whose loop it stops at once; after the epoch's end at its last batch; under DDP at the next
    batch's start, where it broadcasts the signal); here it is raised at the batch end. Inside an accumulation
    group that saves the group's position without the gradients taken so far (the message says so): the resumed
    step misses them. Lightning then calls `on_exception`, which saves, and exits: status 1 after Ctrl-C, 143
    after SIGTERM (set by `goemo.cli.main`). An interrupt during validation or before training keeps the last
    saved checkpoint: half a validation epoch would not resume cleanly. Under DDP, Ctrl-C is shared between the
    processes each step, so they all stop at the same batch.
    """

    def __init__(self) -> None:
        self._sigint = False  # Ctrl-C seen: stop at the end of this batch
        self._waited = False  # a stop was put off once for a validation or an epoch's end: the next step end stops
        self._validate = False  # a validation (or the epoch's end) follows the last training batch: let it run
        self._group = 0  # batches of an unfinished accumulation group taken (0: the last batch ended a step)
        self._forced = False  # Ctrl-C twice: stopped mid-step, nothing consistent to save
        self._previous_handler: Any = None
        self._pid = os.getpid()  # the training process (on_train_start sets it again)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker, which inherited the handler: Ctrl-C reaches it too
            return
        if self._sigint:
            self._forced = True
            raise KeyboardInterrupt
        self._sigint = True
        print("\nCtrl-C: stopping after this batch and saving last.ckpt (press again to stop at once)", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._pid = os.getpid()
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop = self._sigint
        if trainer.world_size > 1:  # every process stops at the same batch, or saving would wait forever
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        # At an epoch's last batch the epoch ends first (its weight-averaging update, validation and checkpoints),
        # and a batch that validation follows validates first: a save from before them resumes past a validation
        # that never ran. Ctrl-C then stops at the next step end, even where a validation follows that one too
        # (validating every batch, or accumulating over a whole epoch, would never stop otherwise). A batch that
        # ends no optimizer step (gradient accumulation) holds gradients no checkpoint keeps: stop at the batch
        # that ends the step.
        epoch_ends = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        step_ended = step_ends(trainer)
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's batches, this one included
        self._group = 0 if step_ended else ready % trainer.accumulate_grad_batches
        self._validate = epoch_ends or validation_follows(trainer)
        self._sigint = self._sigint or stop
        sigterm = trainer.received_sigterm and trainer.world_size == 1  # DDP: Lightning raises it at the next batch
        if not (stop or sigterm) or not step_ended:
            return
        if self._validate and not self._waited:
            self._waited = True
            return
        if stop:
            raise KeyboardInterrupt
        raise SIGTERMException()

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._sigint and not (trainer.state.fn == TrainerFn.FITTING and self._validate):
            raise KeyboardInterrupt

    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning's evaluation loop (validate, test) stops on SIGTERM at a batch end; its predict loop does not.
        if trainer.received_sigterm:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            # Raised on rank 0 alone (SIGTERM in setup, a save refusing non-finite weights, a full disk, the report or
            # study it alone writes), it leaves the other ranks waiting at a collective: a traceback on gloo once rank 0
            # is gone, a wait for the process-group timeout under NCCL. End the processes Lightning started, as it does
            # after Ctrl-C; the error is rank 0's to say. Processes started by srun or torchrun are their launcher's
            # to end (`srun --kill-on-bad-exit=1`, docs/guide.md).
            launcher = getattr(trainer.strategy, "launcher", None)
            if trainer.world_size > 1 and trainer.is_global_zero and hasattr(launcher, "kill"):
                launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
            return
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        where = f"at step {trainer.global_step} (epoch {trainer.current_epoch})"
        folder = _checkpoint_dir(trainer)
        log_dir = getattr(trainer, "log_dir", None)  # the run folder (the logger's version folder)
        run = Path(log_dir) if log_dir and folder is not None else folder.parent if folder is not None else None
        saveable = (
            trainer.state.fn == TrainerFn.FITTING
            and trainer.state.stage == RunningStage.TRAINING  # not during the sanity check or validation
            and folder is not None
            and not self._forced
            and (what == "SIGTERM" or self._sigint)  # Ctrl-C outside a batch end (e.g. in setup) saves nothing
        )
        saved = None
        if saveable and trainer.global_step > 0:  # with no step taken there is nothing to resume
            saved = folder / "last.ckpt"
            if _last_saved_step(trainer) != trainer.global_step:  # else saved at this very step already
                try:
                    trainer.save_checkpoint(saved, weights_only=False)  # through SafeCheckpointIO: atomic
                    if self._group:  # Lightning raises SIGTERM after any batch: the gradients taken so far are lost
                        where += (f", {self._group} batch(es) into an accumulation group of {trainer.accumulate_grad_batches}, "
                                  "whose step will miss their gradients")  # fmt: skip
                except KeyboardInterrupt:  # Ctrl-C while saving: SafeCheckpointIO kept the previous file whole
                    saved, where = None, f"{where}, then by Ctrl-C while saving"
                except GoemoError as e:  # a full disk, say: still the interrupt's exit (143 for a requeue), said in full
                    saved, where = None, f"{where}, then the save failed ({e})"
        if not trainer.is_global_zero:
            return
        last = folder / "last.ckpt" if folder is not None else None
        if trainer.state.fn != TrainerFn.FITTING:
            kept = "predictions" if trainer.state.fn == TrainerFn.PREDICTING else "metrics or report"
            msg = f"interrupted by {what} during {trainer.state.fn.value}: stopped before the end, so no {kept} were written"
        elif saved is not None:
            msg = f"interrupted by {what} {where}: saved {saved}; resume with: {resume_hint(run)}"
        elif last is not None and last.is_file():
            kept = f"kept the last checkpoint, {last} (step {saved_step(last)})"
            msg = f"interrupted by {what} {where}: {kept}; resume with: {resume_hint(run)}"
        elif getattr(trainer, "ckpt_path", None):  # a resumed fit stopped before its first save (while the data is tokenized, say)
            msg = f"interrupted by {what} before training went on: {trainer.ckpt_path} is as it was; run the same command to resume"
        else:
            msg = f"interrupted by {what} {where}: no checkpoint saved yet, nothing to resume"
        print(f"error: {msg}", file=sys.stderr, flush=True)


class StopOnNonFiniteLoss(Callback):
    """Stops `fit` with a one-line error when the training loss is nan or inf, before its backward pass.

    No checkpoint is written from that state (`SafeCheckpointIO` also refuses non-finite weights), so the last
    checkpoint saved before it stays the newest. Under DDP the decision is shared, so every process stops.
    """

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        folder = _checkpoint_dir(trainer)
        last = folder / "last.ckpt" if folder is not None else None
        if last is not None and last.is_file():
            kept = f"the last checkpoint, {last} (step {saved_step(last)}), is kept"
        else:
            kept = "no checkpoint was saved before it"
        value = loss.detach().float().item()  # this process's: under DDP another one's may be the non-finite one
        raise GoemoError(
            f"non-finite training loss ({value if not math.isfinite(value) else 'on another process'}) at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}): training stopped and saved nothing; {kept}; "
            f"lower --model.learning_rate or check the data"
        )
