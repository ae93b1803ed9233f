"""predict --data.predict_file: reading .txt/.jsonl/.csv, streaming in input order, records, the CLI."""

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from goemo.errors import GoemoError
from goemo.inputs import count_texts, read_texts
from goemo.predict import PredictionWriter, TextFileDataset, label_thresholds, to_records
from tests.conftest import LABELS4, PREDICT_TEXTS, best_thresholds, run_main


def write_inputs(path: Path, texts: list[str]) -> Path:
    """`texts` as a predict file of the type given by path's suffix."""
    if path.suffix == ".txt":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text"])
            w.writerows([i, t] for i, t in enumerate(texts))
    return path


def check_records(records: list[dict], texts: list[str], labels: list[str], thresholds: list[float]) -> None:
    """Input order, structure, and labels = scores above their label's threshold (p > t), most probable first."""
    threshold = dict(zip(labels, thresholds))
    assert [r["text"] for r in records] == texts
    for r in records:
        assert set(r) == {"text", "labels", "scores"}
        assert list(r["scores"]) == labels and all(0.0 <= p <= 1.0 for p in r["scores"].values())
        above = sorted((n for n, p in r["scores"].items() if p > threshold[n]), key=lambda n: -r["scores"][n])
        assert r["labels"] == above


# -- reading files ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_read_texts_round_trip(tmp_path, suffix):
    texts = PREDICT_TEXTS + ["line one\nline two"] * (suffix == ".csv")  # a quoted newline only CSV can hold
    texts = [t for t in texts if suffix != ".txt" or "\n" not in t]
    path = write_inputs(tmp_path / f"in{suffix}", texts)
    assert list(read_texts(path)) == texts
    assert count_texts(path) == len(texts)


@pytest.mark.parametrize("name", ["texts.TXT", "t.CSV", "t.JSONL"])
def test_read_texts_takes_upper_case_suffixes(tmp_path, name):
    texts = ["happy", "sad, and tired"]
    path = write_inputs(tmp_path / name.lower(), texts).rename(tmp_path / name)
    assert list(read_texts(path)) == texts
    assert count_texts(path) == len(texts)


