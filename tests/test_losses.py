import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from goemo.data import GoEmotionsDataModule
from goemo.errors import GoemoError
from goemo.losses import FocalLoss, WeightedBCE, build_loss, pos_weight_from_frequencies
from goemo.model import EmotionClassifier
from goemo.runs import load_checkpoint

# One row, two labels: logits (2, -1), targets (1, 0).
LOGITS = torch.tensor([[2.0, -1.0]])
TARGETS = torch.tensor([[1.0, 0.0]])
sig = lambda x: 1 / (1 + math.exp(-x))
P0, P1 = sig(2.0), sig(-1.0)  # probability of label 0 (a positive) and label 1 (a negative)
BCE0, BCE1 = -math.log(P0), -math.log(1 - P1)  # per-term cross-entropy


def test_bce_by_hand():
    loss = build_loss("bce", 2, 2.0, None)(LOGITS, TARGETS)
    assert loss.item() == pytest.approx((BCE0 + BCE1) / 2, rel=1e-6)


def test_bce_pos_weight_by_hand():
    loss_fn = build_loss("bce_pos_weight", 2, 2.0, None)
    assert loss_fn.pos_weight.tolist() == [1.0, 1.0]  # until fit fills it in
    loss_fn.pos_weight.copy_(torch.tensor([3.0, 5.0]))
    # the logits are shifted by log w: (2 + log 3, -1 + log 5); w scales the positive term only
    q0, q1 = sig(2.0 + math.log(3.0)), sig(-1.0 + math.log(5.0))
    assert loss_fn(LOGITS, TARGETS).item() == pytest.approx((-3.0 * math.log(q0) - math.log(1 - q1)) / 2, rel=1e-6)
    both = torch.tensor([[1.0, 1.0]])
    assert loss_fn(LOGITS, both).item() == pytest.approx((-3.0 * math.log(q0) - 5.0 * math.log(q1)) / 2, rel=1e-6)


def test_bce_pos_weight_is_lowest_at_the_labels_own_log_odds():
    """Weighted, the best constant logit is still log(f / (1 - f)): the outputs stay the labels' probabilities."""
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # f = 0.2, 0.4
    loss_fn = build_loss("bce_pos_weight", 2, 2.0, None)
    loss_fn.pos_weight.copy_(torch.tensor([4.0, 10.0]))  # the first label's neg/pos, and another weight
    f = targets.mean(0)
    logit = torch.log(f / (1 - f)).repeat(5, 1).requires_grad_()  # (5, 2): one constant per label
    loss_fn(logit, targets).backward()
    torch.testing.assert_close(logit.grad.sum(0), torch.zeros(2), atol=1e-7, rtol=0)


def test_focal_by_hand():
    gamma = 2.0
    # p_t = P0 for the positive, 1 - P1 for the negative
    fl0, fl1 = (1 - P0) ** gamma * BCE0, P1**gamma * BCE1
    assert FocalLoss(gamma)(LOGITS, TARGETS).item() == pytest.approx((fl0 + fl1) / 2, rel=1e-6)
    alpha = 0.25  # positives weigh alpha, negatives 1 - alpha
    got = build_loss("focal", 2, gamma, alpha)(LOGITS, TARGETS).item()
    assert got == pytest.approx((alpha * fl0 + (1 - alpha) * fl1) / 2, rel=1e-6)
    # gamma 0, no alpha: plain BCE
    assert FocalLoss(0.0)(LOGITS, TARGETS).item() == pytest.approx((BCE0 + BCE1) / 2, rel=1e-6)


def test_focal_is_fp32_under_half_inputs():
    logits = torch.tensor([[12.0, -12.0]], dtype=torch.float16)
    loss = FocalLoss(2.0)(logits, torch.tensor([[1.0, 0.0]], dtype=torch.float16))
    assert loss.dtype == torch.float32 and loss.item() > 0  # (1 - p_t)^2 * BCE ~ 1e-16, not 0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradient_is_finite_on_confident_logits(gamma):
    """Past |logit| ~17, 1 - p_t is exactly 0 in float32, where x^gamma has an infinite slope for gamma < 1: the
    gradient was NaN (and one step made the head NaN) while the loss looked fine."""
    logits = torch.tensor([[30.0, -30.0, 0.3, 200.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    loss = FocalLoss(gamma)(logits, targets)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, [0, 1, 3]].abs().max() < 1e-12 and logits.grad[0, 2] < 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 2], targets[0, 2]).item()
    assert loss.item() == pytest.approx((1 - torch.sigmoid(torch.tensor(0.3)).item()) ** gamma * bce / 4, rel=1e-5)


