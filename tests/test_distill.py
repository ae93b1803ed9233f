"""Knowledge distillation: `python -m goemo.distill` writes a teacher's training-split probabilities; a student fit
with `model.teacher` trains on `(1 - w) * labels + w * p_teacher`."""

import math
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from goemo import distill, ensemble, teacher as teacher_file
from goemo.data import GoEmotionsDataModule
from goemo.errors import GoemoError
from goemo.model import EmotionClassifier

REPO = Path(__file__).resolve().parent.parent

LABELS = ["joy", "anger", "fear", "neutral"]  # write_tiny_data's labels


def test_teacher_file_round_trip_and_one_line_errors(tmp_path):
    texts, labels = ["a", "b", "c"], ["x", "y"]
    probs = np.array([[0.1, 0.9], [0.25, 0.5], [0.0, 1.0]], dtype=np.float32)
    path = tmp_path / "t.npz"
    teacher_file.write_teacher(path, probs, labels, texts, ["m"])
    np.testing.assert_allclose(teacher_file.read_teacher(str(path), labels, texts), probs, atol=1 / 510 + 1e-7)  # uint8 steps
    with pytest.raises(GoemoError, match="has 2 labels \\(x, y, \\.\\.\\.\\), the data 2 \\(y, x"):
        teacher_file.read_teacher(str(path), ["y", "x"], texts)
    # Some of the teacher's rows, in another order, a text twice (a subset, a fold, a shuffled copy): found by text.
    got = teacher_file.read_teacher(str(path), labels, ["c", "a", "c"])
    np.testing.assert_array_equal(got, teacher_file.read_teacher(str(path), labels, texts)[[2, 0, 2]])
    with pytest.raises(GoemoError, match="has no probabilities for 2 of the 3 training texts \\(written for another "
                                         "training split, 3 rows\\); write one from the student's data"):
        teacher_file.read_teacher(str(path), labels, ["a", "d", "e"])
    old = tmp_path / "v2.npz"  # format 2 (no keys): its own split only
    with np.load(path) as z:
        np.savez(old, **{k: z[k] for k in ("probs", "labels", "digest", "teachers")}, format=np.int64(2))
    np.testing.assert_array_equal(teacher_file.read_teacher(str(old), labels, texts), teacher_file.read_teacher(str(path), labels, texts))
    with pytest.raises(GoemoError, match="has no probabilities for 3 of the 3 training texts"):
        teacher_file.read_teacher(str(old), labels, ["c", "a", "b"])
    with pytest.raises(GoemoError, match="'.*none.npz': no such file; give the file's path, write one with `python "
                                         "-m goemo.distill RUN --out FILE`, or \\(a new fit\\) pass --model.teacher null"):  # fmt: skip
        teacher_file.read_teacher(str(tmp_path / "none.npz"), labels, texts)
    with pytest.raises(GoemoError, match=f"'none.npz': no such file in {re.escape(str(Path.cwd()))} \\(a relative "
                                         "path is read from the working folder\\); give"):  # fmt: skip
        teacher_file.read_teacher("none.npz", labels, texts)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(GoemoError, match="not a goemo teacher file"):
        teacher_file.read_teacher(str(tmp_path / "bad.npz"), labels, texts)
    path.with_name("cut.npz").write_bytes(path.read_bytes()[:40])  # a zip cut short
    np.save(tmp_path / "one.npy", probs)  # an array, not an archive
    for name, why in (("cut.npz", "File is not a zip file"), ("one.npy", "one array, not an .npz archive")):
        with pytest.raises(GoemoError, match=f"not a goemo teacher file \\({why}\\); write one with"):
            teacher_file.read_teacher(str(tmp_path / name), labels, texts)
    with pytest.raises(GoemoError, match="do not fit 2 texts x 2 labels"):
        teacher_file.write_teacher(tmp_path / "u.npz", probs, labels, texts[:2], ["m"])
    for bad in (np.nan, 1.5):
        with pytest.raises(GoemoError, match="probabilities outside 0..1"):
            teacher_file.write_teacher(tmp_path / "bad.npz", np.full((3, 2), bad, np.float32), labels, texts, ["m"])
    np.savez(tmp_path / "old.npz", format=np.int64(1), probs=probs, labels=np.array(labels), digest=np.array("x"))
    with pytest.raises(GoemoError, match="format 1, this goemo reads 2-3; write it again"):
        teacher_file.read_teacher(str(tmp_path / "old.npz"), labels, texts)
    digest = np.array(teacher_file.texts_digest(texts))
    for bad, got in ((probs, "(3, 2) float32"), (np.zeros((3, 1), np.uint8), "(3, 1) uint8"), (np.zeros(3, np.uint8), "(3,) uint8")):
        np.savez(tmp_path / "hand.npz", format=np.int64(2), probs=bad, labels=np.array(labels), digest=digest)
        with pytest.raises(GoemoError, match=f"probs must be \\(rows, 2\\) uint8 \\(probability x 255\\), got {re.escape(got)}"):
            teacher_file.read_teacher(str(tmp_path / "hand.npz"), labels, texts)
    assert teacher_file.texts_digest(["ab", "c"]) != teacher_file.texts_digest(["a", "bc"])  # rows are delimited
    with np.load(path) as z:  # damaged files: 0-d arrays where lists belong, keys that do not match the rows
        whole = {k: z[k] for k in z.files}
    for key, bad, why in (("labels", np.array("x"), "iteration over a 0-d array"),
                          ("teachers", np.array("m"), "iteration over a 0-d array"),
                          ("format", np.array([3, 3]), "only 0-dimensional arrays")):  # fmt: skip
        np.savez(tmp_path / "damaged.npz", **{**whole, key: bad})
        with pytest.raises(GoemoError, match=f"not a goemo teacher file \\({why}"):
            teacher_file.read_teacher(str(tmp_path / "damaged.npz"), labels, texts)
    np.savez(tmp_path / "damaged.npz", **{**whole, "keys": whole["keys"][:2]})
    with pytest.raises(GoemoError, match=r"damaged.npz': \(2,\) keys for 3 rows of probabilities, a damaged or hand-made file"):
        teacher_file.read_teacher(str(tmp_path / "damaged.npz"), labels, ["c", "a"])


