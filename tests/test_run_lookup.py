"""How `--ckpt_path` (and goemo.load) finds runs: `best`/`last` take named runs (`--trainer.logger.init_args.version
NAME`) as well as version_N, and a folder that is no run (a working folder, a run's checkpoints/, a model folder) is
said for what it is. Fake run folders only: nothing here trains or loads weights."""

import os
import sys
from pathlib import Path

import pytest
import torch

from goemo.errors import GoemoError
from goemo.runs import newest_run, resolve_checkpoint, rewrite_args

LIGHTNING = {"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {}, "callbacks": {}}
ROOT = Path("lightning_logs")


def fake_run(root: Path, name: str, started: float | None = None, saved: bool = True) -> Path:
    """root/NAME with a config.yaml (its mtime set to `started`) and, if `saved`, checkpoints/last.ckpt."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    version = "null" if name.startswith("version_") else name  # as a fit named by --trainer.logger.init_args.version saves it
    (run / "config.yaml").write_text(f"trainer:\n  logger:\n    class_path: goemo.cli.HParamsTensorBoardLogger\n"
                                     f"    init_args:\n      version: {version}\n", encoding="utf-8")  # fmt: skip
    if saved:
        torch.save(LIGHTNING, run / "checkpoints" / "last.ckpt")
    if started is not None:
        os.utime(run / "config.yaml", (started, started))
    return run


def test_best_and_last_take_a_named_run_fitted_after_version_0(tmp_path, monkeypatch):
    """A run fitted with `--trainer.logger.init_args.version exp` lives in lightning_logs/exp: when its fit started
    after version_0's, test and fit take it, not version_0; when before, version_0 stays the newest."""
    monkeypatch.chdir(tmp_path)
    old, exp = fake_run(ROOT, "version_0", started=1_000), fake_run(ROOT, "exp", started=2_000)
    for sub in ("test", "fit"):
        for alias in ("best", "last"):
            assert rewrite_args([sub, "--ckpt_path", alias], ROOT) == (
                [sub, "--config", str(exp / "config.yaml"), "--ckpt_path", str(exp / "checkpoints" / "last.ckpt")], exp)
    os.utime(exp / "config.yaml", (500, 500))
    assert rewrite_args(["test", "--ckpt_path", "best"], ROOT)[1] == old


def test_a_copy_of_a_run_is_no_named_run(tmp_path):
    """`cp -r version_0 keep_v0`: its config.yaml (fresh mtime) names no version, so it never becomes best or last."""
    import shutil

    root = tmp_path / "lightning_logs"
    fake_run(root, "version_0", started=1_000)
    newer = fake_run(root, "version_1", started=2_000)
    shutil.copytree(root / "version_0", root / "keep_v0")
    os.utime(root / "keep_v0" / "config.yaml", (3_000, 3_000))  # `cp -r` gives the copy a fresh time
    assert newest_run(root) == newer and resolve_checkpoint("last", root, resume=True)[1] == newer


def test_with_named_runs_only_the_newest_fit_is_best(tmp_path):
    root = tmp_path / "lightning_logs"
    fake_run(root, "zeta", started=1_000)
    alpha = fake_run(root, "alpha", started=3_000)
    fake_run(root, "mid", started=2_000)
    assert newest_run(root) == alpha
    assert resolve_checkpoint("last", root, resume=True) == (alpha / "checkpoints" / "last.ckpt", alpha)


def test_folders_that_are_not_runs_stay_out(tmp_path):
    """An ensemble's, a sweep's and an export's folder under lightning_logs are newer than the run, and no runs."""
    root = tmp_path / "lightning_logs"
    run = fake_run(root, "version_0", started=1_000)
    (root / "ens").mkdir()
    (root / "ens" / "ensemble.json").write_text("{}")
    (root / "ens" / "test_report.md").write_text("report")
    (root / "sweeps" / "study").mkdir(parents=True)
    (root / "sweeps" / "study" / "summary.json").write_text('{"runs": []}')
    (root / "export").mkdir()
    for name in ("config.json", "thresholds.json", "model.safetensors"):
        (root / "export" / name).write_text("{}")
    (root / "sweeps.db").write_bytes(b"")
    assert newest_run(root) == run
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(GoemoError, match="^no run with checkpoints under .*lightning_logs/: train one first"):
        newest_run(root)


def test_fit_last_refuses_to_resume_an_older_run_when_a_newer_named_fit_saved_nothing(tmp_path):
    root = tmp_path / "lightning_logs"
    old = fake_run(root, "version_0", started=1_000)
    fake_run(root, "exp", started=2_000, saved=False)
    with pytest.raises(GoemoError, match=r"exp, the newest run, has no checkpoint .* \(--ckpt_path .*version_0\)$"):
        resolve_checkpoint("last", root, resume=True)
    assert resolve_checkpoint("best", root)[1] == old  # test/predict: the newest run with checkpoints


def test_fit_last_resumes_the_newest_run_past_an_older_fit_that_saved_nothing(tmp_path):
    """version_0 crashed before its first save, then version_1 trained: `fit --ckpt_path last` resumes version_1."""
    root = tmp_path / "lightning_logs"
    fake_run(root, "version_0", started=1_000, saved=False)
    new = fake_run(root, "version_1", started=2_000)
    assert resolve_checkpoint("last", root, resume=True) == (new / "checkpoints" / "last.ckpt", new)


def test_version_10_is_newer_than_version_9(tmp_path):
    """version_N are ordered by N, not by name ("version_9" > "version_10"), even when both fits started together."""
    root = tmp_path / "lightning_logs"
    fake_run(root, "version_9", started=1_000)
    ten = fake_run(root, "version_10", started=1_000)
    assert newest_run(root) == ten
    for alias in ("best", "last"):
        assert resolve_checkpoint(alias, root, resume=alias == "last") == (ten / "checkpoints" / "last.ckpt", ten)


def test_a_run_without_last_ckpt_resumes_from_its_newest_checkpoint(tmp_path):
    """No last.ckpt (save_last off): `last` and the run folder take the checkpoint saved last, by its mtime."""
    root = tmp_path / "lightning_logs"
    run = fake_run(root, "version_0", saved=False)
    old, new = run / "checkpoints" / "epoch=0-step=10.ckpt", run / "checkpoints" / "epoch=1-step=20.ckpt"
    for f, mtime in ((old, 1_000), (new, 2_000)):
        torch.save(LIGHTNING, f)
        os.utime(f, (mtime, mtime))
    assert resolve_checkpoint(str(run), resume=True) == (new, run)
    assert resolve_checkpoint("last", root, resume=True) == (new, run)


def test_a_working_folder_names_its_run(tmp_path, monkeypatch, capsys):
    from goemo.cli import main

    fake_run(tmp_path / "a" / "lightning_logs", "version_0")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    want = ("../a: a working folder, not a run; give its run (--ckpt_path ../a/lightning_logs/version_0), "
            "or run from ../a with --ckpt_path best|last")  # fmt: skip
    with pytest.raises(GoemoError) as e:
        resolve_checkpoint("../a")
    assert str(e.value) == want
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--ckpt_path", "../a"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"error: {want}"


def test_a_folder_of_runs_names_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(ROOT, "version_0", started=1_000)
    fake_run(ROOT, "exp", started=2_000)
    with pytest.raises(GoemoError, match=r"^lightning_logs: a folder of runs, not a run; give one of them \(--ckpt_path lightning_logs/exp: the newest\)$"):
        resolve_checkpoint("lightning_logs")


def test_a_runs_checkpoints_folder_means_its_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fake_run(ROOT, "version_0")
    last = run / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(run / "checkpoints")) == (last, run)
    assert rewrite_args(["test", "--ckpt_path", str(run / "checkpoints")], ROOT) == (
        ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)], run)
    # checkpoints with no run beside them (a checkpoint.dirpath's folder): which run is not known
    Path("myckpts").mkdir()
    torch.save(LIGHTNING, Path("myckpts", "last.ckpt"))
    with pytest.raises(GoemoError, match=r"^myckpts: a folder of checkpoint files, not a run; give one of its \.ckpt files, or its run's folder$"):
        resolve_checkpoint("myckpts")


def test_a_model_folder_says_where_it_goes(tmp_path, monkeypatch):
    from goemo import load

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for call in (lambda: resolve_checkpoint("model"), lambda: load("model")):
        with pytest.raises(GoemoError, match=r"^model is a model folder, not a run; --model\.model_name_or_path takes it$"):
            call()


def test_a_run_or_folder_without_checkpoints_keeps_its_message(tmp_path):
    run = fake_run(tmp_path, "version_0", saved=False)
    (tmp_path / "empty").mkdir()
    for folder in (run, tmp_path / "empty"):
        with pytest.raises(GoemoError, match=r"checkpoints: no checkpoint files \(the fit stopped before its first save\?\)"):
            resolve_checkpoint(str(folder))
