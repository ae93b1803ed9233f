"""goemo.load(..., backend=...) and `predict --backend`: onnxruntime gives the PyTorch model's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from goemo.errors import GoemoError
from tests.conftest import PREDICT_TEXTS, run_main

TEXTS = PREDICT_TEXTS + ["happy glad", "angry mad angry", "scared", "table chair happy", "mad"] * 4


@pytest.fixture(scope="module")
def run(learned_run, tmp_path_factory):
    """A copy of the learned tiny run (the backends cache their ONNX files in the run folder); its scores differ
    between texts, so a backend that mixed up its rows would not pass for the model."""
    work = tmp_path_factory.mktemp("backends") / "work"
    shutil.copytree(learned_run, work)
    return work / "lightning_logs" / "version_0"


def test_a_runs_onnx_files_go_into_its_own_folder_a_loose_checkpoints_beside_it():
    from goemo.onnx_backend import cache_dir

    assert cache_dir(Path("runs/version_3/checkpoints/best.ckpt")) == Path("runs/version_3/onnx")
    assert cache_dir(Path("downloads/model.ckpt")) == Path("downloads")


@pytest.mark.parametrize("backend", ["onnx", "int8"])
def test_onnx_backends_refuse_another_device_than_the_cpu_before_loading(tmp_path, backend):
    from goemo.onnx_backend import load_backend

    missing = tmp_path / "none.ckpt"
    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(GoemoError, match=f"^backend {backend} runs on the CPU \\(onnxruntime's CPU provider\\); use device='cpu'$"):
            load_backend(missing, device=device, backend=backend)
    for device in ("cpu", "cpu:0"):  # the CPU: on to the checkpoint, which is not there
        with pytest.raises(GoemoError, match="no such file or run folder"):
            load_backend(missing, device=device, backend=backend)


def test_onnx_backend_matches_torch(run):
    from goemo import load

    torch_clf, onnx_clf = load(run), load(run, backend="onnx", device="cpu:0", batch_size=np.int64(8))  # as torch takes them
    want, got = torch_clf.predict_proba(TEXTS), onnx_clf.predict_proba(TEXTS)
    assert got.shape == want.shape and onnx_clf.backend == "onnx"
    assert np.abs(want - want[0]).max(0).min() > 100 * 1e-4  # every label's scores differ between texts
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [r["labels"] for r in onnx_clf.predict(TEXTS)] == [r["labels"] for r in torch_clf.predict(TEXTS)]
    assert (run / "onnx").is_dir() and len(list((run / "onnx").glob("*.onnx"))) == 1
    assert not list((run / "onnx").glob(".*partial"))


def test_int8_backend_is_close_and_keeps_the_top_label(run):
    from goemo import load

    want, got = load(run).predict_proba(TEXTS), load(run, backend="int8").predict_proba(TEXTS)
    assert len(set(want.argmax(1))) > 1 and np.abs(want - want[0]).max() > 0.5  # texts the model tells apart
    assert np.abs(got - want).max() < 0.05  # dynamic int8 weights: small, bounded error
    same_top = (got.argmax(1) == want.argmax(1)).mean()
    assert same_top >= 0.9, same_top
    assert len(list((run / "onnx").glob("*.int8.onnx"))) == 1


def test_a_rewritten_checkpoint_gets_a_new_export(run, tmp_path):
    """A resumed fit rewrites last.ckpt under its name: the cached ONNX model must follow, not score the old weights."""
    import os

    import torch

    from goemo import load
    from goemo.runs import load_checkpoint

    work = tmp_path / "run"
    shutil.copytree(run, work)  # a copy: the other tests keep the run as it is
    last = work / "checkpoints" / "last.ckpt"
    first = load(last, backend="onnx").predict_proba(TEXTS)
    np.testing.assert_allclose(first, load(last).predict_proba(TEXTS), atol=1e-4)
    ckpt = load_checkpoint(last)
    ckpt["state_dict"]["head.bias"] += 2.0  # other weights under the same name, as a resumed fit writes them
    torch.save(ckpt, last)
    os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 10**9))  # a coarse clock cannot hide it
    second = load(last, backend="onnx").predict_proba(TEXTS)
    np.testing.assert_allclose(second, load(last).predict_proba(TEXTS), atol=1e-4)  # the new weights, not the old
    assert np.abs(second - first).max() > 0.1
    assert [p.name.split("-")[0] for p in (work / "onnx").glob("last-*.onnx")] == ["last"]  # the stale export is gone


def test_an_onnx_model_that_cannot_be_written_is_one_line(run, tmp_path, monkeypatch):
    import errno

    from goemo import load, onnx_backend

    work = tmp_path / "run"
    shutil.copytree(run, work, ignore=shutil.ignore_patterns("onnx"))
    (work / "onnx").write_text("")  # a file where the folder goes (as root, permissions would not stop a write)
    with pytest.raises(GoemoError, match=f"^{work / 'onnx'}: cannot write the ONNX model there \\(File exists\\); "):
        load(work, backend="onnx")
    (work / "onnx").unlink()

    def full(clf, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("goemo.export.export_onnx", full)
    with pytest.raises(GoemoError, match="^no space left on device while writing .*; free space and run again$"):
        load(work, backend="onnx")
    assert not list((work / "onnx").iterdir())  # no partial file left

    def no_room(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr("goemo.onnx_backend.Path.touch", no_room)  # full before the export starts (its partial file)
    with pytest.raises(GoemoError, match="^no space left on device while writing .*; free space and run again$"):
        load(work, backend="onnx")
    assert onnx_backend.cache_dir(work / "checkpoints" / "x.ckpt") == work / "onnx"


def test_unknown_backend_is_one_line(run):
    from goemo import load

    with pytest.raises(GoemoError, match="backend 'tensorrt': use one of torch, onnx, int8"):
        load(run, backend="tensorrt")


@pytest.mark.slow
def test_predict_command_with_a_backend_writes_what_torch_writes(run):
    work = run.parent.parent
    (work / "in.txt").write_text("\n".join(TEXTS[:12]) + "\n", encoding="utf-8")
    outs = {}
    for backend in ("torch", "onnx"):
        r = run_main("predict", "--ckpt_path", str(run), "--data.predict_file", "in.txt", "--backend", backend,
                     "--output", f"{backend}.jsonl", "--trainer.enable_progress_bar", "false", cwd=work)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        outs[backend] = [json.loads(line) for line in (work / f"{backend}.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in outs["onnx"]] == [r["labels"] for r in outs["torch"]]
    assert len({tuple(r["labels"]) for r in outs["torch"]}) > 1  # texts the model tells apart
    assert [r["text"] for r in outs["onnx"]] == [t for t in TEXTS[:12]]
    for a, b in zip(outs["onnx"], outs["torch"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


# -- the cached ONNX files: readable by others, a killed export's partial removed, a stale file left if it must be ---
def test_cached_onnx_files_are_readable_by_other_users(tmp_path, tiny_model):
    """mkstemp's 0600 went with the rename: another user could not read RUN/onnx/*.onnx (and their load failed)."""
    import os
    import stat

    from goemo import load
    from tests.test_export import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    umask = os.umask(0o022)
    try:
        load(ckpt, backend="int8")
    finally:
        os.umask(umask)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.glob("*.onnx")}
    assert len(modes) == 2 and set(modes.values()) == {"0o644"}, modes