def test_a_students_teacher_name_says_its_teacher_weight_and_temperature():
    student = {"model_name_or_path": "m", "teacher": "pkg:goemo/teachers/t.npz", "teacher_weight": 0.75}
    assert distill.teacher_name(student) == "m (distilled from pkg:goemo/teachers/t.npz at weight 0.75)"
    assert distill.teacher_name({**student, "teacher": None}) == "m"
    assert distill.teacher_name({**student, "teacher_temperature": 2.0}) == (
        "m (distilled from pkg:goemo/teachers/t.npz at weight 0.75 and temperature 2.0)"
    )


def test_distill_command_writes_the_teachers_mean_training_probabilities(tiny_run, learned_run, tmp_path, capsys):
    from goemo import load

    runs = [str(tiny_run / "lightning_logs/version_0"), str(learned_run / "lightning_logs/version_0")]
    out = tmp_path / "teacher.npz"
    distill.main([*runs, "--out", str(out)])
    assert "training rows x 4 labels from 2 teacher run(s)" in capsys.readouterr().out
    texts = ensemble.splits_of(load(runs[0]), ("train",))["train"]["text"]
    mean = np.mean([load(r).predict_proba(texts) for r in runs], axis=0)  # (N, 4)
    table = teacher_file.read_teacher(str(out), LABELS, texts)
    np.testing.assert_allclose(table, mean, atol=1 / 510 + 1e-6)
    assert table.std(0).max() > 0.01  # the teachers' outputs, not a constant
    with np.load(out) as z:
        assert [str(t) for t in z["teachers"]] == [str(load(r).model.hparams.model_name_or_path) for r in runs]
    # A teacher file joins the runs' mean as one teacher more: a new run added to a file whose run is gone.
    first = tmp_path / "first.npz"
    distill.main([runs[0], "--out", str(first)])
    distill.main([runs[1], str(first), "--out", str(tmp_path / "two.npz")])
    assert "from 1 teacher run(s) and 1 teacher file(s)" in capsys.readouterr().out
    two = teacher_file.read_teacher(str(tmp_path / "two.npz"), LABELS, texts)
    first_table = teacher_file.read_teacher(str(first), LABELS, texts)
    second = load(runs[1]).predict_proba(texts)
    assert np.abs(second - first_table).max() > 0.05  # the two teachers differ: a file ignored would show
    np.testing.assert_allclose(two, (second + first_table) / 2, atol=1 / 510 + 1e-6)
    with np.load(tmp_path / "two.npz") as z:
        assert [str(t) for t in z["teachers"]][1] == f"{first} ({load(runs[0]).model.hparams.model_name_or_path})"
    distill.main([runs[1], str(out), "--out", str(tmp_path / "three.npz")])  # a file of two runs counts as one teacher
    np.testing.assert_allclose(teacher_file.read_teacher(str(tmp_path / "three.npz"), LABELS, texts),
                               (second + table) / 2, atol=1 / 510 + 1e-6)  # fmt: skip
    distill.main([*runs, str(first), "--out", str(tmp_path / "four.npz")])  # two runs and a file: three teachers
    np.testing.assert_allclose(teacher_file.read_teacher(str(tmp_path / "four.npz"), LABELS, texts),
                               (mean * 2 + first_table) / 3, atol=1 / 510 + 1e-6)  # fmt: skip
    dot = str(first.parent / "." / first.name)
    for args, why in (([str(first)], "give at least one teacher run"),
                      ([runs[1], str(first), dot], f"{re.escape(dot)} and {re.escape(str(first))} are the same teacher file"),
                      (["no-such-run", str(tmp_path / "none.npz")], "teacher file '.*none.npz': no such file; give the file's path$"),
                      ([runs[1], str(first), "--out", str(first)], "--out .*first.npz is the teacher file .* read here; give")):  # fmt: skip
        with pytest.raises(SystemExit):
            distill.main([*args, "--out", str(tmp_path / "x.npz")] if "--out" not in args else args)
        assert re.search(why, capsys.readouterr().err.strip())
    with pytest.raises(SystemExit) as e:  # a folder for --out: one line, before any model is loaded
        distill.main([runs[0], "--out", str(tmp_path)])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err


