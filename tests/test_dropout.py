"""goemo.dropout: the same dropout as PyTorch's, with masks drawn 16 bits at a time and kept as bool; attention too."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from goemo import dropout as goemo_dropout
from goemo.dropout import ATTENTION, Dropout, keep_mask, use_cpu_attention_dropout, use_cpu_dropout
from goemo.model import EmotionClassifier


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_1_minus_p(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([1000, 4000]), p)  # 4M draws: standard error of a rate <= 2.5e-4
    assert keep.dtype == torch.bool and keep.shape == (1000, 4000)
    assert abs(keep.float().mean().item() - (1 - p)) < 2e-3
    # Each of the four 16-bit numbers cut from a 64-bit word is uniform, the top one (with the word's
    # sign bit) included: at p=0.5 a sign bit stuck at 0 would keep 62.5% overall and 100% of every fourth.
    by_slot = keep.view(-1, 4).float().mean(0)
    assert torch.allclose(by_slot, torch.full((4,), 1 - p), atol=4e-3), by_slot
    # Neighbouring elements are independent: a kept element is followed by a kept one at the same rate.
    flat = keep.flatten()
    assert abs(flat[1:][flat[:-1]].float().mean().item() - (1 - p)) < 3e-3


def test_keep_mask_is_repeatable_per_seed_and_any_length():
    torch.manual_seed(3)
    a = keep_mask(torch.Size([7, 3]), 0.3)  # 21 elements: not a multiple of 4
    torch.manual_seed(3)
    b = keep_mask(torch.Size([7, 3]), 0.3)
    assert torch.equal(a, b) and a.shape == (7, 3)
    assert not torch.equal(a, keep_mask(torch.Size([7, 3]), 0.3))  # the generator moved on


def test_dropout_zeroes_or_scales_and_its_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 50, requires_grad=True)
    out = Dropout(0.25).train()(x)
    kept = out != 0
    scale = 65536 / (65536 - round(0.25 * 65536))
    torch.testing.assert_close(out[kept], x[kept] * scale)
    assert 0.7 < kept.float().mean().item() < 0.8
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g * kept * scale)


def test_dropout_keeps_a_bool_mask_for_backward_where_torch_keeps_a_float_one():
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        Dropout(0.1).train()(torch.randn(8, 16, requires_grad=True))
        ours = list(saved)
        saved.clear()
        nn.Dropout(0.1).train()(torch.randn(8, 16, requires_grad=True))
    assert ours == [torch.bool]
    assert saved == [torch.float32]  # what goemo's saves 3 bytes an element against


def test_dropout_is_the_identity_in_eval_and_at_p_0():
    x = torch.randn(4, 5)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))  # torch's own path


def test_use_cpu_dropout_swaps_every_dropout_module_of_the_classifier(tiny_model):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"])  # fast_dropout by default
    drops = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert drops and all(type(d) is Dropout for d in drops)
    assert isinstance(m.dropout, Dropout) and {d.p for d in drops} == {0.1}  # the head's too; p unchanged
    stock = EmotionClassifier(str(tiny_model), label_names=["a", "b"], fast_dropout=False)
    assert all(type(d) is nn.Dropout for d in stock.modules() if isinstance(d, nn.Dropout))
    assert use_cpu_dropout(stock) == len(drops) and use_cpu_dropout(stock) == 0  # nothing left to swap


def _qkv_and_mask(dtype=torch.float64):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, dtype=dtype, requires_grad=True) for _ in range(3))  # (B, h, T, d)
    mask = torch.ones(3, 1, 5, 5, dtype=torch.bool)  # (B, 1, T, S) as transformers' sdpa_mask makes it
    mask[1, ..., 3:] = False  # row 1: two padded keys
    mask[2, ..., 1:] = False  # row 2: one real token
    return q, k, v, mask


def test_attention_without_dropout_is_pytorchs_and_its_gradient_is_exact():
    q, k, v, mask = _qkv_and_mask()
    attend = goemo_dropout._AttentionFunction.apply
    torch.testing.assert_close(attend(q, k, v, mask, 0.0, 0.5), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -1e9)
    torch.testing.assert_close(attend(q, k, v, additive, 0.0, 0.5), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.autograd.gradcheck(lambda a, b, c: attend(a, b, c, mask, 0.0, 0.3), (q, k, v))


def test_attention_drops_probabilities_with_keep_mask_and_backpropagates_through_the_same_mask():
    q, k, v, mask = _qkv_and_mask()
    p, scale = 0.3, 0.5

    def attend(a, b, c):
        torch.manual_seed(7)
        return goemo_dropout._AttentionFunction.apply(a, b, c, mask, p, scale)

    torch.manual_seed(7)
    keep = keep_mask(torch.Size([3, 2, 5, 5]), p)
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), -1)
    expected = (probs * keep * (65536 / (65536 - round(p * 65536)))) @ v
    torch.testing.assert_close(attend(q, k, v), expected)
    assert 0.6 < keep.float().mean().item() < 0.8
    assert torch.autograd.gradcheck(attend, (q, k, v))  # reseeded each call: the same mask throughout


def test_the_attention_keeps_the_probabilities_and_a_bool_mask_for_backward():
    q, k, v, mask = _qkv_and_mask(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        goemo_dropout._AttentionFunction.apply(q, k, v, mask, 0.1, 0.5)
    big = [s for s in saved if s[1] == (3, 2, 5, 5)]  # (B, h, T, S): one float tensor and one bool
    assert sorted(big, key=str) == sorted([(torch.float32, (3, 2, 5, 5)), (torch.bool, (3, 2, 5, 5))], key=str)


def test_the_classifier_trains_with_goemos_attention_and_evaluates_with_sdpa(tiny_model, monkeypatch):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"])  # fast_dropout by default
    assert m.encoder.config._attn_implementation == ATTENTION
    stock = EmotionClassifier(str(tiny_model), label_names=["a", "b"], fast_dropout=False)
    assert stock.encoder.config._attn_implementation == "sdpa"
    assert use_cpu_attention_dropout(stock) == 1 and use_cpu_attention_dropout(stock) == 0
    seen = []
    real = goemo_dropout._AttentionFunction.apply
    monkeypatch.setattr(goemo_dropout._AttentionFunction, "apply", lambda q, k, v, mask, p, s: seen.append((mask, p)) or real(q, k, v, mask, p, s))
    ids = torch.randint(5, 1000, (2, 6))
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    m.train()
    m(ids, attention_mask).sum().backward()
    assert len(seen) == 2 and {p for _, p in seen} == {0.1}  # both layers
    mask = seen[0][0]  # transformers' sdpa mask: the padded keys of row 1 masked, nothing else
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 6, 6)
    assert mask[0].all() and mask[1, ..., :4].all() and not mask[1, ..., 4:].any()
    seen.clear()
    m.eval()
    stock.load_state_dict(m.state_dict())
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attention_mask), stock(ids, attention_mask), rtol=0, atol=0)
    assert seen == []  # evaluation: transformers' own sdpa function


def test_encoders_on_other_attention_implementations_are_left_alone(tiny_model):
    from transformers import AutoModel

    eager = AutoModel.from_pretrained(str(tiny_model), attn_implementation="eager")
    assert use_cpu_attention_dropout(eager) == 0 and eager.config._attn_implementation == "eager"
