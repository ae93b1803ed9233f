"""Every bad input ends with one line `error: ...` naming the file (and line) and what is wrong, exit status 2,
no traceback, and no output left looking complete; odd but valid texts work.

Most cases run the CLI in-process (`goemo.cli.main`, the same code as `python main.py`, without the start-up
time of a new process); `test_cli_subprocess_*` run a few through a real process.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from goemo.cli import main
from goemo.errors import GoemoError
from tests.conftest import LABELS4, run_main, write_split

def cli_error(capsys, monkeypatch, cwd: Path, *args: str) -> str:
    """Run `python main.py ARGS` in-process; it must exit 2 with a one-line error and no traceback. Returns the line."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["main.py"])  # main() rewrites sys.argv[1:] for LightningCLI
    with pytest.raises(SystemExit) as e:
        main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    assert not list(cwd.glob("lightning_logs/*/checkpoints/*.ckpt"))  # nothing trained, nothing saved
    return last


def fit(tiny_model: Path, data: Path, cache: Path, *extra: str) -> tuple[str, ...]:
    return ("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data),
            "--data.cache_dir", str(cache), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", *extra)  # fmt: skip


# -- data files -----------------------------------------------------------------------------------------
def _rm(d: Path, name: str) -> None:
    (d / name).unlink()


DATA_CASES = {
    # case: (how to break the folder, expected line with {d} = the data folder)
    "missing split file": (lambda d: _rm(d, "dev.tsv"),
                           "error: {d}/dev.tsv: split file not found (a data_dir holds train.tsv, dev.tsv, test.tsv, labels.txt)"),
    "missing labels.txt": (lambda d: _rm(d, "labels.txt"),
                           "error: {d}/labels.txt: label file not found (expected labels.txt beside the TSV splits)"),
    "empty split": (lambda d: (d / "train.tsv").write_text(""), "error: {d}/train.tsv: the split is empty"),
    "too few columns": (lambda d: (d / "train.tsv").write_text("fine\t0\ta\nno id\t1\n"),
                        "error: {d}/train.tsv:2: expected 3 tab-separated columns (text, label ids, id), found 2"),
    "too many columns": (lambda d: (d / "test.tsv").write_text("fine\t0\ta\nx\t1\tb\textra\n"),
                         "error: {d}/test.tsv:2: expected 3 tab-separated columns (text, label ids, id), found 4"),
    "label id not an integer": (lambda d: (d / "train.tsv").write_text("fine\t0\ta\nbad\tjoy\tb\n"),
                                "error: {d}/train.tsv:2: label ids must be comma-separated integers, got 'joy'"),
    "empty label id": (lambda d: (d / "train.tsv").write_text("fine\t0\ta\nbad\t\tb\n"),
                       "error: {d}/train.tsv:2: label ids must be comma-separated integers, got ''"),
    "label id outside labels.txt": (lambda d: (d / "dev.tsv").write_text("fine\t0\ta\nbad\t1,4\tb\n"),
                                    "error: {d}/dev.tsv:2: label id 4 is outside labels.txt (ids 0..3)"),
    "negative label id": (lambda d: (d / "dev.tsv").write_text("bad\t-1\ta\n"),
                          "error: {d}/dev.tsv:1: label id -1 is outside labels.txt (ids 0..3)"),
    "non-UTF-8 split": (lambda d: (d / "dev.tsv").write_bytes(b"fine\t0\ta\ncaf\xe9\t1\tb\n"),
                        "error: {d}/dev.tsv:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"),
    "non-UTF-8 labels.txt": (lambda d: (d / "labels.txt").write_bytes(b"joy\nanger\nfe\xffr\nneutral\n"),
                             "error: {d}/labels.txt:3: not valid UTF-8 (byte 0xff); save the file as UTF-8"),
    "duplicate label names": (lambda d: (d / "labels.txt").write_text("joy\nanger\njoy\nneutral\n"),
                              "error: {d}/labels.txt:3: duplicate label name 'joy' (also on line 1)"),
    "empty label name": (lambda d: (d / "labels.txt").write_text("joy\n\nfear\nneutral\n"),
                         "error: {d}/labels.txt:2: empty label name"),
    "unclosed quote": (lambda d: (d / "train.tsv").write_text('fine\t0\ta\n"unclosed\t1\tb\nmore\t2\tc\n'),
                       "error: {d}/train.tsv:2: unreadable row (unexpected end of data); "
                       "an unclosed double quote takes in the lines after it"),
    "one label only": (lambda d: (d / "labels.txt").write_text("joy\n"),
                       "error: a multi-label classifier needs at least 2 labels, got ['joy']"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_folder(case, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    breaks, expected = DATA_CASES[case]
    breaks(tiny_data)
    line = cli_error(capsys, monkeypatch, tmp_path, *fit(tiny_model, tiny_data, tmp_path / "cache"))
    assert line == expected.format(d=tiny_data)


def test_missing_data_folder(tiny_model, tmp_path, capsys, monkeypatch):
    line = cli_error(capsys, monkeypatch, tmp_path, *fit(tiny_model, tmp_path / "nope", tmp_path / "cache"))
    assert line == f"error: data_dir '{tmp_path / 'nope'}': no such folder (it should hold the official GoEmotions TSV files)"


def test_taxonomy_needs_goemotions_labels(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    line = cli_error(capsys, monkeypatch, tmp_path, *fit(tiny_model, tiny_data, tmp_path / "cache", "--data.taxonomy", "ekman"))
    assert line == ("error: data.taxonomy 'ekman' maps GoEmotions' 28 labels, but the data has 4 others "
                    f"({', '.join(LABELS4[:3])}, ...); use data.taxonomy original with this data")


# -- odd but valid texts (predicted through the CLI and the API with conftest.PREDICT_TEXTS) ------------------
ODD_TEXTS = ["", "word " * 10_000, "😂😂🔥🙏", "Je suis très content, merci beaucoup !", "今日はとても嬉しい", "¡Qué alegría! 🎉"]


def test_odd_texts_train(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    # every odd text in the one training batch (fast_dev_run: one batch of each split)
    write_split(tiny_data / "train.tsv", [(t, str(i % 4)) for i, t in enumerate(ODD_TEXTS)])
    write_split(tiny_data / "dev.tsv", [(t, "3") for t in ODD_TEXTS])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    record = "--trainer.callbacks+=tests.helpers.RecordValidation", "--trainer.callbacks.path", str(tmp_path / "v.jsonl")
    main(list(fit(tiny_model, tiny_data, tmp_path / "cache", "--trainer.fast_dev_run", "1", *record)))
    assert "error" not in capsys.readouterr().err.lower()
    (v,) = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert v["step"] == 1 and math.isfinite(v["metrics"]["val/loss"])  # one step trained on them, then scored them


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture
def good_ckpt(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run's best checkpoint, outside any run folder (so nothing reads its config)."""
    from goemo.runs import best_checkpoint

    dst = tmp_path / "good.ckpt"
    shutil.copy(best_checkpoint(tiny_run / "lightning_logs" / "version_0"), dst)
    return dst


def test_checkpoint_of_other_labels(good_ckpt, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    (tiny_data / "labels.txt").write_text("happy\nangry\nscared\nneutral\n")
    args = fit(tiny_model, tiny_data, tmp_path / "cache")
    line = cli_error(capsys, monkeypatch, tmp_path, "test", *args[1:], "--ckpt_path", str(good_ckpt))
    assert line == (
        "error: the checkpoint was trained on 4 labels (joy, anger, fear, ...) but the data has 4 (happy, angry, scared, ...); "
        "use the data (and taxonomy) it was trained with"
    )


def test_checkpoint_whose_model_folder_changed(good_ckpt, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    # The model settings the command line leaves out come from the checkpoint; its model folder now holds a
    # smaller model
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=16, intermediate_size=32)
    (other / "config.json").write_text(json.dumps(cfg))
    ckpt = torch.load(good_ckpt, weights_only=True)
    ckpt["hyper_parameters"]["model_name_or_path"] = str(other)
    torch.save(ckpt, good_ckpt)
    args = fit(tiny_model, tiny_data, tmp_path / "cache")[3:]  # no --model.model_name_or_path
    line = cli_error(capsys, monkeypatch, tmp_path, "test", *args, "--ckpt_path", str(good_ckpt))
    assert line == (
        f"error: the checkpoint's weights do not fit model '{other}' (mismatched 40 (e.g. encoder.embeddings.word_embeddings.weight: "
        f"checkpoint (30522, 32), model (30522, 16))); use the model (--model.*) it was trained with"
    )


def corrupt(kind: str, good: Path, path: Path) -> None:
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "not a checkpoint":
        path.write_text("hello, I am a text file\n")
    elif kind == "a bare tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "a dict without a state_dict":  # a bare state_dict, say
        torch.save({"encoder.weight": torch.zeros(2)}, path)
    elif kind == "a state_dict of other things":
        torch.save({"state_dict": {"head.weight": [0.0, 1.0]}, "hyper_parameters": {}}, path)
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "saved by hand":  # weights and hyperparameters, as goemo.load and the export take them
        ckpt = torch.load(good, weights_only=True)
        torch.save({k: ckpt[k] for k in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters")}, path)


CKPT_CASES = {
    "truncated": "error: {p}: not a loadable checkpoint (PytorchStreamReader failed reading zip archive: failed finding central directory)",
    "not a checkpoint": "error: {p}: not a loadable checkpoint (not a file written by torch.save)",
    "a bare tensor": "error: {p}: not a Lightning checkpoint (no state_dict)",
    "a dict without a state_dict": "error: {p}: not a Lightning checkpoint (no state_dict)",
    "a state_dict of other things": "error: {p}: not a Lightning checkpoint (its state_dict holds more than named tensors)",
    "empty file": "error: {p}: not a loadable checkpoint (the file is empty or cut short)",
    "saved by hand": "error: {p}: not a checkpoint Lightning's Trainer wrote (no pytorch-lightning_version); goemo.load "
                     "and `python -m goemo.export` take it",
}


@pytest.mark.parametrize("kind", list(CKPT_CASES))
def test_broken_checkpoint(kind, good_ckpt, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.ckpt"
    corrupt(kind, good_ckpt, bad)
    args = fit(tiny_model, tiny_data, tmp_path / "cache")
    line = cli_error(capsys, monkeypatch, tmp_path, "test", *args[1:], "--ckpt_path", str(bad))
    assert line == CKPT_CASES[kind].format(p=bad), line


def test_a_dict_without_a_state_dict_is_one_line(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    """The case above without a fitted run (that one is slow): the file alone is refused, before any model loads."""
    kind, bad = "a dict without a state_dict", tmp_path / "bad.ckpt"
    corrupt(kind, tmp_path / "unused.ckpt", bad)
    args = fit(tiny_model, tiny_data, tmp_path / "cache")
    line = cli_error(capsys, monkeypatch, tmp_path, "test", *args[1:], "--ckpt_path", str(bad))
    assert line == CKPT_CASES[kind].format(p=bad), line


def test_truncated_last_ckpt_of_a_run(tiny_run, tmp_path, capsys, monkeypatch):
    # `--ckpt_path best` reads the run's last.ckpt to find the best one
    work = tmp_path / "work"
    shutil.copytree(tiny_run / "lightning_logs", work / "lightning_logs")
    last = work / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as e:
        main(["test", "--ckpt_path", "best"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: lightning_logs/version_0/checkpoints/last.ckpt: not a loadable checkpoint (")


@pytest.mark.parametrize("saved", [torch.zeros(2), {"callbacks": [1]}], ids=["a tensor", "callbacks not a dict"])
def test_a_last_ckpt_of_another_shape_is_one_line(tiny_run, tmp_path, saved):
    """`best` and a run folder read the run's last.ckpt for the best checkpoint's name: a file of another shape there
    is one line, from goemo.load as from the CLI."""
    from goemo import load

    work = tmp_path / "work"
    shutil.copytree(tiny_run / "lightning_logs" / "version_0", work)
    torch.save(saved, work / "checkpoints" / "last.ckpt")
    with pytest.raises(GoemoError, match=r"last.ckpt: not a Lightning checkpoint \(no dict of callbacks' states\)"):
        load(work)


def test_missing_checkpoint_and_unsafe_flag(good_ckpt, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    args = fit(tiny_model, tiny_data, tmp_path / "cache")[1:]
    line = cli_error(capsys, monkeypatch, tmp_path, "test", *args, "--ckpt_path", str(tmp_path / "nope.ckpt"))
    assert line == f"error: --ckpt_path '{tmp_path / 'nope.ckpt'}': no such file or run folder; use best, last, a run folder or a .ckpt file"
    line = cli_error(capsys, monkeypatch, tmp_path, "test", *args, "--ckpt_path", str(good_ckpt), "--weights_only", "false")
    assert line == "error: --weights_only false: goemo loads checkpoints with weights_only=True only (a checkpoint never runs code)"


# -- configs and flags ----------------------------------------------------------------------------------------
def test_config_errors(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    base = fit(tiny_model, tiny_data, tmp_path / "cache")
    cases = {
        "unknown flag": ((*base, "--model.learnin_rate", "1e-3"),
                         "error: unrecognized arguments: --model.learnin_rate 1e-3 (see: python main.py fit --help)"),
        "mistyped value": ((*base, "--model.learning_rate", "fast"),
                           'error: Parser key "model.learning_rate": Expected a <class \'float\'>. Got value: fast (see: python main.py fit --help)'),
        "unknown subcommand": (("train",), "error: argument subcommand: invalid choice: 'train' (choose from 'fit', 'validate', 'test', 'predict') (see: python main.py --help)"),
        "missing config file": (("fit", "--config", "nope.yaml"),
                                f"error: Parser key \"config\": File does not exist: '{tmp_path / 'nope.yaml'}' (config: nope.yaml) (see: python main.py fit --help)"),
    }  # fmt: skip
    (tmp_path / "typo.yaml").write_text("model:\n  learnin_rate: 0.001\n")
    cases["unknown key in a config file"] = (("fit", "--config", "typo.yaml"),
        "error: Subcommand 'fit' does not accept option 'model.learnin_rate' (config: typo.yaml) (see: python main.py fit --help)")  # fmt: skip
    (tmp_path / "broken.yaml").write_text("model: [1, 2\n")
    cases["malformed YAML"] = (("fit", "--config", "broken.yaml"), "error: Problems parsing config: while parsing a flow sequence in broken.yaml")
    for case, (args, expected) in cases.items():
        line = cli_error(capsys, monkeypatch, tmp_path, *args)
        assert line.startswith(expected), (case, line)


OWN_OPTIMIZER = ("goemo trains with its own AdamW and schedule; set model.learning_rate, model.head_learning_rate, "
                 "model.weight_decay, model.warmup_ratio or model.lr_schedule instead")
VALUE_CASES = {
    "negative learning rate": (("--model.learning_rate", "-0.001"),
                               "error: model.learning_rate and model.head_learning_rate must be finite and > 0, got -0.001, None"),
    "zero batch size": (("--data.train_batch_size", "0"),
                        "error: data.train_batch_size and data.eval_batch_size must be at least 1, got 0 and 32"),
    "threshold outside 0..1": (("--model.threshold", "1.5"), "error: model.threshold must be within 0..1, got 1.5"),
    "warmup ratio 1.5": (("--model.warmup_ratio", "1.5"), "error: model.warmup_ratio must be within [0, 1), got 1.5"),
    "focal alpha 2": (("--model.loss", "focal", "--model.focal_alpha", "2"),
                      "error: model.focal_alpha must be within 0..1 or null, got 2.0"),
    "max_length 1": (("--data.max_length", "1"), "error: data.max_length must be at least 2, got 1"),
    "max_length past the model": (("--data.max_length", "1000"), "error: data.max_length 1000 is more than model '{m}' takes (128 positions); use --data.max_length 128 or less"),
    "negative num_workers": (("--data.num_workers", "-1"), "error: data.num_workers must be >= 0 (0 = load in the main process), got -1"),
    "negative step-checkpoint interval": (("--last_checkpoint.every_n_train_steps", "-5"),
                                          "error: last_checkpoint.every_n_train_steps must be >= 0 (0 = off), got -5"),
    "negative val examples": (("--val_examples.num_examples", "-1"), "error: val_examples.num_examples must be >= 0, got -1"),
    "LightningCLI's optimizer": (("--optimizer", "SGD"), "error: --optimizer: " + OWN_OPTIMIZER),
    "LightningCLI's scheduler": (("--lr_scheduler", "ConstantLR"), "error: --lr_scheduler: " + OWN_OPTIMIZER),
    "endless epochs": (("--trainer.max_epochs", "-1"),
                       "error: the linear learning-rate schedule needs an end: set trainer.max_epochs >= 1 or trainer.max_steps"),
    "devices -3 on a CPU": (("--trainer.devices", "-3"), "error: trainer settings: `devices` selected with `CPUAccelerator` should be an int > 0."),
    "val/loss ranked highest first": (("--checkpoint.monitor", "val/loss"),
        "error: checkpoint.monitor val/loss is lower-is-better, but checkpoint.mode is max (goemo's default, for val/f1_micro): add --checkpoint.mode min"),
    "train loss ranked highest first": (("--checkpoint.monitor", "train/loss"),
        "error: checkpoint.monitor train/loss is lower-is-better, but checkpoint.mode is max (goemo's default, for val/f1_micro): add --checkpoint.mode min"),
    "validating past the epoch": (("--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "5"),
        ("error: trainer settings: `val_check_interval` (5) must be less than or equal to the number of the training batches (2). "
         "If you want to disable validation set `limit_val_batches` to 0.0 instead. If you want to validate based on the total "
         "training batches, set `check_val_every_n_epoch=None`.")),
}  # fmt: skip


def test_a_fit_into_an_existing_runs_folder_is_refused(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    """A resumed run's config.yaml holds its version: fitting it again wrote into that run, then stopped with
    SaveConfigCallback's traceback (its config.yaml exists)."""
    run = tmp_path / "lightning_logs" / "version_3"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    for version in ("version_3", "3"):
        line = cli_error(capsys, monkeypatch, tmp_path, *fit(tiny_model, tiny_data, tmp_path / "cache", "--trainer.logger.init_args.version", version))
        assert line == (f"error: trainer.logger version {version} names the run lightning_logs/version_3, which has a config.yaml: to resume it, "
                        "--ckpt_path lightning_logs/version_3; to fit this config anew, add --ckpt_path null --model.pretrained true "
                        "--trainer.logger.init_args.version null")  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_hub_dataset_beside_a_data_dir_is_refused_for_a_new_fit(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    """The data came from data_dir and the Hub flag was dropped, silently (the run's config.yaml held both)."""
    for flags in (("--data.hub_dataset", "my/copy"), ("--data.hub_config", "raw")):
        line = cli_error(capsys, monkeypatch, tmp_path, *fit(tiny_model, tiny_data, tmp_path / "cache", *flags))
        assert line == (f"error: data.hub_dataset and data.hub_config are read only with data.data_dir null (now {tiny_data}); "
                        "add --data.data_dir null to load that dataset")  # fmt: skip


def test_a_resumed_fit_notes_the_hub_dataset_and_refuses_a_typed_loss_ranked_highest(tiny_run, tmp_path):
    """Resuming a run (fit --ckpt_path last) with a Hub dataset beside its data_dir: a note, as the run's own config would
    get, not the new fit's refusal. A typed --checkpoint.monitor val/loss at mode max is refused on a resume too."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work)
    r = run_main("fit", "--ckpt_path", "last", "--data.hub_dataset", "my/copy", cwd=work)  # trained out: ends at once
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: data.hub_dataset my/copy (" in r.stderr and "is not read: the data comes from data.data_dir" in r.stderr
    r = run_main("fit", "--ckpt_path", "last", "--checkpoint.monitor", "val/loss", cwd=work)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: checkpoint.monitor val/loss is lower-is-better, but checkpoint.mode is max (goemo's default, for "
        "val/f1_micro): add --checkpoint.mode min")  # fmt: skip


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_nonsense_values(case, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    extra, expected = VALUE_CASES[case]
    line = cli_error(capsys, monkeypatch, tmp_path, *fit(tiny_model, tiny_data, tmp_path / "cache", *extra))
    assert line == expected.format(m=tiny_model)


# -- model folders ---------------------------------------------------------------------------------------------
def test_model_folders(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    no_pad = tmp_path / "no-pad-token"  # a GPT-style tokenizer: nothing to pad a batch with
    shutil.copytree(tiny_model, no_pad)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = None
    tok.save_pretrained(no_pad)
    no_vocab = tmp_path / "weights-only"  # model.save_pretrained alone: transformers builds a 5-token tokenizer
    no_vocab.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / f, no_vocab / f)
    cases = {
        "missing model folder": (tmp_path / "nope" / "model", "error: model '{p}': no such folder"),
        "model folder without config.json": (empty, ("error: cannot load model from folder {p}: it has no config.json; "
                                                     "give the folder that save_pretrained wrote (config.json, weights, "
                                                     "tokenizer files)")),
        "broken config.json": (broken, "error: cannot load model from folder {p}: "),
        "tokenizer without a pad token": (no_pad, "error: tokenizer '{p}' has no pad token, and goemo pads each batch "
                                                  "to its longest text; use an encoder's tokenizer (BERT, RoBERTa, "
                                                  "MPNet, ...) or set pad_token in its tokenizer_config.json"),
        "no tokenizer files": (no_vocab, "error: tokenizer '{p}' knows only its special tokens (no vocab.txt or "
                                         "tokenizer.json beside the model?), so every word would be [UNK]; "),
    }
    for case, (path, expected) in cases.items():
        line = cli_error(capsys, monkeypatch, tmp_path, *fit(path, tiny_data, tmp_path / "cache"))
        assert line.startswith(expected.format(p=path)), (case, line)


# -- the CLI as a real process ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_subprocess_bad_config_key(tmp_path):
    r = run_main("fit", "--model.learnin_rate", "1e-3", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "usage:" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: unrecognized arguments: --model.learnin_rate 1e-3 (see: python main.py fit --help)"]


# -- no partial output that looks complete -------------------------------------------------------------------------
def test_failed_predict_leaves_no_predictions_file(tmp_path):
    from types import SimpleNamespace

    from goemo.predict import PredictionWriter

    out = tmp_path / "preds.jsonl"
    out.write_text("an earlier, complete file\n")
    w = PredictionWriter(str(out))
    model = SimpleNamespace(label_names=LABELS4, thresholds=torch.full((4,), 0.5))
    w.on_predict_start(SimpleNamespace(world_size=1, log_dir=str(tmp_path)), model)
    batch = {"index": torch.tensor([0]), "text": ["hi"]}
    w.write_on_batch_end(None, model, torch.full((1, 4), 0.9), None, batch, 0, 0)
    w.on_exception(None, model, RuntimeError("the model crashed half-way"))
    assert out.read_text() == "an earlier, complete file\n"  # untouched, and no half file beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]


def test_failed_export_leaves_no_folder(tiny_run, tmp_path, monkeypatch):
    from goemo import export as export_module

    def broken_onnx(clf, path):
        path.write_bytes(b"half an onnx file")
        raise GoemoError(f"{path}: onnxruntime output differs from the checkpoint")

    monkeypatch.setattr(export_module, "export_onnx", broken_onnx)
    out = tmp_path / "exported"
    with pytest.raises(GoemoError, match="differs"):
        export_module.export(str(tiny_run / "lightning_logs" / "version_0"), out, onnx=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    for tolerance, message in (("ONNX_TOLERANCE", "onnxruntime output differs from the checkpoint by"),
                               ("HF_TOLERANCE", "does not reproduce the checkpoint")):  # fmt: skip
        with monkeypatch.context() as m:  # a difference over the tolerance (any, at -1) stops the export
            m.setattr(export_module, tolerance, -1.0)
            with pytest.raises(GoemoError, match=message):
                export_module.export(str(tiny_run / "lightning_logs" / "version_0"), out, onnx=True)
        assert not out.exists() and list(tmp_path.iterdir()) == []



def test_predict_needs_a_file_of_texts(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    # Without one Lightning would predict the test split into memory, and the CLI would drop the result.
    base = ("predict", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
            "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false")  # fmt: skip
    needs = ("error: predict needs --data.predict_file FILE (.txt, .jsonl or .csv: the texts to predict); "
             "`test` scores the test split")  # fmt: skip
    assert cli_error(capsys, monkeypatch, tmp_path, *base) == needs
    assert cli_error(capsys, monkeypatch, tmp_path, *base, "--output", "out.jsonl") == needs
    (tmp_path / "texts.txt").write_text("happy glad\n", encoding="utf-8")
    # without a checkpoint the head is untrained: its scores near 0.5 would look like predictions
    needs = "error: predict needs --ckpt_path (best, last, a run folder or a .ckpt file): the model to predict with"
    for backend in ("torch", "onnx"):
        line = cli_error(capsys, monkeypatch, tmp_path, *base, "--data.predict_file", "texts.txt", "--backend", backend)
        assert line == needs
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_refuses_a_max_length_past_the_model_on_every_backend(tiny_run, tiny_model, tmp_path, capsys, monkeypatch, backend):
    from goemo.runs import best_checkpoint

    shutil.copy(best_checkpoint(tiny_run / "lightning_logs" / "version_0"), tmp_path / "model.ckpt")
    (tmp_path / "texts.txt").write_text("happy glad\n", encoding="utf-8")
    line = cli_error(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "model.ckpt", "--data.predict_file", "texts.txt",
                     "--data.max_length", "1000", "--backend", backend)  # fmt: skip
    assert line == f"error: data.max_length 1000 is more than model '{tiny_model}' takes (128 positions); use --data.max_length 128 or less"
    assert not list(tmp_path.glob("**/predictions.jsonl")) and not list(tmp_path.glob("**/*.onnx"))  # refused first


@pytest.mark.slow
def test_predict_never_replaces_its_texts_and_a_config_files_ckpt_path_must_be_a_file(tiny_run, tmp_path, capsys, monkeypatch):
    from goemo.predict import predict_file
    from goemo.runs import best_checkpoint

    shutil.copy(best_checkpoint(tiny_run / "lightning_logs" / "version_0"), tmp_path / "model.ckpt")
    (tmp_path / "texts.txt").write_text("happy glad\n", encoding="utf-8")
    base = ("predict", "--ckpt_path", "model.ckpt", "--data.predict_file", "texts.txt")
    line = cli_error(capsys, monkeypatch, tmp_path, *base, "--output", "./texts.txt")
    assert line == "error: --output texts.txt is the file of texts it would replace; write the predictions elsewhere"
    line = cli_error(capsys, monkeypatch, tmp_path, *base, "--model.threshold", "0.3")  # was silently a no-op
    assert line == ("error: predict labels texts at the checkpoint's tuned per-label thresholds, so --model.threshold 0.3 would "
                    "change nothing: drop it, and cut each record's scores (every label's probability) instead")  # fmt: skip
    # a checkpoint from before tuned thresholds labels at model.threshold: the flag works there
    old = torch.load(tmp_path / "model.ckpt", weights_only=True)
    del old["state_dict"]["thresholds"]
    torch.save(old, tmp_path / "old.ckpt")
    monkeypatch.chdir(tmp_path)
    main(["predict", "--ckpt_path", "old.ckpt", "--data.predict_file", "texts.txt", "--data.data_dir", str(tiny_run / "data"),
          "--model.threshold", "0.01", "--output", "p.jsonl", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    record = json.loads((tmp_path / "p.jsonl").read_text(encoding="utf-8"))
    # every label (each scores near 0.5 here; at the checkpoint's threshold 0.5 some would drop), best first
    assert record["labels"] == sorted(LABELS4, key=lambda k: -record["scores"][k])
    with pytest.raises(GoemoError, match="is the file of texts it would replace"):
        predict_file(None, tmp_path / "texts.txt", tmp_path / "texts.txt")  # the Python path (the onnx backends')
    assert (tmp_path / "texts.txt").read_text(encoding="utf-8") == "happy glad\n"
    # without a logger the default output is predictions.jsonl in the working folder: a file of texts of that name
    (tmp_path / "predictions.jsonl").write_text('{"text": "happy glad", "id": 7}\n', encoding="utf-8")
    line = cli_error(capsys, monkeypatch, tmp_path, "predict", "--ckpt_path", "model.ckpt", "--data.predict_file",
                     "predictions.jsonl", "--trainer.logger", "false")  # fmt: skip
    assert line == "error: --output predictions.jsonl is the file of texts it would replace; write the predictions elsewhere"
    assert (tmp_path / "predictions.jsonl").read_text(encoding="utf-8") == '{"text": "happy glad", "id": 7}\n'
    # `best` resolves as the flag only; from a config file Lightning would fail with a traceback
    (tmp_path / "ck.yaml").write_text("ckpt_path: best\n", encoding="utf-8")
    line = cli_error(capsys, monkeypatch, tmp_path, "predict", "--config", "ck.yaml", "--data.predict_file", "texts.txt")
    assert line == "error: ckpt_path best: no such checkpoint file (best, last and run folders work as the flag --ckpt_path)"


@pytest.mark.parametrize("module", ["compare", "distill", "ensemble", "export", "models", "serve", "sweep"])
def test_a_goemo_commands_argument_error_is_one_line(module, capsys):
    """As main.py's: argparse printed its usage block above the error."""
    import importlib

    main = importlib.import_module(f"goemo.{module}").main
    with pytest.raises(SystemExit) as exit:
        main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and err.strip().endswith(f"(see: python -m goemo.{module} --help)"), err

