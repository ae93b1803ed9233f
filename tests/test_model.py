import math

import pytest
import torch

from goemo.errors import GoemoError
from goemo.model import EmotionClassifier, _encoder_depths


@pytest.mark.parametrize("pooling,width", [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_forward_shapes(tiny_model, pooling, width):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b", "c"], pooling=pooling).eval()
    assert m.head.in_features == width
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    logits = m(ids, (ids != 0).long())
    assert logits.shape == (2, 3)


def test_mean_pooling_ignores_padding(tiny_model):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], pooling="mean").eval()
    ids = torch.tensor([[101, 2000, 102]])
    padded = torch.tensor([[101, 2000, 102, 0, 0, 0]])
    with torch.no_grad():
        a = m(ids, torch.ones_like(ids))
        b = m(padded, (padded != 0).long())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logits_and_probabilities_are_float32_under_bf16_autocast(tiny_model):
    """bf16-mixed (the default on CUDA) made bf16 logits: their sigmoid is in 1/256 steps above 0.5, and thresholds
    were tuned on coarser probabilities than test, goemo.load and the export compute in float32. The encoder runs in
    bf16, the head outside autocast."""
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b", "c"]).eval()
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([[1.0, 0, 0], [0, 1, 0]])}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = m.features(batch["input_ids"], batch["attention_mask"])
        logits = m(batch["input_ids"], batch["attention_mask"])
        assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
        assert m.model_step(batch)[1].dtype == torch.float32
        assert m.predict_step(batch, 0).dtype == torch.float32
        m._eval_step(batch, "val")  # no trainer: its self.log calls are skipped
    probs, _ = m.val_outputs.compute()
    assert probs.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, m.head(features.float()), rtol=0, atol=0)  # a float32 matmul of the bf16 features


def test_a_nan_row_does_not_turn_its_batch_positive(tiny_model):
    """torchmetrics sigmoids a batch of probabilities with any value outside 0..1, NaN included: the fixed-threshold
    metrics would count the batch's clear negatives as positives, and disagree with `*_tuned` (NaN > t is False)."""
    from goemo.thresholds import thresholded_metrics

    m = EmotionClassifier(str(tiny_model), label_names=["a", "b", "c"]).eval()
    logits = torch.tensor([[-3.0, -2.0, 2.0], [-4.0, 3.0, -1.0], [float("nan"), -2.0, -3.0]])  # (B, L)
    labels = torch.tensor([[0.0, 0, 1], [0, 1, 0], [0, 0, 0]])
    m.model_step = lambda batch: (torch.tensor(0.5), logits, None)
    m._eval_step({"labels": labels}, "val")  # no trainer: its self.log calls are skipped
    fixed = {k.removeprefix("val/"): float(v) for k, v in m.val_metrics.compute().items()}
    probs, targets = m.val_outputs.compute()
    tuned = {k: float(v) for k, v in thresholded_metrics(probs, targets, torch.full((3,), 0.5)).items()}
    assert fixed == tuned and fixed["exact_match"] == 1.0  # every row right: the NaN counts as a negative


def test_thresholds_stay_float32_when_the_model_is_cast(tiny_data, tiny_model, tmp_path):
    """precision bf16-true casts every floating buffer: a bf16 threshold is the tuned one rounded (0.37 -> 0.3691)."""
    import lightning as L

    from goemo.data import GoEmotionsDataModule

    m = EmotionClassifier(str(tiny_model), label_names=["a", "b", "c"])
    m.thresholds.fill_(0.37)
    m.to(torch.bfloat16)
    assert m.head.weight.dtype == torch.bfloat16  # the rest is cast
    assert m.thresholds.dtype == torch.float32 and m.thresholds[0].item() == torch.tensor(0.37).item()
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    model = EmotionClassifier(str(tiny_model), label_names=dm.label_names)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-true", limit_val_batches=2, default_root_dir=tmp_path, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(model, dm)  # tunes the thresholds in place
    assert model.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert model.thresholds.dtype == torch.float32


