"""goemo.load(...).predict / predict_proba: no Trainer, same records as the CLI's predictions.jsonl."""

import json

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
