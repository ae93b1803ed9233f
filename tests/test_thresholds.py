import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from goemo.data import GoEmotionsDataModule
from goemo.errors import GoemoError
from goemo.model import EmotionClassifier
from goemo.runs import load_checkpoint
from goemo.thresholds import GRID, ProbsAndTargets, apply_thresholds, thresholded_metrics, tune_thresholds


def brute_force(probs: np.ndarray, targets: np.ndarray, fallback: float) -> np.ndarray:
    """Every grid value for every label, scored by sklearn; strictly better only, so ties keep the lowest."""
    out = []
    for j in range(probs.shape[1]):
        best_t, best_f1 = fallback, 0.0
        for t in GRID.numpy():
            f1 = f1_score(targets[:, j], probs[:, j] > t, zero_division=0)
            if f1 > best_f1:
                best_t, best_f1 = float(t), f1
        out.append(best_t)
    return np.array(out, dtype=np.float32)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    n, k = 300, 6
    targets = (rng.random((n, k)) < [0.05, 0.1, 0.2, 0.3, 0.5, 0.02]).astype(np.int64)
    # informative but noisy scores, float32 as the model produces them
    probs = np.clip(0.35 * targets + rng.random((n, k)) * 0.7, 0, 1).astype(np.float32)
    targets[:, 5] = 0  # a label with no positives: best F1 is 0 -> fallback
    return probs, targets


def test_matches_brute_force(arrays):
    probs, targets = arrays
    got = tune_thresholds(probs, targets, fallback=0.5)
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_array_equal(got.numpy(), brute_force(probs, targets, 0.5))
    assert got[5] == 0.5  # no positives
    # torch input, other fallback: same choice where there is something to learn
    got2 = tune_thresholds(torch.from_numpy(probs), torch.from_numpy(targets), fallback=0.3)
    np.testing.assert_array_equal(got2[:5].numpy(), got[:5].numpy())
    assert got2[5] == pytest.approx(0.3)


def test_ties_pick_the_lowest_threshold():
    # positives at 0.8/0.9, negatives at 0.1: every threshold in [0.10, 0.79] separates them perfectly
    probs = np.array([[0.9], [0.8], [0.1], [0.1]], dtype=np.float32)
    targets = np.array([[1], [1], [0], [0]])
    assert tune_thresholds(probs, targets).item() == pytest.approx(0.10)  # 0.1 > 0.10 is false in float32


