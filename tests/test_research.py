"""The research loop: space files, sweeps whose trials are ordinary runs, the comparison table, ensembles."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from goemo import compare, ensemble, sweep
from goemo.errors import GoemoError
from goemo.thresholds import tune_thresholds
from tests.conftest import REPO, run_main, write_tiny_data


# -- space files ---------------------------------------------------------------------------------------------------
def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_space_file_parses_every_kind(tmp_path):
    space = sweep.read_space(space_file(tmp_path, """
model.learning_rate: {float: [1.0e-5, 3.0e-4], log: true}
model.warmup_ratio: {float: [0.0, 0.1], step: 0.02}
trainer.max_epochs: {int: [1, 4]}
data.train_batch_size: {categorical: [16, 32, 64]}
"""))
    assert space["model.learning_rate"] == {"kind": "float", "low": 1e-5, "high": 3e-4, "log": True, "step": None}
    assert space["model.warmup_ratio"]["step"] == 0.02 and space["trainer.max_epochs"]["kind"] == "int"
    assert space["data.train_batch_size"] == {"kind": "categorical", "values": [16, 32, 64]}


def test_a_categorical_entry_may_say_log_false_or_step_null(tmp_path):
    space = sweep.read_space(space_file(tmp_path, "model.loss: {categorical: [bce, focal], log: false, step: null}"))
    assert space["model.loss"] == {"kind": "categorical", "values": ["bce", "focal"]}


def test_space_numbers_read_as_yaml_1_2_reads_them(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-5 as a string; the space file, like the CLI's configs, takes it as a float
    space = sweep.read_space(space_file(tmp_path, """
model.learning_rate: {float: [1e-5, 3E-4], log: true}
model.head_learning_rate: {categorical: [1e-3, 2.0e-3, +5e-3]}
model.loss: {grid: [bce, 1e5x]}
"""))
    assert space["model.learning_rate"] == {"kind": "float", "low": 1e-5, "high": 3e-4, "log": True, "step": None}
    assert space["model.head_learning_rate"]["values"] == [1e-3, 2e-3, 5e-3]
    assert space["model.loss"]["values"] == ["bce", "1e5x"]  # not a number: stays a string
    assert yaml.safe_load("x: 1e-5") == {"x": "1e-5"}  # PyYAML's own loader is left as it was


@pytest.mark.parametrize(
    "text,message",
    [
        ("model.learning_rate: {float: [1e-3, 1e-4]}", "model.learning_rate: empty or inverted range"),
        ("model.learning_rate: {float: [1.0e-3, 1.0e-3]}", "model.learning_rate: empty or inverted range"),
        ("model.learning_rate: {float: [0, 1.0e-3], log: true}", "model.learning_rate: a log range must be above 0"),
        ("trainer.max_epochs: {int: [1, 2.5]}", "trainer.max_epochs: int bounds must be integers"),
        ("data.train_batch_size: {categorical: []}", "data.train_batch_size: categorical needs a non-empty list"),
        ("model.loss: {choice: [bce]}", "model.loss: give exactly one of float, int, categorical, grid"),
        ("model.learning_rate: {float: [1, 2], scale: log}", "model.learning_rate: unknown setting 'scale'"),
        ("- not a mapping", "a space file maps config keys to distributions"),
        ("seed_everything: {grid: [42, 1, 42]}", "seed_everything: grid lists 42 twice (each value is one trial"),
        ("model.loss: {categorical: [bce, focal, bce]}", "model.loss: categorical lists 'bce' twice"),
        ("seed_everything: {grid: [42, 42]}", "seed_everything: grid lists 42 twice (each value is one trial"),  # side by side
        ("model.learning_rate: {float: [1.0e-5, 1.0e-4], log: 'false'}", "model.learning_rate: log must be true or false, got 'false'"),
        ("model.loss: {categorical: [bce, focal], log: true}", "model.loss: categorical takes its list of values only (log is for"),
        ("seed_everything: {grid: [1, 2], step: 1}", "seed_everything: grid takes its list of values only (step is for"),
        ("trainer.max_epochs: {int: [1, 4], step: true}", "trainer.max_epochs: step must be a positive integer"),  # true is 1 to Python
        ("model.learning_rate: {float: [0.1, 0.5], step: -0.1}", "model.learning_rate: step must be a positive number"),
    ],
)
def test_bad_space_files_are_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(GoemoError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sweep.read_space(space_file(tmp_path, text))


def test_a_study_refuses_trials_of_another_recipe(tmp_path):
    import argparse

    import optuna

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  learning_rate: 1.0e-4\n")
    space = sweep.read_space(space_file(tmp_path, "model.learning_rate: {float: [1e-5, 1e-4]}"))
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(study_name="s", storage=url)
    a = argparse.Namespace(metric="val/f1_macro", direction="maximize", config=config, fit_args=["--x", "1"],
                           study="s", storage=None)  # fmt: skip
    sweep.check_recipe(study, a, space)  # a new study records its recipe
    sweep.check_recipe(optuna.load_study(study_name="s", storage=url), a, space)  # the same recipe goes on
    other = {"metric": "val/f1_micro", "fit_args": ["--x", "2"], "config": tmp_path / "c2.yaml"}
    (tmp_path / "c2.yaml").write_text("model:\n  learning_rate: 2.0e-4\n")
    refused = r"study 's' in lightning_logs/sweeps.db searches another recipe \(its .* differs\)"
    for key, value in other.items():
        with pytest.raises(GoemoError, match=refused):
            sweep.check_recipe(study, argparse.Namespace(**{**vars(a), key: value}), space)
    with pytest.raises(GoemoError, match=r"\(its --space/--seeds differs\)"):
        sweep.check_recipe(study, a, {**space, "seed_everything": {"kind": "grid", "values": [1, 2]}})
    with pytest.raises(GoemoError) as e:  # a server URL is named without its password
        sweep.check_recipe(study, argparse.Namespace(**{**vars(a), "metric": "val/f1_micro",
                                                        "storage": "postgresql://goemo:s3cret@db.example/goemo"}), space)  # fmt: skip
    assert "in postgresql://goemo:***@db.example/goemo searches another recipe" in str(e.value) and "s3cret" not in str(e.value)


def test_a_space_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "s.yaml").write_bytes(b"model.loss: {categorical: [caf\xe9]}")
    with pytest.raises(GoemoError, match=r"s.yaml: cannot read the space file \('utf-8' codec can't decode byte 0xe9"):
        sweep.read_space(tmp_path / "s.yaml")
    assert sweep.read_space(space_file(tmp_path, "model.loss: {categorical: [bce, focal]}"))  # a UTF-8 one reads


def test_a_trial_draws_from_the_space_files_distributions_and_keeps_by_the_studys_direction():
    import optuna

    trial = optuna.create_study().ask()
    sweep.suggest(trial, {"data.train_batch_size": {"kind": "int", "low": 8, "high": 512, "step": None, "log": True},
                          "model.learning_rate": {"kind": "float", "low": 1e-5, "high": 1e-3, "step": None, "log": True}})  # fmt: skip
    assert trial.distributions["data.train_batch_size"].log and trial.distributions["model.learning_rate"].log
    for metric, direction, mode in (("val/f1_macro", "maximize", "max"), ("val/loss", "minimize", "min")):
        args = sweep.fit_args(sweep.parse_args(["--seeds", "42", "--metric", metric, "--direction", direction]), {})
        assert args[args.index("--checkpoint.monitor") + 1] == metric and args[args.index("--checkpoint.mode") + 1] == mode
    with pytest.raises(GoemoError, match="^--trials must be at least 1, got 0$"):
        sweep.parse_args(["--seeds", "42,1", "--trials", "0"])


def test_a_seed_group_is_never_pruned_and_never_runs_a_seed_twice(tmp_path, capsys):
    for trials in ("5", "4"):  # one more than the grid: a seed run twice
        with pytest.raises(GoemoError, match=rf"^--trials {trials}: the grid has 3 points, each run once; give --trials 3 or fewer"):
            sweep.run_sweep(sweep.parse_args(["--seeds", "42,1,7", "--trials", trials]))
    a = sweep.parse_args(["--seeds", "42,1,7", "--config", str(tmp_path / "nope.yaml")])
    assert a.prune  # pruning is on by default ...
    with pytest.raises(GoemoError, match="no such file"):  # (stops here, after the sweep's settings are made)
        sweep.run_sweep(a)
    assert not a.prune  # ... but a seed is never cut short: a pruned seed would enter its group's mean
    assert "note: a sweep over seed_everything is not pruned" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--metric", "val/f1_macro_tune"], ("--metric 'val/f1_macro_tune' is not a validation metric goemo logs; use one of "
                                             "val/loss, val/f1_micro, val/f1_micro_tuned, val/f1_macro, val/f1_macro_tuned")),
        (["--metric", "val/loss"], "--metric val/loss with --direction maximize would look for the worst run; use --direction minimize"),
        (["--direction", "minimize"], "--metric val/f1_macro with --direction minimize would look for the worst run; use --direction maximize"),
    ],
)  # fmt: skip
def test_the_objective_is_checked_before_any_trial(flags, message):
    """A misspelt metric failed each trial after its first epoch; a loss maximized picked the worst trial as best."""
    with pytest.raises(GoemoError, match="^" + re.escape(message)):
        sweep.parse_args(["--seeds", "1,2", *flags])
    assert sweep.parse_args(["--seeds", "1,2", "--metric", "val/loss", "--direction", "minimize"]).metric == "val/loss"


def test_trials_run_goemos_cli_from_this_checkout(tmp_path):
    """A goemo installed without its repository has no main.py: trials run goemo.cli's main from a launcher that
    puts this checkout first, ahead of a `goemo` folder in the working directory or an installed one."""
    import subprocess

    assert sweep.CLI[:2] == [sys.executable, "-c"] and sweep.CLI[2].endswith("from goemo.cli import main; main()")
    (tmp_path / "goemo").mkdir()
    (tmp_path / "goemo" / "__init__.py").write_text("")  # a decoy
    probe = sweep.CLI[2].replace("from goemo.cli import main; main()", "import goemo; print(goemo.__file__)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == Path(sweep.__file__).resolve().parent / "__init__.py"


@pytest.mark.parametrize("seeds", ["", "1,x", "1,1", ","])
def test_seeds_must_be_different_integers(seeds):
    with pytest.raises(GoemoError, match="give different integers separated by commas"):
        sweep.parse_args(["--seeds", seeds])
    assert sweep.parse_args(["--seeds", "42, 1,7"]).seeds == [42, 1, 7]


@pytest.mark.slow
@pytest.mark.parametrize(
    "text,message",
    [
        ("model.learnin_rate: {float: [1.0e-5, 1.0e-4]}", "space key 'model.learnin_rate' is not a config key (did you mean model.learning_rate"),
        ("model.loss: {categorical: [bce, hinge]}", "space key 'model.loss': "),
        ("data.train_batch_size: {categorical: [16, big]}", "space key 'data.train_batch_size': "),
    ],
)
def test_space_keys_and_values_are_checked_by_the_config_parser_before_any_trial(tmp_path, text, message):
    args = sweep.parse_args(["--space", str(space_file(tmp_path, text)), "--trials", "2", "--config", str(REPO / "configs/minilm.yaml")])
    with pytest.raises(GoemoError, match=message.replace("(", r"\(").replace(".", r"\.")):
        sweep.run_sweep(args)
    assert not list(tmp_path.glob("lightning_logs/version_*"))


# -- a tiny real sweep -------------------------------------------------------------------------------------------
def tiny_fit_args(tiny_model: Path, data: Path, cache: Path) -> list[str]:
    return ["--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data), "--data.cache_dir", str(cache),
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--data.train_batch_size", "8", "--model.pooling", "mean", "--val_examples.num_examples", "0"]  # fmt: skip


@pytest.mark.parametrize(
    "tail, reason",
    [
        (["Epoch 0: 10%", "error: non-finite training loss at step 3"], "non-finite training loss at step 3"),
        (["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
          "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) FATAL:  sorry, too many clients already",
          "(Background on this error at: https://sqlalche.me/e/21/e3q8)"],
         "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) FATAL:  sorry, too many clients already"),
        (["Killed"], "Killed"),
        ([], "exit -9"),
    ],
)  # fmt: skip
def test_a_failed_trials_reason_is_the_line_that_says_why(tail, reason):
    assert sweep.failure_reason(tail, -9) == reason


@pytest.mark.slow
def test_tiny_sweep_trials_are_ordinary_runs_and_a_failed_trial_is_recorded(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_tiny_data(tmp_path / "data")
    space = space_file(tmp_path, "model.learning_rate: {grid: [1.0e-2, 1.0e+30]}\n")  # the second diverges: nan loss
    summary = sweep.run_sweep(sweep.parse_args(
        ["--space", str(space), "--study", "tiny", "--heartbeat", "0", "--", *tiny_fit_args(tiny_model, data, tmp_path / "cache")]
    ))  # fmt: skip
    assert summary["trials"] == {"complete": 1, "pruned": 0, "fail": 1}
    assert "non-finite training loss" in summary["failed"][0]["error"]
    best = Path(summary["best"]["run"])
    assert best.parent == (tmp_path / "lightning_logs").resolve() and best.name.startswith("version_")
    config = yaml.safe_load((best / "config.yaml").read_text())
    assert config["model"]["learning_rate"] == 0.01  # the trial's value, in its run's own config
    # its best checkpoint is kept by the study's metric, so `test` of the run scores the epoch the study ranked
    assert (config["checkpoint"]["monitor"], config["checkpoint"]["mode"]) == ("val/f1_macro", "max")
    assert (tmp_path / "lightning_logs/sweeps/tiny/summary.json").is_file() and (tmp_path / "lightning_logs/sweeps.db").is_file()
    assert sorted(r["state"] for r in summary["runs"]) == ["complete", "fail"]  # both trials made a run folder
    assert compare.expand([tmp_path / "lightning_logs/sweeps/tiny"]) == [best]  # a study compares its finished trials
    r = run_main("test", "--ckpt_path", str(best), "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (best / "test_report.json").is_file()


def test_an_interrupt_outside_a_trial_says_the_sweep_stopped(monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, raised as it) before a trial has started: a KeyboardInterrupt without a message."""
    import signal

    from goemo import sweep

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "parse_args", lambda argv: None)
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    original = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            sweep.main([])
    finally:
        signal.signal(signal.SIGTERM, original)  # main() installs the sweep's own
    assert e.value.code == 130 and capsys.readouterr().err == "Ctrl-C: the sweep stopped\n"


