"""A trained run as a plain classifier, no Trainer: `Classifier` and `load_run` (behind `goemo.load`)."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import numpy as np
import torch

from goemo.compare import BEFORE
from goemo.errors import GoemoError
from goemo.hub import load_tokenizer, note_tokenizer_change, resolve_model_path, tokenizer_digest
from goemo.model import EmotionClassifier, max_positions
from goemo.predict import encode_batches, label_thresholds, to_records
from goemo.runs import RUNS_DIR, load_lightning_checkpoint, logger_args, resolve_checkpoint

CHUNK_BATCHES = 32  # batches tokenized and length-sorted together
# What runs did before each later model option existed (goemo.compare's record of them); pretrained: a checkpoint's
# weights are loaded whatever the encoder started from.
OLD_MODEL_SETTINGS = {k.removeprefix("model."): v for k, v in BEFORE.items() if k.startswith("model.") and k != "model.pretrained"}


class Classifier:
    def __init__(self, model: EmotionClassifier, tokenizer, max_length: int = 128, batch_size: int = 64) -> None:
        """Predicts label probabilities for lists of texts with a trained EmotionClassifier.

        Texts are tokenized as in training (truncated to `max_length` tokens), batched by similar
        length for little padding, and returned in input order.

        Args:
            model: The classifier, on the device to run on; it is put in eval mode.
            tokenizer: Its tokenizer.
            max_length: Truncate texts to this many tokens (the data module's `max_length` at training).
            batch_size: Texts per forward pass.
        """
        for name, value, least in (("batch_size", batch_size, 1), ("max_length", max_length, 2)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:  # numpy's too
                raise GoemoError(f"{name} must be a whole number of at least {least}, got {value!r}")
        limit = max_positions(model.encoder.config)
        if limit is not None and max_length > limit:  # past it the position embeddings have no row
            raise GoemoError(f"max_length {max_length} is more than the model takes ({limit} positions); give {limit} or less")
        self.model = model.eval()
        self.tokenizer, self.max_length, self.batch_size = tokenizer, int(max_length), int(batch_size)
        self.label_names: list[str] = list(model.label_names)
        self.thresholds: np.ndarray = label_thresholds(model).numpy()  # (L,)
        # (input_ids, attention_mask) (B, T) -> logits (B, L); goemo.onnx_backend swaps in onnxruntime's.
        self.forward = model
        self.backend = "torch"

    def predict_proba(self, texts: Iterable[str]) -> np.ndarray:
        """Sigmoid probabilities, float32 array (number of texts, num_labels), rows in input order.

        `texts`: any iterable of strings (a list, a tuple, a generator, a numpy array of str, ...).
        """
        texts = as_texts(texts)
        probs = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        chunk = CHUNK_BATCHES * self.batch_size
        device = self.model.device
        with torch.inference_mode():
            for start in range(0, len(texts), chunk):
                for batch in encode_batches(self.tokenizer, texts[start : start + chunk], self.max_length, self.batch_size, start):
                    logits = self.forward(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, L)
                    probs[batch["index"].numpy()] = torch.sigmoid(logits.float()).cpu().numpy()
        return probs

    def predict(self, texts: Iterable[str]) -> list[dict]:
        """One `{"text", "labels", "scores"}` record per text, as in the CLI's predictions.jsonl."""
        texts = as_texts(texts)  # read once: a generator cannot be read again
        return to_records(texts, self.predict_proba(texts), self.label_names, self.thresholds)


def as_texts(texts: Iterable[str]) -> list[str]:
    """`texts` as a list, read once; a GoemoError unless it is an iterable of strings (and not one string)."""
    if isinstance(texts, (str, bytes)):
        raise GoemoError("predict/predict_proba take an iterable of strings, not one string (wrap a single text in a list)")
    if isinstance(texts, Mapping) or hasattr(texts, "columns") or getattr(texts, "ndim", 1) != 1:
        # iterating a dict or a DataFrame gives its keys or column names, which would be predicted silently
        raise GoemoError(f"predict/predict_proba take a flat iterable of strings, got a {type(texts).__name__} "
                         "(pass one column, e.g. df['text'], or list(d.values()))")  # fmt: skip
    try:
        texts = list(texts)
    except TypeError:
        raise GoemoError(f"predict/predict_proba take an iterable of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise GoemoError(f"predict/predict_proba take strings only: item {i} is {type(t).__name__}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can read it
                raise GoemoError(f"predict/predict_proba: item {i} is not valid Unicode ({e.reason} at position {e.start})") from None
    return texts


def fitted_path(name: str, fitted_in: Path | None) -> str:
    """A relative path a run's config names (model, tokenizer, data folder) as its fit saw it: relative to the working
    folder it was fitted in (`fit_folder`), when that holds it (a `model/` of the caller's own is another model). Hub
    ids, `pkg:` names, absolute paths and runs whose working folder cannot be told stay as they are."""
    if fitted_in is None or not name or ":" in name or Path(name).expanduser().is_absolute():
        return name
    return str(fitted_in / name) if (fitted_in / name).exists() else name


def fit_folder(run: Path) -> Path | None:
    """The working folder a run was fitted in: its folder less the logger's save_dir/name (config.yaml's; by default
    ./lightning_logs/version_N). None for an absolute save_dir or one that climbs (`..`)."""
    args = logger_args(run)
    under = Path(str(args.get("save_dir") or "."), str(args.get("name", "lightning_logs") or ""))
    folder = run.resolve()
    if under.is_absolute() or ".." in under.parts or len(under.parts) >= len(folder.parents):
        return None
    return folder.parents[len(under.parts)]  # parents[0] is save_dir/name


def load_model(path: Path, fitted_in: Path | None = None) -> tuple[EmotionClassifier, dict]:
    """The EmotionClassifier saved in a Lightning checkpoint file, and the checkpoint's data-module hparams.

    The encoder is built from its config (no pretrained weights are read or fetched) and every
    weight comes from the checkpoint, loaded with `weights_only=True`. `model.trained_tokenizer`: the
    `tokenizer_digest` of the tokenizer it was trained with (None in checkpoints from before it was saved).
    """
    ckpt = load_lightning_checkpoint(path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise GoemoError(f"{path}: not a goemo checkpoint (no hyper_parameters)")
    accepted = inspect.signature(EmotionClassifier.__init__).parameters
    # Drop what Lightning adds (e.g. `_instantiator`) and settings a newer goemo no longer has; and `compile`, a
    # training setting: inference would pay torch.compile's warm-up (and need a C++ compiler on a CPU).
    args = {k: v for k, v in hparams.items() if k in accepted and k not in ("pretrained", "compile")}
    # A setting the checkpoint lacks (older than the option) is what the run did then, not today's default: e.g.
    # thresholds tuned without resamples, which goemo.ensemble tunes an ensemble of old runs with.
    args = {**{k: v for k, v in OLD_MODEL_SETTINGS.items() if k in accepted}, **args}
    if isinstance(args.get("model_name_or_path"), str):  # its config.json, which builds the encoder
        args["model_name_or_path"] = fitted_path(args["model_name_or_path"], fitted_in)
    model = EmotionClassifier(**args, pretrained=False)
    model.on_load_checkpoint(ckpt)  # as Lightning's load: thresholds of an older checkpoint; a mismatch in one line
    model.load_state_dict(ckpt["state_dict"])
    data_hparams = ckpt.get("datamodule_hyper_parameters") or {}
    if not isinstance(data_hparams, dict):
        raise GoemoError(f"{path}: not a goemo checkpoint (datamodule_hyper_parameters is a {type(data_hparams).__name__})")
    data_state = ckpt.get("GoEmotionsDataModule")  # the data module's state_dict, under its class name (Lightning's)
    model.trained_tokenizer = data_state.get("tokenizer") if isinstance(data_state, dict) else None
    return model, data_hparams


def load_run(
    ckpt: Union[str, Path] = "best",
    device: str = "cpu",
    batch_size: int = 64,
    runs_dir: Union[str, Path] = RUNS_DIR,
) -> Classifier:
    """A trained classifier from a run folder, a .ckpt file, or `best`/`last` (newest run under `runs_dir`).

    Args:
        ckpt: As the CLI's `--ckpt_path`: `best` (the run's best checkpoint by validation F1),
            `last`, a run folder (its best checkpoint), or a checkpoint file.
        device: Where to run, e.g. "cpu" or "cuda".
        batch_size: Texts per forward pass.
        runs_dir: Where `best`/`last` look for runs.
    """
    path, run = resolve_checkpoint(str(ckpt), Path(runs_dir))
    fitted_in = fit_folder(run) if run is not None else None  # where the run's relative paths point
    model, data_hparams = load_model(path, fitted_in)
    data_hparams = {**data_hparams, **{k: fitted_path(data_hparams[k], fitted_in) for k in ("tokenizer_name", "data_dir")
                                       if isinstance(data_hparams.get(k), str)}}  # fmt: skip
    name = resolve_model_path(data_hparams.get("tokenizer_name") or model.hparams.model_name_or_path)
    tokenizer = load_tokenizer(name)
    note_tokenizer_change(model.trained_tokenizer, tokenizer_digest(tokenizer), name)  # before calling it (hub.py)
    clf = Classifier(model.to(device), tokenizer, data_hparams.get("max_length", 128), batch_size)
    clf.data_hparams = data_hparams  # what it was trained on (goemo.ensemble reads the same splits)
    return clf
