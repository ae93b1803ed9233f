"""ONNX Runtime backends for `goemo.load(..., backend="onnx" | "int8")`: the same classifier, run by onnxruntime.

`onnx` runs the export's model (`goemo.export.export_onnx`: goemo's own module, checked against the checkpoint);
`int8` runs it after onnxruntime's dynamic int8 quantization (weights stored as int8 with a scale per output
channel in a 7-bit range, activations quantized per batch). Both are made once per checkpoint and cached beside the
run (`RUN/onnx/CKPT-KEY.onnx`, `CKPT-KEY.int8.onnx`, written atomically; KEY names the checkpoint file's size and
modification time, and int8's recipe, so a rewritten `last.ckpt` gets a new export and its old one is removed).
Tokenization, length-sorted batching, thresholds and the output structure are the classifier's own, so only the
forward pass differs. The session uses as many threads as torch does, so backends
compare on equal terms.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
import torch

from goemo.classifier import Classifier, load_run
from goemo.errors import GoemoError
from goemo.files import no_space, partial_path, remove_dead_partials
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
    tmp = partial_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_partials(target)  # a killed export's (kill -9, out of memory)
        # Made here, not by mkstemp: the umask's mode (0644), as the run's other files, not mkstemp's 0600, which other
        # users could not read (their load would then fail); and the folder is known writable before the export.
        tmp.touch(exist_ok=False)
    except OSError as e:
        if no_space(e):
            raise GoemoError(f"no space left on device while writing {target}; free space and run again") from None
        raise GoemoError(f"{target.parent}: cannot write the ONNX model there ({e.strerror or e}); make it a writable "
                         "folder, or copy the run folder to one") from None  # fmt: skip
    try:
        make(tmp)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:  # torch.onnx's writer may wrap the OSError in a RuntimeError
        if not no_space(e):
            raise
        raise GoemoError(f"no space left on device while writing {target}; free space and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def onnx_files(clf: Classifier, ckpt: Path, int8: bool, stat: os.stat_result) -> Path:
    """The checkpoint's ONNX model (fp32, or int8-quantized), made on first use; `stat`: the file's when `clf`
    was loaded from it."""
    from goemo.export import export_onnx, require_onnx

    require_onnx("backend onnx/int8", ("onnxruntime",))  # the export and quantization check the rest, if needed

    folder = cache_dir(ckpt)
    # The checkpoint as loaded: a resumed fit rewrites last.ckpt under the same name, and an export of the old
    # weights beside the new thresholds would score wrongly without a word. int8's recipe is part of its key, so a
    # file quantized otherwise (before reduce_range) is not reused.
    def key(*recipe: str) -> str:
        return hashlib.sha256(":".join(map(str, (stat.st_size, stat.st_mtime_ns, *recipe))).encode()).hexdigest()[:12]

    fp32, quantized = folder / f"{ckpt.stem}-{key()}.onnx", folder / f"{ckpt.stem}-{key('reduce_range')}.int8.onnx"
    earlier = re.compile(re.escape(ckpt.stem) + r"-[0-9a-f]{12}(\.int8)?\.onnx")  # this file's earlier contents
    for old in folder.glob("*.onnx") if folder.is_dir() else ():
        if earlier.fullmatch(old.name) and old not in (fp32, quantized):
            try:
                old.unlink(missing_ok=True)
            except OSError:  # e.g. another user's, in a folder this one may not change: left, it is never read
                pass
    if not fp32.is_file():  # to be exported: checked before anything is written
        require_onnx("backend onnx/int8")
    _atomic(fp32, lambda tmp: export_onnx(clf, tmp))
    if not int8:
        return fp32
    # Per-channel weight scales: on the MiniLM recipe's checkpoint, tuned test macro-F1 0.5462 against fp32's 0.5473,
    # where one scale per tensor lost 0.014 (0.5332; benchmarks/README.md). reduce_range (7-bit weights): on x86 CPUs
    # without VNNI, uint8 activations times int8 weights can saturate (onnxruntime's quantize_dynamic says so), and
    # the cached file travels with the run folder to such machines (on the MiniLM checkpoint: 0.5479).
    def quantize(tmp: Path) -> None:
        require_onnx("backend int8 (quantizing the model once)", ("onnx", "onnxruntime"))
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)

    return _atomic(quantized, quantize)


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