@pytest.mark.slow
def test_sigterm_stops_the_sweep_after_its_trials_fit_saved(tmp_path, tiny_model):
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    data = write_tiny_data(tmp_path / "data")
    space = space_file(tmp_path, "model.learning_rate: {float: [1e-3, 1e-2]}\n")
    fit = [*tiny_fit_args(tiny_model, data, tmp_path / "cache"), "--trainer.max_epochs", "1000"]  # long enough
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "goemo.sweep", "--space", str(space), "--study", "t", "--trials", "2", "--", *fit]
    worker = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline, started = f"sqlite:///{tmp_path / 'lightning_logs/sweeps.db'}", time.time() + 600, False
        while not started and time.time() < deadline:  # until the trial's fit has saved an epoch's checkpoint
            time.sleep(1)
            assert worker.poll() is None, worker.stderr.read()[-3000:]  # the worker died: say why
            # Its first trial's log: the worker has made the database and its tables by then (opening the study
            # while the worker creates them, this process would create them too, and one of the two can fail)
            if not (tmp_path / "lightning_logs/sweeps/t/trial_0.log").is_file():
                continue
            try:
                trials = optuna.load_study(study_name="t", storage=url).trials
            except KeyError:  # no study yet
                continue
            saved = any((tmp_path / "lightning_logs").rglob("epoch*.ckpt"))
            started = bool(trials) and "run" in trials[0].user_attrs and saved
        assert started, "the trial's fit did not save a checkpoint within 10 minutes"
        worker.send_signal(signal.SIGTERM)  # to the worker alone: it passes the signal on to the fit
        assert worker.wait(timeout=120) == 143
        assert worker.stderr.read().splitlines()[-1].startswith("SIGTERM: trial 0 stopped (marked failed, its log ")
        trial, again = optuna.load_study(study_name="t", storage=url).trials
        assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"] and "error" not in trial.user_attrs
        # queued with the same values, for the next command to run first
        assert again.state.name == "WAITING" and again.user_attrs == {"retry_of": 0}
        assert again.system_attrs["fixed_params"] == trial.params
        log = (tmp_path / "lightning_logs/sweeps/t/trial_0.log").read_text()
        assert "error: interrupted by SIGTERM" in log  # the fit stopped as after SIGTERM: saved, with the resume line
        assert (Path(trial.user_attrs["run"]) / "checkpoints" / "last.ckpt").is_file()
    finally:  # a failed assertion leaves no worker behind (its fit dies with it)
        worker.kill()


def test_tpe_seeds_differ_between_workers_and_between_runs_of_one_study():
    import optuna

    x = {"x": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}

    def first_value(seed, done: int = 0) -> float:
        study = optuna.create_study()
        for _ in range(done):  # trials an earlier command of this study ran
            study.add_trial(optuna.trial.create_trial(params={"x": 1e-4}, distributions=x, value=0.5))
        study.sampler = sweep.make_sampler(study, {}, False, seed)
        return study.ask(x).params["x"]

    assert first_value(0) == first_value(0)  # --sampler-seed: a one-worker study repeats
    assert first_value(0, done=3) != first_value(0)  # going on with a study draws new values, not trial 0's again
    assert first_value(None) != first_value(None)  # the default: each worker its own draws
    grid = sweep.make_sampler(optuna.create_study(), {"seed_everything": {"values": [1, 2]}}, True, None)
    assert isinstance(grid, optuna.samplers.GridSampler)


def test_optuna_report_prunes_at_the_validations_number_whatever_the_step_count(tmp_path):
    """Trials of other batch sizes take other step counts: each reports its n-th validation as step n, so
    the median pruner compares equal shares of training; a trial below the median is stopped and marked."""
    import optuna
    from types import SimpleNamespace

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize",
                                pruner=sweep.make_pruner(True))  # fmt: skip
    for values in ((0.30, 0.40), (0.20, 0.50)):  # the pruner waits for two finished trials
        done = study.ask()
        for n, v in enumerate(values):
            done.report(v, n)
        study.tell(done, max(values))

    def validate(cb, trainer, value, step):
        trainer.callback_metrics, trainer.global_step = {"val/f1_macro": torch.tensor(value)}, step
        cb.on_validation_end(trainer, None)

    def trainer_for() -> SimpleNamespace:
        return SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), sanity_checking=False, should_stop=False,
                               world_size=1)  # fmt: skip

    good, bad = study.ask(), study.ask()
    cb = sweep.OptunaReport(url, "s", good.number)
    trainer = trainer_for()
    cb.setup(trainer, None, "fit")
    validate(cb, trainer, 0.35, 128)  # batch 16: twice the steps of the batch-32 trial above
    validate(cb, trainer, 0.48, 256)
    assert not trainer.should_stop
    cb = sweep.OptunaReport(url, "s", bad.number)
    trainer = trainer_for()
    cb.setup(trainer, None, "fit")
    validate(cb, trainer, 0.05, 32)  # batch 64: half the steps; below the median at the first validation
    assert trainer.should_stop
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert trials[good.number].intermediate_values == pytest.approx({0: 0.35, 1: 0.48})
    assert trials[bad.number].intermediate_values == pytest.approx({0: 0.05})
    assert trials[bad.number].user_attrs == {"run": str(tmp_path.resolve()), "pruned_at_step": 32}
    off = study.ask()  # goemo.sweep --no-prune: the trial's process must not prune with a default pruner either
    cb = sweep.OptunaReport(url, "s", off.number, prune=False)
    trainer = trainer_for()
    cb.setup(trainer, None, "fit")
    validate(cb, trainer, 0.01, 32)
    assert not trainer.should_stop


def fake_fits(monkeypatch, returncode: int) -> list:
    """A trial's fit process that runs nothing and ends with `returncode`; returns the list its arguments go into."""
    seen = []

    class FakeProc:
        def __init__(self, args, **kw):
            seen.append(args)

        def wait(self):
            return returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", FakeProc)
    return seen


def test_a_seed_groups_trials_are_told_not_to_prune(tmp_path, monkeypatch):
    """The worker of a seed group does not prune, and each trial's process must not either (its own pruner)."""
    import optuna

    seen = fake_fits(monkeypatch, returncode=1)
    a = sweep.parse_args(["--seeds", "42,1"])
    a.prune, a.sweep_dir, a.study = False, tmp_path, "seeds"  # as run_sweep leaves them for a seed group
    trial = optuna.create_study().ask()
    sweep.run_trial(trial, a, {"seed_everything": {"kind": "grid", "values": [42, 1]}}, "sqlite://")
    args = seen[0]
    assert args[args.index("--trainer.callbacks.prune") + 1] == "false"


@pytest.mark.parametrize("metric, direction, best", [("val/f1_macro", "maximize", 0.6), ("val/loss", "minimize", 0.4)])
def test_a_trial_scores_its_best_validation_as_its_run_keeps_its_best_checkpoint(tmp_path, monkeypatch, metric, direction, best):
    """The trial's value is its best epoch's (the checkpoint `best` keeps), not its last one's."""
    import optuna

    fake_fits(monkeypatch, returncode=0)  # the fit: it reported 0.4, 0.6 and 0.5 (below), and ended well
    a = sweep.parse_args(["--seeds", "42", "--metric", metric, "--direction", direction])
    a.sweep_dir, a.study = tmp_path, "s"
    trial = optuna.create_study(direction=direction).ask()
    for step, value in enumerate((0.4, 0.6, 0.5)):  # neither best is the last
        trial.report(value, step)
    assert sweep.run_trial(trial, a, {"seed_everything": {"kind": "grid", "values": [42]}}, "sqlite://") == best


def test_optuna_report_ignores_the_sanity_check(tmp_path):
    """Lightning keeps the sanity check's metrics until it ends: reported, they would be validation 0."""
    from types import SimpleNamespace

    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize", pruner=sweep.make_pruner(True))
    trial = study.ask()
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), sanity_checking=True, should_stop=False,
                              world_size=1, global_step=0, callback_metrics={"val/f1_macro": torch.tensor(0.01)})
    cb = sweep.OptunaReport(url, "s", trial.number)
    cb.setup(trainer, None, "fit")
    cb.on_validation_end(trainer, None)  # the sanity check's two batches: not validation 0
    trainer.sanity_checking, trainer.callback_metrics, trainer.global_step = False, {"val/f1_macro": torch.tensor(0.4)}, 12
    cb.on_validation_end(trainer, None)
    assert optuna.load_study(study_name="s", storage=url).trials[trial.number].intermediate_values == pytest.approx({0: 0.4})


