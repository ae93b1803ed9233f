"""A teacher file: a teacher's probabilities on a training split, for knowledge distillation (`model.teacher`).

An .npz file holding `probs` (N, L) uint8, the probabilities times 255 rounded (at most 1/510 off; a 43k-row GoEmotions
table compresses to about 0.5 MB, a float16 one to 2.3 MB; the keys add 0.35 MB), rows in the training split's order; `labels` (L,);
`digest`, the sha256 of the training texts in that order; `keys` (N,) uint64, a hash of each row's text; `teachers`,
the teachers' model names (and a student's own teacher file and weight; a teacher file joined by goemo.distill: its
name and its own `teachers`). `python -m goemo.distill` writes one. A student whose training split is the teacher's
(same digest) takes the table as it is; one on some of those rows (a subset, a fold, another order) gets each row's
probabilities by its text's key; a row the table lacks is an error.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from goemo.errors import GoemoError

FORMAT = 3  # written; 2 (no keys) is still read, for the student of the very same split only; 1 (float16) no longer
READ_FORMATS = (2, 3)


def text_keys(texts: list[str]) -> np.ndarray:
    """(N,) uint64: the first 8 bytes of each text's BLAKE2b hash, to find a row's probabilities by its text."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") for t in texts],
                    dtype=np.uint64)  # fmt: skip


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
            digest=np.array(texts_digest(texts)), keys=text_keys(texts), teachers=np.array(teachers),
        )  # fmt: skip


def read_teacher(name: str, labels: list[str], texts: list[str]) -> np.ndarray:
    """The (N, L) float32 table of teacher file `name` (a path or `pkg:MODULE/FILE`) for the training split `texts`:
    the same labels in the same order; rows the file's own (same texts in the same order) or found by their texts."""
    return read_teacher_file(name, labels, texts)[0]


def teacher_path(name: str, option: str = "model.teacher") -> Path:
    """The file of teacher name `name` (a path or `pkg:MODULE/FILE`), or a one-line error naming `option`."""
    from goemo.hub import package_path

    null = option == "model.teacher"  # a student's fit can drop its teacher
    path = package_path(name, option) if name.startswith("pkg:") else Path(name).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" in {Path.cwd()} (a relative path is read from the working folder)"
        raise GoemoError(f"{option} {name!r}: no such file{where}; give the file's path"
                         + (", write one with `python -m goemo.distill RUN --out FILE`, or (a new fit) pass --model.teacher null"
                            if null else ""))  # fmt: skip
    return path


def _fields(name: str, labels: list[str], option: str, labels_only: bool = False) -> dict:
    """The file's arrays (only `format` and `labels` with `labels_only`), checked against the data's `labels`; errors
    are one line naming `option`."""
    path = teacher_path(name, option)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("one array, not an .npz archive")
        with z:
            f = {"format": int(z["format"]), "labels": [str(s) for s in z["labels"]]}
            if not labels_only:
                f.update(probs=z["probs"], digest=str(z["digest"]), keys=z["keys"] if f["format"] >= 3 else None,
                         teachers=[str(t) for t in z["teachers"]] if "teachers" in z.files else [])  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:  # TypeError: a 0-d `labels`, ...
        raise GoemoError(f"{option} {name!r}: not a goemo teacher file ({e}); write one with `python -m goemo.distill`") from None
    null = option == "model.teacher"  # a student's fit can drop its teacher
    if f["format"] not in READ_FORMATS:
        raise GoemoError(f"{option} {name!r}: format {f['format']}, this goemo reads {READ_FORMATS[0]}-{READ_FORMATS[-1]}; write it again with `python -m goemo.distill`")
    if f["labels"] != list(labels):
        saved = f["labels"]
        raise GoemoError(f"{option} {name!r} has {len(saved)} labels ({', '.join(saved[:3])}, ...), the data "
                         f"{len(labels)} ({', '.join(labels[:3])}, ...); use a teacher of the same labels"
                         + (", or --model.teacher null" if null else ""))  # fmt: skip
    return f


def check_teacher(name: str, labels: list[str], option: str = "model.teacher") -> None:
    """read_teacher_file's checks that need no training texts (the file, its format, its labels), without reading
    the table: a fit makes them before its data module tokenizes, so a wrong file fails at once."""
    _fields(name, labels, option, labels_only=True)


def read_teacher_file(
    name: str, labels: list[str], texts: list[str], option: str = "model.teacher"
) -> tuple[np.ndarray, list[str]]:
    """read_teacher's table and the file's `teachers` (what it was distilled from); errors name `option`."""
    null = option == "model.teacher"  # a student's fit can drop its teacher
    f = _fields(name, labels, option)
    probs, digest, keys, teachers = f["probs"], f["digest"], f["keys"], f["teachers"]
    if probs.dtype != np.uint8 or probs.shape[1:] != (len(labels),):  # a hand-made file: floats, or a wrong width
        raise GoemoError(f"{option} {name!r}: probs must be (rows, {len(labels)}) uint8 (probability x 255), got "
                         f"{probs.shape} {probs.dtype}; write it with `python -m goemo.distill`")  # fmt: skip
    if keys is not None and keys.shape != probs.shape[:1]:
        raise GoemoError(f"{option} {name!r}: {keys.shape} keys for {probs.shape[0]} rows of probabilities, a damaged "
                         "or hand-made file; write it again with `python -m goemo.distill`")  # fmt: skip
    if probs.shape[0] == len(texts) and digest == texts_digest(texts):  # the teacher's own split, row for row
        return probs.astype(np.float32) / 255, teachers
    rows = None
    if keys is not None:
        first = {k: i for i, k in reversed(list(enumerate(keys.tolist())))}  # a repeated text: its first row
        rows = [first.get(k) for k in text_keys(texts).tolist()]
    missing = len(texts) if rows is None else sum(r is None for r in rows)
    if missing:
        raise GoemoError(f"{option} {name!r} has no probabilities for {missing} of the {len(texts)} training texts "
                         f"(written for another training split, {probs.shape[0]} rows); "
                         + ("write one from the student's data with `python -m goemo.distill`, or --model.teacher null"
                            if null else "give a file of the first run's training split, or leave it out"))  # fmt: skip
    return probs[np.array(rows, dtype=np.int64)].astype(np.float32) / 255, teachers