@pytest.mark.parametrize(
    "gamma,alpha,match",
    [
        (-1.0, None, "focal_gamma must be a number >= 0"),
        (float("nan"), None, "focal_gamma must be a number >= 0, got nan"),
        (float("inf"), None, "focal_gamma must be a number >= 0, got inf"),
        (2.0, 1.5, "focal_alpha must be within 0..1"),
    ],
)
def test_focal_bad_args(gamma, alpha, match):
    with pytest.raises(GoemoError, match=match):
        FocalLoss(gamma, alpha)


def test_pos_weight_from_frequencies():
    w = pos_weight_from_frequencies(torch.tensor([0.5, 0.2, 0.001, 0.0]), max_weight=100.0)
    assert w.tolist() == pytest.approx([1.0, 4.0, 100.0, 100.0])  # 999 capped; no positives -> the cap
    # no cap (inf, "no cap" in --help): 999 as is; no positives -> 1, so the loss stays finite
    w = pos_weight_from_frequencies(torch.tensor([0.5, 0.001, 0.0]), max_weight=float("inf"))
    assert w.tolist() == pytest.approx([1.0, 999.0, 1.0])
    loss = WeightedBCE(3)
    loss.pos_weight.copy_(w)
    assert torch.isfinite(loss(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0]])))


def test_fit_fills_pos_weight_from_training_frequencies(tiny_data, tiny_model, tmp_path):
    """`bce_pos_weight`: the data module's training frequencies become neg/pos, carried by the checkpoint."""
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    model = EmotionClassifier(str(tiny_model), label_names=dm.label_names, loss="bce_pos_weight")
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", default_root_dir=tmp_path,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    freq = dm.label_frequencies()
    labels = torch.stack([r["labels"] for r in dm.datasets["train"]])  # (96, 4) from the rows themselves
    torch.testing.assert_close(freq, labels.double().mean(0))
    expected = ((1 - freq) / freq).float()
    torch.testing.assert_close(model.loss_fn.pos_weight, expected)
    saved = load_checkpoint(trainer.checkpoint_callback.best_model_path)["state_dict"]["loss_fn.pos_weight"]
    torch.testing.assert_close(saved, expected)
    # and a test-time model gets them from the checkpoint, not from the data
    loaded = EmotionClassifier.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    torch.testing.assert_close(loaded.loss_fn.pos_weight, expected)


def test_model_builds_each_loss(tiny_model):
    for name, cls in (("bce", torch.nn.BCEWithLogitsLoss), ("bce_pos_weight", WeightedBCE), ("focal", FocalLoss)):
        assert isinstance(EmotionClassifier(str(tiny_model), label_names=["a", "b"], loss=name).loss_fn, cls)
    focal = EmotionClassifier(str(tiny_model), label_names=["a", "b"], loss="focal", focal_gamma=0.5, focal_alpha=0.3)
    assert (focal.loss_fn.gamma, focal.loss_fn.alpha) == (0.5, 0.3)  # the settings reach the loss


@pytest.mark.parametrize("loss", ["bce", "bce_pos_weight"])
def test_focal_settings_out_of_range_are_refused_whatever_the_loss(tiny_model, loss):
    """They are saved with the run (and a sweep may switch the loss to focal): checked like every other setting."""
    with pytest.raises(GoemoError, match=r"model.focal_gamma must be a number >= 0, got -3.0"):
        EmotionClassifier(str(tiny_model), label_names=["a", "b"], loss=loss, focal_gamma=-3.0)
    with pytest.raises(GoemoError, match=r"model.focal_alpha must be within 0..1 or null, got 7.0"):
        EmotionClassifier(str(tiny_model), label_names=["a", "b"], loss=loss, focal_alpha=7.0)


def test_head_bias_prior_starts_from_the_training_log_odds_and_a_resumed_fit_keeps_its_own(tiny_data, tiny_model, tmp_path):
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    seen = []

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(pl_module.head.bias.detach().clone())

    def fit(epochs: int, ckpt_path=None) -> tuple[EmotionClassifier, L.Trainer]:
        model = EmotionClassifier(str(tiny_model), label_names=dm.label_names, head_bias="prior", head_learning_rate=0.5)
        trainer = L.Trainer(
            max_epochs=epochs, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", default_root_dir=tmp_path,
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Look()],
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, trainer

    assert EmotionClassifier(str(tiny_model), label_names=dm.label_names).head.bias.abs().max() == 0  # default: zero
    model, trainer = fit(1)
    f = dm.label_frequencies().float()
    torch.testing.assert_close(seen[0], torch.log(f / (1 - f)))  # the tiny data's four labels are all in use
    trained = model.head.bias.detach().clone()
    assert (trained - seen[0]).abs().max() > 0.1  # training moved it
    fit(2, ckpt_path=trainer.checkpoint_callback.best_model_path)
    torch.testing.assert_close(seen[1], trained)  # resumed: the checkpoint's bias, not the prior again