def test_optuna_report_on_a_finished_trial_or_another_machine_notes_and_fits_on(tmp_path, capsys):
    """A trial's config.yaml names its study and trial: fit again (the summary's best config with another seed) or
    resumed after the trial finished, the fit goes on and reports to no study, where Optuna refused with a traceback."""
    from types import SimpleNamespace

    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    done = study.ask()
    study.tell(done, 0.5)
    for name, number, note in (("s", done.number, "trial 0 of study 's' is complete"), ("s", 7, "trial 7 of study 's' is not in it"),
                               ("gone", 0, "study 'gone' is not in its database")):  # fmt: skip
        cb = sweep.OptunaReport(url, name, number)
        trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), sanity_checking=False, should_stop=False,
                                  world_size=1, callback_metrics={"val/f1_macro": torch.tensor(0.0)}, global_step=1)  # fmt: skip
        cb.setup(trainer, None, "fit")
        cb.on_validation_end(trainer, None)
        assert not trainer.should_stop and note + ": this fit reports to no study" in capsys.readouterr().err
    assert optuna.load_study(study_name="s", storage=url).trials[0].intermediate_values == {}
    with pytest.raises(GoemoError, match=r"^OptunaReport: cannot open study 's' \(.*\); drop it from the config"):
        sweep.OptunaReport("postgresql+nodriver://u@localhost/x", "s", 0).setup(trainer, None, "fit")


def test_optuna_report_stops_every_rank_when_rank_0_prunes():
    """Under DDP only rank 0 asks the study; Lightning does not share should_stop, so the decision is broadcast:
    a rank left training would wait in the gradient all-reduce forever."""
    from types import SimpleNamespace

    calls = []

    def broadcast(obj, src=0):
        calls.append((obj, src))
        return True  # rank 0 said prune

    cb = sweep.OptunaReport("sqlite://", "s", 0)  # rank 1: setup loads no trial
    trainer = SimpleNamespace(is_global_zero=False, sanity_checking=False, should_stop=False, world_size=2, log_dir=".",
                              callback_metrics={"val/f1_macro": torch.tensor(0.1)}, strategy=SimpleNamespace(broadcast=broadcast))  # fmt: skip
    cb.setup(trainer, None, "fit")
    cb.on_validation_end(trainer, None)
    assert trainer.should_stop and calls == [(False, 0)]


def test_a_grid_with_a_failed_point_waits_for_the_point_in_flight_and_heartbeat_0_never_hangs(tmp_path, monkeypatch, capsys):
    """Seeds 42,1,7: 1 complete, 7 failed with a reason, one trial running on another worker. The grid has no point
    left for this worker (GridSampler would hand out the running one again: a seed run twice); with --heartbeat 0
    nothing would ever fail a dead worker's trial, so the worker says so and stops instead of waiting forever."""
    import optuna
    from optuna.trial import TrialState

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "check_space", lambda *a, **k: None)
    ran = []
    monkeypatch.setattr(sweep, "run_trial", lambda trial, *a: ran.append(trial.number) or 0.5)
    url = f"sqlite:///{(tmp_path / 'lightning_logs/sweeps.db').resolve()}"
    (tmp_path / "lightning_logs").mkdir()
    study = optuna.create_study(study_name="seeds", storage=url, direction="maximize")
    seeds = [42, 1, 7]
    for seed, state in ((7, TrialState.FAIL), (1, TrialState.COMPLETE), (42, TrialState.RUNNING)):
        study.enqueue_trial({"seed_everything": seed})
        t = study.ask()
        t.suggest_categorical("seed_everything", seeds)
        if state == TrialState.FAIL:
            t.set_user_attr("error", "CUDA out of memory")
            study.tell(t, state=state)
        elif state == TrialState.COMPLETE:
            study.tell(t, 0.5)
    sweep.run_sweep(sweep.parse_args(["--seeds", "42,1,7", "--heartbeat", "0"]))
    assert ran == [] and "note: 1 trial(s) still running, on other workers or on dead ones" in capsys.readouterr().err


def grid_study_with_a_dead_third_trial(tmp_path: Path, monkeypatch, seeds: list[int], took_values: bool = True):
    """Seeds as a grid: trials 0 and 1 complete, trial 2 RUNNING with a last heartbeat (its worker was killed), as
    the grid sampler left them; the sweep's trials are recorded, not run. Returns (the ran list, trial 2's seed)."""
    import optuna
    from optuna.trial import TrialState

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "check_space", lambda *a, **k: None)
    ran = []
    monkeypatch.setattr(sweep, "run_trial", lambda trial, a, space, url: ran.append(suggest_seed(trial, seeds)) or 0.5)
    (tmp_path / "lightning_logs").mkdir()
    storage = optuna.storages.RDBStorage(f"sqlite:///{(tmp_path / 'lightning_logs/sweeps.db').resolve()}")
    study = optuna.create_study(study_name="seeds", storage=storage, direction="maximize")
    study.sampler = sweep.make_sampler(study, {"seed_everything": {"values": seeds}}, True, None)
    trials = [study.ask() for _ in seeds]
    seed = suggest_seed(trials[2], seeds) if took_values else None
    for t in trials[:2]:
        suggest_seed(t, seeds)
        study.tell(t, 0.5)
    storage.record_heartbeat(trials[2]._trial_id)  # then nothing: the worker died
    if not took_values:  # killed between Optuna's ask and the trial's suggest: a point without params
        storage.set_trial_state_values(trials[2]._trial_id, TrialState.FAIL)  # tell: the sampler would stop a study
    return ran, seed


def suggest_seed(trial, seeds: list[int]) -> int:
    return trial.suggest_categorical("seed_everything", seeds)


@pytest.mark.parametrize("retries", [0, 1])
def test_a_grid_point_whose_dead_trial_is_not_retried_is_not_replaced_by_another_point_run_twice(tmp_path, monkeypatch, capsys, retries):
    """The worker of the third seed was SIGKILLed and the same command runs again: the stale trial is failed after the grace
    period; with --retries 0 nothing queues it again, and GridSampler (every point visited) would run a random seed a
    second time. The point is given up, with a note that says how to run it; with --retries 1 the retry runs it."""
    seeds = [42, 1, 7]
    ran, seed = grid_study_with_a_dead_third_trial(tmp_path, monkeypatch, seeds)
    command = ["--seeds", "42,1,7", "--retries", str(retries), "--heartbeat", "1", "--", "--trainer.max_epochs", "1"]
    sweep.run_sweep(sweep.parse_args(command))
    err = capsys.readouterr().err
    if retries:
        assert ran == [seed] and "has no result" not in err
        return
    assert ran == []  # not a seed run twice
    assert (f"note: trial 2 (seed_everything={seed}) has no result: its worker died 1 time(s) and it is not retried again; run "
            "the point as a plain fit, `python main.py fit --checkpoint.monitor val/f1_macro --checkpoint.mode max "
            f"--trainer.max_epochs 1 --seed_everything {seed}`, and compare it beside the sweep\n") in err
    sweep.run_sweep(sweep.parse_args(command))
    assert ran == [] and "note: trial 2 " in capsys.readouterr().err  # the same command again: the same note, no run


def test_a_grid_stops_rather_than_run_a_point_twice_when_a_trial_died_before_it_took_its_values(tmp_path, monkeypatch, capsys):
    """A point Optuna's GridSampler counts as visited though no trial of it has values: the worker stops, where the
    sampler would run a random point again."""
    ran, _ = grid_study_with_a_dead_third_trial(tmp_path, monkeypatch, [42, 1, 7], took_values=False)
    sweep.run_sweep(sweep.parse_args(["--seeds", "42,1,7", "--heartbeat", "0"]))
    assert ran == [] and "note: every grid point was tried but 1 left no result and no retry; this worker stops" in capsys.readouterr().err


def test_max_failures_counts_this_workers_failed_trials_not_the_other_workers(tmp_path, monkeypatch):
    """With 8 workers on one study, the failures of all of them must not stop each one at --max-failures."""
    import optuna
    from optuna.trial import TrialState

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "check_space", lambda *a, **k: None)
    own_fails = []

    def run_trial(trial, a, space, url):
        # meanwhile another worker's trial failed
        trial.study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"error": "another worker's"}))
        sweep.suggest(trial, space)
        return sweep.failed_trial(trial, "this worker's") if own_fails.pop(0) else 0.5

    monkeypatch.setattr(sweep, "run_trial", run_trial)
    space = space_file(tmp_path, "model.learning_rate: {float: [1.0e-5, 1.0e-4]}\n")
    args = ["--space", str(space), "--heartbeat", "0", "--max-failures", "2"]
    own_fails[:] = [False, False, False]
    assert sweep.run_sweep(sweep.parse_args([*args, "--trials", "3"]))["trials"] == {"complete": 3, "pruned": 0, "fail": 3}
    own_fails[:] = [True, False, True]  # this worker's own second failure stops it
    with pytest.raises(GoemoError, match=r"^2 of this worker's trials failed \(last: this worker's\); see "):
        sweep.run_sweep(sweep.parse_args([*args, "--trials", "6"]))


def test_a_sweep_summary_is_written_when_importance_needs_what_is_not_installed(tmp_path, monkeypatch):
    """Optuna before 5.0 computes importance with fANOVA, which needs scikit-learn: an ImportError, not a traceback."""
    from types import SimpleNamespace

    import optuna

    study = optuna.create_study(direction="maximize")
    for lr, value in ((1e-5, 0.4), (1e-4, 0.5)):
        study.enqueue_trial({"model.learning_rate": lr})
        t = study.ask()
        t.suggest_float("model.learning_rate", 1e-5, 1e-4, log=True)
        study.tell(t, value)

    def needs_sklearn(study, **kwargs):
        raise ImportError("Tried to import 'sklearn' but failed. Please make sure that the package is installed correctly to use "
                          "this feature. Actual error: No module named 'sklearn'.")  # fmt: skip

    # The module itself: `optuna.importance` may be Optuna's lazy-import stand-in, which an attribute set on it bypasses
    # (the test then passed only after another test had imported the module).
    importlib.import_module("optuna.importance")
    monkeypatch.setattr(sys.modules["optuna.importance"], "get_param_importances", needs_sklearn)
    a = SimpleNamespace(metric="val/f1_macro", direction="maximize", sweep_dir=tmp_path)
    summary = sweep.summarize(study, a)
    assert summary["importance"].startswith("not computed (Tried to import 'sklearn' but failed.")
    assert json.loads((tmp_path / "summary.json").read_text())["best"]["value"] == 0.5 and (tmp_path / "summary.md").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-failures", "0"], "--max-failures must be at least 1, got 0"),
        (["--heartbeat", "-1"], "--heartbeat must be at least 0, got -1"),
        (["--retries", "-2"], "--retries must be at least 0, got -2"),
    ],
)
def test_sweep_counts_are_checked(args, message):
    with pytest.raises(GoemoError, match="^" + re.escape(message)):
        sweep.parse_args(["--seeds", "1,2", *args])


def test_seeds_and_a_space_file_give_the_seeds_one_way_only(tmp_path):
    with pytest.raises(GoemoError, match="^--seeds and the space file's seed_everything both set the seeds"):
        sweep.run_sweep(sweep.parse_args(["--seeds", "1,2", "--space", str(space_file(tmp_path, "seed_everything: {grid: [3, 4]}"))]))
    with pytest.raises(GoemoError, match="^--seeds runs a grid over seed_everything, and a grid searches every combination"):
        sweep.run_sweep(sweep.parse_args(["--seeds", "1,2", "--space", str(space_file(tmp_path, "model.learning_rate: {float: [1.0e-5, 1.0e-4]}"))]))


