"""A teacher file: a teacher's probabilities on a training split, for knowledge distillation (`model.teacher`).

An .npz file holding `probs` (N, L) uint8, the probabilities times 255 rounded (at most 1/510 off; a 43k-row GoEmotions
table compresses to about 0.5 MB, a float16 one to 2.3 MB), rows in the training split's order; `labels` (L,);
`digest`, the sha256 of the training texts in that order, which the student's data must match; `teachers`, the
teachers' model names. `python -m goemo.distill` writes one.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from goemo.errors import GoemoError

FORMAT = 2  # 1: float16 probabilities (no longer read)


def texts_digest(texts: list[str]) -> str:
    """sha256 of the texts in order: a teacher table fits a training split only if the digests agree."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def write_teacher(path: Path, probs: np.ndarray, labels: list[str], texts: list[str], teachers: list[str]) -> None:
    """Write the table (`probs` (N, L), rows in the order of `texts`) as an .npz file, atomically."""
    from goemo.files import AtomicFile

    if probs.shape != (len(texts), len(labels)):
        raise GoemoError(f"teacher probabilities {probs.shape} do not fit {len(texts)} texts x {len(labels)} labels")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise GoemoError("teacher probabilities outside 0..1 (NaN or a bad model); check the teacher runs' predictions")
    with AtomicFile(Path(path), "wb") as f:
        np.savez_compressed(
            f, format=np.int64(FORMAT), probs=np.round(probs * 255).astype(np.uint8), labels=np.array(labels),
            digest=np.array(texts_digest(texts)), teachers=np.array(teachers),
        )  # fmt: skip


def read_teacher(name: str, labels: list[str], texts: list[str]) -> np.ndarray:
    """The (N, L) float32 table of teacher file `name` (a path or `pkg:MODULE/FILE`), checked against the training
    split it is for: the same labels in the same order and the same texts in the same order."""
    from goemo.hub import package_path

    path = package_path(name, "model.teacher") if name.startswith("pkg:") else Path(name).expanduser()
    if not path.is_file():
        raise GoemoError(f"model.teacher {name!r}: no such file; write one with `python -m goemo.distill RUN --out FILE`")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("one array, not an .npz archive")
        with z:
            fmt, probs, saved, digest = int(z["format"]), z["probs"], [str(s) for s in z["labels"]], str(z["digest"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise GoemoError(f"model.teacher {name!r}: not a goemo teacher file ({e}); write one with `python -m goemo.distill`") from None
    if fmt != FORMAT:
        raise GoemoError(f"model.teacher {name!r}: format {fmt}, this goemo reads {FORMAT}; write it again with `python -m goemo.distill`")
    if saved != list(labels):
        raise GoemoError(f"model.teacher {name!r} has {len(saved)} labels ({', '.join(saved[:3])}, ...), the data "
                         f"{len(labels)} ({', '.join(labels[:3])}, ...); use a teacher of the same labels, or --model.teacher null")  # fmt: skip
    if probs.dtype != np.uint8 or probs.shape[1:] != (len(labels),):  # a hand-made file: floats, or a wrong width
        raise GoemoError(f"model.teacher {name!r}: probs must be (rows, {len(labels)}) uint8 (probability x 255), got "
                         f"{probs.shape} {probs.dtype}; write it with `python -m goemo.distill`")  # fmt: skip
    if probs.shape[0] != len(texts) or digest != texts_digest(texts):
        raise GoemoError(f"model.teacher {name!r} was written for another training split ({probs.shape[0]} rows, this "
                         f"one {len(texts)}); write one from the student's data, or --model.teacher null")  # fmt: skip
    return probs.astype(np.float32) / 255
