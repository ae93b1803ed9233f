"""TensorBoard text panel: a few validation texts with their true and predicted labels, each epoch.

Scalars, learning rates and hparams are logged elsewhere (the model, LearningRateMonitor, the CLI's
logger); this adds the one thing curves cannot show: what the model actually says about real texts.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from goemo.batching import MultiLabelCollator
from goemo.errors import GoemoError
from goemo.predict import label_thresholds
from goemo.thresholds import apply_thresholds

TAG = "val/examples"


def _cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip() or "(empty)"


class ValidationExamples(Callback):
    def __init__(self, num_examples: int = 8) -> None:
        """Logs a markdown table of the first validation rows (text, true labels, predictions) at each epoch end.

        The rows are the first `num_examples` of the validation split in file order, the same every
        epoch, so the panel's step slider shows how predictions on them change. Only rank 0 logs,
        and only to a logger with TensorBoard's `add_text`.

        Args:
            num_examples: Validation rows to show; 0 turns the panel off.
        """
        if num_examples < 0:
            raise GoemoError(f"val_examples.num_examples must be >= 0, got {num_examples}")
        self.num_examples = num_examples
        self._table = None  # (writer, texts, (n, L) labels, (n, L) probabilities) of the validation running

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        # The probabilities of the weights this validation scores: the model is in eval mode here and, with
        # `weight_averaging`, holds the mean, which goes back out in the callbacks' epoch-end hooks.
        self._table = None
        if not self.num_examples or trainer.sanity_checking or not trainer.is_global_zero:
            return
        writer = getattr(trainer.logger, "experiment", None)  # a SummaryWriter for TensorBoardLogger
        dm = trainer.datamodule
        ds = getattr(dm, "datasets", {}).get("validation")
        if not hasattr(writer, "add_text") or ds is None:
            return
        n = min(self.num_examples, len(ds))
        rows = [ds[i] for i in range(n)]  # {"input_ids": (T,), "attention_mask": (T,), "labels": (L,)}
        texts = ds.with_format(None).select(range(n))["text"]
        batch = MultiLabelCollator(dm.tokenizer.pad_token_id, dm.tokenizer.padding_side)(rows)
        with torch.inference_mode():
            logits = pl_module(batch["input_ids"].to(pl_module.device), batch["attention_mask"].to(pl_module.device))
        self._table = (writer, texts, batch["labels"], torch.sigmoid(logits.float()).cpu())  # probs (n, L)

    def on_validation_end(self, trainer, pl_module) -> None:
        # After the module's `on_validation_epoch_end`, which tuned the thresholds on this validation.
        if self._table is None:
            return
        writer, texts, labels, probs = self._table
        self._table = None
        predicted = apply_thresholds(probs, label_thresholds(pl_module))  # (n, L), as in the metrics
        names = pl_module.label_names
        lines = ["| text | true labels | predicted (probability) |", "|---|---|---|"]
        for text, truth, p, hit in zip(texts, labels, probs, predicted):
            true_labels = ", ".join(names[j] for j in truth.nonzero().flatten().tolist()) or "-"
            order = torch.argsort(p, descending=True).tolist()
            pred = ", ".join(f"{names[j]} ({p[j]:.2f})" for j in order if hit[j])
            pred = pred or f"- (top: {names[order[0]]} {p[order[0]]:.2f})"  # early on nothing passes
            lines.append(f"| {_cell(text)} | {true_labels} | {pred} |")
        writer.add_text(TAG, "\n".join(lines), global_step=trainer.global_step)
