"""Keeping the process's resident memory close to what it uses (glibc's malloc; no-ops elsewhere).

glibc serves a large block from its heap once a block that size was freed (its mmap threshold grows up to
32 MiB), and freed heap memory mostly stays resident. Training frees and reallocates activations of a
different size every batch, so the heap fragments: late in the CPU benchmark's epoch (MiniLM-L6, batch 32)
411 of the heap's 743 MiB were free yet resident. `ReleaseFreeMemory` (opt-in: it changes glibc's allocator
process-wide, a trick measured on one machine; `--trainer.callbacks+=goemo.memory.ReleaseFreeMemory`) does two things:

- Training takes blocks of 2 MiB and more (MiniLM-L6 at batch 32: the feed-forward activations of all but
  the shortest batches) as mappings of their own, returned to the system when freed, so they never
  fragment the heap; evaluation (inference, batch 128: blocks up to tens of MiB) keeps them in the heap,
  since paging a mapping in again for every block would cost it ~20% of its speed. Measured with the
  CPU benchmark's goemo command (2-core dev machine): peak RSS 1,217-1,261 MiB over three runs with glibc's
  dynamic threshold; one run each with 2 MiB in every phase: 1,173 MiB, training 127 and evaluation 431
  samples/s (129.7 and 521.6 in a run with the dynamic threshold); these phases: 1,174-1,200 MiB over three.
- It hands the free heap pages back to the system where one phase hands over to the next (before each
  training epoch, validation and test: `malloc_trim`), so the next phase's tensors of other sizes land on
  pages it touches itself rather than on top of the last phase's resident holes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Optional

from lightning.pytorch.callbacks import Callback

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
TRAIN_MMAP_THRESHOLD = 2 << 20  # bytes: training's larger blocks become mappings of their own
EVAL_MMAP_THRESHOLD = 32 << 20  # the most glibc's dynamic threshold grows to (64-bit): evaluation keeps its blocks


@functools.cache  # opened once per process, not at every phase change
def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (musl has no malloc_trim)
        return libc
    except (OSError, AttributeError):
        return None


def set_mmap_threshold(nbytes: int) -> bool:
    """Blocks of `nbytes` and more get a mapping of their own; False (nothing set) off glibc. The heap's top is kept up to twice that, as glibc's own
    dynamic threshold does, so a phase's churn of large blocks does not shrink and regrow the heap every batch."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(M_MMAP_THRESHOLD, nbytes)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes)
    return True


def release_free_memory() -> bool:
    """Return the heap's free pages to the system (`malloc_trim(0)`); False where that is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class ReleaseFreeMemory(Callback):
    """Training's mmap threshold from the start of `fit` (its sanity check included) and after each
    validation within it, evaluation's for validation, test and predict; `release_free_memory` at each of
    those changes (a training epoch, a validation or a test starts, training resumes after a validation)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        set_mmap_threshold(TRAIN_MMAP_THRESHOLD if stage == "fit" else EVAL_MMAP_THRESHOLD)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        set_mmap_threshold(TRAIN_MMAP_THRESHOLD)
        release_free_memory()

    def on_validation_start(self, trainer, pl_module) -> None:
        # The sanity check's two batches keep training's threshold: heap grown for them would stay for training.
        if not trainer.sanity_checking:
            set_mmap_threshold(EVAL_MMAP_THRESHOLD)
        release_free_memory()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":  # training goes on (a validation every N steps, or the next epoch)
            set_mmap_threshold(TRAIN_MMAP_THRESHOLD)
            # glibc maps a block only when no free heap chunk fits it: return validation's top of the heap first.
            release_free_memory()

    def on_test_start(self, trainer, pl_module) -> None:
        release_free_memory()