# -- the comparison table ----------------------------------------------------------------------------------------
def fake_run(folder: Path, lr: float, seed: int, val: dict, test: dict) -> Path:
    """A run folder as goemo writes one: config.yaml, TensorBoard events, checkpoints, test_report.json."""
    from torch.utils.tensorboard import SummaryWriter

    (folder / "checkpoints").mkdir(parents=True)
    config = {"seed_everything": seed, "model": {"learning_rate": lr, "pooling": "mean"}, "data": {"cache_dir": str(folder)},
              "trainer": {"max_epochs": 2, "logger": {"init_args": {"save_dir": str(folder)}}}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    writer = SummaryWriter(str(folder))
    for step, epoch in ((10, 0), (20, 1)):
        writer.add_scalar("epoch", epoch, step)
        for k, v in val.items():
            writer.add_scalar(k, v - (0.1 if step == 10 else 0.0), step)
    # As Lightning: the checkpoint's step is one past the validation's log, and the next epoch's first training
    # log falls on the checkpoint's step when that is a logging step ((21 + 1) % log_every_n_steps == 0).
    writer.add_scalar("epoch", 2, 21)
    writer.add_scalar("train/loss", 0.1, 21)
    writer.close()
    best = folder / "checkpoints" / "epoch01-step21.ckpt"
    torch.save({"global_step": 21, "epoch": 1, "state_dict": {}}, best)
    torch.save({"global_step": 21, "epoch": 1, "state_dict": {}, "callbacks": {"ModelCheckpoint{}": {"best_model_path": str(best)}}},
               folder / "checkpoints" / "last.ckpt")  # fmt: skip
    rep = {k: {"micro": {"f1": test[f"{k}_micro"], "ci": [test[f"{k}_micro"] - 0.01, test[f"{k}_micro"] + 0.01]},
               "macro": {"f1": test[f"{k}_macro"], "ci": [0.4, 0.6]}, "exact_match": 0.3} for k in ("fixed", "tuned")}  # fmt: skip
    (folder / "test_report.json").write_text(json.dumps(rep))
    return folder


def test_compare_leaves_out_a_test_report_of_another_checkpoint_than_the_best(tmp_path, capsys):
    """Tested, then resumed to a new best: the report scored the old best, and a row would mix two checkpoints."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "a", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.62, "tuned_macro": 0.5})
    rep = json.loads((run / "test_report.json").read_text())
    for scored, kept in ((21, True), (11, False)):  # the best checkpoint is epoch01-step21
        (run / "test_report.json").write_text(json.dumps({**rep, "checkpoint": {"file": f"step{scored}.ckpt", "global_step": scored}}))
        row = compare.run_row(run)
        assert (row.get("tuned/macro") == 0.5) is kept and row["val/f1_macro"] == 0.5
    assert capsys.readouterr().err == (f"note: {run / 'test_report.json'} scored step11.ckpt (step 11), not the run's best checkpoint "
                                       f"(step 21): its test figures are left out; run `python main.py test --ckpt_path {run}` again\n")


def test_compare_shows_differing_keys_only_and_collapses_seed_groups(tmp_path):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = lambda x: {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.62, "tuned_macro": x}  # noqa: E731
    a = fake_run(tmp_path / "a", 1e-4, 42, val, t(0.54))
    b = fake_run(tmp_path / "b", 1e-4, 1, {**val, "val/f1_macro": 0.52}, t(0.52))
    c = fake_run(tmp_path / "c", 2e-4, 42, val, t(0.50))
    header, body = compare.table([a, b, c])
    assert header[:5] == ["run", "model.learning_rate", "seed", "n", "epochs"]  # cache_dir, logger: not what a run did
    group, single = body
    assert group[1:5] == ["0.0001", "42, 1", "2", "2"]
    tuned_macro = header.index("test macro-F1 tuned")
    assert group[tuned_macro] == f"0.530 ± {np.std([0.54, 0.52], ddof=1):.3f}"
    assert group[header.index("val macro-F1")] == f"0.510 ± {np.std([0.5, 0.52], ddof=1):.3f}"  # at the best step
    assert single[1:5] == ["0.0002", "42", "1", "2"] and single[tuned_macro] == "0.500 [0.400, 0.600]"
    md = compare.to_markdown(header, body)
    assert md.count("\n") == 4 and "| 0.0002 |" in md
    for f in (c / "checkpoints").iterdir():  # a run without checkpoints: its epochs unknown, shown as the other gaps
        f.unlink()
    single = compare.table([a, b, c])[1][1]
    assert single[4] == "-" and single[header.index("val macro-F1")] == "-"
    assert compare.to_csv(header, body).splitlines()[0].startswith("run,model.learning_rate,seed")


def test_compare_stops_on_a_broken_config_or_report_with_one_line(tmp_path):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "a", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5})
    (run / "test_report.json").write_text('{"fixed": {}}')
    with pytest.raises(GoemoError, match=r"test_report.json: not a test report goemo wrote \(KeyError: 'micro'\); run `python"):
        compare.table([run])
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(GoemoError, match=r"config.yaml: not a run's config \(a mapping of settings\)"):
        compare.table([run])
    (run / "config.yaml").write_text("model: [\n")
    with pytest.raises(GoemoError, match=r"config.yaml: cannot read the run's config \(while parsing"):
        compare.table([run])


@pytest.mark.parametrize("limit, kept", [(None, True), (1.0, True), (5, False), (0.25, False), (1, False)])
def test_compare_leaves_out_a_test_report_of_part_of_the_split(tmp_path, capsys, limit, kept):
    """`test --trainer.limit_test_batches` scores part of the test split; its own config (config_test.yaml) says so."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "a", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.62, "tuned_macro": 0.5})
    (run / "config_test.yaml").write_text(yaml.safe_dump({"trainer": {"limit_test_batches": limit}}))
    assert (compare.run_row(run).get("tuned/macro") == 0.5) is kept
    err = capsys.readouterr().err
    assert err == ("" if kept else f"note: {run / 'test_report.json'} scored part of the test split (trainer.limit_test_batches "
                                   f"{limit}): its test figures are left out; run `python main.py test --ckpt_path {run} --trainer.limit_test_batches 1.0` "
                                   "again\n")  # fmt: skip


def test_compare_leaves_out_a_test_report_made_on_other_data_or_at_another_threshold(tmp_path, capsys):
    """`test --ckpt_path RUN --data.data_dir OTHER` (or --model.threshold X) writes the run's test report too: its
    figures are not the run's, and a seed group's mean would mix them in."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "a", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.62, "tuned_macro": 0.5})
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["data_dir"], config["model"]["threshold"] = "my d1", 0.5
    config["data"]["holdout_fold"], config["data"]["max_length"], config["model"]["threshold_resamples"] = None, 128, 100
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rep = json.loads((run / "test_report.json").read_text())
    note = f"note: {run / 'test_report.json'} {{}}: its test figures are left out; run `python main.py test --ckpt_path {run}{{}}` again\n"
    as_tested = {**config, "ckpt_path": "x.ckpt", "model": {**config["model"], "pretrained": False, "threshold_shrink": 10.0}}
    cases = [  # (config_test.yaml, the report's fixed threshold, the note or "" when the figures are kept)
        (as_tested, 0.5, ""),  # what the test CLI adds (ckpt_path, pretrained false), and a key the run predates
        # what does not change a test's figures: the training rows (cross-fitting), how thresholds are tuned (the
        # report scores the checkpoint's), the data folder named another way
        ({**as_tested, "data": {**config["data"], "holdout_fold": 1, "data_dir": str(Path("my d1").resolve())},
          "model": {**as_tested["model"], "threshold_resamples": 0}}, 0.5, ""),
        ({**as_tested, "data": {**config["data"], "data_dir": "d2"}}, 0.5,
         note.format("was made with data.data_dir d2, the run's config.yaml says my d1", " --data.data_dir 'my d1'")),
        ({**as_tested, "data": {**config["data"], "max_length": 16}}, 0.5,
         note.format("was made with data.max_length 16, the run's config.yaml says 128", " --data.max_length 128")),
        ({**as_tested, "model": {**as_tested["model"], "threshold": 0.05}}, 0.05,
         note.format("was made with model.threshold 0.05, the run's config.yaml says 0.5", " --model.threshold 0.5")),
        (None, 0.05, note.format("scored at the fixed threshold 0.05, the run's config.yaml says 0.5", "")),  # no config_test.yaml
    ]  # fmt: skip
    for tested, fixed, err in cases:
        (run / "config_test.yaml").unlink(missing_ok=True)
        if tested is not None:
            (run / "config_test.yaml").write_text(yaml.safe_dump(tested))
        (run / "test_report.json").write_text(json.dumps({**rep, "thresholds": {"fixed": fixed, "tuned": [0.3]}}))
        assert (compare.run_row(run).get("tuned/macro") == 0.5) is (err == "")
        assert capsys.readouterr().err == err


def test_compare_groups_seeds_whose_checkpoints_were_saved_in_other_folders(tmp_path):
    """--checkpoint.dirpath says where files go, not what the run did: no column of its own, no split group."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}
    runs = []
    for seed in (42, 1):
        run = fake_run(tmp_path / f"s{seed}", 1e-4, seed, val, t)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["checkpoint"] = {"dirpath": str(tmp_path / f"ckpts_{seed}"), "monitor": "val/f1_micro"}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        runs.append(run)
    header, body = compare.table(runs)
    assert "checkpoint.dirpath" not in header and len(body) == 1 and body[0][header.index("n")] == "2"


def test_compare_of_a_sweep_folder_says_which_finished_trials_are_not_there(tmp_path, capsys):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "version_0", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5})
    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    moved = tmp_path / "version_1"  # a finished trial's folder, moved away since
    (sweep_dir / "summary.json").write_text(json.dumps({"runs": [{"state": "complete", "run": str(run)},
                                                                 {"state": "pruned", "run": str(moved)}]}))  # fmt: skip
    assert compare.expand([sweep_dir]) == [run]  # was one seed less in the group without a word
    assert capsys.readouterr().err == (f"note: {sweep_dir / 'summary.json'}: 1 finished trial(s) are left out, their run "
                                       f"folders are not there (first: {moved}); give the trials' run folders where they are now\n")  # fmt: skip


def test_compare_never_writes_its_table_over_a_runs_files(tmp_path, capsys):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "runs" / "version_0", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5})
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for flag, name in (("--csv", "config.yaml"), ("--md", "test_report.json"), ("--csv", "hparams.yaml"),
                       ("--md", "checkpoints/last.ckpt")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            compare.main([str(tmp_path / "runs"), flag, str(run / name)])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: {flag} {run / name} is a file of the runs compared, which the table would replace; write it elsewhere\n"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    with pytest.raises(SystemExit):
        compare.main([str(run), "--md", str(tmp_path / "t"), "--csv", str(tmp_path / "t")])
    assert capsys.readouterr().err == f"error: --md and --csv both name {tmp_path / 't'}; give each its own file\n"
    compare.main([str(run), "--md", str(run / "table.md")])  # a new file beside the run's own: fine
    assert (run / "table.md").read_text() == capsys.readouterr().out


def test_compare_refuses_an_empty_folder_and_a_broken_sweep_summary(tmp_path):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "runs" / "version_0", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5})
    (tmp_path / "empty").mkdir()
    with pytest.raises(GoemoError, match=f"^{re.escape(str(tmp_path / 'empty'))}: holds no run folders"):
        compare.expand([run, tmp_path / "empty"])  # was left out without a word
    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    for text in ("{", '{"runs": [{"state": "complete"}]}', "[1]"):
        (sweep_dir / "summary.json").write_text(text)
        with pytest.raises(GoemoError, match="summary.json: not a sweep summary goemo wrote"):
            compare.expand([sweep_dir])
    moved = str(tmp_path / "gone" / "version_3")  # the trials' folders were moved after the sweep
    (sweep_dir / "summary.json").write_text(json.dumps({"runs": [{"state": "complete", "run": moved}]}))
    with pytest.raises(GoemoError, match=f"none of the trials' run folders it names is there \\(first: {re.escape(moved)}\\)"):
        compare.expand([sweep_dir])  # was "no runs to compare", not saying why
    (sweep_dir / "summary.json").write_text(json.dumps({"runs": [{"state": "complete", "run": str(run)}]}))
    assert compare.expand([sweep_dir]) == [run]


