import pytest
import torch

from goemo.hub import GoemoError
from goemo.model import EmotionClassifier


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
    ],
)
def test_nonsense_values_are_refused(tiny_model, kw, msg):
    with pytest.raises(GoemoError, match=msg):
        EmotionClassifier(str(tiny_model), **kw)


def test_optimizer_groups(tiny_model):
    """No weight decay on biases and LayerNorm; the head gets its own learning rate; linear warmup then decay."""
    from types import SimpleNamespace

    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], learning_rate=1e-4, head_learning_rate=1e-2,
                          weight_decay=0.1, warmup_ratio=0.1)  # fmt: skip
    m._trainer = SimpleNamespace(estimated_stepping_batches=100)
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


def test_freeze_embeddings_keeps_the_token_matrix_only(tiny_model):
    """Frozen: the token embedding matrix gets no gradient, no AdamW state and does not move; the rest trains."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], freeze_embeddings=True, learning_rate=1e-2)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10)
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
