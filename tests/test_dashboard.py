"""Dashboards: a real TensorBoard server reads the tiny run's tags back; the terminal shows Rich output."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from goemo.averaging import EpochAveraging
from goemo.dashboard import TAG, ValidationExamples
from tests.conftest import run_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def tensorboard(tiny_run, tmp_path_factory):
    """A TensorBoard server on the tiny run folder; yields its base URL once it serves the run's scalars."""
    run = tiny_run / "lightning_logs" / "version_0"
    port = free_port()
    log = (tmp_path_factory.mktemp("tb") / "tensorboard.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the server starts, then loads the event files in the background
            assert proc.poll() is None, f"tensorboard exited with {proc.returncode}; see {log.name}"
            try:
                if get_json(f"{url}/data/plugin/scalars/tags").get(".", {}).get("val/f1_micro"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not serve the run within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class Writer:
    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))


class Scaled(torch.nn.Module):
    """Logits = w * (first token id - 2) for both labels: probabilities read back from w."""

    label_names = ["joy", "anger"]
    device = torch.device("cpu")

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("thresholds", torch.full((2,), 0.5))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.w * (input_ids[:, :1].float() - 2)).expand(-1, 2)  # (B, 2)


def test_the_examples_table_shows_the_averaged_weights_at_the_thresholds_tuned_on_that_validation():
    rows = {"text": ["lo|w", "high"], "input_ids": [[1, 5], [3]], "attention_mask": [[1, 1], [1]],
            "labels": [[0.0, 1.0], [1.0, 0.0]]}  # fmt: skip
    ds = Dataset.from_dict(rows).with_format("torch", columns=["input_ids", "attention_mask", "labels"])
    writer, model = Writer(), Scaled()
    data = SimpleNamespace(datasets={"validation": ds}, tokenizer=SimpleNamespace(pad_token_id=0, padding_side="right"))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, logger=SimpleNamespace(experiment=writer),
                              datamodule=data, global_step=7, current_epoch=0, is_last_batch=True,
                              num_training_batches=1, state=SimpleNamespace(fn="fit"))  # fmt: skip
    averaging, examples = EpochAveraging(start_epoch=0), ValidationExamples(num_examples=2)
    with torch.no_grad():
        model.w.fill_(3.0)
    averaging.on_train_batch_end(trainer, model, None, None, 0)  # the mean: w = 3
    with torch.no_grad():
        model.w.fill_(-5.0)  # the trained weights go on: they would flip every prediction
    # The hooks in Lightning's order: callbacks' epoch start, callbacks' then the module's epoch end, validation end.
    averaging.on_validation_epoch_start(trainer, model)
    examples.on_validation_epoch_start(trainer, model)
    averaging.on_validation_epoch_end(trainer, model)
    assert model.w.item() == -5.0 and writer.texts == []
    model.thresholds.copy_(torch.tensor([0.9, 0.02]))  # the module tunes them on this validation
    examples.on_validation_end(trainer, model)
    (tag, text, step), = writer.texts
    assert (tag, step) == (TAG, 7)
    # sigmoid(3 * (1 - 2)) = 0.05 (anger only, > 0.02); sigmoid(3 * (3 - 2)) = 0.95 (both)
    # (a | in a text is escaped: it would end the cell)
    assert text.splitlines()[2:] == ["| lo\\|w | anger | anger (0.05) |", "| high | joy | joy (0.95), anger (0.95) |"]
    examples.on_validation_end(trainer, model)  # a validation with no table started logs nothing
    trainer.sanity_checking = True
    examples.on_validation_epoch_start(trainer, model)
    examples.on_validation_end(trainer, model)
    trainer.sanity_checking, trainer.is_global_zero = False, False  # under DDP: rank 0's table only
    examples.on_validation_epoch_start(trainer, model)
    examples.on_validation_end(trainer, model)
    assert len(writer.texts) == 1
    trainer.is_global_zero, more = True, ValidationExamples(num_examples=5)  # more than the split's 2 rows: all of them
    more.on_validation_epoch_start(trainer, model)
    more.on_validation_end(trainer, model)
    assert len(writer.texts) == 2 and len(writer.texts[1][1].splitlines()) == 4  # header, rule and the 2 rows


@pytest.mark.slow
def test_tensorboard_serves_scalars_lr_and_text(tensorboard):
    scalars = set(get_json(f"{tensorboard}/data/plugin/scalars/tags")["."])
    assert {"train/loss", "val/loss", "val/f1_micro", "val/f1_macro", "val/exact_match"} <= scalars
    assert any(t.startswith("lr-AdamW") for t in scalars), scalars  # LearningRateMonitor
    text_tags = get_json(f"{tensorboard}/data/plugin/text/tags")["."]
    assert text_tags == ["val/examples/text_summary"]
    steps = get_json(f"{tensorboard}/data/plugin/text/text?run=.&tag=val/examples/text_summary")
    assert len(steps) == 2  # one table per epoch
    html = steps[-1]["text"]
    assert "true labels" in html and 'She said "hi" to me' in html  # dev.tsv's first row
    assert html.count("<tr>") == 1 + 4 + 1  # outer table, header, --val_examples.num_examples 4


@pytest.mark.slow
def test_fit_shows_rich_summary_and_progress(tiny_run):
    out = (tiny_run / "fit.out").read_text(encoding="utf-8")
    assert "┃ Name" in out and "BertModel" in out and "Trainable params" in out  # RichModelSummary
    assert "Epoch 1/1" in out and "it/s" in out and "train/loss" in out  # RichProgressBar: throughput, loss


@pytest.mark.slow
def test_validate_prints_metrics_table_without_progress_bar(tiny_run):
    r = run_main("validate", "--ckpt_path", "best", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", cwd=tiny_run)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Validate metric" in r.stdout and "val/f1_micro" in r.stdout and "val/exact_match" in r.stdout
    assert "it/s" not in r.stdout + r.stderr  # no progress bar
