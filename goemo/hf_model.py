"""goemo's classifier as a Hugging Face model class, for exported runs whose pooling no stock class has.

`python -m goemo.export` copies this file, unchanged, into the export folder as `modeling_goemo.py` and
names it in config.json's `auto_map`, so `pipeline` and `AutoModelForSequenceClassification` load it
with `trust_remote_code` on. It therefore
imports only torch and transformers, never goemo. Its model_type is `goemo`, so without
`trust_remote_code` transformers refuses the folder instead of loading some other head.

Layout and maths are those of goemo.model.EmotionClassifier: `encoder.*` (the Hugging Face base model)
and `head.*` (one linear layer) hold the same tensors, and the pooling is the same code:
input_ids/attention_mask (B, T) -> hidden states (B, T, H) -> pooled (B, H or 2H) -> logits (B, L).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class GoemoConfig(PretrainedConfig):
    model_type = "goemo"

    def __init__(self, encoder: Optional[dict] = None, pooling: str = "mean", **kwargs) -> None:
        """encoder: the base model's config as a dict (with its `model_type`); pooling: cls, mean or cls+mean."""
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        super().__init__(**kwargs)


def pool(out, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) token states -> (B, H) or (B, 2H): `cls` the pooler over [CLS], `mean` over real tokens."""
    hidden = out.last_hidden_state  # (B, T, H)
    parts = []
    if pooling in ("cls", "cls+mean"):
        pooled = getattr(out, "pooler_output", None)
        parts.append(pooled if pooled is not None else hidden[:, 0])
    if pooling in ("mean", "cls+mean"):
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        parts.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(parts, dim=-1)


class GoemoForSequenceClassification(PreTrainedModel):
    config_class = GoemoConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def __init__(self, config: GoemoConfig) -> None:
        super().__init__(config)
        enc = dict(config.encoder)
        self.encoder = AutoModel.from_config(AutoConfig.for_model(enc.pop("model_type"), **enc))
        width = self.encoder.config.hidden_size * (2 if config.pooling == "cls+mean" else 1)
        self.head = nn.Linear(width, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,  # accepted from tokenizers; training never used them
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        logits = self.head(pool(out, attention_mask, self.config.pooling))  # (B, L)
        loss = None
        if labels is not None:  # multi-label: float multi-hot (B, L)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss=loss, logits=logits)