def test_encoder_trains_with_dropout(tiny_model):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"])
    assert m.encoder.training  # from_pretrained returns eval mode; dropout must be on in fit


def test_labels_default_to_goemotions(tiny_model):
    m = EmotionClassifier(str(tiny_model))
    assert len(m.label_names) == 28 and m.hparams.label_names[-1] == "neutral" and m.head.out_features == 28


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"head_learning_rate": 0.0}, "head_learning_rate"),
        ({"threshold": 1.5}, "threshold must be within 0..1"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"attention_dropout": 1.0}, "attention_dropout must be within"),
        ({"pooling": "max"}, "model.pooling 'max': use one of cls, mean, cls\\+mean"),  # e.g. a newer goemo's checkpoint
        ({"lr_schedule": "step"}, "model.lr_schedule 'step': use one of linear, cosine, constant"),
        ({"token_cutoff": 1.0}, "model.token_cutoff must be within"),
        ({"token_cutoff": -0.1}, "model.token_cutoff must be within"),
    ],
)
def test_nonsense_values_are_refused(tiny_model, kw, msg):
    with pytest.raises(GoemoError, match=msg):
        EmotionClassifier(str(tiny_model), **kw)


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_cutoff_hides_only_inner_real_tokens(tiny_model, side):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], token_cutoff=0.3)
    torch.manual_seed(0)  # the lengths and the cut both: the same draws whatever ran before
    lengths = torch.randint(1, 41, (500,))
    pads = (torch.arange(40)[None, :] < lengths[:, None]).long()  # (B, T), right padding
    mask = pads if side == "right" else pads.flip(1)
    cut = m._cut_tokens(mask)
    real = mask.bool()
    positions = torch.arange(40).expand_as(mask)
    first = torch.where(real, positions, 99).amin(1)
    last = torch.where(real, positions, -1).amax(1)
    rows = torch.arange(500)
    assert (cut <= mask).all()  # padding stays hidden
    assert (cut[rows, first] == 1).all() and (cut[rows, last] == 1).all()  # [CLS] and [SEP] always seen
    inner = real.clone()
    inner[rows, first] = False
    inner[rows, last] = False
    hidden = (mask - cut)[inner].float().mean().item()
    assert abs(hidden - 0.3) < 0.02  # ~8,000 inner tokens


def test_token_cutoff_changes_training_only(tiny_model):
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([[1.0, 0.0]] * 4)}  # fmt: skip
    losses, outputs = {}, {}
    for p in (0.0, 0.5):
        torch.manual_seed(0)  # the same weights for both
        m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], token_cutoff=p).eval()  # no dropout: only the cut differs
        m.log = m.log_dict = lambda *a, **k: None  # no trainer attached
        losses[p] = m.training_step(batch, 0).item()
        with torch.no_grad():  # validation's and test's own steps, and what they keep for tuning and the report
            m.validation_step({**batch, "row": torch.arange(4)}, 0)
            m.test_step({**batch, "row": torch.arange(4)}, 0)
        outputs[p] = (m.val_outputs.compute()[0], m.test_outputs.compute()[0])  # (4, 2) probabilities each
    assert losses[0.0] != losses[0.5]
    assert all(torch.equal(a, b) for a, b in zip(outputs[0.0], outputs[0.5]))  # evaluation sees whole texts


def test_optimizer_groups(tiny_model):
    """No weight decay on biases and LayerNorm; the head gets its own learning rate; linear warmup then decay."""
    from types import SimpleNamespace

    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], learning_rate=1e-4, head_learning_rate=1e-2,
                          weight_decay=0.1, warmup_ratio=0.1)  # fmt: skip
    m._trainer = SimpleNamespace(estimated_stepping_batches=100, gradient_clip_val=None, precision_plugin=None)
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert opt.defaults["fused"] is True  # on a CPU too: the foreach step is several times slower
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            assert g["weight_decay"] == (0.0 if (n.endswith("bias") or "LayerNorm" in n) else 0.1), n
            assert g["initial_lr"] == (1e-2 if n.startswith("head.") else 1e-4), n
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])
        opt.step(), sched.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[-1] < 0.02