def random_teacher(tmp_path, tiny_model, tiny_data) -> tuple[GoEmotionsDataModule, np.ndarray]:
    """The tiny data set up for fit, and tmp_path/t.npz: uniform random probabilities (rows, 4) for its training rows."""
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    texts = dm.datasets["train"].with_format(None)["text"]
    teacher = np.random.default_rng(0).uniform(size=(len(texts), 4)).astype(np.float32)
    teacher_file.write_teacher(tmp_path / "t.npz", teacher, LABELS, texts, ["m"])
    return dm, teacher


def test_a_student_trains_on_targets_blended_with_the_teachers(tmp_path, tiny_model, tiny_data):
    """model.teacher in a tiny fit: the loss trained on is BCE against (1 - w) y + w p_teacher[row] (a batch checked by
    hand), `train/loss` stays the labels' BCE, and the checkpoint loads and tests without the teacher file."""
    seen = {}

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                # What training_step returned (and Lightning backpropagated) is the blended loss, not the labels' BCE.
                returned, logged = outputs["loss"].detach(), trainer.callback_metrics
                seen["returned"] = (returned, logged["train/distill_loss"].clone(), logged["train/loss"].clone())
                pl_module.eval()
                with torch.no_grad():
                    logits = pl_module(batch["input_ids"], batch["attention_mask"])
                    seen["check"] = (batch, logits, pl_module._soft_target_loss(batch, logits))
                pl_module.train()

    dm, teacher = random_teacher(tmp_path, tiny_model, tiny_data)
    model = EmotionClassifier(str(tiny_model), label_names=LABELS, teacher=str(tmp_path / "t.npz"), teacher_weight=0.7)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Look()],
    )  # fmt: skip
    trainer.fit(model, dm)
    returned, distill_loss, label_loss = seen["returned"]
    assert returned == distill_loss and returned != label_loss
    batch, logits, loss = seen["check"]
    p = torch.from_numpy(np.round(teacher * 255).astype(np.float32) / 255)[batch["row"]]  # as stored
    target = 0.3 * batch["labels"] + 0.7 * p
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target))
    assert not torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, batch["labels"]))
    assert "train/distill_loss" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    from goemo.classifier import load_model

    (tmp_path / "t.npz").unlink()  # a trained student needs no teacher to load, test or predict
    loaded, _ = load_model(trainer.checkpoint_callback.best_model_path)
    assert loaded.teacher_probs is None
    trainer.test(loaded, dm, verbose=False)


