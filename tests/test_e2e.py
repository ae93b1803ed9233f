"""A tiny random BERT through `fit`, then `test --ckpt_path best` in a new process, read back from TensorBoard."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from tests.conftest import REPO, run_main

pytestmark = pytest.mark.slow


def scalar_tags(run: Path) -> dict[str, list[float]]:
    """{tag: values} over every event file of a run (fit and later test write separate files)."""
    out: dict[str, list[float]] = {}
    for f in sorted(run.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(v.tag, []).append(float(torch.tensor(v.tensor.float_val or [0.0])[0]))
    return out


def hparams_metric_tags(run: Path) -> set[str]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    tags = set()
    for f in run.glob("events.out.tfevents.*"):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == "_hparams_/experiment":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    tags |= {m.name.tag for m in data.experiment.metric_infos}
    return tags


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model):
    """One fit shared by the tests below: 2 epochs of 6 steps on the synthetic 4-label folder."""
    from tests.conftest import LABELS4, synthetic_rows, write_split

    cwd = tmp_path_factory.mktemp("e2e")
    data = cwd / "data"
    data.mkdir()
    (data / "labels.txt").write_text("\n".join(LABELS4) + "\n")
    for name, n, seed in (("train.tsv", 96, 0), ("dev.tsv", 32, 1), ("test.tsv", 32, 2)):
        write_split(data / name, synthetic_rows(n, seed))
    r = run_main(
        "fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data),
        "--data.cache_dir", str(cwd / "cache"), "--data.train_batch_size", "16", "--model.learning_rate", "1e-3",
        "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        cwd=cwd,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd


@pytest.mark.slow
def test_python_m_goemo_cli_fits_as_main_py_does(tmp_path, tiny_model, tiny_data):
    """`python -m goemo.cli` (a goemo installed without main.py, and the sweep's trials): the run's hparams.yaml
    holds the seed and trainer settings, which the CLI hands to goemo.cli's logger class (not a __main__ copy's)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "goemo.cli", "fit", "--model.model_name_or_path", str(tiny_model),
                        "--data.data_dir", str(tiny_data), "--data.cache_dir", str(tmp_path / "cache"),
                        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                        "--trainer.enable_progress_bar", "false", "--seed_everything", "7"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    hparams = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["seed_everything"] == 7 and hparams["trainer"]["max_epochs"] == 1


def test_fit_writes_run_folder(fitted):
    run = fitted / "lightning_logs" / "version_0"
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) >= 2
    assert (run / "config.yaml").is_file() and (run / "hparams.yaml").is_file()
    tags = scalar_tags(run)
    for name in ("train/loss", "val/loss", "val/f1_micro", "val/f1_macro", "val/exact_match"):
        assert name in tags, (name, sorted(tags))
    assert len(tags["val/f1_micro"]) == 2  # validated every epoch
    assert {"lr-AdamW/encoder", "lr-AdamW/head"} <= set(tags)  # LearningRateMonitor
    assert {"val/f1_micro", "test/f1_micro", "test/f1_macro", "test/exact_match"} <= hparams_metric_tags(run)


def test_test_best_in_new_process(fitted):
    r = run_main("test", "--ckpt_path", "best", cwd=fitted)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test/f1_micro" in r.stdout and "test/exact_match" in r.stdout
    run = fitted / "lightning_logs" / "version_0"
    assert not (fitted / "lightning_logs" / "version_1").exists()  # logged into the fitted run
    tags = scalar_tags(run)
    for name in ("test/loss", "test/f1_micro", "test/f1_macro", "test/exact_match"):
        assert name in tags, (name, sorted(tags))
    # the run's saved config was reused: same model and data, nothing repeated on the command line
    cfg = yaml.safe_load((run / "config_test.yaml").read_text())
    fit_cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"].pop("pretrained") is False  # the checkpoint holds every weight
    fit_cfg["model"].pop("pretrained")
    assert cfg["model"] == fit_cfg["model"] and cfg["data"]["data_dir"] == fit_cfg["data"]["data_dir"]
    # `best` is ModelCheckpoint's best by val/f1_micro
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    best = next(v["best_model_path"] for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert f"using run lightning_logs/version_0 (lightning_logs/version_0/checkpoints/{Path(best).name})\n" in r.stderr, r.stderr[-2000:]


def test_flags_override_the_run_config(fitted):
    # Model flags too: Lightning parses the checkpoint's hyperparameters over them (Lightning #21455).
    r = run_main("validate", "--ckpt_path", "last", "--data.eval_batch_size", "8", "--model.threshold", "0.3", cwd=fitted)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((fitted / "lightning_logs" / "version_0" / "config_validate.yaml").read_text())
    assert cfg["data"]["eval_batch_size"] == 8 and cfg["ckpt_path"].endswith("last.ckpt")
    assert cfg["model"]["threshold"] == 0.3


def test_a_checkpoint_file_alone_gives_the_model_config_beneath_the_flags(fitted, tiny_model, tmp_path):
    import json
    import shutil

    ckpt = shutil.copy(fitted / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    r = run_main("test", "--ckpt_path", str(ckpt), "--data.data_dir", str(fitted / "data"), "--model.threshold", "0.25",
                 "--trainer.enable_progress_bar", "false", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    cfg = yaml.safe_load((run / "config_test.yaml").read_text())
    assert cfg["model"]["model_name_or_path"] == str(tiny_model)  # from the checkpoint, not the default
    assert cfg["model"]["learning_rate"] == 1e-3 and cfg["model"]["threshold"] == 0.25  # the flag wins
    assert json.loads((run / "test_report.json").read_text())["thresholds"]["fixed"] == 0.25