def fake_onnx_files(monkeypatch, tmp_path):
    """goemo.onnx_backend.onnx_files(ckpt, int8) for a checkpoint file, its export a few bytes."""
    from goemo.onnx_backend import onnx_files

    monkeypatch.setattr("goemo.export.export_onnx", lambda clf, path: path.write_bytes(b"onnx"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"weights")
    return lambda int8=False: onnx_files(None, ckpt, int8, ckpt.stat())


def test_a_killed_exports_partial_file_is_removed_by_the_next(tmp_path, monkeypatch):
    """kill -9 or the OOM killer during the export left `.NAME.*.partial` in RUN/onnx for good."""
    import re
    import subprocess
    import sys

    from goemo.files import partial_path

    make = fake_onnx_files(monkeypatch, tmp_path)
    target = make()
    target.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    left = partial_path(target)
    left = left.with_name(re.sub(r"-\d+-(?=[0-9a-f]{8}\.partial$)", f"-{int(dead.stdout)}-", left.name))
    left.write_bytes(b"half an export")
    assert make().read_bytes() == b"onnx" and sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_a_stale_cached_file_that_cannot_be_removed_is_left(tmp_path, monkeypatch):
    """After a resume, the old checkpoint's export is removed; one this user may not remove raised PermissionError."""
    import errno

    make = fake_onnx_files(monkeypatch, tmp_path)
    stale = tmp_path / "onnx" / "last-0123456789ab.onnx"
    stale.parent.mkdir()
    stale.write_bytes(b"old weights")
    unlink = Path.unlink

    def denied(self, *args, **kwargs):
        if self == stale:  # as root (the tests), permissions would not stop it
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", denied)
    assert make().read_bytes() == b"onnx" and stale.read_bytes() == b"old weights"


def without_onnxscript(code: str, *args: str, cwd: Path):
    """`code` run by a fresh Python in which onnxscript cannot be imported (in this process torch.onnx may hold it)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['onnxscript'] = None\n" + code, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def test_a_missing_onnx_extra_is_one_line_before_anything_is_written(tmp_path, tiny_model):
    """Without onnxscript, torch.onnx failed deep inside the export with ModuleNotFoundError, a traceback."""
    from tests.test_export import write_checkpoint

    write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    code = "from goemo import load\nfrom goemo.errors import exit_on_error\nwith exit_on_error(): load('run.ckpt', backend='onnx')"
    r = without_onnxscript(code, cwd=tmp_path)
    message = "error: backend onnx/int8 needs onnx, onnxscript and onnxruntime (onnxscript is not installed): pip install -e '.[onnx]'\n"
    assert (r.returncode, r.stderr) == (2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_int8_is_quantized_with_reduce_range_and_an_earlier_int8_file_is_not_reused(tmp_path, monkeypatch):
    """7-bit weights (reduce_range): uint8 x int8 products can saturate on x86 CPUs without VNNI, and the cached
    file goes wherever the run folder goes. A file quantized before (without it) is made again, not read."""
    import onnxruntime.quantization

    calls = []
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic",
                        lambda src, dst, **kw: calls.append(kw) or Path(dst).write_bytes(b"int8"))  # fmt: skip
    make = fake_onnx_files(monkeypatch, tmp_path)
    fp32 = make()
    before = fp32.with_name(fp32.name.replace(".onnx", ".int8.onnx"))  # where the int8 file was cached before
    before.write_bytes(b"int8 at full range")
    got = make(int8=True)
    assert got.read_bytes() == b"int8" and got != before and not before.exists()
    assert calls == [{"weight_type": onnxruntime.quantization.QuantType.QInt8, "per_channel": True, "reduce_range": True}]
    assert sorted(p.name for p in fp32.parent.iterdir()) == sorted([fp32.name, got.name])


def test_a_model_exported_before_runs_without_onnxscript(tmp_path, tiny_model):
    """onnxscript only exports: a run folder whose ONNX model is cached (copied to a slim inference machine) loads
    with onnxruntime alone."""
    from goemo import load
    from tests.test_export import write_checkpoint

    write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    want = load(tmp_path / "run.ckpt", backend="onnx").predict_proba(["I love it", "ugh"])
    code = "from goemo import load\nprint(load('run.ckpt', backend='onnx').predict_proba(['I love it', 'ugh']).tolist())"
    r = without_onnxscript(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_allclose(eval(r.stdout), want, atol=1e-6)