def test_a_teacher_temperature_softens_its_probabilities_through_their_logits(tmp_path, tiny_model, tiny_data):
    """T divides the teacher's logits: sigmoid(logit(p) / T), p clipped to the file's resolution; T 1 leaves them."""
    from goemo.model import temper

    p = torch.tensor([[0.9, 0.5, 0.0, 1.0]])
    assert temper(p, 1.0) is p
    logit = torch.tensor([math.log(9), 0.0, -math.log(509), math.log(509)])  # 0 and 1 clipped to 1/510, 509/510
    torch.testing.assert_close(temper(p, 2.0), torch.sigmoid(logit / 2)[None])
    assert temper(p, 2.0)[0, 0].item() == pytest.approx(0.75)  # 9:1 odds become 3:1
    with pytest.raises(GoemoError, match="model.teacher_temperature must be a number > 0"):
        EmotionClassifier(str(tiny_model), teacher="t.npz", teacher_temperature=0.0)
    with pytest.raises(GoemoError, match="model.teacher_temperature 2.0 tempers a teacher's probabilities; set model.teacher"):
        EmotionClassifier(str(tiny_model), teacher_temperature=2.0)  # nothing to temper: it would do nothing
    # At fit the table is read, then softened: the targets blend the softened probabilities.
    dm, teacher = random_teacher(tmp_path, tiny_model, tiny_data)
    model = EmotionClassifier(str(tiny_model), label_names=LABELS, teacher=str(tmp_path / "t.npz"), teacher_temperature=2.0)
    L.Trainer(max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)  # fmt: skip
    stored = torch.from_numpy(np.round(teacher * 255).astype(np.float32) / 255)
    torch.testing.assert_close(model.teacher_probs, temper(stored, 2.0))


def test_the_blend_is_float32_under_bf16_true(tiny_model):
    """precision bf16-true hands the loss bf16 labels and logits: the blend and its BCE are still float32."""
    model = EmotionClassifier(str(tiny_model), label_names=LABELS, teacher="t.npz", teacher_weight=0.7)
    model.teacher_probs = torch.tensor([[0.2, 0.9, 0.01, 0.6], [0.5, 0.3, 0.7, 0.05]])  # (N, L), as read at fit
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    logits = torch.tensor([[1.3, -2.1, 0.4, 0.8], [-0.7, 2.2, -1.9, 0.1]])
    batch = {"labels": labels.bfloat16(), "row": torch.tensor([1, 0])}
    loss = model._soft_target_loss(batch, logits.bfloat16())
    target = 0.3 * labels + 0.7 * model.teacher_probs[[1, 0]]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits.bfloat16().float(), target), rtol=0, atol=1e-7)