def _rates(model, steps):
    """The first parameter group's rate over `steps` optimizer steps, as fractions of its peak."""
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"] / opt.param_groups[0]["initial_lr"])
        opt.step(), sched.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedules_after_the_warmup(tiny_model, schedule):
    """cosine: half a cosine down to 0; constant: the peak until the end (and with no end at all: max_epochs -1)."""
    from types import SimpleNamespace

    def model(steps, warmup=0.1):
        m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], warmup_ratio=warmup, lr_schedule=schedule)
        m._trainer = SimpleNamespace(estimated_stepping_batches=steps, gradient_clip_val=None, precision_plugin=None, is_global_zero=True)
        return m

    lrs = _rates(model(100), 100)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    if schedule == "cosine":  # 0.5 * (1 + cos(pi * progress)), progress over the 90 steps after the warmup
        assert lrs[55] == pytest.approx(0.5) and lrs[32] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
        assert lrs[-1] < 0.001
    else:
        assert lrs[10:] == pytest.approx([1.0] * 90)
        assert _rates(model(math.inf, warmup=0.0), 5) == [1.0] * 5
        with pytest.raises(GoemoError, match="model.warmup_ratio .* needs an end: .*, or model.warmup_ratio 0"):
            model(math.inf).configure_optimizers()


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_clipped_gradients_under_mixed_precision_take_the_unfused_step(tiny_data, tiny_model, tmp_path, precision):
    """configs/base.yaml on a GPU: 16-mixed and clipping at 1. Lightning refuses to clip for a fused optimizer under
    mixed precision (a RuntimeError at the first step); bf16-mixed on a CPU takes the same path."""
    import lightning as L

    from goemo.data import GoEmotionsDataModule

    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    model = EmotionClassifier(str(tiny_model), label_names=dm.label_names)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", precision=precision,
        gradient_clip_val=1.0, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, dm)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is (precision == "32-true")  # full precision keeps the fast step


