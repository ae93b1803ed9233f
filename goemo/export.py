"""`python -m goemo.export CKPT OUT_DIR [--onnx]`: a trained run as a Hugging Face model folder (and ONNX).

`cls` pooling with a BERT-style head maps onto the encoder family's stock
`AutoModelForSequenceClassification` (the pooler over [CLS], then one linear layer), so the folder loads in
a plain `transformers.pipeline("text-classification", model=OUT_DIR, top_k=None, function_to_apply="sigmoid")`,
called with `truncation=True` (texts cut at the run's max_length, the tokenizer's model_max_length).
No stock class mean-pools a BERT-style encoder over its attention mask (ModernBERT's and EuroBERT's do,
but those are other encoders; XLNet/XLM-style `summary_type="mean"` averages padding too), so `mean` and
`cls+mean` runs export with goemo's own small class (`goemo/hf_model.py`, copied in as
`modeling_goemo.py` and named in config.json's `auto_map`): the same call with `trust_remote_code` on
loads it, and without it transformers refuses the folder rather than guess a head. Every export is
checked numerically against the checkpoint (the custom class after loading it back from the folder)
before it is kept.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from goemo.classifier import Classifier, load_run as load
from goemo.errors import ArgumentParser, GoemoError, exit_on_error
from goemo.files import no_space, partial_path, remove_dead_partials
from goemo.hub import hub_kwargs
from goemo.runs import resolve_checkpoint

# Texts of varied length (empty, emoji, long enough to be truncated) for the numeric checks.
PROBE_TEXTS = ["", "I love it!", "😂😂😂", "thanks, that is so kind of you " * 40, "ugh. why would anyone do that?"]
HF_TOLERANCE = 1e-5  # max abs difference of probabilities, checkpoint vs exported HF model
ONNX_TOLERANCE = 1e-4  # max abs difference of logits, checkpoint vs onnxruntime
EXPORT_FILES = ("config.json", "thresholds.json")  # every export writes both; --force replaces only such a folder


def _probe_batch(clf: Classifier) -> dict[str, torch.Tensor]:
    """The probe texts tokenized as in training, padded: input_ids/attention_mask (5, T)."""
    return clf.tokenizer(
        PROBE_TEXTS, truncation=True, max_length=clf.max_length, padding=True, return_tensors="pt", return_token_type_ids=False
    )  # fmt: skip


def _reference_logits(clf: Classifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return clf.model(batch["input_ids"], batch["attention_mask"]).float()  # (B, L)


def hf_config(clf: Classifier, cfg):
    """`cfg` (a transformers config) with the run's labels and the multi-label problem type."""
    names = clf.label_names
    cfg.num_labels = len(names)
    cfg.id2label = dict(enumerate(names))
    cfg.label2id = {n: i for i, n in enumerate(names)}
    cfg.problem_type = "multi_label_classification"  # pipeline() then applies a sigmoid by default
    return cfg


def _check(kind: str, hf, clf: Classifier) -> None:
    """Raise unless `hf` gives the checkpoint's probabilities on the probe texts (within HF_TOLERANCE)."""
    batch = _probe_batch(clf)
    with torch.inference_mode():
        got = torch.sigmoid(hf(**batch).logits.float())
    diff = (got - torch.sigmoid(_reference_logits(clf, batch))).abs().max().item()
    if diff > HF_TOLERANCE:
        raise GoemoError(f"{kind} does not reproduce the checkpoint (max probability difference {diff:.1e})")


def to_hf_model(clf: Classifier):
    """The run as the encoder family's stock AutoModelForSequenceClassification, weights mapped, checked.

    Raises a GoemoError when the pooling or the family's head does not map exactly.
    """
    from transformers import AutoModelForSequenceClassification

    model = clf.model
    if model.hparams.pooling != "cls":
        raise GoemoError(f"pooling {model.hparams.pooling!r}: no stock Hugging Face class pools that way")
    cfg = hf_config(clf, copy.deepcopy(model.encoder.config))
    hf = AutoModelForSequenceClassification.from_config(cfg).eval()
    # encoder.* -> bert.* (the base model), head.* -> classifier.*: BertForSequenceClassification's layout.
    state = {f"{hf.base_model_prefix}.{k}": v for k, v in model.encoder.state_dict().items()}
    state.update({f"classifier.{k}": v for k, v in model.head.state_dict().items()})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    kind = f"{cfg.model_type}'s {type(hf).__name__}"
    if missing or unexpected:
        raise GoemoError(
            f"{kind} has another head than pooler + one linear layer (missing {', '.join(missing[:3]) or '-'}, "
            f"unexpected {', '.join(unexpected[:3]) or '-'})"
        )
    _check(kind, hf, clf)
    return hf


