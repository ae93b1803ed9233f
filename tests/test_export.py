"""python -m goemo.export: a pipeline()-loadable HF folder (stock class for cls pooling, goemo's for mean) and model.onnx."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from goemo import load
from goemo.export import export
from tests.conftest import LABELS4, PREDICT_TEXTS, REPO, best_thresholds

# Varied lengths, and one text longer than the tiny model's 128 positions: pipeline() must truncate it.
TEXTS = PREDICT_TEXTS + ["fine", "a bit longer text, with punctuation!"]


def encode(clf, texts: list[str]) -> dict[str, torch.Tensor]:
    """Texts tokenized as in training, padded to the longest: (n, T) each."""
    return clf.tokenizer(texts, truncation=True, max_length=clf.max_length, padding=True, return_tensors="pt",
                         return_token_type_ids=False)  # fmt: skip


def onnx_vs_torch(path: Path, clf, texts: list[str]) -> float:
    """Max abs difference of logits (n, L): onnxruntime on model.onnx vs the checkpoint's module."""
    import onnxruntime

    enc = encode(clf, texts)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")})
    with torch.inference_mode():
        want = clf.model(enc["input_ids"], enc["attention_mask"]).numpy()
    assert got.shape == want.shape == (len(texts), 4)
    return float(np.abs(got - want).max())


THRESHOLDS = [0.1, 0.2, 0.3, 0.4]