def test_compare_of_a_sweep_folder_leaves_out_its_running_and_waiting_trials(tmp_path, capsys):
    """A summary written while other workers run: a running trial's folder is half-trained, and a waiting retry
    names its dead trial's folder."""
    runs = {}
    for state in ("complete", "pruned", "running", "waiting", "fail"):
        runs[state] = tmp_path / state
        runs[state].mkdir()
        (runs[state] / "config.yaml").write_text("seed_everything: 1\n")
    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "summary.json").write_text(json.dumps({"runs": [{"state": k, "run": str(v)} for k, v in runs.items()]}))
    assert compare.expand([sweep_dir]) == [runs["complete"], runs["pruned"]]
    assert capsys.readouterr().err == (f"note: {sweep_dir / 'summary.json'}: 2 trial(s) still running or waiting when it was written are "
                                       "left out (their runs are not trained to the end); compare again when the sweep's last "
                                       "worker has ended (it rewrites the summary)\n")  # fmt: skip


def test_compare_says_when_a_sweep_summary_cannot_be_read(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweeps" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "summary.json").write_text("{}")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads any file: a chmod would not stop this test
    with pytest.raises(GoemoError, match=r"summary\.json: cannot read it \(Permission denied\); check its permissions$"):
        compare.expand([sweep_dir])


def test_compare_command_writes_markdown_and_csv(tmp_path, capsys):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    fake_run(tmp_path / "runs" / "version_0", 1e-4, 42, val, {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5})
    compare.main([str(tmp_path / "runs"), "--md", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")])
    assert capsys.readouterr().out == (tmp_path / "t.md").read_text() and (tmp_path / "t.csv").is_file()
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such run folder\n"
    with pytest.raises(SystemExit):  # a folder where a file goes: one line, before any run is read
        compare.main([str(tmp_path / "nope"), "--csv", str(tmp_path)])
    err = capsys.readouterr().err
    assert err == f"error: --csv {tmp_path}: is a folder; give a file name (e.g. {tmp_path / 'results.csv'})\n"


def test_compare_groups_a_seed_sweeps_trials(tmp_path):
    # goemo.sweep --seeds: each trial's config names its own trial in the study's report callback
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}
    runs = [fake_run(tmp_path / f"version_{i}", 1e-4, seed, val, t) for i, seed in enumerate((42, 1))]
    for i, run in enumerate(runs):
        config = yaml.safe_load((run / "config.yaml").read_text())
        report = {"class_path": "goemo.sweep.OptunaReport", "init_args": {"trial": i}}
        config["trainer"]["callbacks"] = [{"class_path": "goemo.reliability.Interrupts"}, report]
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    header, body = compare.table(runs)
    assert header[1] == "seed" and len(body) == 1 and body[0][1:3] == ["42, 1", "2"]
    config = yaml.safe_load((runs[1] / "config.yaml").read_text())
    config["trainer"]["callbacks"][0] = {"class_path": "goemo.reliability.StopOnNonFiniteLoss"}  # a real difference
    (runs[1] / "config.yaml").write_text(yaml.safe_dump(config))
    header, body = compare.table(runs)
    assert header[1] == "trainer.callbacks" and len(body) == 2 and "OptunaReport" not in body[0][1]


def test_compare_groups_runs_that_name_one_teacher_two_ways_or_have_no_teacher(tmp_path):
    """A shipped teacher named by `pkg:` or by the path of a copy is one recipe; with no teacher, teacher_weight did
    nothing and does not split the runs. Another teacher file does."""
    import shutil

    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}
    shipped = min((REPO / "goemo" / "teachers").glob("*.npz"))
    copy = tmp_path / "copy.npz"
    shutil.copyfile(shipped, copy)
    other = tmp_path / "other.npz"
    other.write_bytes(shipped.read_bytes()[:-1] + b"x")  # the same size, other bytes

    def run(name, seed, teacher, weight):
        folder = fake_run(tmp_path / name, 1e-4, seed, val, t)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["model"].update(teacher=teacher, teacher_weight=weight)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        return folder

    pkg = f"pkg:goemo/teachers/{shipped.name}"
    header, body = compare.table([run("a", 42, pkg, 0.75), run("b", 1, str(copy), 0.75)])
    assert header[1] == "seed" and len(body) == 1 and body[0][1:3] == ["42, 1", "2"]
    header, body = compare.table([run("c", 42, None, 0.5), run("d", 1, None, 0.75)])
    assert header[1] == "seed" and len(body) == 1
    header, body = compare.table([run("e", 42, pkg, 0.75), run("f", 1, str(other), 0.75)])
    assert header[1] == "model.teacher" and [row[1] for row in body] == [pkg, str(other)]
    header, body = compare.table([run("g", 42, pkg, 0.5), run("h", 1, str(copy), 0.75)])  # a teacher's weight does
    assert header[1] == "model.teacher_weight" and [row[1] for row in body] == ["0.5", "0.75"]


@pytest.mark.parametrize("key, then, other", [("threshold_shrink", 0.0, 10.0), ("lr_schedule", "linear", "constant"),
                                             ("teacher_temperature", 1.0, 2.0), ("token_cutoff", 0.0, 0.1)])
def test_compare_takes_a_run_from_before_a_setting_as_what_it_did(tmp_path, key, then, other):
    """model.threshold_shrink, lr_schedule, teacher_temperature, token_cutoff came later: a run without one did what
    `then` does."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}

    def run(name, seed, value):
        folder = fake_run(tmp_path / name, 1e-4, seed, val, t)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["model"].pop(key, None)
        if value is not None:
            config["model"][key] = value
        if key == "teacher_temperature":  # a temperature tempers a teacher: without one it splits nothing
            config["model"]["teacher"] = "t.npz"
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        return folder

    header, body = compare.table([run("a", 42, None), run("b", 1, then)])
    assert header[1] == "seed" and len(body) == 1
    header, body = compare.table([run("c", 42, None), run("d", 1, other)])
    assert header[1] == f"model.{key}" and [row[1] for row in body] == [str(then), str(other)]


# The options of the model and data module when goemo.compare was written (commit 3d04228); weight_averaging came later.
FIRST_OPTIONS = {
    "model": {"model_name_or_path", "label_names", "pooling", "learning_rate", "head_learning_rate", "weight_decay",
              "warmup_ratio", "threshold", "pretrained", "loss", "focal_gamma", "focal_alpha", "pos_weight_max",
              "freeze_embeddings", "checkpoint_tokens", "attention_dropout", "fast_dropout", "compile"},
    "data": {"data_dir", "tokenizer_name", "hub_dataset", "hub_config", "max_length", "train_batch_size",
             "eval_batch_size", "group_by_length", "num_workers", "cache_dir", "predict_file", "taxonomy"},
    "weight_averaging": set(),
}  # fmt: skip
# Where the runs from before an option did something else than its default does now.
OLD_BEHAVIOUR = {"model.threshold_resamples": 0}  # thresholds tuned on the validation rows themselves, before bagging


@pytest.mark.parametrize("section", ["model", "data", "weight_averaging"])
def test_compare_knows_what_runs_did_before_each_later_option(section):
    """An option added since is missing from older runs' configs: compare.BEFORE must read it as what those runs did
    (its default, unless OLD_BEHAVIOUR says otherwise), or a new run of an unchanged recipe splits from the old ones."""
    import inspect

    from goemo.averaging import EpochAveraging
    from goemo.data import GoEmotionsDataModule
    from goemo.model import EmotionClassifier

    cls = {"model": EmotionClassifier, "data": GoEmotionsDataModule, "weight_averaging": EpochAveraging}[section]
    params = inspect.signature(cls.__init__).parameters
    later = {f"{section}.{name}" for name in params if name != "self"} - {f"{section}.{n}" for n in FIRST_OPTIONS[section]}
    expected = {key: OLD_BEHAVIOUR.get(key, params[key.split(".", 1)[1]].default) for key in later}
    given = {k: v for k, v in compare.BEFORE.items() if k.startswith(f"{section}.") and k != "model.pretrained"}
    assert given == expected


def test_compare_groups_a_run_from_before_weight_averaging_with_one_that_does_not_average(tmp_path):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}
    old, new = fake_run(tmp_path / "a", 1e-4, 42, val, t), fake_run(tmp_path / "b", 1e-4, 1, val, t)
    config = yaml.safe_load((new / "config.yaml").read_text())
    config["weight_averaging"] = {"start_epoch": None, "updates_per_epoch": 1}
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    header, body = compare.table([old, new])
    assert header[1] == "seed" and len(body) == 1


def test_compare_groups_runs_without_a_teacher_from_before_and_after_its_options(tmp_path):
    """A run from before model.teacher, one with teacher null from before teacher_temperature, and one of today with
    neither teacher nor temperature are one recipe: one row, no teacher column."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}

    def run(name, seed, model_keys):
        folder = fake_run(tmp_path / name, 1e-4, seed, val, t)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        for key in ("teacher", "teacher_weight", "teacher_temperature"):
            config["model"].pop(key, None)
        config["model"].update(model_keys)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        return folder

    runs = [run("before_teacher", 1, {}), run("before_temperature", 2, {"teacher": None, "teacher_weight": 0.5}),
            run("now", 3, {"teacher": None, "teacher_weight": 0.5, "teacher_temperature": 1.0})]  # fmt: skip
    header, body = compare.table(runs)
    assert header[1] == "seed" and len(body) == 1 and not any("teacher" in h for h in header)


def test_compare_groups_a_resumed_fit_with_its_seeds(tmp_path):
    """A resumed fit rewrites its config.yaml with ckpt_path and model.pretrained false (the checkpoint holds the
    weights): the same recipe as a fit that ran in one go."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}
    whole, resumed = fake_run(tmp_path / "a", 1e-4, 7, val, t), fake_run(tmp_path / "b", 1e-4, 1, val, t)
    for folder, pretrained, ckpt in ((whole, True, None), (resumed, False, "lightning_logs/version_0/checkpoints/last.ckpt")):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["model"]["pretrained"], config["ckpt_path"] = pretrained, ckpt
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    header, body = compare.table([whole, resumed])
    assert header[1] == "seed" and len(body) == 1 and body[0][1:3] == ["7, 1", "2"]
    config = yaml.safe_load((resumed / "config.yaml").read_text())
    config["ckpt_path"] = None  # a fresh fit with random encoder weights: another recipe
    (resumed / "config.yaml").write_text(yaml.safe_dump(config))
    header, body = compare.table([whole, resumed])
    assert header[1] == "model.pretrained" and [row[1] for row in body] == ["True", "False"]
    # A fit from random weights, resumed: its config.yaml reads as the pretrained one's, its checkpoints say otherwise.
    config["ckpt_path"] = "lightning_logs/version_0/checkpoints/last.ckpt"
    (resumed / "config.yaml").write_text(yaml.safe_dump(config))
    best = resumed / "checkpoints" / "epoch01-step21.ckpt"
    torch.save({**torch.load(best), "encoder_start": "random"}, best)
    header, body = compare.table([whole, resumed])
    assert header[1] == "model.pretrained" and [row[1] for row in body] == ["True", "False"]
    torch.save({**torch.load(best), "encoder_start": "pretrained"}, best)
    assert len(compare.table([whole, resumed])[1]) == 1
    config["model"].pop("pretrained")  # a run from before the setting: the pretrained encoder, as goemo always did
    (resumed / "config.yaml").write_text(yaml.safe_dump(config))
    assert len(compare.table([whole, resumed])[1]) == 1


def test_compare_counts_a_run_named_twice_once(tmp_path):
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.6, "tuned_macro": 0.5}
    a = fake_run(tmp_path / "runs" / "version_0", 1e-4, 42, val, t)
    b = fake_run(tmp_path / "runs" / "version_1", 1e-4, 1, val, t)
    assert compare.expand([a, tmp_path / "runs", a]) == [a, b]
    header, body = compare.table(compare.expand([a, tmp_path / "runs" / "version_0" / "."]))
    assert len(body) == 1 and body[0][header.index("n")] == "1"  # not a seed group of one run


def test_compare_keeps_a_rerun_of_one_seed_out_of_its_seed_group(tmp_path, capsys):
    # A rerun (or a sweep trial and its retry) has the config and seed of the first: not a second seed.
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    t = lambda x: {"fixed_micro": 0.6, "fixed_macro": 0.5, "tuned_micro": 0.62, "tuned_macro": x}  # noqa: E731
    seeds_and_scores = ((42, 0.40), (1, 0.50), (42, 0.54))
    runs = [fake_run(tmp_path / f"version_{i}", 1e-4, seed, val, t(x)) for i, (seed, x) in enumerate(seeds_and_scores)]
    header, body = compare.table(runs)
    seed, n, tuned = header.index("seed"), header.index("n"), header.index("test macro-F1 tuned")
    assert [(row[seed], row[n]) for row in body] == [("42, 1", "2"), ("42", "1")]
    assert body[0][tuned] == f"0.450 ± {np.std([0.40, 0.50], ddof=1):.3f}" and body[1][tuned] == "0.540 [0.400, 0.600]"
    assert capsys.readouterr().err == (f"note: {runs[2]} has the config and seed (42) of {runs[0]}: a row of its own, "
                                       "not one more seed of its group\n")  # fmt: skip


# -- ensembles ------------------------------------------------------------------------------------------------------
class FakeMember:
    """A member whose probabilities for the i-th text are row i of a fixed array."""

    def __init__(self, probs: np.ndarray, names=("a", "b")) -> None:
        self.probs, self.label_names = probs, list(names)
        self.model = type("M", (), {"hparams": type("H", (), {"threshold": 0.5, "threshold_resamples": 0})()})()

    def predict_proba(self, texts) -> np.ndarray:
        return self.probs[[int(t) for t in texts]]


def test_ensemble_averages_and_tunes_on_the_averaged_validation(monkeypatch):
    # binary fractions, so the float32 means are exact
    p1 = np.array([[1.0, 0.125], [0.25, 0.75], [0.5, 0.5], [0.125, 0.25]], dtype=np.float32)
    p2 = np.array([[0.5, 0.125], [0.25, 0.5], [0.25, 0.5], [0.125, 0.0]], dtype=np.float32)
    targets = np.array([[1, 0], [0, 1], [0, 1], [0, 0]], dtype=np.uint8)
    ens = ensemble.Ensemble([FakeMember(p1), FakeMember(p2)])
    texts = ["0", "1", "2", "3"]
    avg = ens.predict_proba(texts)
    np.testing.assert_array_equal(avg, [[0.75, 0.125], [0.25, 0.625], [0.375, 0.5], [0.125, 0.125]])
    monkeypatch.setattr(ensemble, "splits_of", lambda m: {"validation": {"text": texts, "targets": targets}, "test": {"text": texts, "targets": targets}})
    ens.tune()
    # by hand (p > t): label a is positive only in row 0 (0.75), its highest negative is 0.375 -> the lowest grid value
    # at or above it, 0.38; label b: positives 0.625 and 0.5, negatives 0.125 -> 0.13
    np.testing.assert_allclose(ens.thresholds, [0.38, 0.13], atol=1e-6)
    np.testing.assert_allclose(ens.thresholds, tune_thresholds(avg, targets).numpy())
    assert [r["labels"] for r in ens.predict(texts)] == [["a"], ["b"], ["b"], []]
    ens.tune(resamples=5)  # averaged over bootstrap resamples of the averaged validation rows
    np.testing.assert_array_equal(ens.thresholds, tune_thresholds(avg, targets, resamples=5).numpy())
    assert ens.resamples == 5 and not np.allclose(ens.thresholds, [0.38, 0.13])
    ens.tune(resamples=0, shrink=4)  # pulled toward the one threshold best for both: 0.38 (macro-F1 1), 1 and 2 positives
    np.testing.assert_allclose(ens.thresholds, [0.38, 0.13 / 3 + 0.38 * 2 / 3], atol=1e-6)
    assert ens.shrink == 4
    ens.members[0].model.hparams.threshold_shrink = 4.0  # unset: the first member's model.threshold_shrink
    ens.tune(resamples=0)
    np.testing.assert_allclose(ens.thresholds, [0.38, 0.13 / 3 + 0.38 * 2 / 3], atol=1e-6)
    ens.tune(resamples=0, shrink=0)
    np.testing.assert_allclose(ens.thresholds, [0.38, 0.13], atol=1e-6)


def test_ensemble_tunes_on_validation_only_with_the_members_fallback(monkeypatch, capsys):
    val_p = np.array([[0.9, 0.2], [0.1, 0.3]], dtype=np.float32)  # texts "0", "1": validation
    test_p = np.array([[0.4, 0.2], [0.6, 0.3]], dtype=np.float32)  # texts "2", "3": test
    probs = np.concatenate([val_p, test_p])
    first = FakeMember(probs)
    first.model.hparams.threshold = 0.3  # the run's model.threshold: the fallback for a label with no positive
    ens = ensemble.Ensemble([first, FakeMember(probs)])
    val_y = np.array([[1, 0], [0, 0]], np.uint8)  # label b has no validation positive
    test_y = np.array([[0, 1], [1, 0]], np.uint8)
    monkeypatch.setattr(ensemble, "splits_of", lambda m: {"validation": {"text": ["0", "1"], "targets": val_y},
                                                          "test": {"text": ["2", "3"], "targets": test_y}})
    data = ens.tune()  # the test rows would give a 0.40 and b 0.20
    np.testing.assert_allclose(ens.thresholds, [0.10, 0.30], atol=1e-6)  # a: 0.9 vs 0.1 on validation; b: fallback
    assert capsys.readouterr().err == ("note: the runs' model.threshold differ: the ensemble is tuned with the first "
                                       "run's (threshold 0.3)\n")  # fmt: skip
    np.testing.assert_array_equal(data["validation_probs"], val_p)


def test_ensemble_refuses_a_member_named_twice_and_bad_resamples(tmp_path):
    from goemo import distill, load

    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    test = {f"{k}_{a}": 0.5 for k in ("fixed", "tuned") for a in ("micro", "macro")}
    run = fake_run(tmp_path / "version_0", 1e-4, 42, val, test)
    twice = [str(run), f"{run}/"]
    with pytest.raises(GoemoError, match=r"are the same checkpoint \(.*\.ckpt\); give each member once"):
        load(twice)
    with pytest.raises(GoemoError, match="same checkpoint"):
        distill.teacher_probs(twice)
    with pytest.raises(GoemoError, match="--resamples must be at least 1"):
        ensemble.build([str(run), str(run)], tmp_path / "ens", resamples=0)
    with pytest.raises(GoemoError, match=r"--threshold-shrink must be a number >= 0 \(0: none\), got -1"):
        ensemble.build([str(run), str(run)], tmp_path / "ens", threshold_shrink=-1)
    with pytest.raises(GoemoError, match=r"^--threshold-resamples must be >= 0 \(0: tune once on the validation rows\), got -1$"):
        ensemble.build([str(run), str(run)], tmp_path / "ens", threshold_resamples=-1)  # before loading and predicting
    assert not (tmp_path / "ens").exists()  # refused before any folder is made
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(GoemoError, match=f"--out {run}: a run's folder; give the ensemble a folder of its own"):
        ensemble.build([str(run), str(run)], run)  # its test report would become the ensemble's, load(run) the ensemble
    assert sorted(p.name for p in run.iterdir()) == before


def test_an_ensembles_folder_is_named_for_what_it_is(tmp_path):
    from goemo import load
    from goemo.runs import resolve_checkpoint

    ens = tmp_path / "ens"
    ens.mkdir()
    spec = {"members": [str(tmp_path / "gone")], "thresholds": [0.5], "labels": ["a"]}
    (ens / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(GoemoError, match=f"ensemble {ens}: its member {tmp_path / 'gone'} is gone; restore it"):
        load(ens)
    not_one = f"{ens / 'ensemble.json'}: not an ensemble file (members, labels and one threshold per label); build the ensemble again"
    for broken in ({}, [], {**spec, "members": []}, {**spec, "thresholds": [0.5, 0.5]}, {**spec, "thresholds": ["x"]}):
        (ens / "ensemble.json").write_text(json.dumps(broken))
        with pytest.raises(GoemoError) as e:
            load(ens)
        assert str(e.value) == not_one
    (ens / "ensemble.json").write_text("{")
    with pytest.raises(GoemoError, match=r"ensemble.json: cannot read the ensemble file \(Expecting property name"):
        load(ens)
    with pytest.raises(GoemoError, match=f"{ens}: an ensemble's folder, not a run: its test report is .*report.md"):
        resolve_checkpoint(str(ens))  # what test/predict --ckpt_path ens runs into
    # a member rewritten in place since the ensemble was built (a resumed fit's last.ckpt): refused, not mixed
    member = tmp_path / "last.ckpt"
    member.write_bytes(b"weights")
    size, mtime = member.stat().st_size, member.stat().st_mtime_ns
    spec = {**spec, "members": [str(member)], "stamps": [[size, mtime - 1]]}
    (ens / "ensemble.json").write_text(json.dumps(spec))
    with pytest.raises(GoemoError, match=f"ensemble {ens}: its member {member} changed since the ensemble was built"):
        load(ens)
    assert ensemble.check_members(ens, {**spec, "stamps": [[size, mtime]]}) == [str(member)]  # unchanged: passes
    (ens / "ensemble.json").write_text(json.dumps({**spec, "stamps": [["x", 1]]}))
    with pytest.raises(GoemoError) as e:
        load(ens)
    assert str(e.value) == not_one


def test_ensemble_refuses_members_trained_on_other_data(monkeypatch):
    """The report is scored on the first member's test split, which a member fitted on other data may have learned."""
    splits = {"d1": (["0", "1"], ["2", "3"]), "copy_of_d1": (["0", "1"], ["2", "3"]), "d2": (["0", "1"], ["2", "9"])}
    y = np.array([[1, 0], [0, 1]], np.uint8)

    def splits_of(member):
        val, test = splits[member.data_hparams["data_dir"]]
        return {"validation": {"text": val, "targets": y}, "test": {"text": test, "targets": y}}

    monkeypatch.setattr(ensemble, "splits_of", splits_of)
    members = []
    for data_dir in ("d1", "copy_of_d1", "d2"):
        member = FakeMember(np.full((10, 2), 0.5, np.float32))
        member.data_hparams = {"data_dir": data_dir, "hub_dataset": "x", "taxonomy": "original"}
        members.append(member)
    ensemble.Ensemble(members[:2]).tune()  # other settings, the same rows: fine
    with pytest.raises(GoemoError) as e:
        ensemble.Ensemble([members[0], members[2]]).tune()
    assert str(e.value) == ("ensemble members were trained on different data (data_dir d1 / d2: their validation and test "
                            "splits differ); combine runs of one dataset")  # fmt: skip


def test_ensemble_refuses_two_checkpoints_of_one_model(tmp_path):
    """A run's best checkpoint and the last.ckpt saved at its step (or a copy) hold one model: it would count twice.
    Other weights at one step (the seeds of one recipe, copied into one folder) are other members."""
    from goemo import load

    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    run = fake_run(tmp_path / "version_0", 1e-4, 42, val, {f"{k}_{a}": 0.5 for k in ("fixed", "tuned") for a in ("micro", "macro")})
    best, last = run / "checkpoints" / "epoch01-step21.ckpt", run / "checkpoints" / "last.ckpt"
    for path in (best, last):
        torch.save({**torch.load(path, weights_only=True), "state_dict": {"head.weight": torch.ones(2, 3)}}, path)
    with pytest.raises(GoemoError, match=r"last.ckpt and .*version_0 hold the same weights \(step 21\); give each member once"):
        load([str(run), str(last)])
    members = tmp_path / "members"
    members.mkdir()
    for seed, value in ((42, 1.0), (1, 2.0)):  # two seeds' best checkpoints at one step, side by side
        torch.save({"global_step": 21, "epoch": 1, "state_dict": {"head.weight": torch.full((2, 3), value)}}, members / f"seed{seed}.ckpt")
    ensemble.check_distinct([str(members / "seed42.ckpt"), str(members / "seed1.ckpt")])  # was refused
    torch.save({**torch.load(last, weights_only=True), "global_step": 30}, last)  # trained on past its best
    ensemble.check_distinct([str(run), str(last)])


class Loaded(Exception):
    """Raised where goemo.ensemble.build would load its members: what it checked before that is done."""


def two_runs_that_never_load(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """Two fake runs (seeds 42 and 1) as ensemble members; loading them raises Loaded."""
    val = {"val/f1_micro": 0.6, "val/f1_macro": 0.5, "val/exact_match": 0.4}
    test = {f"{k}_{a}": 0.5 for k in ("fixed", "tuned") for a in ("micro", "macro")}

    def load_ensemble(members):
        raise Loaded

    monkeypatch.setattr(ensemble, "load_ensemble", load_ensemble)
    return fake_run(tmp_path / "a", 1e-4, 42, val, test), fake_run(tmp_path / "b", 1e-4, 1, val, test)


def test_ensemble_notes_an_out_folder_of_another_ensemble_and_checks_its_members_first(tmp_path, monkeypatch, capsys):
    a, b = two_runs_that_never_load(tmp_path, monkeypatch)
    with pytest.raises(GoemoError, match="^an ensemble needs at least 2 runs, got 1$"):
        ensemble.build([str(a)], tmp_path / "one")
    assert not (tmp_path / "one").exists()  # was left behind, empty
    out = tmp_path / "ens"
    out.mkdir()
    members = [str(a / "checkpoints" / "epoch01-step21.ckpt"), str(tmp_path / "gone.ckpt")]
    (out / "ensemble.json").write_text(json.dumps({"members": members, "thresholds": [0.5], "labels": ["a"]}))
    with pytest.raises(Loaded):
        ensemble.build([str(a), str(b)], out)  # was replaced without a word
    assert capsys.readouterr().err == (f"note: --out {out} held an ensemble of other checkpoints ({', '.join(members)}); "
                                       "this one replaces it\n")  # fmt: skip
    (out / "ensemble.json").write_text(json.dumps({"members": [str((r / "checkpoints/epoch01-step21.ckpt").resolve()) for r in (a, b)],
                                                   "thresholds": [0.5], "labels": ["a"]}))  # fmt: skip
    with pytest.raises(Loaded):
        ensemble.build([str(b), str(a)], out)  # the same members again (a rerun): no note
    assert capsys.readouterr().err == ""


def test_ensemble_refuses_an_out_folder_holding_another_report(tmp_path, monkeypatch):
    """`--out .` beside another tool's test_report.json replaced it; an ensemble's cut short is built again."""
    a, b = two_runs_that_never_load(tmp_path, monkeypatch)
    out = tmp_path / "reports"
    out.mkdir()
    (out / "test_report.json").write_text('{"micro": {}}')
    with pytest.raises(GoemoError, match=f"^--out {out}: holds a test_report.json of no ensemble; give the ensemble a folder of its own"):
        ensemble.build([str(a), str(b)], out)
    assert (out / "test_report.json").read_text() == '{"micro": {}}'
    (out / "test_report.json").write_text('{"members": ["a", "b"]}')  # an ensemble's, cut short before ensemble.json
    with pytest.raises(Loaded):
        ensemble.build([str(a), str(b)], out)


def test_ensemble_report_scores_at_the_members_threshold_and_main_passes_its_options_on(tmp_path, monkeypatch):
    a, b = two_runs_that_never_load(tmp_path, monkeypatch)
    probs = np.array([[0.4, 0.2], [0.2, 0.35], [0.1, 0.1], [0.6, 0.45]], np.float32)
    members = [FakeMember(probs), FakeMember(probs)]
    for m in members:
        m.model.hparams.threshold = 0.3  # fitted with --model.threshold 0.3
    y = np.array([[1, 0], [0, 1], [0, 0], [1, 1]], np.uint8)
    monkeypatch.setattr(ensemble, "load_ensemble", lambda paths: ensemble.Ensemble(members))
    monkeypatch.setattr(ensemble, "splits_of", lambda m: {s: {"text": ["0", "1", "2", "3"], "targets": y} for s in ("validation", "test")})
    rep = ensemble.build([str(a), str(b)], tmp_path / "ens", resamples=10)
    # at 0.3 every positive (0.4, 0.6; 0.35, 0.45) is found and nothing else; at 0.5 only 0.6 would be
    assert rep["thresholds"]["fixed"] == 0.3 and rep["fixed"]["micro"]["f1"] == 1.0
    given = []
    monkeypatch.setattr(ensemble, "build", lambda *args: given.append(args) or {})
    ensemble.main(["r1", "r2", "--out", "e", "--resamples", "9", "--threshold-resamples", "7", "--threshold-shrink", "4"])
    assert given == [(["r1", "r2"], Path("e"), 9, 7, 4.0)]


def test_ensemble_members_data_that_is_not_here_is_noted(monkeypatch, capsys):
    """A member fitted on a copy of the data on another machine: nothing to compare with, not a reason to refuse."""
    y = np.array([[1, 0], [0, 1]], np.uint8)

    def splits_of(member):
        if member.data_hparams["data_dir"] != "d1":
            raise GoemoError("data_dir '/scratch/goemotions': no such folder")
        return {"validation": {"text": ["0", "1"], "targets": y}, "test": {"text": ["2", "3"], "targets": y}}

    monkeypatch.setattr(ensemble, "splits_of", splits_of)
    members = [FakeMember(np.full((4, 2), 0.5, np.float32)) for _ in range(2)]
    members[0].data_hparams, members[1].data_hparams = {"data_dir": "d1"}, {"data_dir": "/scratch/goemotions"}
    ensemble.Ensemble(members).tune()
    assert capsys.readouterr().err == ("note: an ensemble member was trained on data that cannot be read here (data_dir "
                                       "'/scratch/goemotions': no such folder); it is taken to be the first member's\n")  # fmt: skip


@pytest.mark.parametrize("signum", [None, 15])
def test_an_interrupted_ensemble_says_so_in_one_line(monkeypatch, capsys, signum):
    import os
    import signal
    import time

    def build(*args):
        if signum is None:
            raise KeyboardInterrupt
        try:  # as loading a checkpoint does: any Exception there is "not a loadable checkpoint"
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
        except Exception:  # noqa: BLE001
            raise GoemoError("x.ckpt: not a loadable checkpoint") from None

    monkeypatch.setattr(ensemble, "build", build)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a new process starts (other tests' commands set theirs)
    try:
        with pytest.raises(SystemExit) as e:
            ensemble.main(["a", "b", "--out", "ens"])
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back: main may be called from Python
    finally:
        signal.signal(signal.SIGTERM, previous)
    what = "Ctrl-C" if signum is None else "SIGTERM"
    assert e.value.code == (130 if signum is None else 143)  # SIGTERM was a silent end; Ctrl-C a traceback
    assert capsys.readouterr().err == (f"error: interrupted by {what}: ens holds no new ensemble (ensemble.json is "
                                       "written last); run the command again\n")  # fmt: skip


def test_a_checkpoint_from_before_an_option_loads_with_what_the_run_did_then(tiny_run, tmp_path):
    """goemo.ensemble tunes with the first member's threshold_resamples: a run from before the option tuned without
    resamples (0), not with today's default (100)."""
    from goemo.classifier import load_model
    from goemo.runs import best_checkpoint

    ckpt = torch.load(best_checkpoint(tiny_run / "lightning_logs/version_0"), weights_only=False)
    assert ckpt["hyper_parameters"]["threshold_resamples"] == 100  # the tiny run's, today's default
    del ckpt["hyper_parameters"]["threshold_resamples"]  # the one BEFORE value that is not today's default
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_model(tmp_path / "old.ckpt")[0].hparams.threshold_resamples == 0
    # and what a checkpoint holds is what it loads with, not the old defaults (0 resamples, no shrink)
    ckpt["hyper_parameters"].update(threshold_resamples=100, threshold_shrink=10.0)
    torch.save(ckpt, tmp_path / "new.ckpt")
    hp = load_model(tmp_path / "new.ckpt")[0].hparams
    assert (hp.threshold_resamples, hp.threshold_shrink) == (100, 10.0)


def test_ensemble_refuses_members_with_other_labels():
    with pytest.raises(GoemoError, match="ensemble members have different labels"):
        ensemble.Ensemble([FakeMember(np.zeros((1, 2))), FakeMember(np.zeros((1, 2)), names=("a", "c"))])


@pytest.mark.slow
def test_ensemble_command_and_load_agree(tiny_run, learned_run, tmp_path):
    from goemo import load

    runs = [str(tiny_run / "lightning_logs/version_0"), str(learned_run / "lightning_logs/version_0")]
    rep = ensemble.build(runs, tmp_path / "ens", resamples=50)
    assert (tmp_path / "ens/test_report.json").is_file() and rep["num_examples"] == 32
    test_texts = ensemble.splits_of(load(runs[0]))["test"]["text"]
    saved = np.load(tmp_path / "ens/test_probs.npy")
    np.testing.assert_allclose(load(tmp_path / "ens").predict_proba(test_texts), saved, atol=1e-6)  # the folder
    members = [load(r).predict_proba(test_texts) for r in runs]
    np.testing.assert_allclose(saved, np.mean(members, axis=0), atol=1e-6)  # the mean of the members
    fresh = load(runs)  # a list: thresholds tuned at the first predict, equal to the folder's
    fresh.predict(test_texts[:2])
    spec = json.loads((tmp_path / "ens/ensemble.json").read_text())
    np.testing.assert_allclose(fresh.thresholds, spec["thresholds"])
    from goemo.runs import best_checkpoint

    # the members' checkpoint files: a member resumed later (a new best checkpoint) is not silently swapped in
    assert spec["members"] == [str(best_checkpoint(Path(r)).resolve()) for r in runs]
    assert spec["stamps"] == [[Path(m).stat().st_size, Path(m).stat().st_mtime_ns] for m in spec["members"]]
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == [
        "ensemble.json", "test_probs.npy", "test_report.json", "test_report.md", "validation_probs.npy"]  # fmt: skip
    assert spec["threshold_resamples"] == load(runs[0]).model.hparams.threshold_resamples
    assert spec["threshold_shrink"] == load(runs[0]).model.hparams.threshold_shrink == 0


def test_ensemble_cv_tunes_with_the_runs_fallback_and_refuses_an_ensemble_folder(tmp_path, monkeypatch, capsys):
    import goemo.api
    from benchmarks import ensemble_cv

    # the tuning half has no positive: its threshold is the fallback, which decides the scoring half's one positive
    probs, targets = np.array([[0.1], [0.1], [0.4], [0.1]], dtype=np.float32), np.array([[0], [0], [1], [0]], dtype=np.uint8)
    halves = (np.array([0, 1]), np.array([2, 3]))
    assert ensemble_cv.heldout_macro(probs, targets, *halves, fallback=0.3) == 1.0
    assert ensemble_cv.heldout_macro(probs, targets, *halves) == 0.0  # 0.5 by default
    assert ensemble_cv.cross_validate([probs], targets, repeats=1, fallback=0.05)["halves"] == 2
    two = ensemble.Ensemble([FakeMember(np.zeros((1, 2))), FakeMember(np.zeros((1, 2)))])
    monkeypatch.setattr(goemo.api, "load", lambda runs, *a, **k: two)  # what an ensemble folder loads as
    with pytest.raises(SystemExit) as e:
        ensemble_cv.main([str(tmp_path / "ens"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'ens'}: an ensemble's folder; give its member runs (their average is scored too)\n"


def test_ensemble_cv_tunes_on_one_half_and_scores_the_other():
    from benchmarks.ensemble_cv import cross_validate, heldout_macro

    probs = np.array([[0.2, 0.9], [0.8, 0.1], [0.3, 0.6], [0.7, 0.4]], dtype=np.float32)
    targets = np.array([[0, 1], [1, 0], [0, 0], [1, 1]], dtype=np.uint8)
    first, second = np.array([0, 1]), np.array([2, 3])
    # by hand (p > t, ties -> the lowest grid value): tuned on rows 0-1, a at 0.20 and b at 0.10 -> rows 2-3 get one
    # false positive each, F1 2/3 and 2/3; tuned on rows 2-3, a at 0.30 (F1 1 on rows 0-1), b's only positive is below
    # its negative, so 0.01 (both predicted, F1 2/3)
    assert heldout_macro(probs, targets, first, second) == pytest.approx(2 / 3)
    assert heldout_macro(probs, targets, second, first) == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(0)
    p = rng.random((200, 3)).astype(np.float32)
    y = (rng.random((200, 3)) < 0.3).astype(np.uint8)
    same = cross_validate([p, p], y, repeats=3)  # identical members: the ensemble is each of them
    assert same["halves"] == 6 and same["gain"] == 0 and same["members"][0] == same["ensemble"] == same["members"][1]
    good = (0.6 * y + 0.4 * p).astype(np.float32)  # every positive above every negative
    other = cross_validate([good, 1 - good], y, repeats=3)  # averaged: about 0.5 everywhere, nothing ranked
    assert other["members"][0] == 1.0 and other["ensemble"] < 0.5 and other["gain"] < 0


def test_ensemble_cv_can_shrink_each_labels_threshold_toward_one_global_threshold():
    from benchmarks.ensemble_cv import cross_validate, heldout_macro

    probs = np.array([[0.9, 0.35], [0.6, 0.3], [0.2, 0.9], [0.1, 0.2]], dtype=np.float32)
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=np.uint8)
    rows = np.arange(4)
    assert heldout_macro(probs, targets, rows, rows, shrink=1e9) == 1.0  # all on the global threshold (0.35)
    rng = np.random.default_rng(0)
    p, y = rng.random((200, 3)).astype(np.float32), (rng.random((200, 3)) < 0.3).astype(np.uint8)
    assert cross_validate([p], y, repeats=1, shrink=1e-9)["members"] == cross_validate([p], y, repeats=1)["members"]
    assert cross_validate([p], y, repeats=1, shrink=10)["members"] != cross_validate([p], y, repeats=1)["members"]
    assert cross_validate([p], y, repeats=1, shrink=10)["shrink"] == 10


def test_ensemble_cv_compares_with_a_baseline_half_by_half():
    """The candidate's score minus the baseline's on each half: the spread a comparison of the two can lean on."""
    from benchmarks.ensemble_cv import cross_validate

    rng = np.random.default_rng(1)
    y = (rng.random((300, 3)) < 0.3).astype(np.uint8)
    good = np.clip(0.5 * y + 0.6 * rng.random((300, 3)), 0, 1).astype(np.float32)
    noisy = np.clip(0.3 * y + 0.8 * rng.random((300, 3)), 0, 1).astype(np.float32)
    alone = cross_validate([noisy], y, repeats=3)
    r = cross_validate([good], y, repeats=3, baseline=noisy)
    assert r["baseline"] == alone["members"][0] and r["baseline_per_half"] == [h[0] for h in alone["per_half"]]
    diff = np.array([h[0] for h in r["per_half"]]) - np.array(r["baseline_per_half"])
    assert r["vs_baseline"] == pytest.approx(diff.mean()) and r["vs_baseline_std"] == pytest.approx(diff.std())
    assert r["vs_baseline"] > 0 and r["vs_baseline_wins"] == 6 and r["halves"] == 6 and r["rows"] == 300
    assert cross_validate([good], y, repeats=3, baseline=good)["vs_baseline"] == 0.0
    ens = cross_validate([good, noisy], y, repeats=3, baseline=noisy)  # several runs: their ensemble against it
    assert ens["vs_baseline"] == pytest.approx(ens["ensemble"] - r["baseline"])


def test_ensemble_cv_command_errors_are_one_line(tmp_path, capsys):
    from benchmarks import ensemble_cv

    for argv, message in (
        ([str(tmp_path / "run"), "--repeats", "0"], "--repeats must be at least 1 and --threshold-resamples at least 0, got 0 and None"),
        ([str(tmp_path / "run"), "--shrink", "-1"], "--shrink must be a number >= 0 (0: none), got -1.0"),
        ([str(tmp_path / "nope"), "--out", str(tmp_path)], f"--ckpt_path '{tmp_path / 'nope'}': no such file or run folder"),
    ):
        with pytest.raises(SystemExit) as e:
            ensemble_cv.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.slow
def test_ensemble_cv_command_on_two_runs_and_on_one(tiny_run, learned_run, tmp_path, capsys):
    from benchmarks import ensemble_cv
    from goemo.runs import best_checkpoint

    runs = [str(tiny_run / "lightning_logs/version_0"), str(learned_run / "lightning_logs/version_0")]
    r = ensemble_cv.main([*runs, "--repeats", "2", "--out", str(tmp_path)])
    assert r["halves"] == 4 and len(r["members"]) == 2
    assert r["threshold_resamples"] == 100  # the runs' model.threshold_resamples, the default
    assert r["gain"] == pytest.approx(r["ensemble"] - np.mean(r["members"]))
    saved = json.loads(next(tmp_path.glob("ensemble-cv-*.json")).read_text())
    assert saved["runs"] == runs and saved["ensemble"] == r["ensemble"]
    out, err = capsys.readouterr()
    assert "| ensemble of 2 |" in out and "note:" not in err  # the runs tune alike

    # One run alone: its held-out score on the same halves as beside the other, and no ensemble rows.
    alone = ensemble_cv.main([runs[1], "--repeats", "2", "--out", str(tmp_path)])
    assert alone["members"] == [r["members"][1]] and alone["members_std"] == [r["members_std"][1]]
    out = capsys.readouterr().out
    assert f"| {runs[1]} | {r['members'][1]:.4f}" in out and "ensemble" not in out.split("\n", 1)[1]
    # Against a baseline run: the same halves, the paired difference, and which checkpoints were scored
    # (the learned run as the baseline: the tiny run labels every text alike, so its rows out of order would score alike)
    assert r["members"][1] - r["members"][0] > 0.2
    paired = ensemble_cv.main([runs[0], "--baseline", runs[1], "--repeats", "2", "--out", str(tmp_path / "b")])
    assert paired["baseline"] == r["members"][1] and paired["vs_baseline"] == pytest.approx(r["members"][0] - r["members"][1])
    out = capsys.readouterr().out
    assert f"| {runs[0]} minus the baseline (paired) | {paired['vs_baseline']:+.4f} ± " in out
    saved = json.loads(next((tmp_path / "b").glob("ensemble-cv-*.json")).read_text())
    assert saved["baseline_runs"] == [runs[1]] and saved["checkpoints"] == [str(best_checkpoint(Path(runs[0])))]

    # A run of other validation rows: the halves are positions, so it is refused (as a member and as a baseline)
    import shutil

    from tests.conftest import synthetic_rows, write_split, write_tiny_data

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(learned_run / "lightning_logs/version_0", elsewhere)
    data = write_tiny_data(tmp_path / "other-data")
    write_split(data / "dev.tsv", synthetic_rows(32, 9))
    moved = torch.load(best_checkpoint(elsewhere), weights_only=True)
    moved["datamodule_hyper_parameters"]["data_dir"] = str(data)
    torch.save(moved, best_checkpoint(elsewhere))
    for argv, who in (([runs[0], str(elsewhere)], str(elsewhere)), ([runs[0], "--baseline", str(elsewhere)], f"--baseline {elsewhere}")):
        with pytest.raises(SystemExit):
            ensemble_cv.main([*argv, "--repeats", "2", "--out", str(tmp_path)])
        assert capsys.readouterr().err.endswith(f"error: {who}: its validation rows differ from {runs[0]}'s; compare runs of one data set\n")

    # A run whose fallback threshold differs: tuned with the first run's here, which the command says.

    other = tmp_path / "other"
    shutil.copytree(learned_run / "lightning_logs/version_0", other)
    best = best_checkpoint(other)
    ckpt = torch.load(best, weights_only=True)
    ckpt["hyper_parameters"]["threshold"] = 0.3
    torch.save(ckpt, best)
    ensemble_cv.main([runs[0], str(other), "--repeats", "2", "--out", str(tmp_path)])
    assert capsys.readouterr().err == ("note: the runs' model.threshold differ: every run and the ensemble are tuned "
                                       "with the first run's (threshold 0.5)\n")
    # A run of model.threshold_shrink 10 first: --shrink defaults to its setting, and the note names it.
    ckpt["hyper_parameters"].update(threshold=0.5, threshold_shrink=10.0)
    torch.save(ckpt, best)
    pulled = ensemble_cv.main([str(other), runs[0], "--repeats", "2", "--out", str(tmp_path)])
    assert pulled["shrink"] == 10.0 and pulled["members"][0] == ensemble_cv.main(
        [str(other), "--repeats", "2", "--shrink", "10", "--out", str(tmp_path)])["members"][0]
    out, err = capsys.readouterr()
    assert "thresholds shrunk with K 10" in out
    assert err == ("note: the runs' model.threshold_shrink differ: every run and the ensemble are tuned with the first "
                   "run's (threshold_shrink 10.0)\n")


@pytest.mark.slow
@pytest.mark.parametrize("space", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_file_fits_the_minilm_config(space):
    sweep.check_space(sweep.read_space(space), REPO / "configs" / "minilm.yaml", [])


def test_a_storage_password_is_masked_and_flagged(tmp_path, capsys):
    import argparse

    # A server that is not there (or no driver): either way the study cannot open, and neither the error nor the note
    # prints the password; the note says where it belongs instead (trials get the URL in argv and config.yaml).
    a = argparse.Namespace(storage="postgresql://goemo:s3cret@127.0.0.1:1/study", heartbeat=0, sweep_dir=tmp_path)
    with pytest.raises(GoemoError, match=r"^--storage postgresql://goemo:\*\*\*@127\.0\.0\.1:1/study: cannot open") as e:
        sweep.storage_for(a)
    note = capsys.readouterr().err
    assert "s3cret" not in str(e.value) and "s3cret" not in note
    assert "holds a password" in note and "~/.pgpass or PGPASSWORD" in note
    a.storage = f"sqlite:///{tmp_path / 'db.sqlite'}"  # no password: no note
    assert sweep.storage_for(a)[0] == a.storage and capsys.readouterr().err == ""


def test_a_groups_cell_says_how_many_runs_it_averages_when_some_lack_the_figure():
    """A seed group where one run has no test report showed the others' mean ± std as if it covered all n."""
    from goemo.compare import fmt

    assert fmt([0.5, None, 0.7]) == "0.600 (of 2)" and fmt([0.5, None]) == "0.500 (of 1)" and fmt([None, None]) == "-"
    assert fmt([0.5, 0.7]) == f"0.600 ± {np.std([0.5, 0.7], ddof=1):.3f}" and fmt([0.5]) == "0.500"
    assert fmt([0.5], ci=[0.4, 0.6]) == "0.500 [0.400, 0.600]"