def test_layer_decay_scales_each_layer_learning_rate(tiny_model):
    """layer_decay d: the top layer at learning_rate, each one below times d, the embeddings d^n; head and pooler keep theirs."""
    from types import SimpleNamespace

    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], learning_rate=1e-4, head_learning_rate=1e-2, layer_decay=0.5)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10, gradient_clip_val=None, precision_plugin=None)
    opt = m.configure_optimizers()["optimizer"]
    lr = {n: g["lr"] for g in opt.param_groups for n, p in m.named_parameters() for q in g["params"] if p is q}
    assert len(lr) == len(list(m.parameters()))  # every parameter in exactly one group, none lost
    n_layers = m.encoder.config.num_hidden_layers  # 2 in the tiny BERT
    assert lr["encoder.encoder.layer.1.attention.self.query.weight"] == pytest.approx(1e-4)  # the top layer
    assert lr["encoder.encoder.layer.0.output.LayerNorm.bias"] == pytest.approx(0.5e-4)
    assert lr["encoder.embeddings.position_embeddings.weight"] == pytest.approx(1e-4 * 0.5**n_layers)
    assert lr["encoder.pooler.dense.weight"] == pytest.approx(1e-4) and lr["head.weight"] == pytest.approx(1e-2)
    with pytest.raises(GoemoError, match="layer_decay must be within"):
        EmotionClassifier(str(tiny_model), layer_decay=0.0)
    with pytest.raises(GoemoError, match=r"named \*\.layer\.<i>\.\*"):
        _encoder_depths(["encoder.embeddings.word.weight", "encoder.blocks.0.attn.weight", "head.weight"])
    electra = ["encoder.embeddings.word_embeddings.weight", "encoder.embeddings_project.weight", "encoder.encoder.layer.0.a.weight",
               "encoder.encoder.layer.1.a.weight", "encoder.encoder.relative_attention_bias.weight"]  # fmt: skip
    assert _encoder_depths(electra) == {electra[0]: 2, electra[1]: 2, electra[2]: 1, electra[3]: 0}  # the projection too


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer
def test_aux_taxonomy_adds_a_training_only_group_loss(tiny_model):
    """aux_taxonomy ekman: the training loss adds aux_weight x BCE of a second head against each row's Ekman groups
    (checked by hand for two rows); predictions, eval loss and the main head are as without it."""
    import torch.nn.functional as F

    from goemo.taxonomy import GOEMOTIONS_LABELS as names

    torch.manual_seed(0)
    m = EmotionClassifier(str(tiny_model), label_names=names, aux_taxonomy="ekman", aux_weight=0.25).eval()
    assert m.aux_head.out_features == 7 and "aux_groups" not in m.state_dict()  # derived, not saved
    labels = torch.zeros(2, 28)
    labels[0, [names.index("annoyance"), names.index("joy")]] = 1.0  # -> anger, joy
    labels[1, names.index("neutral")] = 1.0
    ids = torch.randint(5, 1000, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    groups = torch.tensor([[1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1.0]])  # anger disgust fear joy sadness surprise neutral
    main, logits, features = m.model_step(batch)
    assert logits.shape == (2, 28) and torch.equal(logits, m(ids, torch.ones_like(ids)))
    aux = F.binary_cross_entropy_with_logits(m.aux_head(features), groups)
    assert aux > 0 and m.training_step(batch, 0).item() == pytest.approx((main + 0.25 * aux).item(), rel=1e-6)
    with pytest.raises(GoemoError, match="aux_taxonomy 'ekman' maps GoEmotions' 28 labels"):
        EmotionClassifier(str(tiny_model), label_names=["a", "b"], aux_taxonomy="ekman")
    with pytest.raises(GoemoError, match="aux_weight must be finite and >= 0"):
        EmotionClassifier(str(tiny_model), aux_weight=-1.0)
    # the auxiliary head is new, as the main one: it trains at the head's learning rate, not the encoder's
    from types import SimpleNamespace

    m = EmotionClassifier(str(tiny_model), label_names=names, aux_taxonomy="ekman", learning_rate=1e-4, head_learning_rate=2e-3)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10, gradient_clip_val=None, precision_plugin=None)
    opt = m.configure_optimizers()["optimizer"]
    lr = {n: g["lr"] for g in opt.param_groups for n, p in m.named_parameters() for q in g["params"] if p is q}
    assert lr["aux_head.weight"] == lr["aux_head.bias"] == lr["head.weight"] == 2e-3


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"learning_rate": float("nan")}, "model.learning_rate and model.head_learning_rate must be finite and > 0, got nan"),
        ({"head_learning_rate": float("inf")}, "must be finite and > 0, got 2e-05, inf"),
        ({"weight_decay": float("nan")}, "model.weight_decay must be finite and >= 0, got nan"),
        ({"aux_weight": float("nan")}, "model.aux_weight must be finite and >= 0, got nan"),
        ({"pos_weight_max": float("nan")}, "model.pos_weight_max must be >= 1, got nan"),
    ],
)
def test_nan_and_inf_settings_are_refused(tiny_model, setting, message):
    with pytest.raises(GoemoError, match=message.replace("(", r"\(")):
        EmotionClassifier(str(tiny_model), **setting)


