"""Device-dependent defaults: dataloader workers and pinned memory, SDPA attention, optional torch.compile."""

import pytest

from goemo.data import GoEmotionsDataModule, default_num_workers
from goemo.model import EmotionClassifier, load_encoder


def test_default_num_workers():
    assert default_num_workers(on_cuda=False) == 0  # workers would take cores from the model
    assert 1 <= default_num_workers(on_cuda=True) <= 4


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_loaders_pin_and_spawn_workers_only_for_cuda(tiny_data, tiny_model, tmp_path, monkeypatch, device):
    """The trainer's device decides, not CUDA's presence: a CPU fit on a GPU machine pins nothing."""
    from types import SimpleNamespace

    import torch

    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), cache_dir=str(tmp_path))
    dm.setup("fit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1, global_rank=0)
    on_cuda = device == "cuda"
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.pin_memory is on_cuda
        assert (loader.num_workers > 0) is on_cuda
    dm.hparams.num_workers = 0  # an explicit value wins
    assert dm.train_dataloader().num_workers == 0


def test_encoder_uses_sdpa(tiny_model):
    m = EmotionClassifier(str(tiny_model), label_names=["a", "b"])
    assert m.encoder.config._attn_implementation == "sdpa"


def test_encoder_without_sdpa_still_loads(tiny_model, monkeypatch):
    from transformers import AutoModel

    real = AutoModel.from_pretrained
    asked = []  # the attention implementation each call asked for

    def no_sdpa(path, **kw):
        asked.append(kw.get("attn_implementation"))
        if "attn_implementation" in kw:
            raise ValueError("does not support an attention implementation through scaled_dot_product_attention")
        return real(path, **kw)

    monkeypatch.setattr(AutoModel, "from_pretrained", no_sdpa)
    enc = load_encoder(str(tiny_model))
    assert asked == ["sdpa", None] and enc.config.hidden_size == 32  # SDPA first, then the model as it comes


def test_compile_is_opt_in_and_keeps_checkpoint_keys(tiny_model):
    plain = EmotionClassifier(str(tiny_model), label_names=["a", "b"])
    compiled = EmotionClassifier(str(tiny_model), label_names=["a", "b"], compile=True)
    assert getattr(plain.encoder, "_compiled_call_impl", None) is None
    assert compiled.encoder._compiled_call_impl is not None  # compiled lazily, at the first forward
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
