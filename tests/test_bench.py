"""The benchmark: subset folders, the Throughput callback's counts, and `benchmarks/cpu.py` end to end (tiny)."""

import json
import os
import subprocess
import sys

import lightning as L
import pytest

from benchmarks.cpu import copy_rows, summarize, table
from benchmarks.throughput import Throughput
from goemo.data import GoEmotionsDataModule
from goemo.model import EmotionClassifier
from tests.conftest import LABELS4, REPO


def test_copy_rows_keeps_quoted_rows_whole(tmp_path):
    src, dst = tmp_path / "in.tsv", tmp_path / "out.tsv"
    src.write_text('a\t0\tid0\n"two\nlines"\t1\tid1\nc\t2\tid2\n', encoding="utf-8")
    assert copy_rows(src, dst, 2) == 2
    assert dst.read_text(encoding="utf-8") == 'a\t0\tid0\n"two\nlines"\t1\tid1\n'
    assert copy_rows(src, dst, None) == 3 and dst.read_bytes() == src.read_bytes()


def test_repeated_runs_report_medians_ranges_and_ratio_of_medians():
    seed = summarize([{"wall_s": 100.0, "peak_rss_mib": 1000.0, "train_samples_per_s": 50.0, "val_f1_macro": 0.0, "returncode": 0},
                      {"wall_s": 130.0, "peak_rss_mib": 1010.0, "train_samples_per_s": 60.0, "val_f1_macro": 0.0, "returncode": 0},
                      {"wall_s": 110.0, "peak_rss_mib": 990.0, "train_samples_per_s": 40.0, "val_f1_macro": 0.0, "returncode": 0}])  # fmt: skip
    assert seed["runs"] == 3 and seed["wall_s"] == 110.0 and seed["train_samples_per_s"] == 50.0
    assert seed["range"]["wall_s"] == (100.0, 130.0) and seed["range"]["peak_rss_mib"] == (990.0, 1010.0)
    goemo = summarize([{"wall_s": 50.0, "peak_rss_mib": 900.0, "train_samples_per_s": 100.0, "val_f1_macro": 0.05, "returncode": 0},
                       {"wall_s": 70.0, "peak_rss_mib": 950.0, "train_samples_per_s": 90.0, "val_f1_macro": 0.05, "returncode": 0}])  # fmt: skip
    assert goemo["wall_s"] == 60.0  # an even count: the mean of the middle two
    md = table({"seed": seed, "goemo": goemo}, epochs=1)
    assert "| wall time of the command (s) | 110.0 (100.0-130.0) | 60.0 (50.0-70.0) | 0.55x |" in md
    assert "| train samples/s (training loop) | 50.0 (40.0-60.0) | 95.0 (90.0-100.0) | 1.90x |" in md
    assert "| dev macro-F1 after 1 epoch(s) | 0.0000 | 0.0500 | - |" in md  # equal in every run: no range
    single = table({"seed": {"wall_s": 100.0}, "goemo": {"wall_s": 50.0}}, epochs=1)
    assert "| wall time of the command (s) | 100.0 | 50.0 | 0.50x |" in single


@pytest.mark.parametrize("val_check_interval,val_runs", [(1.0, 2), (3, 4)])  # 6 batches an epoch, 2 epochs
def test_throughput_counts(tiny_data, tiny_model, tmp_path, val_check_interval, val_runs):
    dm = GoEmotionsDataModule(data_dir=str(tiny_data), tokenizer_name=str(tiny_model), train_batch_size=16,
                              cache_dir=str(tmp_path / "cache"))  # fmt: skip
    model = EmotionClassifier(str(tiny_model), label_names=LABELS4)
    out = tmp_path / "tp" / "out.json"
    trainer = L.Trainer(
        max_epochs=2, callbacks=[Throughput(str(out))], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, val_check_interval=val_check_interval,
    )  # fmt: skip
    trainer.fit(model, dm)
    r = json.loads(out.read_text())
    lengths = {s: sum(dm.datasets[s].with_format(None)["length"]) for s in ("train", "validation")}
    assert r["epochs"] == 2 and r["global_step"] == 12
    assert r["train_samples"] == 2 * 96 and r["train_real_tokens"] == 2 * lengths["train"]
    # the sanity check's batch is not counted
    assert r["val_samples"] == val_runs * 32 and r["val_real_tokens"] == val_runs * lengths["validation"]
    assert r["train_padded_tokens"] >= r["train_real_tokens"] and 0 <= r["train_padding_fraction"] < 1
    assert 0 < r["train_time_s"] + r["val_time_s"] <= r["fit_time_s"]
    assert r["train_samples_per_s"] == pytest.approx(r["train_samples"] / r["train_time_s"], rel=1e-2)
    assert r["val_f1_micro"] is not None and "val/f1_macro" in r["val_metrics"]