def test_head_init_label_names_points_each_row_at_its_names_encoding(tiny_model):
    """head_init label_names: at fit setup, row j = centered pooled encoding of label j's name, at a random row's norm."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    names = ["joy", "anger", "fear_of_heights"]
    m = EmotionClassifier(str(tiny_model), label_names=names, pooling="mean", head_init="label_names")
    random_row = m.head.weight[0].clone()
    m._trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tok))
    m.setup("fit")
    assert m.encoder.training  # left in training mode
    m.eval()
    with torch.no_grad():
        e = torch.stack([m.pool(m.encoder(**tok([n], return_tensors="pt")), tok([n], return_tensors="pt")["attention_mask"])[0] for n in ("joy", "anger", "fear of heights")])
    e = e - e.mean(0)
    expected = e / e.norm(dim=1, keepdim=True) * 0.02 * 32**0.5  # the tiny BERT: initializer_range 0.02, hidden 32
    torch.testing.assert_close(m.head.weight, expected)
    assert not torch.equal(m.head.weight[0], random_row)
    m2 = EmotionClassifier(str(tiny_model), label_names=names, head_init="label_names")
    m2._trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(GoemoError, match="head_init label_names needs the data module's tokenizer"):
        m2.setup("fit")


def test_freeze_embeddings_keeps_the_token_matrix_only(tiny_model):
    """Frozen: the token embedding matrix gets no gradient, no AdamW state and does not move; the rest trains."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], freeze_embeddings=True, learning_rate=1e-2)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10, gradient_clip_val=None, precision_plugin=None)
    opt = m.configure_optimizers()["optimizer"]
    words = m.encoder.get_input_embeddings().weight
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(words) not in in_opt and len(in_opt) == len(list(m.parameters())) - 1
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = torch.randint(5, 1000, (4, 7))
    loss = m.model_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.ones(4, 2)})[0]
    loss.backward()
    opt.step()
    assert words.grad is None and torch.equal(words, before["encoder.embeddings.word_embeddings.weight"])
    moved = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert "encoder.embeddings.position_embeddings.weight" in moved and "head.weight" in moved
    assert len(moved) == len(before) - 1


def test_checkpoint_tokens_recomputes_long_batches_with_the_same_gradients(tiny_model):
    """Over the budget the layers are checkpointed (dropout replayed exactly); the gradients do not change."""
    ids = torch.randint(5, 1000, (4, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.ones(4, 2)}
    grads = {}
    for budget in (None, 36, 35):  # 36 = 4 x 9 positions: not over; 35: over, so checkpointed
        torch.manual_seed(0)
        m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], checkpoint_tokens=budget)
        torch.manual_seed(1)  # same dropout masks in each run
        m.training_step(batch, 0).backward()
        assert [layer.gradient_checkpointing for layer in m._checkpointed] == ([True] * 2 if budget == 35 else [False] * 2 if budget else [])
        grads[budget] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for budget in (36, 35):
        for n, g in grads[None].items():
            torch.testing.assert_close(grads[budget][n], g, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(GoemoError, match="checkpoint_tokens must be >= 1"):
        EmotionClassifier(str(tiny_model), label_names=["a", "b"], checkpoint_tokens=0)


def _dropouts(m: EmotionClassifier) -> dict[str, set]:
    """p of the attention-probability dropouts and of all the others in the encoder."""
    attn = {mod.dropout.p for mod in m.encoder.modules() if type(mod).__name__.endswith("SelfAttention")}
    other = {mod.p for name, mod in m.encoder.named_modules() if isinstance(mod, torch.nn.Dropout) and "attention.self" not in name}
    return {"attention": attn, "other": other}


@pytest.mark.parametrize("pretrained", [True, False])  # False: the path `test --ckpt_path` and goemo.load take
def test_attention_dropout_replaces_the_encoders_own(tiny_model, pretrained):
    default = EmotionClassifier(str(tiny_model), label_names=["a", "b"], pretrained=pretrained)
    assert _dropouts(default) == {"attention": {0.1}, "other": {0.1}}  # BertConfig's defaults
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], attention_dropout=0.0, pretrained=pretrained)
    assert m.encoder.config.attention_probs_dropout_prob == 0.0
    assert _dropouts(m) == {"attention": {0.0}, "other": {0.1}}  # hidden-state dropout stays
    assert m.hparams.attention_dropout == 0.0  # saved, so a checkpoint rebuilds the same encoder


def test_attention_dropout_on_an_encoder_without_one_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    EmotionClassifier(str(tmp_path), label_names=["a", "b"])  # loads when the option is unset
    with pytest.raises(GoemoError, match="GPT2Config has no attention dropout setting"):
        EmotionClassifier(str(tmp_path), label_names=["a", "b"], attention_dropout=0.0)


