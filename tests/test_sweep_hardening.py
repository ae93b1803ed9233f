"""goemo.sweep's edges: a second signal while a trial's fit saves, the summary of a sweep that stops early, space
values Optuna cannot keep apart, ranges it cannot draw from, and working folders whose paths look like URLs."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from goemo import sweep
from goemo.errors import GoemoError


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def no_space_check(monkeypatch) -> None:
    monkeypatch.setattr(sweep, "check_space", lambda space, config, extra: None)  # a CLI subprocess per probe


# -- Ctrl-C or SIGTERM twice ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_second_signal_while_the_fit_saves_still_queues_the_trials_values_again(tmp_path, monkeypatch, capsys, signame):
    """The first signal reaches the worker while it waits for the trial's fit; the second while the fit saves. The
    trial must still be marked interrupted and its values queued, or it counts as a dead worker's and never runs."""
    import optuna

    monkeypatch.chdir(tmp_path)
    no_space_check(monkeypatch)
    sig = getattr(signal, signame)

    class Fit:  # the trial's child process
        waits = 0

        def __init__(self, args, stdout, stderr, preexec_fn) -> None:
            pass

        def wait(self) -> int:
            Fit.waits += 1
            if Fit.waits == 1:
                raise KeyboardInterrupt  # Ctrl-C, or SIGTERM as main()'s handler raises it
            os.kill(os.getpid(), sig)  # again, while the fit saves its last.ckpt
            time.sleep(0.2)  # (Python runs a signal's handler between two of its instructions)
            return 1

        def terminate(self) -> None:
            pass

    monkeypatch.setattr(sweep.subprocess, "Popen", Fit)
    monkeypatch.setattr(sweep, "_SIGTERM_SEEN", [])
    command = ["--seeds", "42,1", "--heartbeat", "0"]
    real_run_trial, held = sweep.run_trial, []

    def run_trial(*args):  # what a third signal would meet while Optuna records the trial: still ignored
        value = real_run_trial(*args)
        held.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return value

    monkeypatch.setattr(sweep, "run_trial", run_trial)
    previous = signal.signal(signal.SIGTERM, sweep._sigterm)  # as sweep.main installs it
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((sweep.Interrupted, KeyboardInterrupt)) as e:  # the old code let the second one out
            sweep.run_sweep(sweep.parse_args(command))
        assert held == [(signal.SIG_IGN, signal.SIG_IGN)]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (sigint, sweep._sigterm)  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.type is sweep.Interrupted and str(e.value).startswith("trial 0 stopped (marked failed")
    assert "stopping trial 0 after its fit saves its last.ckpt (its log: lightning_logs/sweeps/seeds/trial_0.log)\n" in capsys.readouterr().err
    trial, again = optuna.load_study(study_name="seeds", storage=f"sqlite:///{tmp_path / 'lightning_logs/sweeps.db'}").trials
    assert trial.state.name == "FAIL" and trial.user_attrs == {"interrupted": True}
    assert again.state.name == "WAITING" and again.user_attrs == {"retry_of": 0}
    ran = []
    monkeypatch.setattr(sweep, "run_trial", lambda trial, a, space, url: ran.append(sweep.suggest(trial, space)) or 0.5)
    sweep.run_sweep(sweep.parse_args(command))  # the same command again: the interrupted values first, then the rest
    assert ran[0] == trial.params and sorted(p["seed_everything"] for p in ran) == [1, 42]


# -- the summary of a sweep that stops early ------------------------------------------------------------------------
def fake_trials(tmp_path: Path, monkeypatch, outcomes: list[str]) -> None:
    """Trials recorded, not run: each takes the next outcome."""
    monkeypatch.chdir(tmp_path)
    no_space_check(monkeypatch)

    def run_trial(trial, a, space, url):
        sweep.suggest(trial, space)
        outcome = outcomes.pop(0)
        if outcome == "interrupted":  # as run_trial leaves a trial stopped by Ctrl-C or SIGTERM
            trial.set_user_attr("interrupted", True)
            a.interrupted = trial.number
            return float("nan")
        if outcome == "failed":
            return sweep.failed_trial(trial, "CUDA out of memory")
        if outcome == "ctrl-c":  # between the trial's fit and its values (Optuna marks it failed and lets it out)
            raise KeyboardInterrupt
        trial.set_user_attr("run", str(tmp_path / f"lightning_logs/version_{trial.number}"))
        return 0.5

    monkeypatch.setattr(sweep, "run_trial", run_trial)