def test_resampled_thresholds_are_the_mean_over_explicit_resamples(arrays):
    # The weighted counts must give what tuning on each resample's rows (duplicates included) gives, each label's
    # column taken in its canonical order (by probability, ties by target).
    probs, targets = arrays
    rows = torch.randint(len(probs), (7, len(probs)), generator=torch.Generator().manual_seed(3)).numpy()  # its draws
    by_hand = []
    for j in range(probs.shape[1]):
        order = np.lexsort((targets[:, j], probs[:, j]))  # by probability, then target
        p, y = probs[order, j : j + 1], targets[order, j : j + 1]
        found = [r for r in rows if y[r].any() and f1_score(y[r, 0], p[r, 0] > GRID[0].item()) > 0]  # F1 above 0
        by_hand.append(np.mean([brute_force(p[r], y[r], 0.5)[0] for r in found]) if found else 0.5)
    state = torch.get_rng_state()
    got = tune_thresholds(probs, targets, fallback=0.5, resamples=7, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: training's random stream is untouched
    np.testing.assert_allclose(got.numpy(), by_hand, rtol=0, atol=1e-6)
    assert got[5] == 0.5  # no positives in any resample
    assert not np.array_equal(got.numpy(), tune_thresholds(probs, targets).numpy())  # resampling changed something
    np.testing.assert_array_equal(got.numpy(), tune_thresholds(probs, targets, resamples=7, seed=3).numpy())
    with pytest.raises(GoemoError, match="resamples must be >= 0"):
        tune_thresholds(probs, targets, resamples=-1)


def test_resamples_that_drew_none_of_a_rare_labels_positives_do_not_pull_its_threshold_to_the_fallback():
    # One positive (p = 0.2) among 199 negatives (p = 0.03): about e^-1 of the resamples miss it. Every resample
    # that has it picks 0.03 (the lowest threshold that passes only the positive); the mean must be that, not a
    # blend with the fallback (0.19 before: a threshold that drops a positive at 0.15).
    probs = np.full((200, 2), 0.03, dtype=np.float32)
    targets = np.zeros((200, 2), dtype=np.int64)
    probs[17, 0], targets[17, 0] = 0.2, 1  # label 1: no positives at all -> the fallback
    got = tune_thresholds(probs, targets, fallback=0.5, resamples=100)
    assert got[0].item() == pytest.approx(0.03) and got[1].item() == 0.5
    assert got[0].item() == pytest.approx(tune_thresholds(probs, targets)[0].item())


def test_shrink_pulls_each_labels_threshold_toward_one_shared_threshold():
    probs = np.array([[0.9, 0.35], [0.6, 0.3], [0.2, 0.9], [0.1, 0.2]], dtype=np.float32)
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=np.uint8)
    # by hand: each label alone, a is separated from 0.20 up (the lowest: 0.20) and b from 0.35 up (0.35); one
    # threshold for both: 0.35 <= g < 0.6 separates both (macro-F1 1), so g = 0.35. K = 2: a has 2 positives, w 1/2;
    # b has 1, w 1/3.
    np.testing.assert_allclose(tune_thresholds(probs, targets).numpy(), [0.2, 0.35], rtol=0, atol=1e-7)
    got = tune_thresholds(probs, targets, shrink=2)
    np.testing.assert_allclose(got.numpy(), [0.5 * 0.2 + 0.5 * 0.35, 0.35 / 3 + 0.35 * 2 / 3], rtol=0, atol=1e-7)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(tune_thresholds(probs, targets, shrink=0).numpy(), tune_thresholds(probs, targets).numpy())


def test_shrink_with_resamples_pulls_the_bagged_thresholds_toward_the_rows_own_shared_one(arrays):
    probs, targets = arrays
    bagged = tune_thresholds(probs, targets, fallback=0.5, resamples=20).double()
    macro = [np.mean([f1_score(targets[:, j], probs[:, j] > g, zero_division=0) for j in range(6)]) for g in GRID.numpy()]
    g = float(GRID[int(np.argmax(macro))])  # the first maximum: the lowest among ties
    n = targets.sum(0)
    want = (n / (n + 10.0) * bagged.numpy() + 10.0 / (n + 10.0) * g).astype(np.float32)
    got = tune_thresholds(probs, targets, fallback=0.5, resamples=20, shrink=10)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    assert got[5] == pytest.approx(g)  # no positives: all on the shared threshold, not the fallback
    with pytest.raises(GoemoError, match="threshold shrink must be a number >= 0"):
        tune_thresholds(probs, targets, shrink=-1)
    # no positives at all: every single threshold has macro-F1 0, and the lowest (0.01) would predict every label
    # for every row; the shared threshold is the fallback then, as each label's own
    for resamples in (0, 20):
        got = tune_thresholds(probs, np.zeros_like(targets), fallback=0.5, resamples=resamples, shrink=10)
        np.testing.assert_array_equal(got.numpy(), np.full(6, 0.5, np.float32))


def test_resampled_thresholds_do_not_depend_on_the_rows_order(arrays):
    # Two DDP ranks' outputs arrive rank by rank, not in the dataset's order: the thresholds must be the same.
    probs, targets = arrays
    probs = np.round(probs, 1)  # many ties, with both targets among them
    shuffled = np.random.default_rng(1).permutation(len(probs))
    a = tune_thresholds(probs, targets, resamples=20)
    np.testing.assert_array_equal(a.numpy(), tune_thresholds(probs[shuffled], targets[shuffled], resamples=20).numpy())