def test_a_resumed_student_refuses_another_teacher_weight_or_table(tmp_path, tiny_model, tiny_data):
    """The fit reads model.teacher at every start: a resume with the teacher dropped or added, another weight, or a
    file rewritten since would train the rest of the run on other targets. Test and load need no teacher."""
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    texts = dm.datasets["train"].with_format(None)["text"]
    rng = np.random.default_rng(0)
    table = str(tmp_path / "t.npz")
    teacher_file.write_teacher(tmp_path / "t.npz", rng.uniform(size=(len(texts), 4)).astype(np.float32), LABELS, texts, ["m"])

    def trainer(epochs):
        return L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip

    def fit(epochs, ckpt_path=None, teacher=table, weight=0.5, temperature=1.0):
        t = trainer(epochs)
        t.fit(EmotionClassifier(str(tiny_model), label_names=LABELS, teacher=teacher, teacher_weight=weight,
                                teacher_temperature=temperature), dm, ckpt_path=ckpt_path)  # fmt: skip
        return t

    ckpt = fit(1).checkpoint_callback.best_model_path
    assert len(torch.load(ckpt, weights_only=True)["teacher_sha256"]) == 64
    fit(2, ckpt)  # the same file and weight: resumes
    with pytest.raises(GoemoError, match=f"this fit started with model.teacher {re.escape(repr(table))} at weight 0.5, "
                                         "now no teacher; resume with the settings it started with"):  # fmt: skip
        fit(2, ckpt, teacher=None)
    with pytest.raises(GoemoError, match="at weight 0.5, now model.teacher .* at weight 0.7; resume with"):
        fit(2, ckpt, weight=0.7)
    with pytest.raises(GoemoError, match="at weight 0.5 and temperature 1.0, now model.teacher .* at weight 0.5 and temperature 2.0; resume with"):
        fit(2, ckpt, temperature=2.0)
    trainer(1).test(EmotionClassifier(str(tiny_model), label_names=LABELS), dm, ckpt_path=ckpt, verbose=False)
    plain = fit(1, teacher=None).checkpoint_callback.best_model_path
    with pytest.raises(GoemoError, match="this fit started with no teacher, now model.teacher .* at weight 0.5"):
        fit(2, plain)
    teacher_file.write_teacher(tmp_path / "t.npz", rng.uniform(size=(len(texts), 4)).astype(np.float32), LABELS, texts, ["m"])
    with pytest.raises(GoemoError, match=f"model.teacher {re.escape(repr(table))} is another table than the one this fit "
                                         f"started with \\(from {re.escape(repr(table))}\\); restore that file"):  # fmt: skip
        fit(2, ckpt)