def test_an_interrupted_or_stopped_sweep_still_writes_its_summary(tmp_path, monkeypatch, capsys):
    outcomes = []
    fake_trials(tmp_path, monkeypatch, outcomes)
    space = space_file(tmp_path, "model.learning_rate: {float: [1.0e-5, 1.0e-4]}\n")
    args = ["--space", str(space), "--heartbeat", "0", "--max-failures", "1", "--trials", "9"]
    path = tmp_path / "lightning_logs/sweeps/space/summary.json"
    outcomes[:] = ["complete"]
    sweep.run_sweep(sweep.parse_args([*args[:-1], "1"]))
    assert json.loads(path.read_text())["trials"] == {"complete": 1, "pruned": 0, "fail": 0}
    outcomes[:] = ["complete", "interrupted"]
    with pytest.raises(sweep.Interrupted, match="^trial 2 stopped"):
        sweep.run_sweep(sweep.parse_args(args))
    summary = json.loads(path.read_text())  # not the first session's: `goemo.compare` of the folder reads it
    assert summary["trials"] == {"complete": 2, "pruned": 0, "fail": 1} and [r["number"] for r in summary["runs"]] == [0, 1]
    outcomes[:] = ["failed"]
    with pytest.raises(GoemoError, match=r"^1 of this worker's trials failed \(last: CUDA out of memory\)"):
        sweep.run_sweep(sweep.parse_args(args))
    assert json.loads(path.read_text())["failed"][-1] == {"number": 3, "error": "CUDA out of memory"}
    outcomes[:] = ["ctrl-c"]
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sweep.parse_args(args))
    assert json.loads(path.read_text())["trials"] == {"complete": 2, "pruned": 0, "fail": 3}
    assert "was not updated" not in capsys.readouterr().err


def test_a_summary_that_cannot_be_written_leaves_the_reason_the_sweep_stopped(tmp_path, monkeypatch, capsys):
    fake_trials(tmp_path, monkeypatch, ["interrupted"])

    def full_disk(study, a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep, "summarize", full_disk)
    with pytest.raises(sweep.Interrupted, match="^trial 0 stopped"):  # not the summary's OSError
        sweep.run_sweep(sweep.parse_args(["--seeds", "1,2", "--heartbeat", "0"]))
    summary = Path("lightning_logs/sweeps/seeds/summary.json")
    assert capsys.readouterr().err.endswith(f"note: {summary} was not updated ([Errno 28] No space left on device)\n")


# -- space files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,message",
    [
        ("trainer.val_check_interval: {grid: [1.0, 1]}",  # every epoch, and every batch
         ("trainer.val_check_interval: grid lists 1.0 and 1, which Optuna takes for one value (it would run 1.0 for "
          "both); keep one of them, and sweep the other in a study of its own")),
        ("seed_everything: {grid: [1, 1.0, true]}", "seed_everything: grid lists 1 and 1.0, which Optuna takes for one"),
        ("model.freeze_embeddings: {categorical: [0, false]}", "model.freeze_embeddings: categorical lists 0 and False, "),
    ],
    ids=["1.0-and-1", "1-1.0-true", "0-and-false"],
)  # fmt: skip
def test_values_optuna_takes_for_one_are_refused(tmp_path, text, message):
    import optuna

    path = space_file(tmp_path, text)
    with pytest.raises(GoemoError, match="^" + re.escape(f"{path}: {message}")):
        sweep.read_space(path)
    # why: Optuna stores a choice as its place in the list, so the second value's trials would run the first
    assert optuna.distributions.CategoricalDistribution([1.0, 1]).to_internal_repr(1) == 0
    assert sweep.read_space(space_file(tmp_path, "x: {categorical: [1, '1', 2.5, null]}"))["x"]["values"] == [1, "1", 2.5, None]


@pytest.mark.parametrize(
    "text,message",
    [
        ("model.learning_rate: {float: [1.0e-5, .inf]}", "float bounds and their distance must be finite numbers, got 1e-05 and inf"),
        ("model.learning_rate: {float: [-.inf, 1.0]}", "float bounds and their distance must be finite numbers, got -inf and 1.0"),
        ("model.learning_rate: {float: [.nan, 1.0]}", "float bounds and their distance must be finite numbers, got nan and 1.0"),
        ("model.learning_rate: {float: [-1.0e+308, 1.0e+308]}", "float bounds and their distance must be finite numbers"),
        ("trainer.max_epochs: {int: [1, 1" + "0" * 400 + "]}", "int bounds and their distance must be finite numbers"),
        ("model.learning_rate: {float: [0.0, 1.0], step: .inf}", "step must be a positive number"),
        ("model.learning_rate: {float: [0.0, 1.0], step: .nan}", "step must be a positive number"),
    ],
    ids=["inf", "-inf", "nan", "too-wide", "huge-int", "step-inf", "step-nan"],
)
def test_a_range_optuna_cannot_draw_from_is_refused(tmp_path, text, message):
    """Each ended the sweep in a traceback (OverflowError, decimal.InvalidOperation), its first trial failed."""
    path = space_file(tmp_path, text)
    with pytest.raises(GoemoError, match="^" + re.escape(f"{path}: {text.split(':')[0]}: {message}")):
        sweep.read_space(path)