def test_aux_head_bias_prior_is_each_groups_log_odds(tmp_path, tiny_model):
    """head_bias prior with aux_taxonomy ekman: the auxiliary head starts at the log-odds of each Ekman group among the
    training rows (a row counts once per group, however many of its labels are in it); an empty group at that of 1e-4."""
    from conftest import synthetic_rows, write_split
    from goemo.taxonomy import GOEMOTIONS_LABELS as names

    d = tmp_path / "data"  # the synthetic rows' four labels (joy, anger, fear, neutral) as ids among the 28
    d.mkdir()
    (d / "labels.txt").write_text("\n".join(names) + "\n")
    ids = [names.index(n) for n in ("joy", "anger", "fear", "neutral")]
    for name, n, seed in (("train.tsv", 96, 0), ("dev.tsv", 32, 1), ("test.tsv", 32, 2)):
        rows = [(t, ",".join(str(ids[int(i)]) for i in y.split(","))) for t, y in synthetic_rows(n, seed)]
        write_split(d / name, rows)
    dm = GoEmotionsDataModule(data_dir=str(d), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    seen = []

    class Look(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(pl_module.aux_head.bias.detach().clone())

    model = EmotionClassifier(str(tiny_model), label_names=names, head_bias="prior", aux_taxonomy="ekman")
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", default_root_dir=tmp_path,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Look()],
    )  # fmt: skip
    trainer.fit(model, dm)
    # goemo.load's path: the model rebuilt from the checkpoint's hyperparameters, every weight loaded strictly
    from goemo.classifier import load_model

    loaded, _ = load_model(trainer.checkpoint_callback.best_model_path)
    torch.testing.assert_close(loaded.aux_head.weight, model.aux_head.weight)
    rows = synthetic_rows(96, 0)
    has = lambda k: sum(str(k) in y.split(",") for _, y in rows) / 96  # noqa: E731  (fraction of rows with label k)
    # Ekman groups: anger, disgust, fear, joy, sadness, surprise, neutral; the tiny rows' labels are one group each.
    f = torch.tensor([has(1), 1e-4, has(2), has(0), 1e-4, 1e-4, has(3)], dtype=torch.float32)
    torch.testing.assert_close(seen[0], torch.log(f / (1 - f)))


def test_self_distill_targets_blend_the_last_epochs_predictions():
    """SelfDistillTargets: rows with a prediction from the epoch before get (1 - a) y + a p, others y; the tables swap
    when the next epoch starts, not again within it (a resumed fit), and a skipped epoch leaves no predictions."""
    from goemo.losses import SelfDistillTargets

    t = SelfDistillTargets(num_rows=3, num_labels=2)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rows = torch.tensor([2, 0])
    t.start_epoch(0)
    torch.testing.assert_close(t.targets(rows, y, 0.5), y)  # nothing predicted yet
    t.record(rows, torch.tensor([[0.2, 0.4], [0.9, 0.6]]))
    t.start_epoch(1)
    t.start_epoch(1)  # resumed within epoch 1: no second swap
    torch.testing.assert_close(t.targets(torch.tensor([0, 1, 2]), torch.tensor([[0.0, 1.0]] * 3), 0.25),
                               torch.tensor([[0.225, 0.9], [0.0, 1.0], [0.05, 0.85]]))  # row 1 was not seen: its labels
    state = t.state_dict()
    t2 = SelfDistillTargets(3, 2)
    t2.load_state_dict(state)
    assert t2.epoch == 1 and torch.equal(t2.prev.nan_to_num(-1), t.prev.nan_to_num(-1))
    t2.start_epoch(3)  # epoch 2 was never recorded: no targets from it
    assert t2.prev.isnan().all()
    with pytest.raises(GoemoError, match=r"self-distillation targets are for \(3, 2\).*has \(4, 2\)"):
        SelfDistillTargets(4, 2).load_state_dict(state)


def test_self_distill_trains_on_soft_targets_from_the_epoch_before(tmp_path, tiny_model, tiny_data):
    """model.self_distill in a tiny 3-epoch fit: every training row's probabilities are recorded in an epoch and read
    back in the next; the loss trained on is BCE against (1 - a) y + a p with a = 0.6 * epoch / 2 (checked by hand on
    a batch), `train/loss` stays the labels' BCE; the tables ride in the checkpoint, which loads as any other."""
    import torch.nn.functional as F

    seen = {}

    class Look(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[f"next{trainer.current_epoch}"] = pl_module.distill_targets.next.clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:  # the batch's loss again, without dropout, against the one by hand
                prev = pl_module.distill_targets.prev.clone()
                pl_module.eval()
                with torch.no_grad():
                    logits = pl_module(batch["input_ids"], batch["attention_mask"])
                    loss = pl_module._soft_target_loss(batch, logits)
                pl_module.train()
                seen[f"batch{trainer.current_epoch}"] = (batch, prev, logits, loss)

    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    model = EmotionClassifier(str(tiny_model), label_names=["joy", "anger", "fear", "neutral"], self_distill=0.6)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Look()],
    )  # fmt: skip
    trainer.fit(model, dm)
    n = len(dm.datasets["train"])
    for e in (0, 1):  # every row predicted once per epoch, and those predictions are the next epoch's targets
        assert seen[f"next{e}"].shape == (n, 4) and not seen[f"next{e}"].isnan().any()
        assert torch.equal(seen[f"batch{e + 1}"][1], seen[f"next{e}"])
    assert seen["batch0"][1].isnan().all()
    for e, a in ((0, 0.0), (1, 0.3), (2, 0.6)):  # a = 0.6 * epoch / (3 - 1)
        batch, prev, logits, loss = seen[f"batch{e}"]
        target = (1 - a) * batch["labels"] + a * prev[batch["row"]] if e else batch["labels"]
        torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target))
    assert "train/distill_loss" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    ckpt = load_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert ckpt["self_distill"]["prev"].shape == (n, 4)
    from goemo.classifier import load_model

    loaded, _ = load_model(trainer.checkpoint_callback.best_model_path)  # strict: no table among the weights
    assert loaded.distill_targets is None
    with pytest.raises(GoemoError, match="model.self_distill needs model.loss bce"):
        EmotionClassifier(str(tiny_model), self_distill=0.5, loss="focal")
    with pytest.raises(GoemoError, match=r"model.self_distill must be within \[0, 1\)"):
        EmotionClassifier(str(tiny_model), self_distill=1.0)


