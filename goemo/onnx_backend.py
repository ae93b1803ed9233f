"""ONNX Runtime backends for `goemo.load(..., backend="onnx" | "int8")`: the same classifier, run by onnxruntime.

`onnx` runs the export's model (`goemo.export.export_onnx`: goemo's own module, checked against the checkpoint);
`int8` runs it after onnxruntime's dynamic int8 quantization (weights stored as int8 with a scale per output
channel, activations quantized per batch). Both are made once per checkpoint and cached beside the run
(`RUN/onnx/CKPT-KEY.onnx`, `CKPT-KEY.int8.onnx`, written atomically; KEY names the checkpoint file's size and
modification time, so a rewritten `last.ckpt` gets a new export and its old one is removed). Tokenization,
length-sorted batching, thresholds and the output structure are the classifier's own, so only the forward pass
differs. The session uses as many threads as torch does, so backends
compare on equal terms.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
import torch

from goemo.classifier import Classifier, load_run
from goemo.errors import GoemoError
from goemo.files import no_space
from goemo.runs import RUNS_DIR, resolve_checkpoint

Backend = Literal["torch", "onnx", "int8"]
BACKENDS = ("torch", "onnx", "int8")


def cache_dir(ckpt: Path) -> Path:
    """Where a checkpoint's ONNX files go: RUN/onnx for a run's checkpoints/FILE, else beside the file."""
    return ckpt.parent.parent / "onnx" if ckpt.parent.name == "checkpoints" else ckpt.parent


def _atomic(target: Path, make: Callable[[Path], None]) -> Path:
    """`make(tmp)` writes a file, renamed to `target` when complete; skipped when `target` exists."""
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as e:
        if no_space(e):
            raise GoemoError(f"no space left on device while writing {target}; free space and run again") from None
        raise GoemoError(f"{target.parent}: cannot write the ONNX model there ({e.strerror or e}); make it a writable "
                         "folder, or copy the run folder to one") from None  # fmt: skip
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:  # torch.onnx's writer may wrap the OSError in a RuntimeError
        if not no_space(e):
            raise
        raise GoemoError(f"no space left on device while writing {target}; free space and run again") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def onnx_files(clf: Classifier, ckpt: Path, int8: bool, stat: os.stat_result) -> Path:
    """The checkpoint's ONNX model (fp32, or int8-quantized), made on first use; `stat`: the file's when `clf`
    was loaded from it."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise GoemoError("backend onnx/int8 needs onnx, onnxscript and onnxruntime: pip install -e '.[onnx]'") from None
    from goemo.export import export_onnx

    folder = cache_dir(ckpt)
    # The checkpoint as loaded: a resumed fit rewrites last.ckpt under the same name, and an export of the old
    # weights beside the new thresholds would score wrongly without a word.
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = f"{ckpt.stem}-{key}"
    earlier = re.compile(re.escape(ckpt.stem) + r"-[0-9a-f]{12}(\.int8)?\.onnx")  # this file's earlier contents
    for old in folder.glob("*.onnx") if folder.is_dir() else ():
        if earlier.fullmatch(old.name) and not old.name.startswith(f"{name}."):
            old.unlink(missing_ok=True)
    fp32 = _atomic(folder / f"{name}.onnx", lambda tmp: export_onnx(clf, tmp))
    if not int8:
        return fp32
    # Per-channel weight scales: on the MiniLM recipe's checkpoint, tuned test macro-F1 0.5462 against fp32's 0.5473,
    # where one scale per tensor lost 0.014 (0.5332; benchmarks/README.md).
    quantize = lambda tmp: quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8, per_channel=True)  # noqa: E731
    return _atomic(folder / f"{name}.int8.onnx", quantize)


def onnx_forward(path: Path) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(input_ids, attention_mask) (B, T) -> logits (B, L), by an onnxruntime session on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as torch: same cores for every backend
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(np.int64)}
        return torch.from_numpy(session.run(["logits"], feed)[0])

    return forward


def load_backend(
    ckpt: Union[str, Path] = "best", device: str = "cpu", batch_size: int = 64, runs_dir: Union[str, Path] = RUNS_DIR,
    backend: Backend = "torch",
) -> Classifier:
    """`goemo.classifier.load_run`, run by `backend`: torch (the checkpoint's module), onnx or int8 (onnxruntime)."""
    if backend not in BACKENDS:
        raise GoemoError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return load_run(ckpt, device, batch_size, runs_dir)
    if torch.device(device).type != "cpu":  # 'cpu:0' and torch.device('cpu') are the CPU too
        raise GoemoError(f"backend {backend} runs on the CPU (onnxruntime's CPU provider); use device='cpu'")
    path, _ = resolve_checkpoint(str(ckpt), Path(runs_dir))  # once: `best` could name another file a moment later
    before = path.stat()
    clf = load_run(path, device, batch_size, runs_dir)
    after = path.stat()
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        raise GoemoError(f"{path} was rewritten while it loaded (a fit is saving it); load it again")
    clf.forward = onnx_forward(onnx_files(clf, path, backend == "int8", before))
    clf.backend = backend
    return clf