def test_a_float_range_is_probed_as_the_floats_its_trials_get(tmp_path, monkeypatch):
    """`trainer.max_epochs: {float: [1, 3]}` passed the check (its bounds probed as written, integers), then each
    trial failed: its fit got 1.98..."""
    space = sweep.read_space(space_file(tmp_path, "trainer.max_epochs: {float: [1, 3]}"))
    assert space["trainer.max_epochs"] == {"kind": "float", "low": 1.0, "high": 3.0, "log": False, "step": None}
    probed = []

    def config_keys(config, extra):  # the fit's config parser, where trainer.max_epochs is an integer
        for key, value in zip(extra[::2], extra[1::2]):
            probed.append(value)
            if not isinstance(yaml.safe_load(value), int):
                raise GoemoError(f'Parser key "{key[2:]}": Expected a <class \'int\'>. Got value: {value}')
        return {"trainer.max_epochs": 4}

    monkeypatch.setattr(sweep, "config_keys", config_keys)
    with pytest.raises(GoemoError, match=r"^space key 'trainer.max_epochs': Parser key \"trainer.max_epochs\": Expected"):
        sweep.check_space(space, None, [])
    assert probed == ["1.0"]
    sweep.check_space(sweep.read_space(space_file(tmp_path, "trainer.max_epochs: {int: [1, 3]}")), None, [])


# -- the study's database ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["runs 2?x=1", "50%25 done#3", "a{b}"])
def test_the_study_database_stays_in_a_working_folder_whose_path_looks_like_a_url(tmp_path, monkeypatch, folder):
    import optuna

    work = tmp_path / folder
    (work / "lightning_logs").mkdir(parents=True)  # as run_sweep makes it
    monkeypatch.chdir(work)
    url, storage = sweep.storage_for(sweep.parse_args(["--seeds", "1,2", "--heartbeat", "0"]))
    optuna.create_study(study_name="seeds", storage=storage)
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [Path(folder, "lightning_logs/sweeps.db")]
    # the URL each trial's fit gets (OptunaReport opens the study with it) finds the same study
    assert optuna.load_study(study_name="seeds", storage=url).study_name == "seeds"


def test_a_path_this_sqlalchemy_cannot_put_in_a_url_is_refused(tmp_path, monkeypatch):
    from sqlalchemy.engine import URL

    # as SQLAlchemy before 2.1 renders a URL: the database's path written as is
    monkeypatch.setattr(URL, "render_as_string", lambda self, hide_password=True: f"sqlite:///{self.database}")
    for name in ("runs 2?x=1", "a{b}"):
        with pytest.raises(GoemoError, match="^cannot name the study's database .* in a SQLite URL with this SQLAlchemy"):
            sweep.sqlite_url(tmp_path / name / "sweeps.db")
    assert sweep.sqlite_url(tmp_path / "a b" / "sweeps.db") == f"sqlite:///{tmp_path}/a b/sweeps.db"


# -- a sweep whose trials all fail ---------------------------------------------------------------------------------
def run_report(args: list[str], validated: bool, metrics: dict) -> None:
    """What a trial's fit does to its study, without the fit: goemo.sweep.OptunaReport's hooks on a stand-in trainer."""
    opt = dict(itertools.pairwise(args))  # each flag and the value after it
    report = sweep.OptunaReport(opt["--trainer.callbacks.storage"], opt["--trainer.callbacks.study"],
                                int(opt["--trainer.callbacks.trial"]), opt["--trainer.callbacks.metric"], prune=False)  # fmt: skip
    trainer = SimpleNamespace(log_dir="lightning_logs/version_0", is_global_zero=True, sanity_checking=False, world_size=1,
                              callback_metrics=metrics, global_step=0, max_epochs=0, limit_val_batches=1.0,
                              check_val_every_n_epoch=1, should_stop=False)  # fmt: skip
    report.setup(trainer, None, "fit")
    if validated:
        report.on_validation_end(trainer, None)
    report.on_fit_end(trainer, None)