@pytest.mark.slow
def test_cpu_benchmark_end_to_end(goemotions, tiny_model, tmp_path):
    """The README command at a tiny size, twice: both children run each round, the table and JSON carry every field."""
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cpu.py"), "--data", str(goemotions), "--train-rows", "64",
         "--eval-rows", "16", "--epochs", "1", "--model", str(tiny_model), "--out-dir", str(out), "--repeat", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for row in ("train samples/s", "of the ceiling (78/s)", "eval samples/s", "of the ceiling (267/s)",
                "peak RSS (MiB)", "wall time of the command", "dev macro-F1 after 1 epoch", "dev micro-F1 after 1 epoch"):  # fmt: skip
        assert row in r.stdout, row
    assert "machine: " in r.stdout and " cores" in r.stdout and "torch " in r.stdout
    (report,) = out.glob("cpu-*.json")
    assert report.with_suffix(".md").is_file() and len(list(out.glob("cpu-*.log"))) == 4
    assert "median (min-max) of 2 runs per side" in r.stdout
    # the second round starts with goemo, so neither side always runs first
    assert r.stdout.index("running goemo (2/2)") < r.stdout.index("running seed (2/2)")
    rep = json.loads(report.read_text())
    assert rep["data_rows"] == {"train": 64, "dev": 16, "test": 16}
    assert {"cpu", "cores", "torch"} <= rep["machine"].keys()
    for name in ("seed", "goemo"):
        res = rep["results"][name]
        assert res["runs"] == 2 and len(rep["runs"][name]) == 2, name
        for key in ("train_samples_per_s", "val_samples_per_s", "peak_rss_mib", "wall_s", "val_f1_macro",
                    "val_f1_micro", "train_of_ceiling", "val_of_ceiling", "other_s"):  # fmt: skip
            assert res.get(key) is not None, (name, key)
        assert res["train_samples"] == 64 and res["val_samples"] == 16, name
        assert res["peak_rss_mib"] > 100 and res["wall_s"] > res["train_time_s"], name


def test_gpu_mfu_counts_six_flops_per_matmul_weight_and_real_token():
    from benchmarks.gpu import side

    row = side("goemo", 2.0, 100, tokens=1000, params=110, matmul_params=80, peak=1e-9)  # 1e-9 TFLOP/s = 1000 FLOP/s
    assert row["mfu"] == 240.0 and row["tokens_per_s"] == 500 and row["samples_per_s"] == 50.0  # 6 * 80 * 500 / 1000


@pytest.mark.slow
def test_gpu_script_tiny_mode_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.py --tiny: both sides train one epoch of a tiny BERT and the table's figures are consistent."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    goemo, seed = result["sides"]
    assert result["train_rows"] == 64 and goemo["side"] == "goemo" and seed["side"].startswith("seed")
    assert goemo["samples_per_s"] == pytest.approx(64 / goemo["epoch_s"], rel=0.01)
    assert result["speedup"] == pytest.approx(seed["epoch_s"] / goemo["epoch_s"], abs=0.005)  # rounded to 2 places
    assert "| goemo | 16 |" in r.stdout and (tmp_path / "out" / "goemo.log").is_file()  # batch 16, as the seed's
    # MFU counts the matmul weights only (the embedding tables are lookups); OUT holds small files only
    assert 0 < goemo["matmul_params"] < goemo["params"] and goemo["mfu"] is None  # no peak known for a CPU
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["goemo.log", "gpu.json", "seed.log"]
