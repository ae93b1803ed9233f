"""Prediction: probabilities -> records, length-sorted batching, and streaming a file through `trainer.predict`.

A record is `{"text": str, "labels": [labels above their threshold (p > t), most probable first],
"scores": {label: probability, for every label}}`; the CLI's predictions.jsonl and `goemo.load(...).predict`
both produce it. A predict file streams: `TextFileDataset` reads it a chunk at a time and tokenizes each
chunk, `PredictionWriter` writes each batch as it comes, so memory does not grow with the file.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import IterableDataset, get_worker_info

from goemo.batching import MultiLabelCollator
from goemo.errors import GoemoError
from goemo.files import AtomicFile
from goemo.inputs import count_texts, read_texts
from goemo.thresholds import apply_thresholds


def label_thresholds(model: torch.nn.Module) -> torch.Tensor:
    """Per-label thresholds (L,): the model's tuned `thresholds` buffer if it has one, else `hparams.threshold` for all."""
    tuned = getattr(model, "thresholds", None)
    if tuned is not None:
        return tuned.detach().float().cpu()
    return torch.full((len(model.label_names),), float(model.hparams.threshold))


def to_records(texts: Sequence[str], probs: np.ndarray, label_names: Sequence[str], thresholds: np.ndarray) -> list[dict]:
    """One record per text from probabilities (n, L) and thresholds (L,)."""
    records = []
    chosen = apply_thresholds(np.asarray(probs), thresholds)  # (n, L) bool, as the metrics count
    for text, p, yes in zip(texts, probs, chosen):
        order = np.argsort(-p, kind="stable")  # most probable first; ties keep label order
        records.append(
            {
                "text": text,
                "labels": [label_names[j] for j in order if yes[j]],
                "scores": {name: float(x) for name, x in zip(label_names, p)},
            }
        )
    return records


def encode_batches(
    tokenizer, texts: Sequence[str], max_length: int, batch_size: int, offset: int = 0
) -> Iterator[dict]:
    """Tokenize `texts` as in training and yield padded batches of similar length, longest first.

    Each batch is `{"input_ids": (B, T), "attention_mask": (B, T), "index": (B,) position of each row in
    texts + offset, "text": [B strings]}`; `index` lets the consumer put results back in input order.
    """
    if not texts:
        return
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, return_token_type_ids=False)
    lengths = torch.tensor([len(ids) for ids in enc["input_ids"]])
    collate = MultiLabelCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    for rows in torch.argsort(lengths, descending=True, stable=True).split(batch_size):
        rows = rows.tolist()
        batch = collate(
            [
                {"input_ids": torch.tensor(enc["input_ids"][i]), "attention_mask": torch.tensor(enc["attention_mask"][i])}
                for i in rows
            ]
        )
        batch["index"] = torch.tensor(rows) + offset
        batch["text"] = [texts[i] for i in rows]
        yield batch


