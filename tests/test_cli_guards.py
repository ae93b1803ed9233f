"""The command line's guards: one --ckpt_path, the run's own checkpoint callback and folder, -c as --config,
outputs that would overwrite a run's files, settings that would do nothing, checks made before training."""

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from goemo.cli import MONITORED, GoemoCLI, main, one_line, setting_given
from goemo.errors import GoemoError
from goemo.model import EmotionClassifier
from goemo.runs import best_checkpoint, resolve_checkpoint, rewrite_args
from tests.conftest import LABELS4

LIGHTNING = {"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {}, "callbacks": {}}


def fake_run(work: Path, version: int = 0, config: str = "{}", ckpt: dict = LIGHTNING) -> Path:
    """lightning_logs/version_N with a config.yaml and checkpoints/last.ckpt (no weights: nothing here loads them)."""
    run = work / "lightning_logs" / f"version_{version}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config, encoding="utf-8")
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return run


def cli(capsys, monkeypatch, cwd: Path, *args: str, code: int = 2) -> str:
    """`python main.py ARGS` in-process in `cwd`, offline; it must exit with `code`. Returns the last line of stderr."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["main.py"])  # main() rewrites sys.argv[1:] for LightningCLI
    try:
        main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code or 0
    out, err = capsys.readouterr()
    assert status == code and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1] if code else out


def test_ckpt_path_is_given_once(tmp_path):
    """The parser takes the last --ckpt_path; resolving the first scored one run's weights with another's config."""
    fake_run(tmp_path)
    for twice in (["--ckpt_path", "best", "--ckpt_path", "x.ckpt"], ["--ckpt_path=best", "--ckpt_path", "last"]):
        with pytest.raises(GoemoError, match="^--ckpt_path is given 2 times; give it once: one checkpoint, with its run's config and folder$"):
            rewrite_args(["test", *twice], tmp_path / "lightning_logs")


def test_best_is_the_checkpoint_sections_best_among_several_model_checkpoints(tmp_path):
    """Another ModelCheckpoint in trainer.callbacks (here on val/loss, saved first) does not decide what `best` is;
    goemo.load("best") resolves through the same resolve_checkpoint."""
    run = fake_run(tmp_path, config="checkpoint:\n  monitor: val/f1_micro\n  mode: max\n")
    ckpts = run / "checkpoints"
    for name in ("epoch00-step1.ckpt", "epoch01-step2.ckpt"):
        torch.save({}, ckpts / name)
    states = {ModelCheckpoint(monitor="val/loss", mode="min").state_key: {"best_model_path": "/old/place/epoch00-step1.ckpt"},
              ModelCheckpoint(monitor="val/f1_micro", mode="max").state_key: {"best_model_path": "/old/place/epoch01-step2.ckpt"}}  # fmt: skip
    torch.save({"callbacks": states}, ckpts / "last.ckpt")
    assert best_checkpoint(run) == ckpts / "epoch01-step2.ckpt"
    assert resolve_checkpoint("best", tmp_path / "lightning_logs") == (ckpts / "epoch01-step2.ckpt", run)
    (run / "config.yaml").write_text("checkpoint:\n  monitor: val/f1_macro\n")  # matches neither: not a guess
    with pytest.raises(GoemoError, match=r"last.ckpt: it holds the states of 2 ModelCheckpoint callbacks and the run's config.yaml "
                                         r"does not tell which is its `checkpoint` section's; give the .ckpt file to use \(in "):  # fmt: skip
        best_checkpoint(run)


def test_best_and_last_find_a_run_whose_checkpoints_went_elsewhere(tmp_path, monkeypatch):
    """A fit with --checkpoint.dirpath keeps its checkpoints outside its run folder: `best`/`last` look there, and
    neither test nor fit falls back to an older run."""
    monkeypatch.chdir(tmp_path)
    root = Path("lightning_logs")
    fake_run(tmp_path, 0)
    newer = root / "version_1"
    newer.mkdir()
    (newer / "config.yaml").write_text("checkpoint:\n  dirpath: myckpts\n")
    Path("myckpts").mkdir()
    torch.save(LIGHTNING, Path("myckpts", "last.ckpt"))
    for sub in ("test", "fit"):
        for alias in ("best", "last"):
            assert rewrite_args([sub, "--ckpt_path", alias], root) == (
                [sub, "--config", str(newer / "config.yaml"), "--ckpt_path", str(Path("myckpts", "last.ckpt"))], newer)


def test_a_checkpoint_monitor_the_model_never_logs_stops_before_training(tmp_path, tiny_model, tiny_data, capsys, monkeypatch):
    line = cli(capsys, monkeypatch, tmp_path, "fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
               "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false", "--checkpoint.monitor", "val/f1-micro")  # fmt: skip
    assert line == f"error: checkpoint.monitor val/f1-micro: the model logs no metric of that name; use one of {', '.join(MONITORED)}"
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt"))


def test_a_subclass_or_a_users_callback_may_log_other_metrics_to_monitor():
    """Names goemo cannot know up front are left to Lightning's own check (at the first validation's end)."""
    from jsonargparse import Namespace

    class Mine(EmotionClassifier):
        pass

    class LogsMore(Callback):
        pass

    def check(model, callbacks=()) -> None:
        cli = SimpleNamespace(config={"fit": Namespace(checkpoint=Namespace(monitor="val/mine"))}, subcommand="fit",
                              model=object.__new__(model), trainer=SimpleNamespace(callbacks=list(callbacks)))  # fmt: skip
        GoemoCLI._check_monitor(cli)

    check(Mine)
    check(EmotionClassifier, [LogsMore()])
    with pytest.raises(GoemoError, match="^checkpoint.monitor val/mine: the model logs no metric of that name"):
        check(EmotionClassifier, [ModelCheckpoint()])


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    for flag in ("--config", "-c"):
        line = cli(capsys, monkeypatch, tmp_path, "fit", flag, "bin.yaml")
        assert line == "error: bin.yaml: not UTF-8 text, so not a YAML config file; give the config's .yaml file"
    run = fake_run(tmp_path)  # a run's config.yaml, damaged
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00bad")
    line = cli(capsys, monkeypatch, tmp_path, "test", "--ckpt_path", "best")
    assert line == f"error: {Path('lightning_logs', 'version_0', 'config.yaml')}: not UTF-8 text, so not a YAML config file; give the config's .yaml file"


def test_dash_c_and_trainer_files_count_as_config_files(tmp_path, monkeypatch):
    moved = tmp_path / "moved.yaml"
    moved.write_text("trainer:\n  logger:\n    init_args: {save_dir: exp}\n")
    (tmp_path / "trainer.yaml").write_text("logger:\n  init_args: {save_dir: exp}\n")
    for given in (["-c", str(moved)], [f"-c={moved}"], [f"-c{moved}"], [f"--config={moved}"], ["--trainer", str(tmp_path / "trainer.yaml")]):
        with pytest.raises(GoemoError, match="^--ckpt_path best takes the newest run in lightning_logs, not in exp/lightning_logs"):
            rewrite_args(["test", *given, "--ckpt_path", "best"])
    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (tmp_path / "mine.yaml").write_text("trainer:\n  precision: bf16-mixed\n")
    (tmp_path / "precision.yaml").write_text("precision: bf16-mixed\n")  # a trainer file
    (tmp_path / "precision_free.yaml").write_text("max_epochs: 1\n")  # its name says precision; it sets none
    own = ["test", "--config", str(run / "config.yaml"), "--ckpt_path", "x.ckpt"]
    for extra in (["-c", str(tmp_path / "mine.yaml")], [f"-c={tmp_path / 'mine.yaml'}"], ["--trainer", str(tmp_path / "precision.yaml")]):
        assert setting_given([*own, *extra], run), extra
    assert not setting_given([*own, "--trainer", str(tmp_path / "precision_free.yaml")], run)
    from jsonargparse import ArgumentError

    monkeypatch.setattr(sys, "argv", ["main.py", "fit", "-c", "x.yaml"])
    assert one_line(ArgumentError(None, "bad value")) == "bad value (config: x.yaml) (see: python main.py fit --help)"


def test_predict_output_never_replaces_the_checkpoint_or_the_runs_configs(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path)
    (tmp_path / "texts.txt").write_text("happy\n")
    for output, what in (("lightning_logs/version_0/checkpoints/last.ckpt", "the checkpoint it predicts with"),
                         ("other.ckpt", "a checkpoint file"),
                         ("lightning_logs/version_0/config.yaml", "the run's config.yaml"),
                         ("lightning_logs/version_0/config_predict.yaml", "the run's config_predict.yaml"),
                         ("lightning_logs/version_0/hparams.yaml", "the run's hparams.yaml")):  # fmt: skip
        line = cli(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "best", "--data.predict_file", "texts.txt",
                   "--model.model_name_or_path", str(tmp_path / "no-model"), "--output", output)  # fmt: skip
        assert line == (f"error: --output {output} is {what}, which the predictions would replace; write them elsewhere "
                        "(by default: predictions.jsonl in the run folder)")  # fmt: skip
    assert (run / "config.yaml").read_text() == "{}"
    # no --output: the default, the run's predictions.jsonl, is the file of texts here
    (run / "predictions.jsonl").write_text('{"text": "happy"}\n')
    line = cli(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "best", "--data.predict_file",
               "lightning_logs/version_0/predictions.jsonl", "--model.model_name_or_path", str(tmp_path / "no-model"))  # fmt: skip
    assert line == ("error: --output lightning_logs/version_0/predictions.jsonl is the file of texts it would replace; write "
                    "the predictions elsewhere")  # fmt: skip
    assert (run / "predictions.jsonl").read_text() == '{"text": "happy"}\n'


def test_predict_refuses_a_threshold_from_a_config_file_too(tmp_path, capsys, monkeypatch):
    tuned = {**LIGHTNING, "state_dict": {"thresholds": torch.full((4,), 0.4)}, "hyper_parameters": {"threshold": 0.5}}
    fake_run(tmp_path, config="model:\n  threshold: 0.5\n", ckpt=tuned)
    (tmp_path / "texts.txt").write_text("happy\n")
    (tmp_path / "thr.yaml").write_text("model:\n  threshold: 0.3\n")
    for given in (["--config", "thr.yaml"], ["--model.threshold", "0.3"]):
        line = cli(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "best", "--data.predict_file", "texts.txt", *given)
        assert line == ("error: predict labels texts at the checkpoint's tuned per-label thresholds, so --model.threshold 0.3 would "
                        "change nothing: drop it, and cut each record's scores (every label's probability) instead")  # fmt: skip
    (tmp_path / "thr.yaml").write_text("model:\n  threshold: 0.5\n")  # the checkpoint's own: on to the next check
    line = cli(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "best", "--config", "thr.yaml")
    assert line.startswith("error: predict needs --data.predict_file FILE")


@pytest.mark.slow
def test_test_without_a_logger_writes_its_report_into_the_run_folder(tiny_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(tiny_run / "lightning_logs" / "version_0", run, ignore=shutil.ignore_patterns("test_report.*", "config_*.yaml"))
    cli(capsys, monkeypatch, tmp_path, "test", "--ckpt_path", "best", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", code=0)  # fmt: skip
    assert (run / "test_report.json").is_file() and (run / "test_report.md").is_file() and (run / "config_test.yaml").is_file()
    assert not list(tmp_path.glob("*test*")) and not list(tmp_path.glob("checkpoints"))


@pytest.mark.slow
def test_a_run_logged_by_another_logger_gets_its_test_report(tiny_run, tmp_path, capsys, monkeypatch):
    """A run whose first logger is a CSVLogger: `test` logged into a new version_1 (its report not the run's, compare
    then showing the run untested); pinned to the run's folder, the CSVLogger would replace its metrics.csv."""
    import yaml

    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(tiny_run / "lightning_logs" / "version_0", run, ignore=shutil.ignore_patterns("test_report.*", "config_*.yaml"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.csv").write_text("epoch,step\n0,12\n")  # what the fit's CSVLogger wrote
    cli(capsys, monkeypatch, tmp_path, "test", "--ckpt_path", "best", "--trainer.enable_progress_bar", "false", code=0)
    assert (run / "test_report.json").is_file() and (run / "config_test.yaml").is_file()
    assert not (run.parent / "version_1").exists() and (run / "metrics.csv").read_text() == "epoch,step\n0,12\n"


@pytest.mark.parametrize("sub", ["fit", "test"])
def test_a_predict_file_outside_predict_is_refused(sub, tmp_path, capsys, monkeypatch):
    """`test --ckpt_path RUN --data.predict_file x.txt` scored the test split and said nothing of the file."""
    fake_run(tmp_path)
    (tmp_path / "x.txt").write_text("happy\n")
    given = ["--ckpt_path", "best"] if sub == "test" else ["--model.model_name_or_path", str(tmp_path / "no-model")]
    line = cli(capsys, monkeypatch, tmp_path, sub, *given, "--data.predict_file", "x.txt")
    assert line == (f"error: --data.predict_file is read by predict only ({sub} uses the data's splits): drop it, "
                    "or run python main.py predict")  # fmt: skip
    (tmp_path / "recipe.yaml").write_text("data:\n  predict_file: x.txt\n")  # a shared recipe's, for its predict runs
    line = cli(capsys, monkeypatch, tmp_path, sub, *given, "--config", "recipe.yaml")
    assert "read by predict only" not in line  # on to the next check


def test_fit_without_a_logger_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """Its config.yaml and checkpoints went into the working folder, where best/last never look, and the next fit
    stopped on that config.yaml with a traceback."""
    model = ("--model.model_name_or_path", str(tmp_path / "no-model"))  # never loaded: refused before
    for _ in range(2):
        line = cli(capsys, monkeypatch, tmp_path, "fit", "--trainer.logger", "false", *model)
        assert line == ("error: fit needs a logger: its folder (lightning_logs/version_N) holds the run's config, "
                        "checkpoints and reports; drop --trainer.logger false")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_default_root_dir_that_moves_no_run_is_refused(tmp_path, capsys, monkeypatch):
    model = ("--model.model_name_or_path", str(tmp_path / "no-model"))  # never loaded: refused before
    line = cli(capsys, monkeypatch, tmp_path, "fit", "--trainer.default_root_dir", "out", *model)
    assert line == ("error: --trainer.default_root_dir out: runs go where the logger's save_dir points (.), not there; "
                    "use --trainer.logger.init_args.save_dir out instead")  # fmt: skip
    line = cli(capsys, monkeypatch, tmp_path, "fit", "--trainer.default_root_dir", "out", "--trainer.logger.init_args.save_dir", "out", *model)
    assert line.startswith(f"error: model '{tmp_path / 'no-model'}'")  # both say the same: on to loading the model


def test_test_and_validate_need_a_checkpoint(tmp_path, tiny_model, tiny_data, capsys, monkeypatch):
    """As predict: without one they scored an untrained head and wrote a full report of it."""
    for sub in ("test", "validate"):
        line = cli(capsys, monkeypatch, tmp_path, sub, "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
                   "--data.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")  # fmt: skip
        assert line == f"error: {sub} needs --ckpt_path (best, last, a run folder or a .ckpt file): the model to score"
    assert not (tmp_path / "lightning_logs").exists()


def test_help_needs_no_run(tmp_path, capsys, monkeypatch):
    out = cli(capsys, monkeypatch, tmp_path, "test", "--ckpt_path", "best", "--help", code=0)
    assert out.startswith("usage: ") and "--ckpt_path" in out


@pytest.mark.parametrize("sub", ["fit", "validate", "test", "predict"])
def test_help_says_ckpt_path_and_weights_only_as_goemo_reads_them(sub, tmp_path, capsys, monkeypatch):
    """Trainer's docstrings offered "hpc", "registry" and weights_only false, which goemo refuses."""
    out = " ".join(cli(capsys, monkeypatch, tmp_path, sub, "--help", code=0).split())
    assert '"hpc"' not in out and '"registry"' not in out and "false is refused" in out
    assert ("Resume a fit: `last`" in out) == (sub == "fit") and ("The model: `best` or `last`" in out) == (sub != "fit")


def test_a_predict_file_that_is_a_folder_says_so(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path)
    (tmp_path / "d.txt").mkdir()
    line = cli(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "best", "--data.predict_file", "d.txt")
    assert line == "error: --data.predict_file d.txt is a folder; give a file of texts (.txt, .jsonl or .csv)"


def test_sigterm_during_the_reports_bootstrap_stops_the_test(tmp_path, monkeypatch):
    """Lightning's loop checks for SIGTERM at batch ends only: one arriving while the report is computed stopped
    nothing (report written, status 0). It is raised as the loop would (goemo.cli then exits 143), before writing."""
    from goemo import report
    from goemo.report import JSON_NAME, TestReport

    torch.manual_seed(0)
    model = SimpleNamespace(test_predictions=(torch.rand(8, 4), (torch.rand(8, 4) > 0.5).float()), thresholds=torch.full((4,), 0.5),
                            label_names=LABELS4, hparams=SimpleNamespace(threshold=0.5), tested_step=lambda: 3)  # fmt: skip
    trainer = SimpleNamespace(is_global_zero=True, received_sigterm=False, ckpt_path=None, log_dir=str(tmp_path), logger=None)
    real = report.bootstrap_f1
    monkeypatch.setattr(report, "bootstrap_f1", lambda *a, **k: setattr(trainer, "received_sigterm", True) or real(*a, **k))
    with pytest.raises(SIGTERMException):  # the signal lands while the intervals are drawn
        TestReport(resamples=10).on_test_end(trainer, model)
    assert trainer.received_sigterm and not (tmp_path / JSON_NAME).exists()
    monkeypatch.setattr(report, "bootstrap_f1", real)
    trainer.received_sigterm = False
    TestReport(resamples=10).on_test_end(trainer, model)
    assert (tmp_path / JSON_NAME).is_file()


def test_ckpt_path_from_a_config_file_is_refused(tmp_path, capsys, monkeypatch):
    """goemo.runs resolves the flag (the run's config and folder are reused); from a config file it was a bare file."""
    run = fake_run(tmp_path)
    (tmp_path / "ck.yaml").write_text(f"ckpt_path: {run / 'checkpoints' / 'last.ckpt'}\n")
    line = cli(capsys, monkeypatch, tmp_path, "test", "--config", "ck.yaml", "--model.model_name_or_path", str(tmp_path / "no-model"))
    assert line == (f"error: ckpt_path {run / 'checkpoints' / 'last.ckpt'} is set in a config file, where the run's config and folder "
                    "are not reused as with the flag: give it as --ckpt_path instead (or add --ckpt_path null to start anew)")  # fmt: skip


def test_a_dirpath_runs_last_checkpoint_is_the_later_of_its_two_folders(tmp_path, monkeypatch):
    """goemo before 2026-12-07 saved a dirpath run's periodic last.ckpt in checkpoints/ and the epoch checkpoints' in
    the dirpath: `last` takes the later step, and a run with only the periodic one is found at all."""
    monkeypatch.chdir(tmp_path)
    root = Path("lightning_logs")
    run = fake_run(tmp_path, 0, config="checkpoint:\n  dirpath: myckpts\n", ckpt={**LIGHTNING, "global_step": 9}).relative_to(tmp_path)
    assert rewrite_args(["fit", "--ckpt_path", "last"], root)[0][-1] == str(run / "checkpoints" / "last.ckpt")
    Path("myckpts").mkdir()
    torch.save({**LIGHTNING, "global_step": 7}, Path("myckpts", "last.ckpt"))
    assert rewrite_args(["fit", "--ckpt_path", "last"], root)[0][-1] == str(run / "checkpoints" / "last.ckpt")
    torch.save({**LIGHTNING, "global_step": 12}, Path("myckpts", "last.ckpt"))
    assert rewrite_args(["fit", "--ckpt_path", str(run)], root)[0][-1] == str(Path("myckpts", "last.ckpt"))


def test_last_checkpoint_follows_checkpoint_dirpath(tmp_path, tiny_model, tiny_data, monkeypatch):
    """One last.ckpt, beside the epoch checkpoints: the periodic saves go to checkpoint.dirpath too."""
    from goemo.data import GoEmotionsDataModule
    from goemo.reliability import LastCheckpoint

    monkeypatch.chdir(tmp_path)
    args = ["--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data), "--trainer.accelerator", "cpu"]
    for given, folder in (([], None), (["--checkpoint.dirpath", "myckpts"], str(tmp_path / "myckpts"))):
        cli = GoemoCLI(EmotionClassifier, GoEmotionsDataModule, run=False, args=[*args, *given])
        (last,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LastCheckpoint)]
        (epochs,) = [cb for cb in cli.trainer.callbacks if type(cb) is ModelCheckpoint]
        assert last.dirpath == epochs.dirpath == folder  # unset: both take the run's checkpoints/ at fit


def test_a_ddp_strategy_class_with_mean_pooling_looks_for_unused_parameters(tmp_path, tiny_model, tiny_data, monkeypatch, capsys):
    """DDPStrategy by class_path (to set its timeout, say): mean pooling leaves the pooler without gradients, and DDP
    stops at the second step unless find_unused_parameters is on, as the `ddp` string is switched."""
    from goemo.data import GoEmotionsDataModule

    monkeypatch.chdir(tmp_path)
    args = ["--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.DDPStrategy"}']  # fmt: skip
    for pooling, switched in (("mean", True), ("cls", False)):
        cli = GoemoCLI(EmotionClassifier, GoEmotionsDataModule, run=False, args=[*args, "--model.pooling", pooling])
        assert cli.config.trainer.strategy.init_args.find_unused_parameters is switched  # as the run's config.yaml says
        assert cli.trainer.strategy._ddp_kwargs.get("find_unused_parameters", False) is switched  # what DDP is given
        assert ("find_unused_parameters is true" in capsys.readouterr().err) is switched


def test_a_runs_own_config_may_hold_default_root_dir_and_another_threshold(tmp_path, capsys, monkeypatch):
    """Older goemo ignored --trainer.default_root_dir and saved it; a fit resumed with another model.threshold saved that
    while its best checkpoint holds the old one: neither is the user's doing now, so neither is refused."""
    tuned = {**LIGHTNING, "state_dict": {"thresholds": torch.full((4,), 0.4)}, "hyper_parameters": {"threshold": 0.5}}
    fake_run(tmp_path, config="trainer:\n  default_root_dir: elsewhere\nmodel:\n  threshold: 0.4\n", ckpt=tuned)
    (tmp_path / "texts.txt").write_text("happy\n")
    line = cli(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "best", "--data.predict_file", "texts.txt",
               "--model.model_name_or_path", str(tmp_path / "no-model"))  # fmt: skip
    assert line.startswith(f"error: model '{tmp_path / 'no-model'}'"), line  # past both checks, on to loading the model


def test_print_config_shows_the_resolved_run(tmp_path, capsys, monkeypatch):
    fake_run(tmp_path, config="data:\n  max_length: 77\n")
    out = cli(capsys, monkeypatch, tmp_path, "test", "--ckpt_path", "best", "--print_config", code=0)
    assert "max_length: 77" in out and f"ckpt_path: {Path('lightning_logs', 'version_0', 'checkpoints', 'last.ckpt')}" in out
    out = cli(capsys, monkeypatch, tmp_path / "lightning_logs", "test", "--ckpt_path", "best", "--print_config", code=0)
    assert "ckpt_path: best" in out  # no run here: the command as given


def test_best_falls_back_to_the_monitor_where_the_key_cannot_be_rebuilt(tmp_path):
    """jsonargparse saves train_time_interval as text ('1:30:00'); Lightning's state key holds a timedelta."""
    from datetime import timedelta

    run = fake_run(tmp_path, config="checkpoint:\n  monitor: val/f1_micro\n  mode: max\n  train_time_interval: '1:30:00'\n")
    ckpts = run / "checkpoints"
    states = {ModelCheckpoint(monitor="val/loss", mode="min").state_key: {"monitor": "val/loss", "best_model_path": "a/epoch00.ckpt"},
              ModelCheckpoint(monitor="val/f1_micro", mode="max", train_time_interval=timedelta(hours=1.5)).state_key:
              {"monitor": "val/f1_micro", "best_model_path": "a/epoch01.ckpt"}}  # fmt: skip
    torch.save({"callbacks": states}, ckpts / "last.ckpt")
    torch.save({}, ckpts / "epoch01.ckpt")
    assert best_checkpoint(run) == ckpts / "epoch01.ckpt"


def test_options_read_a_flags_value_as_its_value():
    from goemo.runs import config_files, options

    assert config_files(["fit", "--trainer.logger.init_args.name", "-cv", "--config", "a.yaml", "-cb.yaml"]) == ["a.yaml", "b.yaml"]
    assert options(["test", "--print_config", "-c", "x.yaml", "--model.x=-1", "--help"]) == [
        ("--print_config", None), ("--config", "x.yaml"), ("--model.x", "-1"), ("--help", None)]


def test_a_resume_whose_optimizer_groups_differ_is_one_line():
    """torch's load_state_dict ValueError (e.g. ELECTRA layer decay's groups changed in 2026-12) is one line."""
    def fails(*args, **kwargs):
        raise ValueError("loaded state dict has a different number of parameter groups")

    cli = SimpleNamespace(trainer=SimpleNamespace(fit=fails))
    with pytest.raises(GoemoError, match="^run/last.ckpt: its optimizer has other parameter groups than this model's"):
        GoemoCLI.fit(cli, None, None, ckpt_path="run/last.ckpt")


def test_a_new_fit_into_a_checkpoint_dirpath_of_another_run_or_one_it_cannot_write_is_refused(tmp_path, capsys, monkeypatch):
    """No version counter: a second fit overwrites the first's epoch checkpoints and last.ckpt by name; a folder that
    cannot be made fails at the first save, after training, with a traceback."""
    model = ("--model.model_name_or_path", str(tmp_path / "no-model"))  # never loaded: refused before
    (tmp_path / "shared").mkdir()
    torch.save({}, tmp_path / "shared" / "epoch00-step6.ckpt")
    line = cli(capsys, monkeypatch, tmp_path, "fit", "--checkpoint.dirpath", "shared", *model)
    assert line == ("error: checkpoint.dirpath shared holds another run's checkpoints, which this fit would overwrite; choose an "
                    "empty folder, or resume that run with --ckpt_path")  # fmt: skip
    (tmp_path / "afile").write_text("x")
    line = cli(capsys, monkeypatch, tmp_path, "fit", "--checkpoint.dirpath", "afile/ck", *model)
    assert line.startswith("error: checkpoint.dirpath afile/ck: cannot write there")
    line = cli(capsys, monkeypatch, tmp_path, "fit", "--checkpoint.dirpath", "fresh", *model)
    assert line.startswith(f"error: model '{tmp_path / 'no-model'}'")  # an empty or new folder: on to loading the model


def test_a_typed_setting_that_another_one_turns_off_is_said(tmp_path, capsys, monkeypatch):
    """`--model.teacher_weight 0.9` without a teacher (or focal_gamma beside loss bce, ...) trained as if not given."""
    model = ("--model.model_name_or_path", str(tmp_path / "no-model"))  # fails after the notes: nothing is trained
    said: list[str] = []
    monkeypatch.setattr("goemo.cli.note", lambda text: said.append(f"note: {text}"))

    def notes(*args: str) -> list[str]:
        said.clear()
        cli(capsys, monkeypatch, tmp_path, "fit", *model, *args)
        return [line for line in said if line.startswith("note: --model.")]

    got = notes("--model.teacher_weight", "0.9", "--model.focal_gamma=1", "--model.aux_weight", "0.3", "--model.pos_weight_max", "5")
    assert got == ["note: --model.teacher_weight 0.9 has no effect: it is read only with model.teacher set (now null)",
                   "note: --model.focal_gamma 1.0 has no effect: it is read only with model.loss focal (now bce)",
                   "note: --model.aux_weight 0.3 has no effect: it is read only with model.aux_taxonomy set (now null)",
                   "note: --model.pos_weight_max 5.0 has no effect: it is read only with model.loss bce_pos_weight (now bce)"]  # fmt: skip
    assert notes("--model.loss", "focal", "--model.focal_gamma", "1", "--model.aux_taxonomy", "ekman", "--model.aux_weight", "0.3") == []
    # A recipe's teacher_weight stays in the config under --model.teacher null: not typed, not said.
    (tmp_path / "recipe.yaml").write_text("model:\n  teacher_weight: 0.75\n  focal_gamma: 1.0\n")
    assert notes("--config", "recipe.yaml") == []


@pytest.mark.parametrize("bar, summary, kept", [(None, False, ["RichProgressBar", "Interrupts"]),
                                                (False, None, ["RichModelSummary", "Interrupts"]),
                                                (False, False, ["Interrupts"]), (None, None, ["RichProgressBar", "RichModelSummary", "Interrupts"])])  # fmt: skip
def test_a_terminal_callback_that_its_switch_turns_off_is_dropped_from_the_config(bar, summary, kept, capsys):
    """`--trainer.enable_model_summary false` beside the config's RichModelSummary: Lightning refuses the two."""
    from types import SimpleNamespace

    callbacks = [SimpleNamespace(class_path=f"lightning.pytorch.callbacks.{n}") for n in ("RichProgressBar", "RichModelSummary")]
    callbacks.append(SimpleNamespace(class_path="goemo.reliability.Interrupts"))
    trainer = SimpleNamespace(callbacks=callbacks, enable_progress_bar=bar, enable_model_summary=summary)
    assert [c.class_path.rpartition(".")[2] for c in GoemoCLI._callbacks(trainer)] == kept
    assert ("note: dropped the callbacks" in capsys.readouterr().err) is (len(kept) < 3)