def save_goemo_model(clf: Classifier, out: Path) -> None:
    """The run as goemo's own HF class (any pooling): config.json with `auto_map`, modeling_goemo.py and
    model.safetensors in `out`; then loaded back from `out` (with goemo's copy of the class: goemo runs no code
    from a model folder) and checked."""
    from goemo import hf_model

    model = clf.model
    encoder = model.encoder.config.to_dict()
    for key in ("_name_or_path", "architectures", "id2label", "label2id", "transformers_version"):
        encoder.pop(key, None)  # the wrapper's own, or a path on this machine
    cfg = hf_config(clf, hf_model.GoemoConfig(encoder=encoder, pooling=model.hparams.pooling))
    cfg.architectures = ["GoemoForSequenceClassification"]
    cfg.auto_map = {
        "AutoConfig": "modeling_goemo.GoemoConfig",
        "AutoModelForSequenceClassification": "modeling_goemo.GoemoForSequenceClassification",
    }
    hf = hf_model.GoemoForSequenceClassification(cfg)
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}  # the same names as goemo's
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    hf.load_state_dict(state)
    hf.save_pretrained(out)
    shutil.copy(hf_model.__file__, out / "modeling_goemo.py")
    reloaded = hf_model.GoemoForSequenceClassification.from_pretrained(out, **hub_kwargs(str(out))).eval()
    _check("the exported GoemoForSequenceClassification", reloaded, clf)


def require_onnx(what: str, modules: tuple[str, ...] = ("onnx", "onnxscript", "onnxruntime")) -> None:
    """One line when the `onnx` extra is missing, before anything is written: torch.onnx imports onnxscript only
    deep inside the export (a traceback, after the HF folder was written). Running a model already exported needs
    onnxruntime alone."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            names = " and ".join([", ".join(modules[:-1]), modules[-1]] if len(modules) > 1 else modules)
            raise GoemoError(f"{what} needs {names} ({e.name or module} is not installed): pip install -e '.[onnx]'") from None


def export_onnx(clf: Classifier, path: Path) -> float:
    """`model.onnx`: input_ids, attention_mask (batch, sequence) int64 -> logits (batch, L); returns the check's max diff.

    Exports goemo's own module, so every pooling works. Apply a sigmoid and thresholds.json to the logits.
    """
    require_onnx("the ONNX export")
    import onnxruntime

    batch = _probe_batch(clf)
    example = (batch["input_ids"], batch["attention_mask"])  # batch > 1: a size-1 axis would be fixed at 1
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with warnings.catch_warnings():  # both inputs share both axes, which the exporter reports as a warning
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
        clf.model.to_onnx(
            path, example, input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes}, external_data=False, verbose=False,
            dynamo=True,  # the default from torch 2.9; torch 2.6-2.8 take dynamic_shapes only with it
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {k: batch[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")})
    diff = float(np.abs(got - _reference_logits(clf, batch).numpy()).max())
    if diff > ONNX_TOLERANCE:
        raise GoemoError(f"{path}: onnxruntime output differs from the checkpoint by {diff:.1e} (> {ONNX_TOLERANCE:g})")
    return diff


def export(ckpt: str, out_dir: Path, onnx: bool = False, force: bool = False) -> None:
    """Write the export folder.

    The target is checked before anything is loaded: it must be new or an empty folder (with `force`, an earlier
    export is replaced whole). Everything is written into a temporary folder beside `out_dir` and moved into place
    only once every check has passed, so a failed export leaves nothing that looks like a finished one, and an
    export never mixes its files with another's.

    Args:
        ckpt: `best`, `last`, a run folder or a checkpoint file, as the CLI's --ckpt_path.
        out_dir: Folder to write: new, or an empty folder.
        onnx: Also write model.onnx.
        force: Replace `out_dir` if it holds an earlier export (the old folder goes only once the new one is complete).
    """
    out_dir = out_dir.expanduser().resolve()
    if onnx:
        require_onnx("--onnx")
    if force and out_dir.is_dir():  # it would replace the run (or every run) it exports from
        path = resolve_checkpoint(str(ckpt))[0].resolve()
        if out_dir in path.parents:
            raise GoemoError(f"{out_dir}: it holds the checkpoint to export ({path}); export to a folder outside it")
    tmp = _claim_target(out_dir, force)
    try:
        clf = load(ckpt)
        hf, why = None, f"pooling {clf.model.hparams.pooling!r}: no stock Hugging Face class pools that way"
        if clf.model.hparams.pooling == "cls":
            try:
                hf = to_hf_model(clf)
            except GoemoError as e:  # e.g. RoBERTa's stock head has another layer: use goemo's class
                why = str(e)
        if hf is not None:
            hf.save_pretrained(tmp)  # config.json (labels, problem_type) + model.safetensors
            print(f"{type(hf).__name__} matches the checkpoint (probabilities within {HF_TOLERANCE:g})", file=sys.stderr)
        else:
            save_goemo_model(clf, tmp)
            print(
                f"GoemoForSequenceClassification matches the checkpoint (probabilities within {HF_TOLERANCE:g}). "
                f"{why[0].upper()}{why[1:]}, so load the folder with trust_remote_code on (it runs the exported "
                f"modeling_goemo.py)", file=sys.stderr,
            )  # fmt: skip
        # model_max_length = training's max_length, so pipeline(..., truncation=True) truncates as training did.
        clf.tokenizer.model_max_length = clf.max_length
        clf.tokenizer.save_pretrained(tmp)
        thresholds = {name: float(t) for name, t in zip(clf.label_names, clf.thresholds)}
        (tmp / "thresholds.json").write_text(json.dumps(thresholds, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if onnx:
            diff = export_onnx(clf, tmp / "model.onnx")
            print(f"model.onnx matches the checkpoint (max logit difference {diff:.1e})", file=sys.stderr)
        # safetensors writes 0600: every file as the umask makes files (the folder, made here, shows it: 0755 ->
        # 0644), so that others can read the export
        mode = tmp.stat().st_mode & 0o666
        for f in tmp.iterdir():
            f.chmod(mode)
        _put_in_place(tmp, out_dir, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if no_space(e):
            raise GoemoError(f"no space left on device while writing the export {out_dir}; free space and run again") from None
        raise


def _claim_target(out_dir: Path, force: bool) -> Path:
    """Check `out_dir` can be written (new, an empty folder, or an earlier export with `force`) and make the temporary
    folder beside it that the export is written into; both before any model is loaded."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GoemoError(f"{out_dir}: exists and is not a folder; choose a new folder to export to")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise GoemoError(f"{out_dir}: the folder is not empty; choose a new folder, or pass --force to replace it whole")
        # --force removes the folder: never `.`, `~` or any folder above the working one, and only what looks like
        # an earlier export (files only, among them the two every export writes)
        cwd = Path.cwd().resolve()
        if out_dir == cwd or out_dir in cwd.parents:
            raise GoemoError(f"{out_dir}: --force would remove the working folder or one above it; export to a new folder")
        entries = list(out_dir.iterdir())
        if any(e.is_dir() for e in entries) or not set(EXPORT_FILES) <= {e.name for e in entries}:
            raise GoemoError(f"{out_dir}: --force replaces only an earlier export (files only, among them "
                             f"{' and '.join(EXPORT_FILES)}); choose a new folder")  # fmt: skip
    # Its own temporary folder (two exports to one target at once never write into each other's), and the ones
    # that killed exports of this machine left are removed.
    remove_dead_partials(out_dir)
    tmp = partial_path(out_dir)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise GoemoError(f"{out_dir}: cannot write beside it ({e.strerror}); choose a folder you can write to") from None
    return tmp


