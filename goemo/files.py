"""Files that are whole or absent: every file goemo writes goes to `.NAME.*.partial` beside it, is flushed to disk,
and is renamed over NAME only when complete, so a crash, a kill or a full disk never leaves a file that looks
finished but is not. And output folders are checked before any work starts.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO

from goemo.errors import GoemoError


_WRITER = socket.gethostname().replace(".", "_").replace("-", "_")[:40] or "host"


def partial_path(path: Path, suffix: str = ".partial") -> Path:
    """Where `path` is written until it is complete: beside it (same file system, so the rename is atomic), hidden,
    not named *.ckpt or *.jsonl, so it is never taken for a finished file, and unique, so two writers of one file
    (two `predict --output X` at once) never write into each other's bytes: the last to finish wins whole.
    `suffix` ".old": where a replaced folder waits until its successor is in place."""
    return path.with_name(f"{_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _prefix(path: Path) -> str:
    """`.NAME.HOST-` of `path`'s partial files; a long NAME (a valid one of 255 bytes) is cut and hashed, so that the
    partial's name stays within the file system's 255 bytes too."""
    name = path.name
    if len(name.encode("utf-8")) > 100:
        name = name.encode("utf-8")[:80].decode("utf-8", "ignore") + "~" + hashlib.sha256(path.name.encode("utf-8")).hexdigest()[:12]
    return f".{name}.{_WRITER}-"


def remove_dead_partials(path: Path) -> None:
    """Remove the partial files of `path` (and replaced folders, `.old`) that a killed process of this machine left
    (kill -9, power cut): their names are unique, so nothing else would ever replace them. Other machines' (a shared
    folder) are left alone."""
    if os.name == "nt":  # there os.kill(pid, 0) does not test a process: it terminates it
        return
    prefix = _prefix(path)
    left = [*path.parent.glob(glob.escape(prefix) + "*.partial"), *path.parent.glob(glob.escape(prefix) + "*.old")]
    for partial in left:  # escaped: a name may hold [ ] * ?
        try:
            pid = int(partial.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:  # that writer is gone
            try:
                if partial.is_dir():  # an export's folder
                    shutil.rmtree(partial, ignore_errors=True)
                else:
                    partial.unlink(missing_ok=True)
            except OSError:  # another user's, in a sticky folder such as /tmp: theirs to remove
                pass
        except (ValueError, OSError):  # not our name pattern, or a live process of another user
            pass


class AtomicFile:
    """`path` written through `.NAME.*.partial`: `commit()` flushes it to disk and renames it over `path`;
    `discard()` (or leaving a `with` block by an exception) removes it and leaves any earlier `path` as it was."""

    def __init__(self, path: Path, mode: str = "w", encoding: str | None = "utf-8") -> None:
        self.path, self.partial = Path(path), partial_path(Path(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_partials(self.path)
        # "x": created here, never an existing file (permissions follow the umask, unlike mkstemp's 0600)
        self.file: IO = open(self.partial, mode.replace("w", "x"), encoding=None if "b" in mode else encoding)

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())  # the bytes are on disk before the name points at them
            self.file.close()
            os.replace(self.partial, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)  # and the rename itself survives a power cut

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:  # a full disk fails the close's flush too: the file goes anyway
            pass
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, kind, value, tb) -> None:
        self.discard() if kind is not None else self.commit()


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with AtomicFile(path) as f:
        f.write(text)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: Path, what: str) -> None:
    """Raise a one-line GoemoError unless files can be created in `folder` (made if missing), by trying it."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise GoemoError(f"{what} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise GoemoError(f"{what} {folder}: cannot write there ({e.strerror or e}); choose a folder you can write to") from None


def check_output_file(path: Path, what: str, example: str = "predictions.jsonl") -> None:
    """Raise a one-line GoemoError unless `path` can be written as a file (not a folder; its folder writable);
    `example` is the file name the error suggests inside a folder given instead."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GoemoError(f"{what} {path}: is a folder; give a file name (e.g. {path / example})")
    check_writable(path.parent, f"{what} {path}: its folder")


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # the disk, or the user's quota on it, is full


def no_space(e: BaseException | None) -> bool:
    """Whether a write failed because the disk is full. torch.save's zip writer raises a RuntimeError ("unexpected
    pos ...") while handling the file's OSError, so the cause is looked for along the exception's context too;
    safetensors' SafetensorError names the OS error only in its message ("... (os error 28)")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL or any(f"(os error {n})" in str(e) for n in _FULL):
            return True
        e = e.__cause__ or e.__context__
    return False