@pytest.fixture(scope="module")
def export_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run whose best checkpoint tells texts apart and labels apart: its logits x 1000 about their
    mean over TEXTS (the tiny run's scores differ between texts by under 5e-5, inside the tolerances below) and
    thresholds THRESHOLDS (the tiny run's are all 0.01: one written under another label's name would pass)."""
    from goemo.runs import best_checkpoint

    work = tmp_path_factory.mktemp("export") / "work"
    shutil.copytree(tiny_run, work)
    best = best_checkpoint(work / "lightning_logs" / "version_0")
    mean_logit = torch.logit(torch.from_numpy(load(best).predict_proba(TEXTS)).double()).mean(0).float()  # (L,)
    ckpt = torch.load(best, weights_only=True, map_location="cpu")
    state, k = ckpt["state_dict"], 1000.0  # k (W h + b - mean) = k W h + k (b - mean)
    state["head.weight"], state["head.bias"] = k * state["head.weight"], k * (state["head.bias"] - mean_logit)
    state["thresholds"] = torch.tensor(THRESHOLDS)
    torch.save(ckpt, best)
    return work


@pytest.fixture(scope="module")
def exported(export_run) -> Path:
    """`python -m goemo.export best OUT --onnx` in the export run."""
    out = export_run / "export"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # this checkout's goemo
    r = subprocess.run([sys.executable, "-m", "goemo.export", "best", str(out), "--onnx"], cwd=export_run, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model.onnx matches the checkpoint" in r.stderr and f"exported to {out}" in r.stdout
    return out


@pytest.mark.slow
def test_hf_folder_layout(exported, export_run):
    from transformers import AutoTokenizer

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "thresholds.json", "tokenizer.json", "model.onnx"} <= names
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["problem_type"] == "multi_label_classification"
    assert cfg["architectures"] == ["BertForSequenceClassification"] and "auto_map" not in cfg
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(LABELS4)} and cfg["label2id"] == {n: i for i, n in enumerate(LABELS4)}
    assert best_thresholds(export_run) == pytest.approx(THRESHOLDS)  # the checkpoint's per-label thresholds
    assert json.loads((exported / "thresholds.json").read_text()) == pytest.approx(dict(zip(LABELS4, THRESHOLDS)))
    # pipeline(..., truncation=True) cuts texts where training did
    max_length = load(export_run / "lightning_logs" / "version_0").max_length
    assert AutoTokenizer.from_pretrained(exported).model_max_length == max_length


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_pipeline_scores_like_the_checkpoint(export_run, exported, batch_size):
    from transformers import pipeline

    clf = load(export_run / "lightning_logs" / "version_0")
    pipe = pipeline("text-classification", model=str(exported), top_k=None, function_to_apply="sigmoid")
    # truncation=True: the exported tokenizer's model_max_length is training's max_length
    out = pipe(TEXTS, batch_size=batch_size, truncation=True)
    got = np.array([[{d["label"]: d["score"] for d in row}[n] for n in LABELS4] for row in out])
    want = clf.predict_proba(TEXTS)
    assert np.abs(want - want[0]).max(0).min() > 100 * 1e-5  # every label's scores differ between texts
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.slow
def test_onnx_matches_on_varied_lengths(export_run, exported):
    clf = load(export_run / "lightning_logs" / "version_0")
    assert onnx_vs_torch(exported / "model.onnx", clf, TEXTS) <= 1e-4
    # batch 1, and another sequence length than the export's example
    assert onnx_vs_torch(exported / "model.onnx", clf, ["just one text"]) <= 1e-4


# -- mean pooling: no stock HF class, goemo's own (trust_remote_code) ------------------------------------------
def write_checkpoint(path: Path, tiny_model: Path, pooling: str) -> Path:
    """A checkpoint file as Lightning writes one (the keys goemo reads), with a random head and thresholds THRESHOLDS."""
    from goemo.model import EmotionClassifier

    torch.manual_seed(1)
    model = EmotionClassifier(str(tiny_model), LABELS4, pooling=pooling)
    state = {**model.state_dict(), "thresholds": torch.tensor(THRESHOLDS)}
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"max_length": 64, "tokenizer_name": str(tiny_model)}}, path)  # fmt: skip
    return path


@pytest.mark.parametrize("pooling", ["mean", "cls+mean"])
def test_mean_pooling_exports_goemo_class_and_onnx(tmp_path, tiny_model, pooling, capsys):
    from transformers import pipeline

    ckpt = write_checkpoint(tmp_path / "run.ckpt", tiny_model, pooling)
    out = tmp_path / "export"
    export(str(ckpt), out, onnx=True)
    assert "load the folder with trust_remote_code on" in capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_goemo.py", "thresholds.json", "model.onnx"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "goemo" and cfg["pooling"] == pooling and cfg["problem_type"] == "multi_label_classification"
    assert cfg["auto_map"]["AutoModelForSequenceClassification"] == "modeling_goemo.GoemoForSequenceClassification"
    assert str(tiny_model) not in (out / "config.json").read_text()  # no path of this machine
    assert "import goemo" not in (out / "modeling_goemo.py").read_text()  # loads where goemo is not installed
    clf = load(ckpt)
    pipe = pipeline("text-classification", model=str(out), top_k=None, function_to_apply="sigmoid", trust_remote_code=True)
    for batch_size in (1, 4):  # 4: padded batches, where the mean must skip padding
        rows = pipe(TEXTS, batch_size=batch_size, truncation=True)
        got = np.array([[{d["label"]: d["score"] for d in row}[n] for n in LABELS4] for row in rows])
        assert np.abs(got - clf.predict_proba(TEXTS)).max() <= 1e-5
    # Without trust_remote_code transformers refuses the folder (model_type goemo), never a wrong stock head.
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("text-classification", model=str(out))
    assert onnx_vs_torch(out / "model.onnx", clf, TEXTS) <= 1e-4
    # The README's recipe for model.onnx alone: PreTrainedTokenizerFast (AutoTokenizer would read config.json and ask,
    # on stdin, whether to run the custom code), onnxruntime, a sigmoid and thresholds.json.
    import onnxruntime as ort
    from transformers import PreTrainedTokenizerFast

    enc = PreTrainedTokenizerFast.from_pretrained(str(out))(TEXTS, padding=True, truncation=True, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"))
    logits = session.run(["logits"], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]
    probs = 1 / (1 + np.exp(-logits))
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds == pytest.approx(dict(zip(LABELS4, THRESHOLDS)))  # each under its own label
    assert np.abs(probs - clf.predict_proba(TEXTS)).max() <= 1e-4
    labels = [{n for n, p in zip(thresholds, row) if p > thresholds[n]} for row in probs]
    assert labels == [set(r["labels"]) for r in clf.predict(TEXTS)]


def test_the_exported_pooling_is_the_pooler_for_cls_and_the_masked_mean_for_mean(tiny_model):
    """What GoemoForSequenceClassification pools, checked against the encoder's outputs directly (the export tests
    compare the export with goemo's module, which pools through the same function)."""
    from transformers import AutoModel

    from goemo.hf_model import pool

    encoder = AutoModel.from_pretrained(tiny_model).eval()
    ids, mask = torch.randint(5, 50, (2, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        out = encoder(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(pool(out, mask, "cls"), out.pooler_output)
    torch.testing.assert_close(pool(out, mask, "mean")[1], out.last_hidden_state[1, :3].mean(0))
    torch.testing.assert_close(pool(out, mask, "cls+mean"), torch.cat([out.pooler_output, pool(out, mask, "mean")], -1))


def test_an_exported_goemo_model_gives_the_multi_label_loss_for_labels(tiny_model):
    """Fine-tuning an export further (Hugging Face's Trainer) needs the loss back from `labels`: BCE on the logits."""
    from transformers import AutoConfig

    from goemo.hf_model import GoemoConfig, GoemoForSequenceClassification

    torch.manual_seed(0)
    model = GoemoForSequenceClassification(GoemoConfig(AutoConfig.from_pretrained(tiny_model).to_dict(), "mean", num_labels=4))
    ids, labels = torch.randint(5, 50, (3, 6)), torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    out = model(ids, labels=labels)
    assert out.loss is not None and out.loss.dtype == torch.float32  # int multi-hot labels taken as floats
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels.float()))
    assert model(ids).loss is None


# -- the export folder: readable by others, --force only over an earlier export, one-line errors ------------------
def test_exported_files_are_readable_by_other_users(tmp_path, tiny_model):
    """safetensors writes model.safetensors 0600: with umask 022 another user could not load the export."""
    import stat

    ckpt = write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    umask = os.umask(0o022)
    try:
        export(str(ckpt), tmp_path / "out")
    finally:
        os.umask(umask)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_force_replaces_only_an_earlier_export_never_the_working_folder(tmp_path, tiny_model, monkeypatch, capsys):
    """`python -m goemo.export RUN . --force` (or `~`) renamed and removed the working folder (or the home folder)."""
    from goemo.errors import GoemoError
    from goemo.export import main

    ckpt = write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    work, home = tmp_path / "home" / "work", tmp_path / "home"
    (work / "src").mkdir(parents=True)
    (work / "config.json").write_text("{}")  # a project's config and its own thresholds: still not an export
    (work / "thresholds.json").write_text("{}")
    (home / "notes.txt").write_text("mine")
    monkeypatch.chdir(work / "src")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere" / "docs").mkdir(parents=True)
    (tmp_path / "elsewhere" / "model.onnx").write_text("someone's")
    capsys.readouterr()  # the model's loading bar
    for target, message in (
        (".", f"{work / 'src'}: --force would remove the working folder or one above it; export to a new folder"),
        ("..", f"{work}: --force would remove the working folder or one above it"),
        (str(home), f"{home}: --force would remove the working folder or one above it"),
        ("~", (f"{tmp_path / 'elsewhere'}: --force replaces only an earlier export (files only, among them config.json "
               "and thresholds.json); choose a new folder")),
    ):  # fmt: skip
        (work / "src" / "main.py").write_text("print()")
        with pytest.raises(SystemExit) as e:
            main([str(ckpt), target, "--force"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert (work / "src" / "main.py").is_file() and (home / "notes.txt").is_file()
    assert (tmp_path / "elsewhere" / "model.onnx").read_text() == "someone's"
    mine = tmp_path / "mine"  # files only, but not both that every export writes (a Hugging Face model folder)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_text("weights")
    with pytest.raises(GoemoError, match="--force replaces only an earlier export"):
        export(str(ckpt), mine, force=True)
    project = tmp_path / "project"  # both files every export writes, and a folder of its own: no export either
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    (project / "thresholds.json").write_text("{}")
    (project / "src" / "main.py").write_text("print()")
    with pytest.raises(GoemoError, match="--force replaces only an earlier export"):
        export(str(ckpt), project, force=True)
    assert (project / "src" / "main.py").read_text() == "print()"
    inside = tmp_path / "with-ckpt"  # an earlier export, with the checkpoint to export saved into it
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    (inside / "thresholds.json").write_text("{}")
    shutil.copy(ckpt, inside / "run.ckpt")
    with pytest.raises(GoemoError, match=f"^{inside}: it holds the checkpoint to export .*; export to a folder outside it$"):
        export(str(inside / "run.ckpt"), inside, force=True)
    assert (inside / "run.ckpt").is_file()
    old = tmp_path / "old-export"  # an earlier export is replaced whole
    old.mkdir()
    for name in ("config.json", "thresholds.json", "tokenizer.json", "model.onnx"):
        (old / name).write_text("{}")
    export(str(ckpt), old, force=True)
    assert not (old / "model.onnx").exists() and (old / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or set-aside folder left


def test_onnx_without_onnxscript_is_one_line_before_anything_is_written(tmp_path, tiny_model):
    """torch.onnx imports onnxscript deep inside the export: a traceback, after the HF folder had been written."""
    from tests.test_backends import without_onnxscript

    write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    r = without_onnxscript("from goemo.export import main\nmain(sys.argv[1:])", "run.ckpt", "out", "--onnx", cwd=tmp_path)
    message = "error: --onnx needs onnx, onnxscript and onnxruntime (onnxscript is not installed): pip install -e '.[onnx]'\n"
    assert (r.returncode, r.stderr) == (2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_a_full_disk_during_the_export_is_one_line(tmp_path, tiny_model, monkeypatch):
    """safetensors' writer fails with a SafetensorError that names the OS error only in its message: a traceback."""
    from safetensors import SafetensorError

    from goemo.errors import GoemoError

    def full(*args, **kwargs):  # what safetensors raises on a full disk (tried on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    ckpt = write_checkpoint(tmp_path / "run.ckpt", tiny_model, "cls")
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    out = tmp_path / "out"
    with pytest.raises(GoemoError, match=f"^no space left on device while writing the export {out}; free space and run again$"):
        export(str(ckpt), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