def _put_in_place(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished export `tmp` to `out_dir`; an existing `out_dir` is set aside first (under a name of its
    own), removed after, and put back if the rename fails. Without `force`, a folder that another export filled
    since `_claim_target` checked it is left as it is."""
    old = None
    if out_dir.exists():
        if not force and out_dir.is_dir() and any(out_dir.iterdir()):
            raise GoemoError(f"{out_dir}: another export filled it meanwhile; pass --force to replace it whole")
        old = partial_path(out_dir, ".old")  # removed by a later export if this one is killed before the end
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException as e:  # OSError, or Ctrl-C / SIGTERM between the two renames
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # the folder that was there, back in place
            old = None
        if isinstance(e, OSError):
            raise GoemoError(f"{out_dir}: another export put its folder there at the same moment; export again") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(
        prog="python -m goemo.export",
        description="Export a trained run as a Hugging Face model folder with thresholds.json, and optionally "
        "model.onnx. A BERT-style 'cls' run loads with stock transformers classes; others ('mean', 'cls+mean', RoBERTa's or "
        "MPNet's 'cls') with trust_remote_code on (the export says which).",
    )
    parser.add_argument("ckpt", help="best, last, a run folder (lightning_logs/version_N) or a .ckpt file")
    parser.add_argument("out_dir", type=Path, help="folder to write")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch and sequence axes)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR whole if it holds an earlier export")
    args = parser.parse_args(argv)
    # SIGTERM as an exception, so the temporary folder is removed as after any other failure (status 143).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with exit_on_error():
        export(args.ckpt, args.out_dir, args.onnx, args.force)
    print(f"exported to {args.out_dir} (call its pipeline with truncation=True: texts cut at the run's max_length)")


if __name__ == "__main__":
    main()