def test_a_teacher_for_other_rows_or_with_other_options_is_a_one_line_error(tmp_path, tiny_model, tiny_data):
    teacher_file.write_teacher(tmp_path / "t.npz", np.zeros((2, 4), np.float32), LABELS, ["a", "b"], ["m"])
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    model = EmotionClassifier(str(tiny_model), label_names=LABELS, teacher=str(tmp_path / "t.npz"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(GoemoError, match="training texts \\(written for another training split, 2 rows\\)"):
        trainer.fit(model, dm)
    with pytest.raises(GoemoError, match="model.teacher needs model.loss bce"):
        EmotionClassifier(str(tiny_model), teacher="t.npz", loss="focal")
    with pytest.raises(GoemoError, match="model.teacher and model.self_distill both"):
        EmotionClassifier(str(tiny_model), teacher="t.npz", self_distill=0.5)
    with pytest.raises(GoemoError, match="model.teacher_weight must be within 0..1"):
        EmotionClassifier(str(tiny_model), teacher="t.npz", teacher_weight=1.5)
    weightless = EmotionClassifier(str(tiny_model), label_names=LABELS, teacher=str(tmp_path / "t.npz"), teacher_weight=0.0)
    with pytest.raises(GoemoError, match="model.teacher_weight 0 gives the teacher no share; pass --model.teacher null"):
        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
            weightless, dm)  # at fit: a checkpoint of such a run (once allowed) still loads, tests and predicts


def test_a_teacher_of_other_labels_stops_a_fit_before_the_data_is_tokenized(
    tmp_path, tiny_model, tiny_data, monkeypatch, capsys
):
    from goemo.cli import main

    teacher_file.write_teacher(tmp_path / "t.npz", np.zeros((2, 2), np.float32), ["x", "y"], ["a", "b"], ["m"])
    tokenized = []
    monkeypatch.setattr(GoEmotionsDataModule, "prepare_data", lambda self: tokenized.append(1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
              "--data.cache_dir", str(tmp_path / "c"), "--model.teacher", str(tmp_path / "t.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has 2 labels (x, y, ...), the data 4 (joy, anger, fear, ...)" in err, err
    assert tokenized == []  # before the data module's prepare_data, which tokenizes every split


def test_folds_partition_the_training_split_and_a_fold_run_trains_on_the_others(tmp_path, tiny_model, tiny_data):
    from goemo.data import fold_ids

    folds = fold_ids(10, 3, seed=0)
    assert sorted(np.bincount(folds)) == [3, 3, 4] and (fold_ids(10, 3, seed=0) == folds).all()
    assert not (fold_ids(10, 3, seed=1) == folds).all()
    full = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    part = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"),
                                holdout_fold=1)  # fmt: skip
    full.setup("fit"), part.setup("fit")
    texts = full.datasets["train"].with_format(None)["text"]
    keep = np.flatnonzero(fold_ids(len(texts), 2, 0) == 0)
    train = part.datasets["train"].with_format(None)
    assert train["text"] == [texts[i] for i in keep] and 0 < len(keep) < len(texts)
    assert train["row"] == list(range(len(keep)))  # indices into the rows it trains on (model.teacher's tables)
    torch.testing.assert_close(part.datasets["train"][:]["labels"], full.datasets["train"][:]["labels"][keep])
    # a teacher of the whole split serves a fold's student: each of its rows by its text
    first = [texts.index(t) for t in texts]  # the data repeats texts; a teacher gives a text one prediction
    probs = np.random.default_rng(0).random((len(texts), len(LABELS))).astype(np.float32)[first]
    teacher_file.write_teacher(tmp_path / "whole.npz", probs, LABELS, texts, ["m"])
    whole = teacher_file.read_teacher(str(tmp_path / "whole.npz"), LABELS, texts)
    np.testing.assert_array_equal(teacher_file.read_teacher(str(tmp_path / "whole.npz"), LABELS, train["text"]), whole[keep])
    assert len(part.datasets["validation"]) == len(full.datasets["validation"])  # validation and test stay whole
    for bad in ({"holdout_fold": 2}, {"holdout_fold": -1}, {"num_folds": 1}):
        with pytest.raises(GoemoError, match="data.holdout_fold must be within 0..\\d+ and data.num_folds at least 2"):
            GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), **bad)
    many = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"),
                                num_folds=97, holdout_fold=96)  # fmt: skip
    with pytest.raises(GoemoError, match="^data.num_folds 97 is more than the 96 training rows: some folds would be empty$"):
        many.setup("fit")  # fold 96 was empty: the run trained on every row