@pytest.mark.parametrize(
    "validated,reason",
    [(False, ("no validation ran (trainer.max_epochs 0, limit_val_batches 1.0, check_val_every_n_epoch 1), so no "
               "val/f1_macro to score the trial; give its fit at least one validation")),
     (True, "no val/f1_macro was logged (is it a validation metric of this config?)")],
    ids=["never-validated", "validated-without-the-metric"],
)  # fmt: skip
def test_a_trial_without_a_value_says_whether_its_fit_validated_at_all(tmp_path, monkeypatch, validated, reason):
    """The old reason blamed the metric's name when the fit never validated (e.g. --trainer.max_epochs 0)."""
    monkeypatch.chdir(tmp_path)
    no_space_check(monkeypatch)

    class Fit:  # the trial's child process: only its OptunaReport's writes to the study
        def __init__(self, args, stdout, stderr, preexec_fn) -> None:
            run_report(args, validated, {"val/loss": 0.5, "train/loss": 0.7})

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", Fit)
    with pytest.raises(GoemoError, match="^all 2 of this worker's trials failed; the first failure: " + re.escape(reason) + "; see "):
        sweep.run_sweep(sweep.parse_args(["--seeds", "1,2", "--heartbeat", "0"]))
    summary = json.loads(Path("lightning_logs/sweeps/seeds/summary.json").read_text())
    assert [f["error"] for f in summary["failed"]] == [reason, reason]


@pytest.mark.slow
def test_a_sweep_of_fits_that_never_validate_says_so_and_exits_with_an_error(tmp_path, monkeypatch, capsys, tiny_model, tiny_data):
    """The repro: every trial of `--trainer.max_epochs 0` failed with "no val/f1_macro was logged", and the sweep exited 0."""
    monkeypatch.chdir(tmp_path)
    no_space_check(monkeypatch)
    fit = ["--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data), "--data.cache_dir",
           str(tmp_path / "cache"), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
           "--val_examples.num_examples", "0", "--trainer.max_epochs", "0"]  # fmt: skip
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as e:
            sweep.main(["--seeds", "1", "--study", "s0", "--heartbeat", "0", "--", *fit])
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() installs the sweep's own
    reason = ("no validation ran (trainer.max_epochs 0, limit_val_batches 1.0, check_val_every_n_epoch 1), so no "
              "val/f1_macro to score the trial; give its fit at least one validation")  # fmt: skip
    err = capsys.readouterr().err
    assert f"trial 0 failed: {reason}\n" in err
    assert e.value.code == 2 and err.endswith(f"error: all 1 of this worker's trials failed; the first failure: {reason}; see lightning_logs/sweeps/s0\n")


def test_a_sweep_none_of_whose_trials_completed_exits_with_an_error_after_its_summary(tmp_path, monkeypatch, capsys):
    """Exit status 2 and one line, as after --max-failures, which a grid of fewer points than it never reaches; a
    pruned trial is a result, and only this command's trials count."""
    import optuna

    monkeypatch.chdir(tmp_path)
    no_space_check(monkeypatch)
    outcomes = []

    def run_trial(trial, a, space, url):
        sweep.suggest(trial, space)
        outcome = outcomes.pop(0)
        if outcome == "pruned":
            raise optuna.TrialPruned("pruned at step 0")
        return 0.5 if outcome == "complete" else sweep.failed_trial(trial, f"{outcome} (trial {trial.number})")

    monkeypatch.setattr(sweep, "run_trial", run_trial)

    def main(*args: str) -> int:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            sweep.main(["--seeds", "1,2,3,4,5,6,7", "--heartbeat", "0", *args])
        except SystemExit as e:
            return e.code
        finally:
            signal.signal(signal.SIGTERM, previous)  # main() installs the sweep's own
        return 0

    summary = Path("lightning_logs/sweeps/seeds/summary.json")
    outcomes[:] = ["complete"]
    assert main("--trials", "1") == 0
    outcomes[:] = ["CUDA out of memory", "Killed"]  # the study has a result, this command none
    capsys.readouterr()
    assert main("--trials", "3") == 2
    out, err = capsys.readouterr()
    assert err.endswith("error: all 2 of this worker's trials failed; the first failure: CUDA out of memory (trial 1); see lightning_logs/sweeps/seeds\n")
    assert "| 2 | fail |" in out and json.loads(summary.read_text())["trials"] == {"complete": 1, "pruned": 0, "fail": 2}
    outcomes[:] = ["pruned", "Killed"]
    assert main("--trials", "5") == 0
    outcomes[:] = ["Killed", "complete"]
    assert main("--trials", "7") == 0
    assert main() == 0  # nothing left to run: no trial of this command failed
    assert json.loads(summary.read_text())["trials"] == {"complete": 2, "pruned": 1, "fail": 4} and not outcomes


# -- -c ---------------------------------------------------------------------------------------------------------------
def test_dash_c_is_short_for_config(tmp_path):
    """The guide's "`-c FILE` is `--config FILE` everywhere": sweep's parser said `unrecognized arguments: -c`."""
    config = tmp_path / "c.yaml"
    for flags in (["-c", str(config)], [f"-c{config}"], ["--config", str(config)]):
        assert sweep.parse_args([*flags, "--seeds", "1"]).config == config