def test_gradients_are_freed_after_each_optimizer_step(tiny_data, tiny_model, tmp_path):
    """Lightning zeroes gradients after the next forward pass; the model frees them right after the step,
    so no forward pass runs with the last batch's gradients still allocated."""
    import lightning as L

    from goemo.data import GoEmotionsDataModule

    seen = {"before_step": [], "batch_start": []}

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["before_step"].append(all(p.grad is not None for p in pl_module.parameters() if p.requires_grad))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["batch_start"].append(any(p.grad is not None for p in pl_module.parameters()))

    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path / "c"))
    model = EmotionClassifier(str(tiny_model), label_names=dm.label_names, pooling="cls+mean")  # every weight gets a gradient
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, accelerator="cpu", default_root_dir=tmp_path,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[Watch()],
    )  # fmt: skip
    trainer.fit(model, dm)
    assert seen["before_step"] == [True] * 4  # backward filled them
    assert seen["batch_start"] == [False] * 4  # and none survived into the next batch


@pytest.mark.parametrize("schedule, warmup", [("linear", 0.0), ("cosine", 0.1), ("constant", 0.1)])
def test_a_resume_with_another_schedule_length_says_so_and_trains_on_the_new_line(tiny_model, capsys, schedule, warmup):
    """transformers' schedules save no length: resumed with another max_epochs, the rate would jump silently, and the
    first resumed step would still train at the rate the checkpoint's optimizer holds (the old line's)."""
    from types import SimpleNamespace

    def model(steps):
        m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], lr_schedule=schedule, warmup_ratio=warmup)
        m._trainer = SimpleNamespace(estimated_stepping_batches=steps, gradient_clip_val=None, precision_plugin=None,
                                     is_global_zero=True, lr_scheduler_configs=[])  # fmt: skip
        return m

    def configure(m):
        cfg = m.configure_optimizers()
        m._trainer.lr_scheduler_configs = [SimpleNamespace(scheduler=cfg["lr_scheduler"]["scheduler"])]
        return cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]

    first, same, longer = model(100), model(100), model(150)
    opt, sched = configure(first)
    for _ in range(5):  # stopped at step 5: inside the warmup of 10 steps (15 for the longer run)
        opt.step(), sched.step()
    ckpt = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(ckpt)
    assert ckpt["schedule_steps"] == 100
    capsys.readouterr()  # the models' loading bars
    same.on_load_checkpoint(ckpt)
    configure(same)
    assert capsys.readouterr().err == ""
    longer.on_load_checkpoint(ckpt)
    opt2, sched2 = configure(longer)
    assert capsys.readouterr().err == (
        "note: the learning-rate schedule now ends at step 150, not at the 100 this fit started with "
        "(another trainer.max_epochs or max_steps): the rate jumps to the new line\n"
    )
    opt2.load_state_dict(opt.state_dict()), sched2.load_state_dict(sched.state_dict())  # as Lightning restores them
    longer.on_train_start()
    expected = sched2.lr_lambdas[0](5) * sched2.base_lrs[0]  # the new line at step 5
    assert expected != pytest.approx(opt.param_groups[0]["lr"])  # the old line's rate there differs
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)


def test_validation_tunes_with_the_models_threshold_as_fallback_and_test_scores_at_the_tuned_ones(tiny_model, monkeypatch):
    """The epoch-end hooks without a fit: validation tunes per-label thresholds (a label with no positive keeps
    model.threshold, not 0.5), and test/*_tuned are scored at those thresholds, not at the fixed one."""
    from types import SimpleNamespace

    model = EmotionClassifier(str(tiny_model), label_names=["a", "b", "c", "d"], threshold=0.3, threshold_resamples=0)
    model._trainer = SimpleNamespace(sanity_checking=False, global_step=0)  # what the hooks read
    model.loaded_step = 21  # as on_load_checkpoint sets it
    logged = {}
    monkeypatch.setattr(model, "log_dict", lambda d, **kw: logged.update({k: float(v) for k, v in d.items()}))
    monkeypatch.setattr(model, "log", lambda k, v, **kw: logged.update({k: float(v)}))
    probs = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.1, 0.8, 0.4, 0.2]])  # (N, L)
    targets = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])  # label d: no positive
    model.val_outputs.update(probs, targets)
    model.on_validation_epoch_end()
    assert model.thresholds[3].item() == pytest.approx(0.3)
    assert logged["val/f1_micro_tuned"] == pytest.approx(1.0)  # a, b, c tuned to fit; d has no positive to find
    model.thresholds.copy_(torch.tensor([0.2, 0.8, 0.5, 0.5]))
    model.test_outputs.update(torch.tensor([[0.3, 0.7, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]]), torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]]))
    model.on_test_epoch_end()
    # at the tuned thresholds: a (0.3 > 0.2) and b (only 0.9 > 0.8) exactly right; at 0.3 b would take row 1 too
    assert logged["test/exact_match_tuned"] == pytest.approx(1.0)
    assert model.test_predictions[0].shape == (2, 4)
    assert logged["step"] == 21  # test metrics at the tested checkpoint's step (Lightning's would be 0)
    model.on_fit_end()  # then trained on: the fit's own weights, at the trainer's step
    model._trainer.global_step = 30
    assert model.tested_step() == 30


