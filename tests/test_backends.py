"""goemo.load(..., backend=...) and `predict --backend`: onnxruntime gives the PyTorch model's outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from goemo.errors import GoemoError
from tests.conftest import PREDICT_TEXTS, run_main

TEXTS = PREDICT_TEXTS + ["happy glad", "angry mad angry", "scared", "table chair happy", "mad"] * 4


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run (the backends cache their ONNX files in the run folder)."""
    work = tmp_path_factory.mktemp("backends") / "work"
    shutil.copytree(tiny_run, work)
    return work / "lightning_logs" / "version_0"


def test_onnx_backend_matches_torch(run):
    from goemo import load

    torch_clf, onnx_clf = load(run), load(run, backend="onnx", device="cpu:0", batch_size=np.int64(8))  # as torch takes them
    want, got = torch_clf.predict_proba(TEXTS), onnx_clf.predict_proba(TEXTS)
    assert got.shape == want.shape and onnx_clf.backend == "onnx"
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [r["labels"] for r in onnx_clf.predict(TEXTS)] == [r["labels"] for r in torch_clf.predict(TEXTS)]
    assert (run / "onnx").is_dir() and len(list((run / "onnx").glob("*.onnx"))) == 1
    assert not list((run / "onnx").glob(".*partial"))


def test_int8_backend_is_close_and_keeps_the_top_label(run):
    from goemo import load

    want, got = load(run).predict_proba(TEXTS), load(run, backend="int8").predict_proba(TEXTS)
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

    monkeypatch.setattr("goemo.onnx_backend.tempfile.mkstemp", no_room)  # full before the export starts
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
    assert [r["text"] for r in outs["onnx"]] == [t for t in TEXTS[:12]]
    for a, b in zip(outs["onnx"], outs["torch"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