def test_txt_keeps_empty_lines_and_strips_bom_and_crlf(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("\ufeffa\r\n\r\nb".encode())
    assert list(read_texts(path)) == ["a", "", "b"]


def test_csv_rows_end_at_a_lone_cr_as_txt_lines_do(tmp_path):
    """Files saved with classic Mac line ends (CR alone); a CR inside quotes stays in its text, as csv reads it."""
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,text\r1,hello\r2,"two\rlines"\r3,world\r')
    assert list(read_texts(path)) == ["hello", "two\rlines", "world"]
    (tmp_path / "in.txt").write_bytes(b"hello\rworld\r")
    assert list(read_texts(tmp_path / "in.txt")) == ["hello", "world"]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": ""}\n', encoding="utf-8")
    assert list(read_texts(path)) == ["a", ""]


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("in.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r'in\.jsonl:2: each line must be a JSON object with a "text" field'),
        ("in.jsonl", b'{"text": "a"}\n{"text": 3}\n', r'in\.jsonl:2: "text" must be a string, got int'),
        ("in.jsonl", b'{"text": "a"}\n\n{oops\n', r"in\.jsonl:3: not valid JSON"),
        ("in.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', r"in\.jsonl:2: not valid UTF-8 \(byte 0xff\)"),
        ("in.csv", b"id,body\n1,hello\n", r'in\.csv:1: the header row has no "text" column \(found: id, body\)'),
        ("in.csv", b"", r'in\.csv:1: the header row has no "text" column'),
        ("in.csv", b"text,id,text\nx,1,y\n", r'in\.csv:1: the header row has 2 "text" columns; keep one'),
        ("in.csv", b"id,text\n1,a\n2\n", r'in\.csv:3: 1 columns, so no "text" value'),
        ("in.csv", b"text\nfine\nbad \xe9 latin-1\n", r"in\.csv:3: not valid UTF-8"),
        ("in.csv", b'text\n"a"b\nc\n', r"in\.csv:2: bad CSV"),  # not the text 'ab'
        ("in.csv", b'text\n"unclosed\nsecond\nthird\n', r"in\.csv:\d: bad CSV"),  # not one text of three lines
        ("in.txt", b"fine\nalso fine\n\xff\n", r"in\.txt:3: not valid UTF-8"),
        # UTF-16 without a byte-order mark is valid UTF-8: it was read as texts of NUL-separated letters
        pytest.param("in.txt", "I love it\nugh\n".encode("utf-16-le"),
                     r"in\.txt:1: holds a NUL byte \(UTF-16 or a binary file\?\); save the file as UTF-8$", id="txt-utf16"),
        pytest.param("in.jsonl", b'{"text": "a", "n": ' + b"1" * 5000 + b"}\n",
                     r"in\.jsonl:1: JSON that Python cannot read \(Exceeds the limit \(4300 digits\) for integer string conversion\)$",
                     id="jsonl-long-number"),
        pytest.param("in.jsonl", b"[" * 100_000 + b"\n", r"in\.jsonl:1: JSON that Python cannot read \(maximum recursion depth",
                     id="jsonl-deep"),
        ("in.tsv", b"text\n", r"in\.tsv: unsupported file type '\.tsv'; use \.txt"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(GoemoError, match=expected):
        count_texts(tmp_path / name)


def test_missing_and_empty_files(tmp_path, tiny_model):
    with pytest.raises(GoemoError, match=r"nope\.txt: no such file"):
        count_texts(tmp_path / "nope.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    from transformers import AutoTokenizer

    with pytest.raises(GoemoError, match=r"empty\.jsonl: no texts to predict"):
        TextFileDataset(str(tmp_path / "empty.jsonl"), AutoTokenizer.from_pretrained(tiny_model), 16, 4)


# -- records and thresholds ---------------------------------------------------------------------------
def test_records_sort_labels_and_use_per_label_thresholds():
    probs = np.array([[0.2, 0.9, 0.5, 0.7], [0.1, 0.1, 0.1, 0.1]], dtype=np.float32)
    recs = to_records(["a", "b"], probs, LABELS4, np.array([0.5, 0.5, 0.5, 0.8], dtype=np.float32))
    # neutral (0.7) is under its own 0.8; fear is exactly at its 0.5, not above it: not predicted, as
    # torchmetrics, the threshold tuning and the test report count (p > t)
    assert recs[0]["labels"] == ["anger"]
    assert recs[1]["labels"] == [] and recs[0]["scores"]["anger"] == pytest.approx(0.9)
    several = to_records(["c", "d"], np.array([[0.6, 0.9, 0.7, 0.1], [0.9, 0.6, 0.1, 0.7]], dtype=np.float32), LABELS4,
                         np.full(4, 0.5, np.float32))  # fmt: skip
    # each text's most probable first, not in label order (nor in the first text's order)
    assert [r["labels"] for r in several] == [["anger", "fear", "joy"], ["joy", "neutral", "anger"]]


def test_label_thresholds_prefers_the_tuned_buffer():
    plain = SimpleNamespace(label_names=LABELS4, hparams=SimpleNamespace(threshold=0.3))
    assert label_thresholds(plain).tolist() == pytest.approx([0.3] * 4)
    tuned = SimpleNamespace(**vars(plain), thresholds=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert label_thresholds(tuned).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


# -- streaming: sorted chunks, worker shards, written back in input order --------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_is_written_in_input_order(tmp_path, tiny_model, num_workers):
    from transformers import AutoTokenizer

    texts = [" ".join(["word"] * ((i * 7) % 11)) + f" {i}" for i in range(23)]  # lengths out of order
    path = write_inputs(tmp_path / "in.jsonl", texts)
    ds = TextFileDataset(str(path), AutoTokenizer.from_pretrained(tiny_model), max_length=16, batch_size=3, chunk_batches=2)
    assert len(ds) == 8
    batches = list(DataLoader(ds, batch_size=None, num_workers=num_workers))
    assert len(batches) == 8 and sorted(i for b in batches for i in b["index"].tolist()) == list(range(23))
    assert any(b["index"].tolist() != sorted(b["index"].tolist()) for b in batches)  # sorted by length, not position
    assert all(b["input_ids"].shape[1] == b["attention_mask"].sum(1).max() for b in batches)

    writer = PredictionWriter(str(tmp_path / "out" / "p.jsonl"))
    module = SimpleNamespace(label_names=LABELS4, hparams=SimpleNamespace(threshold=0.5))
    writer.on_predict_start(SimpleNamespace(world_size=1, log_dir=str(tmp_path)), module)
    for b in batches:  # probability of label 0 encodes the row's position
        probs = torch.zeros(len(b["index"]), 4)
        probs[:, 0] = b["index"] / 100
        writer.write_on_batch_end(None, module, probs, None, b, 0, 0)
    writer.on_predict_end(None, module)
    rows = [json.loads(line) for line in (tmp_path / "out" / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["scores"]["joy"] for r in rows] == pytest.approx([i / 100 for i in range(23)])


def test_a_missing_batch_fails_the_predictions_and_writes_no_file(tmp_path):
    """Rows 2-3 never arrive: the rows after them wait, and at the end the file is refused, not committed short."""
    writer = PredictionWriter(str(tmp_path / "p.jsonl"))
    module = SimpleNamespace(label_names=LABELS4, hparams=SimpleNamespace(threshold=0.5))
    writer.on_predict_start(SimpleNamespace(world_size=1, log_dir=str(tmp_path)), module)
    for rows in ([0, 1], [4, 5]):  # the batch of rows 2 and 3 is lost
        batch = {"index": torch.tensor(rows), "text": [f"t{i}" for i in rows]}
        writer.write_on_batch_end(None, module, torch.zeros(2, 4), None, batch, 0, 0)
    with pytest.raises(GoemoError, match=r"p\.jsonl: 2 predictions were never written \(rows missing before them\)$"):
        writer.on_predict_end(None, module)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_predict_txt_writes_into_the_run_folder(tiny_run, txt_predictions):
    r, out = txt_predictions
    assert f"wrote {len(PREDICT_TEXTS)} predictions to lightning_logs/version_0/predictions.jsonl" in r.stdout
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    check_records(records, PREDICT_TEXTS, LABELS4, best_thresholds(tiny_run))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_cli_predict_jsonl_and_csv_with_output(tiny_run, txt_predictions, tmp_path, suffix):
    src = write_inputs(tmp_path / f"texts{suffix}", PREDICT_TEXTS)
    out = tmp_path / "sub" / "preds.jsonl"
    r = run_main("predict", "--ckpt_path", "best", "--data.predict_file", str(src), "--output", str(out),
                 "--data.eval_batch_size", "2", cwd=tiny_run)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"to {out}" in r.stdout
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    check_records(records, PREDICT_TEXTS, LABELS4, best_thresholds(tiny_run))
    # same scores as the .txt run (batch size 2 here, 32 there: padding must not matter)
    txt = [json.loads(line) for line in txt_predictions[1].read_text(encoding="utf-8").splitlines()]
    for a, b in zip(records, txt):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


@pytest.mark.slow
def test_cli_predict_bad_file_is_one_line(tiny_run, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    r = run_main("predict", "--ckpt_path", "best", "--data.predict_file", str(tmp_path / "bad.jsonl"), cwd=tiny_run)
    assert r.returncode == 2
    assert re.search(r'^error: \S*bad\.jsonl:2: each line must be a JSON object with a "text" field$', r.stderr, re.M), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_cli_predict_of_a_bare_checkpoint_cuts_texts_as_goemo_load_does(learned_run, tmp_path, backend):
    """A .ckpt without its run folder has no config.yaml: the CLI takes max_length from the checkpoint, as goemo.load."""
    from goemo import load
    from goemo.runs import best_checkpoint, load_checkpoint

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt = load_checkpoint(best_checkpoint(learned_run / "lightning_logs" / "version_0"))
    ckpt["datamodule_hyper_parameters"]["max_length"] = 4  # as if trained on texts cut to 2 words
    torch.save(ckpt, tmp_path / "short.ckpt")
    texts = ["table chair table chair happy glad happy glad", "happy glad happy glad angry mad angry mad"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    r = run_main("predict", "--ckpt_path", "short.ckpt", "--data.predict_file", "texts.txt", "--output", "p.jsonl",
                 "--data.data_dir", str(learned_run / "data"), "--backend", backend, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = [[rec["scores"][n] for n in LABELS4] for rec in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())]
    assert np.allclose(got, load(tmp_path / "short.ckpt").predict_proba(texts), atol=1e-5)
    whole = load(learned_run / "lightning_logs" / "version_0").predict_proba(texts)  # max_length 128
    assert np.abs(np.array(got) - whole).max() > 0.05  # so the line above tells 4 from 128
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config_predict.yaml").read_text())
    assert saved["backend"] == backend and saved["data"]["predict_file"] == "texts.txt"  # either path saves its config


def test_predict_file_reads_and_writes_tilde_paths_and_refuses_an_empty_file(tmp_path, monkeypatch, capsys):
    """The onnx/int8 path of `predict` (goemo.predict.predict_file) takes paths as the torch path does: `~` is the
    home folder (it wrote into a folder named `~` under the working one), and a file without texts is an error."""
    from goemo.predict import predict_file

    class Upper:  # a classifier: one record per text
        backend = "fake"

        def predict(self, texts):
            return [{"text": t.upper()} for t in texts]

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "texts.txt").write_text("a\nb\n", encoding="utf-8")
    assert predict_file(Upper(), Path("~/texts.txt"), Path("~/preds.jsonl")) == 2
    assert [json.loads(x)["text"] for x in (home / "preds.jsonl").read_text().splitlines()] == ["A", "B"]
    assert not (cwd / "~").exists() and f"wrote 2 predictions to {home / 'preds.jsonl'} (fake)" in capsys.readouterr().out
    (home / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(GoemoError, match=f"^{re.escape(str(home / 'empty.txt'))}: no texts to predict$"):
        predict_file(Upper(), Path("~/empty.txt"), Path("~/none.jsonl"))
    assert not (home / "none.jsonl").exists()


@pytest.mark.slow
def test_a_run_trained_in_bf16_predicts_in_float32_as_goemo_load_unless_told(tiny_run, tmp_path):
    """A GPU fit saves trainer.precision bf16-mixed in its config.yaml; predict (and test) from the run evaluate in
    float32, as goemo.load, serve and the ONNX export, so its predictions agree with theirs on any machine."""
    import shutil

    import yaml

    from goemo import load

    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(tiny_run / "lightning_logs" / "version_0", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["precision"] = "bf16-mixed"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "texts.txt").write_text("\n".join(PREDICT_TEXTS) + "\n", encoding="utf-8")
    want = load(run).predict_proba(PREDICT_TEXTS)
    for typed in ([], ["--trainer.precision", "bf16-mixed"]):
        out = tmp_path / f"p{len(typed)}.jsonl"
        r = run_main("predict", "--ckpt_path", str(run), "--data.predict_file", "texts.txt", "--output", str(out),
                     *typed, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        got = np.array([[rec["scores"][n] for n in LABELS4] for rec in map(json.loads, out.read_text().splitlines())])
        noted = "note: trainer.precision 32-true: the run trained in bf16-mixed; predict runs in float32" in r.stderr
        if typed:  # asked for: bf16 autocast (this barely trained model's outputs sit near 0.5: 4e-5 off)
            assert not noted and np.abs(got - want).max() > 5e-6
        else:
            assert noted and np.abs(got - want).max() < 1e-6, r.stderr[-2000:]


def test_predict_writes_its_config_after_the_predictions_file(tiny_run, tmp_path, monkeypatch):
    """Both happen at predict's end: the writer commits predictions.jsonl first, so a failed commit (a full disk)
    leaves config_predict.yaml beside the earlier predictions it describes."""
    import shutil
    import sys

    from goemo.cli import main

    work = tmp_path / "work"
    shutil.copytree(tiny_run, work, ignore=shutil.ignore_patterns("*.jsonl", "texts.*", "config_*.yaml"))
    run = work / "lightning_logs" / "version_0"
    (work / "texts.txt").write_text("happy\n", encoding="utf-8")
    (work / "other.txt").write_text("angry\nmad\n", encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    flags = ["--trainer.enable_progress_bar", "false"]
    main(["predict", "--ckpt_path", "last", "--data.predict_file", "texts.txt", *flags])
    before = {name: (run / name).read_text(encoding="utf-8") for name in ("predictions.jsonl", "config_predict.yaml")}
    assert "texts.txt" in before["config_predict.yaml"]

    def full_disk(self, trainer, pl_module):
        self.out.discard()
        raise GoemoError(f"no space left on device while writing {self.path}; free space and run again")

    monkeypatch.setattr(PredictionWriter, "on_predict_end", full_disk)
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", "last", "--data.predict_file", "other.txt", *flags])
    assert {name: (run / name).read_text(encoding="utf-8") for name in before} == before  # the earlier pair, as it was
