"""Python API: trained runs as plain classifiers, no Trainer.

    from goemo import load
    clf = load("lightning_logs/version_0")          # or "best", "last", or a .ckpt file
    clf.predict(["I love it", "ugh"])               # [{"text", "labels", "scores"}, ...] as in predictions.jsonl
    clf.predict_proba(["I love it", "ugh"])         # numpy (2, num_labels)
    ens = load(["lightning_logs/version_0", "lightning_logs/version_1"])   # an ensemble, same methods
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Union

import torch

from goemo.classifier import Classifier, as_texts, load_model, load_run  # noqa: F401 (the API's names)
from goemo.ensemble import ENSEMBLE_FILE, Ensemble, load_ensemble
from goemo.errors import GoemoError
from goemo.onnx_backend import Backend, load_backend
from goemo.runs import ALIASES, RUNS_DIR


def load(
    ckpt: Union[str, Path, list] = "best", device: str = "cpu", batch_size: int = 64, runs_dir: Union[str, Path] = RUNS_DIR,
    backend: Backend = "torch",
) -> Union[Classifier, Ensemble]:
    """A trained classifier, or an ensemble of several, with `predict` and `predict_proba`.

    Args:
        ckpt: As the CLI's `--ckpt_path`: `best` (the newest run's best checkpoint by validation F1), `last`,
            a run folder (its best checkpoint) or a checkpoint file. A list of these: an ensemble averaging
            their probabilities, its thresholds tuned on the averaged validation probabilities at the first
            `predict`. A folder written by `python -m goemo.ensemble`: that ensemble, with its thresholds.
        device: Where to run, e.g. "cpu" or "cuda".
        batch_size: Texts per forward pass.
        runs_dir: Where `best`/`last` look for runs.
        backend: What runs the model: `torch` (the checkpoint's module), `onnx` (onnxruntime, the export's
            model) or `int8` (onnxruntime after dynamic int8 quantization; faster, slightly less accurate: see
            benchmarks/README.md). The ONNX files are made once and cached in the run folder's onnx/.
    """
    check_arguments(ckpt, device, batch_size)
    batch_size = int(batch_size)  # numpy's integers too (torch's split takes Python ints only)
    if isinstance(ckpt, (list, tuple)):
        return load_ensemble([Path(c).expanduser() for c in ckpt], device, batch_size, backend, runs_dir)
    ckpt = Path(ckpt).expanduser()
    if str(ckpt) not in ALIASES and (ckpt / ENSEMBLE_FILE).is_file():  # `best` is the newest run, not a folder named so
        return load_ensemble(ckpt, device, batch_size, backend, runs_dir)
    return load_backend(ckpt, device, batch_size, runs_dir, backend)


def check_arguments(ckpt, device, batch_size) -> None:
    """One line for what `load` cannot take, before anything is loaded."""
    paths = list(ckpt) if isinstance(ckpt, (list, tuple)) else [ckpt]
    bad = [type(c).__name__ for c in paths if not isinstance(c, (str, Path))]
    if bad or not paths:
        got = bad[0] if bad else "an empty list"
        raise GoemoError(f"ckpt: best, last, a run folder, a .ckpt file, an ensemble folder or a list of these, got {got}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:  # numpy's too
        raise GoemoError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise GoemoError(f"device {device!r}: not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    # Only devices that can run the model here: others ('mps' off a Mac, 'xla', 'meta', 'cuda:3' with 2 GPUs) failed
    # deep inside torch with a traceback. torch.cuda, torch.mps, torch.xpu, ... each say whether theirs is there.
    if where.type == "cpu":
        return
    backend = getattr(torch, where.type, None)
    if where.type == "meta" or not hasattr(backend, "is_available") or not hasattr(backend, "device_count"):
        raise GoemoError(f"device {device!r}: goemo runs on 'cpu', 'cuda' (or 'cuda:N'), 'mps' or 'xpu'; use device='cpu'")
    if not backend.is_available():
        raise GoemoError(f"device {device!r}: this torch sees no {where.type.upper()} device; use device='cpu'")
    if (where.index or 0) >= backend.device_count():
        n = backend.device_count()
        raise GoemoError(f"device {device!r}: this machine has {n} {where.type.upper()} device(s), "
                         f"{where.type}:0 to {where.type}:{n - 1}")  # fmt: skip