def test_the_heads_dropout_is_the_rate_each_familys_own_head_uses():
    """classifier_dropout 0.0 (ModernBERT's default) is a rate, not "unset"; DistilBERT names its own."""
    from transformers import AlbertConfig, BertConfig, DebertaV2Config, DistilBertConfig, ModernBertConfig, MPNetConfig

    from goemo.model import build_head

    def rate(cfg) -> float:
        return build_head(cfg, "mean", 3)[0].p

    assert rate(BertConfig(hidden_dropout_prob=0.15)) == 0.15  # classifier_dropout None: the hidden dropout
    assert rate(BertConfig(classifier_dropout=0.0, hidden_dropout_prob=0.15)) == 0.0
    assert rate(BertConfig(classifier_dropout=0.3)) == 0.3
    assert rate(ModernBertConfig()) == ModernBertConfig().classifier_dropout == 0.0
    assert rate(DistilBertConfig(seq_classif_dropout=0.2)) == 0.2
    assert rate(AlbertConfig(classifier_dropout_prob=0.1, hidden_dropout_prob=0.0)) == 0.1
    assert rate(DebertaV2Config(cls_dropout=0.3, hidden_dropout_prob=0.1)) == 0.3
    assert rate(DebertaV2Config(hidden_dropout_prob=0.1)) == 0.1  # no cls_dropout: the hidden dropout, as its pooler
    assert rate(MPNetConfig()) == 0.1  # configs/mpnet.yaml's, unchanged


@pytest.mark.parametrize("was,now", [(0.5, 0.0), (0.0, 0.5), (0.5, 0.3)])
def test_a_resumed_fit_keeps_its_self_distill_share(tiny_model, was, now):
    """0 -> x would read an empty table as last epoch's predictions; x -> 0 would train the rest on the labels alone."""
    from types import SimpleNamespace

    model = EmotionClassifier(str(tiny_model), label_names=["a", "b"], self_distill=now)
    model._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(GoemoError, match=f"^this fit started with model.self_distill {was}, now {now}; resume with the settings"):
        model._check_resumed_targets({"hyper_parameters": {"self_distill": was, "teacher": None}})
    model._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"))  # test and predict need no targets
    model._check_resumed_targets({"hyper_parameters": {"self_distill": was, "teacher": None}})


def test_checkpoints_say_what_the_encoder_started_from_and_a_resume_keeps_it(tiny_model):
    scratch = EmotionClassifier(str(tiny_model), pretrained=False)
    ckpt = {"state_dict": scratch.state_dict()}
    scratch.on_save_checkpoint(ckpt)
    assert ckpt["encoder_start"] == "random"
    resumed = EmotionClassifier(str(tiny_model), pretrained=False)  # as the CLI builds a resumed fit
    resumed.on_load_checkpoint({**ckpt, "encoder_start": "pretrained"})
    out = {}
    resumed.on_save_checkpoint(out)
    assert out["encoder_start"] == "pretrained"
    old = {k: v for k, v in ckpt.items() if k != "encoder_start"}  # a checkpoint from before the key: unknown, not guessed
    resumed.on_load_checkpoint(old)
    out = {}
    resumed.on_save_checkpoint(out)
    assert "encoder_start" not in out