def test_tuned_metrics_equal_fixed_when_thresholds_are_fixed(arrays):
    from torchmetrics.functional.classification import multilabel_f1_score

    probs, targets = map(torch.from_numpy, arrays)
    m = thresholded_metrics(probs, targets, torch.full((6,), 0.3))
    fixed = multilabel_f1_score(probs, targets, num_labels=6, threshold=0.3, average="macro", zero_division=0)
    assert m["f1_macro"] == pytest.approx(fixed.item())
    pred = apply_thresholds(probs, torch.full((6,), 0.3))
    assert m["f1_micro"] == pytest.approx(f1_score(targets.numpy(), pred.numpy(), average="micro", zero_division=0))
    assert m["exact_match"] == pytest.approx((pred.numpy() == targets.numpy().astype(bool)).all(1).mean())


def test_bad_shapes():
    with pytest.raises(GoemoError, match=r"one shape \(N, L\)"):
        tune_thresholds(np.zeros((3, 2)), np.zeros((3, 3)))


def test_probs_and_targets_collects_batches():
    m = ProbsAndTargets()
    m.update(torch.tensor([[0.1, 0.9]]), torch.tensor([[0.0, 1.0]]))
    m.update(torch.tensor([[0.7, 0.2], [0.3, 0.4]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    probs, targets = m.compute()
    assert probs.shape == targets.shape == (3, 2) and targets.dtype == torch.uint8
    assert targets[:, 0].tolist() == [0, 1, 0]


def test_probs_and_targets_come_back_in_split_order_when_rows_are_given():
    """Under DDP the outputs are gathered rank by rank: with the rows' indices they come back in the split's order, as
    in one process, so the report's bootstrap intervals do not depend on the number of processes."""
    m = ProbsAndTargets()
    m.update(torch.tensor([[0.1, 0.9], [0.5, 0.5]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([2, 0]))  # rank 0's
    m.update(torch.tensor([[0.7, 0.2]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]))  # rank 1's
    probs, targets = m.compute()
    assert probs.tolist() == [[0.5, 0.5], [0.699999988079071, 0.20000000298023224], [0.10000000149011612, 0.8999999761581421]]
    assert targets.tolist() == [[1, 1], [1, 0], [0, 1]]
    m.update(torch.tensor([[0.4, 0.6]]), torch.tensor([[0.0, 1.0]]))  # a batch without its rows' indices
    with pytest.raises(GoemoError, match=r"^3 row indices for 4 rows of outputs"):
        m.compute()


# -- in a real fit ---------------------------------------------------------------------------------
def test_each_checkpoint_carries_its_epochs_thresholds(tiny_data, tiny_model, tmp_path):
    """Every checkpoint (so also "best") holds the thresholds tuned on the validation that preceded it:
    re-tuning them from the checkpoint's own validation outputs gives the same vector. Saved one
    validation late (hook order), they would differ, as the thresholds move between validations here.
    Validating 4 times an epoch makes ModelCheckpoint save in `on_validation_end`, the tight case (once an
    epoch, it saves later, at train epoch end)."""
    L.seed_everything(0)
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"),
                              train_batch_size=8)  # fmt: skip
    model = EmotionClassifier(str(tiny_model), label_names=dm.label_names, pooling="mean", learning_rate=3e-3,
                              head_learning_rate=3e-2)  # fmt: skip
    ckpt = L.pytorch.callbacks.ModelCheckpoint(monitor="val/f1_micro", mode="max", save_top_k=-1)
    trainer = L.Trainer(
        max_epochs=1, val_check_interval=0.25, accelerator="cpu", default_root_dir=tmp_path, callbacks=[ckpt],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert {"val/f1_micro_tuned", "val/f1_macro_tuned", "val/exact_match_tuned"} <= set(trainer.callback_metrics)
    files = sorted(ckpt.best_k_models)
    assert len(files) == 4 and ckpt.best_model_path in files
    saved = [load_checkpoint(f)["state_dict"]["thresholds"] for f in files]
    assert len({tuple(t.tolist()) for t in saved}) > 1  # they move between epochs, so the check below bites
    for f, thresholds in zip(files, saved):
        again = EmotionClassifier.load_from_checkpoint(f)
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(again, dm, verbose=False)
        torch.testing.assert_close(again.thresholds, thresholds)


def test_old_checkpoint_without_thresholds_loads(tiny_model, tmp_path):
    model = EmotionClassifier(str(tiny_model), label_names=["a", "b"], threshold=0.4)
    state = {k: v for k, v in model.state_dict().items() if k != "thresholds"}
    ckpt = {"state_dict": state, "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": "2.6.0"}
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="no tuned per-label thresholds"):
        loaded = EmotionClassifier.load_from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.thresholds.tolist() == pytest.approx([0.4, 0.4])
    from goemo import load
    from goemo.errors import GoemoError

    with pytest.warns(UserWarning, match="no tuned per-label thresholds"):  # goemo.load, export: the same rule
        assert load(tmp_path / "old.ckpt").thresholds.tolist() == pytest.approx([0.4, 0.4])
    del state["head.bias"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(GoemoError, match=r"the checkpoint's weights do not fit model .* \(missing 1 \(e.g. head.bias\)\)"):
        load(tmp_path / "old.ckpt")


def test_predict_uses_tuned_thresholds(tiny_model):
    from goemo.predict import label_thresholds, to_records

    model = EmotionClassifier(str(tiny_model), label_names=["a", "b", "c"]).eval()
    model.thresholds.copy_(torch.tensor([0.0, 1.0, 0.5]))
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        probs = model.predict_step(batch, 0)
    assert probs.shape == (1, 3)
    assert label_thresholds(model).tolist() == [0.0, 1.0, 0.5]
    (rec,) = to_records(["x"], probs.numpy(), model.label_names, label_thresholds(model).numpy())
    assert "a" in rec["labels"] and "b" not in rec["labels"]  # a label is chosen when p > t: any p > 0, no p > 1
    assert ("c" in rec["labels"]) == bool(probs[0, 2] > 0.5)


@pytest.mark.slow
def test_validation_tunes_with_the_models_threshold_resamples(learned_run, tiny_model):
    """The thresholds a validation epoch stores are tune_thresholds of its outputs with `model.threshold_resamples`."""
    (best,) = (learned_run / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    dm = GoEmotionsDataModule(data_dir=str(learned_run / "data"), tokenizer_name=str(tiny_model),
                              cache_dir=str(learned_run / "cache"))  # fmt: skip
    got = {}
    for k, shrink in ((0, 0.0), (5, 0.0), (5, 10.0)):
        model = EmotionClassifier.load_from_checkpoint(best, threshold_resamples=k, threshold_shrink=shrink)
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(model, dm, verbose=False)
        got[k, shrink] = model.thresholds.clone()
    model.eval()  # validate() leaves it in training mode, as it found it
    with torch.no_grad():  # the same model's validation outputs, batch by batch
        outputs = [(torch.sigmoid(model.model_step(b)[1]), b["labels"]) for b in dm.val_dataloader()]
    probs, targets = (torch.cat(x) for x in zip(*outputs))
    for (k, shrink), thresholds in got.items():
        torch.testing.assert_close(thresholds, tune_thresholds(probs, targets, 0.5, k, shrink=shrink), rtol=0, atol=0)
    assert not torch.equal(got[0, 0.0], got[5, 0.0]) and not torch.equal(got[5, 0.0], got[5, 10.0])
    with pytest.raises(GoemoError, match="threshold_resamples must be >= 0"):
        EmotionClassifier(str(tiny_model), label_names=["a", "b"], threshold_resamples=-1)
    with pytest.raises(GoemoError, match=r"model.threshold_shrink must be a number >= 0 \(0: no pull"):
        EmotionClassifier(str(tiny_model), label_names=["a", "b"], threshold_shrink=float("nan"))


def test_grid_reaches_0_99_in_steps_of_0_01():
    """The tests above search GRID itself: a grid ending at 0.98, or a coarser one, passed them all."""
    assert len(GRID) == 99 and GRID[0].item() == pytest.approx(0.01) and GRID[-1].item() == pytest.approx(0.99)
    high = tune_thresholds(np.array([[0.995], [0.995], [0.985], [0.985]], np.float32), np.array([[1], [1], [0], [0]]), 0.5)
    assert high.item() == pytest.approx(0.99)  # only 0.99 parts positives (0.995) from negatives (0.985)
    step = tune_thresholds(np.array([[0.125], [0.125], [0.115], [0.115]], np.float32), np.array([[1], [1], [0], [0]]), 0.5)
    assert step.item() == pytest.approx(0.12)