def test_a_cross_fitted_teacher_gives_each_row_the_probabilities_of_the_runs_that_held_it_out(tmp_path, tiny_model, tiny_data, tiny_run):
    from goemo import load
    from goemo.data import fold_ids

    ckpts = []
    for k in (0, 1):
        dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"),
                                  holdout_fold=k)  # fmt: skip
        L.seed_everything(k)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path / f"f{k}", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(EmotionClassifier(str(tiny_model), label_names=LABELS), dm)
        ckpts.append(trainer.checkpoint_callback.best_model_path)
    t = distill.teacher_probs(ckpts)
    folds = fold_ids(len(t["texts"]), 2, 0)
    for k in (0, 1):  # fold k's rows: run k's probabilities, which never trained on them
        rows = np.flatnonzero(folds == k)
        np.testing.assert_allclose(t["probs"][rows], load(ckpts[k]).predict_proba([t["texts"][i] for i in rows]), atol=1e-6)
    mine = load(ckpts[1]).predict_proba([x for x, f in zip(t["texts"], folds) if f == 0])
    assert np.abs(t["probs"][folds == 0] - mine).max() > 1e-4  # not the run that trained on them
    with pytest.raises(GoemoError, match="no teacher run holds out fold 1 of 2; fit one with --data.holdout_fold 1"):
        distill.teacher_probs(ckpts[:1])
    # Fold 1 held out of the same rows in another order: other rows than fold 1's, which it trained on.
    other = tmp_path / "reversed"
    other.mkdir()
    for name in ("labels.txt", "dev.tsv", "test.tsv"):
        (other / name).write_bytes((tiny_data / name).read_bytes())
    rows = (tiny_data / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (other / "train.tsv").write_text("".join(reversed(rows)), encoding="utf-8")
    dm = GoEmotionsDataModule(data_dir=str(other), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"), holdout_fold=1)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path / "rev", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(EmotionClassifier(str(tiny_model), label_names=LABELS), dm)
    with pytest.raises(GoemoError, match="was fit on another training split than"):
        distill.teacher_probs([ckpts[0], trainer.checkpoint_callback.best_model_path])
    with pytest.raises(GoemoError, match="teacher runs do not all hold out a fold of one partition .*holdout_fold None"):
        distill.teacher_probs([ckpts[0], str(tiny_run / "lightning_logs/version_0")])


def test_the_minilm_configs_teacher_ships_in_the_package_and_fits_the_embedded_training_split():
    """configs/minilm.yaml's teacher (pkg:goemo/teachers/mpnet-seed42.npz; docs/results.md, the MPNet teacher) is
    installed with goemo, and its labels and rows are the embedded release's training split: the whole split row for
    row, and a subset (the sweep's 8,192 rows, another order) by each row's text."""
    import yaml

    from goemo.data import EMBEDDED
    from goemo.taxonomy import GOEMOTIONS_LABELS

    name = yaml.safe_load((REPO / "configs" / "minilm.yaml").read_text())["model"]["teacher"]
    assert name == "pkg:goemo/teachers/mpnet-seed42.npz"
    dm = GoEmotionsDataModule(data_dir=EMBEDDED, tokenizer_name="unused")
    texts = list(dm._raw_splits()["train"]["text"])
    probs = teacher_file.read_teacher(name, list(GOEMOTIONS_LABELS), texts)
    assert probs.shape == (43410, 28) and 0.04 < probs.mean() < 0.05  # the distill command printed 0.0454
    subset = teacher_file.read_teacher(name, list(GOEMOTIONS_LABELS), texts[8191::-1])
    np.testing.assert_array_equal(subset, probs[8191::-1])
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["goemo"]
    assert any(fnmatch.fnmatch("teachers/mpnet-seed42.npz", g) for g in shipped)  # a wheel install has it too


@pytest.mark.parametrize("other", [{"loss": "focal"}, {"self_distill": 0.5}])
def test_a_teacher_beside_another_loss_or_self_distill_says_how_to_drop_it(tiny_model, other):
    """configs/minilm.yaml sets a teacher the user never typed: the error names `--model.teacher null`."""
    with pytest.raises(GoemoError, match=r"--model\.teacher null drops the teacher configs/minilm\.yaml sets"):
        EmotionClassifier(str(tiny_model), label_names=LABELS, teacher="t.npz", **other)