@pytest.mark.parametrize("key,was,now", [("learning_rate", 2e-5, 1e-3), ("head_learning_rate", None, 2e-3), ("weight_decay", 0.01, 0.0),
                                         ("layer_decay", 1.0, 0.8), ("freeze_embeddings", False, True),
                                         ("warmup_ratio", 0.0, 0.1), ("lr_schedule", "linear", "cosine"),
                                         ("pooling", "mean", "cls"), ("loss", "bce", "focal"), ("aux_taxonomy", None, "ekman")])
def test_a_resumed_fit_keeps_its_settings(tiny_model, key, was, now):
    """Lightning restores the optimizer's groups and the scheduler's base rates: another rate or decay would be in the
    run's hparams and never used; another layer_decay or freeze_embeddings fails in PyTorch's load_state_dict."""
    from types import SimpleNamespace

    from goemo.taxonomy import GOEMOTIONS_LABELS  # the auxiliary head's taxonomy maps these

    model = EmotionClassifier(str(tiny_model), label_names=GOEMOTIONS_LABELS, **{key: now})
    model._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    saved = {"hyper_parameters": {**dict(model.hparams), key: was}}
    with pytest.raises(GoemoError, match=f"^this fit started with model.{key} {was}, now {now}; resume with the settings"):
        model._check_resumed_targets(saved)
    model._check_resumed_targets({"hyper_parameters": dict(model.hparams)})  # the same settings: resumed
    model._trainer = SimpleNamespace(state=SimpleNamespace(fn="test"))  # test and predict train nothing
    model._check_resumed_targets(saved)


@pytest.mark.parametrize("key,was,now,setting,counts,idle", [
    ("pos_weight_max", 100.0, 10.0, "loss", "bce_pos_weight", "bce"),
    ("focal_gamma", 2.0, 1.0, "loss", "focal", "bce"),
    ("aux_weight", 0.5, 0.2, "aux_taxonomy", "ekman", None),
])  # fmt: skip
def test_a_setting_of_the_objective_is_kept_only_where_it_weighs(tiny_model, key, was, now, setting, counts, idle):
    from types import SimpleNamespace

    for value, refused in ((counts, True), (idle, False)):
        from goemo.taxonomy import GOEMOTIONS_LABELS  # the auxiliary head's taxonomy maps these

        model = EmotionClassifier(str(tiny_model), label_names=GOEMOTIONS_LABELS, **{setting: value, key: now})
        model._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
        saved = {"hyper_parameters": {**dict(model.hparams), key: was}}
        if refused:
            with pytest.raises(GoemoError, match=f"^this fit started with model.{key} {was}, now {now};"):
                model._check_resumed_targets(saved)
        else:
            model._check_resumed_targets(saved)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "data2vec-text", "ibert", "longformer",
                                        "xmod", "luke", "markuplm", "esm"])
def test_max_positions_is_the_longest_input_the_encoder_takes(model_type):
    """data.max_length is checked against it: one more token than an encoder takes is an IndexError deep in its first
    long batch. RoBERTa's copies number positions from the padding index + 1."""
    import torch
    from transformers import AutoConfig, AutoModel

    from goemo.model import max_positions

    extra = {"longformer": {"attention_window": 4}, "xmod": {"languages": ["en_XX"], "default_language": "en_XX"},
             "luke": {"entity_vocab_size": 10, "entity_emb_size": 8}}.get(model_type, {})  # fmt: skip
    cfg = AutoConfig.for_model(model_type, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=20, pad_token_id=1, vocab_size=50, **extra)  # fmt: skip
    model = AutoModel.from_config(cfg).eval()
    n = max_positions(cfg)
    with torch.no_grad():
        model(input_ids=torch.full((1, n), 5))  # the longest it takes (5: any token but padding)
        with pytest.raises((IndexError, RuntimeError)):  # an index out of the position (or token type) table
            model(input_ids=torch.full((1, n + 1), 5))