@pytest.mark.parametrize("loss", ["bce", "bce_pos_weight"])
def test_the_main_loss_is_float32_under_bf16_true(tiny_model, loss):
    """precision bf16-true casts the model (pos_weight included) to bf16: the loss is still computed in float32."""
    model = EmotionClassifier(str(tiny_model), label_names=["a", "b"], loss=loss)
    if loss == "bce_pos_weight":
        model.loss_fn.pos_weight.copy_(torch.tensor([559.0, 3.7]))
    model = model.bfloat16()
    batch = {"input_ids": torch.tensor([[101, 2023, 102], [101, 2008, 102]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0]]).bfloat16()}  # fmt: skip
    got, logits, _ = model.model_step(batch)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    if loss == "bce_pos_weight":  # kept float32 by the cast: 559, not bf16's 560
        assert model.loss_fn.pos_weight.dtype == torch.float32
    w = torch.tensor([559.0, 3.7]) if loss == "bce_pos_weight" else torch.ones(2)
    want = F.binary_cross_entropy_with_logits(logits.float() + w.log(), batch["labels"].float(), pos_weight=w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_auxiliary_loss_is_float32_under_bf16_true(tiny_model):
    """aux_taxonomy's loss is added to the main one in float32 too (in bf16 it was ~0.3% off under bf16-true)."""
    from goemo.taxonomy import GOEMOTIONS_LABELS as names

    torch.manual_seed(0)
    model = EmotionClassifier(str(tiny_model), label_names=names, aux_taxonomy="ekman", aux_weight=0.5).bfloat16().eval()  # no dropout
    labels = torch.zeros(2, len(names))
    labels[0, [0, 3]], labels[1, 27] = 1.0, 1.0
    batch = {"input_ids": torch.tensor([[101, 2023, 102], [101, 2008, 102]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": labels.bfloat16()}  # fmt: skip
    with pytest.warns(UserWarning, match="self.log"):  # no trainer to log to; the returned loss is what counts
        got = model.training_step(batch, 0)
    main, _, features = model.model_step(batch)
    groups = (labels @ model.aux_groups.float()).clamp(max=1.0)
    want = main + 0.5 * F.binary_cross_entropy_with_logits(model.aux_head(features).float(), groups)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
