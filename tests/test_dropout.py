"""goemo.dropout: the same dropout as PyTorch's, with masks drawn 16 bits at a time and kept as bool."""

import pytest
import torch
from torch import nn

from goemo.dropout import Dropout, keep_mask, use_cpu_dropout
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
    # p within 1/131072 of 1 rounds to 65536/65536 in keep_mask's steps (a division by zero): torch's path too
    assert torch.equal(Dropout(0.999995).train()(x), torch.zeros_like(x))


def test_use_cpu_dropout_keeps_each_modules_p_and_inplace():
    m = nn.Sequential(nn.Dropout(0.3), nn.Dropout(0.0, inplace=True))
    assert use_cpu_dropout(m) == 2
    assert [type(d) for d in m] == [Dropout, Dropout]
    assert [d.p for d in m] == pytest.approx([0.3, 0.0], abs=1 / 65536)  # keep_mask rounds p to 1/65536 steps
    assert [d.inplace for d in m] == [False, True]


def test_use_cpu_dropout_swaps_every_dropout_module_of_the_classifier(tiny_model):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"], fast_dropout=True)
    drops = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert drops and all(type(d) is Dropout for d in drops)
    assert isinstance(m.dropout, Dropout) and {d.p for d in drops} == {0.1}  # the head's too; p unchanged
    stock = EmotionClassifier(str(tiny_model), label_names=["a", "b"])  # PyTorch's dropout by default
    assert all(type(d) is nn.Dropout for d in stock.modules() if isinstance(d, nn.Dropout))
    assert use_cpu_dropout(stock) == len(drops) and use_cpu_dropout(stock) == 0  # nothing left to swap