class TextFileDataset(IterableDataset):
    def __init__(self, path: str, tokenizer, max_length: int, batch_size: int, chunk_batches: int = 32) -> None:
        """The texts of a predict file as ready batches (see `encode_batches`), streamed.

        The file is read `chunk_batches * batch_size` texts at a time; each chunk is sorted by length
        (less padding) and cut into batches. With DataLoader workers, worker k takes chunks k, k+n, ...
        The file is read once up front to validate it and count its texts (for the progress bar).

        Args:
            path: A .txt, .jsonl or .csv file (see goemo.inputs).
            tokenizer: The model's tokenizer.
            max_length: Truncate texts to this many tokens, as in training.
            batch_size: Texts per batch.
            chunk_batches: Batches per sorted chunk; bounds memory (and the writer's reorder buffer).
        """
        self.path = Path(path).expanduser()
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.chunk = chunk_batches * batch_size
        self.num_texts = count_texts(self.path)
        if self.num_texts == 0:
            raise GoemoError(f"{self.path}: no texts to predict")

    def __len__(self) -> int:
        """Number of batches: chunks are whole batches, so only the last one may be short."""
        return math.ceil(self.num_texts / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        texts: list[str] = []
        start = 0  # input position of texts[0]
        for text in read_texts(self.path):
            texts.append(text)
            if len(texts) == self.chunk:
                if (start // self.chunk) % workers == worker:
                    yield from encode_batches(self.tokenizer, texts, self.max_length, self.batch_size, start)
                start, texts = start + len(texts), []
        if texts and (start // self.chunk) % workers == worker:
            yield from encode_batches(self.tokenizer, texts, self.max_length, self.batch_size, start)


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output: Optional[str] = None) -> None:
        """Writes `trainer.predict` probabilities as JSON lines (see `to_records`) in input order, batch by batch.

        Batches arrive sorted by length within chunks (and interleaved across workers); each carries the
        input positions of its rows, so rows wait in a small buffer until every earlier row is written.

        Args:
            output: File to write; default: `predictions.jsonl` in the run folder (`trainer.log_dir`).
        """
        super().__init__(write_interval="batch")
        self.output = output
        self.path: Optional[Path] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Rows carry their own input positions (batch["index"]), so Lightning's sampler indices, which an
        # IterableDataset cannot give, are not needed; and the dataset shards itself across workers.
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            raise GoemoError("predicting a file runs on one device; pass --trainer.devices 1")
        self.path = Path(self.output).expanduser() if self.output else Path(trainer.log_dir or ".") / "predictions.jsonl"
        # Written under a temporary name and renamed at the end: a run that fails half-way leaves no
        # predictions file that looks complete (nor replaces a good one from before).
        self.out = AtomicFile(self.path)
        self.labels = list(pl_module.label_names)
        self.thresholds = label_thresholds(pl_module).numpy()
        self.pending: dict[int, dict] = {}  # input position -> record, until its turn
        self.written = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction: torch.Tensor, batch_indices, batch: dict, batch_idx: int, dataloader_idx: int
    ) -> None:
        probs = prediction.float().cpu().numpy()  # (B, L)
        for i, record in zip(batch["index"].tolist(), to_records(batch["text"], probs, self.labels, self.thresholds)):
            self.pending[i] = record
        while self.written in self.pending:
            self.out.file.write(json.dumps(self.pending.pop(self.written), ensure_ascii=False) + "\n")
            self.written += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.pending:  # cannot happen unless batches went missing
            self.out.discard()
            raise GoemoError(f"{self.path}: {len(self.pending)} predictions were never written (rows missing before them)")
        self.out.commit()
        print(f"wrote {self.written} predictions to {self.path}", file=sys.stdout)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if getattr(self, "out", None) is not None:
            self.out.discard()


def check_not_the_input(output: Path, path: Path) -> None:
    """One line if `output` is the file of texts `path`: the predictions would replace the texts."""
    if Path(output).expanduser().resolve() == Path(path).expanduser().resolve():
        raise GoemoError(f"--output {output} is the file of texts it would replace; write the predictions elsewhere")


def predict_file(clf, path: Path, output: Path, chunk: int = 2048) -> int:
    """Stream a predict file through a `goemo.classifier.Classifier` (any backend) into JSON lines, in input order.

    Written atomically: on SIGTERM or Ctrl-C the partial file is removed and the process exits 143 or 1 with a
    one-line message, as the trainer's path does. Returns the number of predictions.
    """
    import signal

    path, output = Path(path).expanduser(), Path(output).expanduser()  # as the trainer's path reads them
    check_not_the_input(output, path)
    out, count, texts = AtomicFile(output), 0, []

    def flush() -> None:
        nonlocal count
        for record in clf.predict(texts):
            out.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += len(texts)
        texts.clear()

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for text in read_texts(path):
            texts.append(text)
            if len(texts) == chunk:
                flush()
        flush()
        if not count:  # as the trainer's path (TextFileDataset) says it
            raise GoemoError(f"{path}: no texts to predict")
        out.commit()
    except BaseException as e:
        out.discard()
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            what = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
            print(f"error: interrupted by {what} during predict: stopped before the end, so no predictions were written", file=sys.stderr)
            sys.exit(1 if what == "Ctrl-C" else 143)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {count} predictions to {output} ({clf.backend})", file=sys.stdout)
    return count


if __name__ == "__main__":  # a tempting name, but the command is the CLI's: say so instead of exiting 0 silently
    print("error: python -m goemo.predict is not a command; use python main.py predict --ckpt_path RUN "
          "--data.predict_file FILE (or python -m goemo.cli predict ...), or goemo.load(RUN).predict(texts)", file=sys.stderr)  # fmt: skip
    sys.exit(2)
