"""Prediction speed on a CPU: goemo's backends against the Hugging Face pipeline, one process per contestant.

    python benchmarks/predict.py lightning_logs/version_0        # a trained run (e.g. configs/minilm.yaml's)

On the full test split (5,427 texts), the same machine and thread count for all: `transformers.pipeline(
"text-classification")` on the run's export (`python -m goemo.export`) at batch 32 and at batch 1, and
`goemo.load(RUN, backend=...)` with torch, onnx and int8. Each contestant runs in a fresh process and reports
samples/s (all texts, after the first), time to first prediction (from the start of loading the model to the first
text's result; the libraries are imported before, the same for all), peak RSS (the test texts come from a file this
script writes first, so no contestant loads goemo's torch model but its own), and test macro-F1 at the run's tuned thresholds (int8 shows its accuracy cost).
Prints a table; JSON and the table go to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONTESTANTS = ("pipeline-32", "pipeline-1", "torch", "onnx", "int8")


def write_test_split(run: str, path: Path) -> None:
    """The test texts and (N, L) targets of the data the run was trained on, into `path` (.npz), read by every
    contestant: loading the run here, once, keeps goemo's torch model out of the others' peak RSS."""
    import numpy as np

    from goemo.classifier import load_run
    from goemo.ensemble import splits_of

    test = splits_of(load_run(run))["test"]
    np.savez(path, texts=np.array(test["text"], dtype=str), targets=test["targets"])


def child(kind: str, run: str, export: Path, threads: int, split: Path) -> dict:
    """One contestant, in this process: load, first prediction, all predictions, macro-F1."""
    import numpy as np
    import torch
    from transformers import pipeline  # imported before the clock, as goemo is

    import goemo  # noqa: F401

    torch.set_num_threads(threads)
    with np.load(split) as f:  # written by this script's parent
        texts, targets = f["texts"].tolist(), f["targets"]
    t_load = time.perf_counter()
    if kind.startswith("pipeline"):
        batch = int(kind.split("-")[1])
        pipe = pipeline("text-classification", model=str(export), top_k=None, function_to_apply="sigmoid",
                        trust_remote_code=True, device="cpu")  # fmt: skip
        names = [pipe.model.config.id2label[i] for i in range(pipe.model.config.num_labels)]
        thresholds = np.array([json.loads((export / "thresholds.json").read_text())[n] for n in names], dtype=np.float32)

        def proba(xs: list[str]) -> np.ndarray:
            out = pipe(xs, batch_size=batch, truncation=True)
            return np.array([[{d["label"]: d["score"] for d in row}[n] for n in names] for row in out], dtype=np.float32)
    else:
        from goemo import load

        clf = load(run, backend=kind)
        thresholds, proba = clf.thresholds, clf.predict_proba
    proba(texts[:1])
    first = time.perf_counter() - t_load
    t = time.perf_counter()
    probs = proba(texts)
    seconds = time.perf_counter() - t
    from goemo.report import label_scores
    from goemo.thresholds import apply_thresholds

    macro = label_scores(apply_thresholds(probs, thresholds), targets, [str(i) for i in range(probs.shape[1])])["macro"]["f1"]
    return {
        "contestant": kind, "samples_per_s": round(len(texts) / seconds, 1), "predict_s": round(seconds, 2),
        "first_prediction_s": round(first, 2), "load_s": round(time.perf_counter() - t_load - seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "test_macro_f1_tuned": round(float(macro), 4), "texts": len(texts), "threads": threads,
    }  # fmt: skip


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run folder (or .ckpt file)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every contestant (default: all cores)")
    p.add_argument("--only", default=",".join(CONTESTANTS), help=f"comma-separated subset of {','.join(CONTESTANTS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--export", type=Path, default=None, help="the run's export folder (default: made in benchmarks/out)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "out")
    a = p.parse_args(argv)
    export = a.export or a.out_dir / "predict-export"
    split = a.out_dir / "predict-test-split.npz"
    if a.child:
        print(json.dumps(child(a.child, a.run, export, a.threads, split)), flush=True)
        return []
    a.out_dir.mkdir(parents=True, exist_ok=True)
    write_test_split(a.run, split)
    only = [c for c in a.only.split(",") if c]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if any(c.startswith("pipeline") for c in only) and not (export / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "goemo.export", a.run, str(export), "--force"], check=True, env=env)
    if any(c in ("onnx", "int8") for c in only):  # make the ONNX files once, outside the timed processes
        subprocess.run([sys.executable, "-c", f"from goemo import load; load({a.run!r}, backend='int8')"], check=True, env=env)
    results = []
    for kind in only:
        print(f"running {kind} ...", flush=True)
        r = subprocess.run([sys.executable, __file__, a.run, "--child", kind, "--threads", str(a.threads), "--export", str(export),
                            "--out-dir", str(a.out_dir)],
                           capture_output=True, text=True, env=env)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"error: {kind} failed:\n{r.stderr[-3000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = next((r["samples_per_s"] for r in results if r["contestant"] == "pipeline-32"), None)
    lines = ["| contestant | samples/s | vs pipeline (batch 32) | first prediction (s) | peak RSS (MiB) | test macro-F1 (tuned) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in results:
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['contestant']} | {r['samples_per_s']} | {ratio} | {r['first_prediction_s']} | {r['peak_rss_mib']:,} | {r['test_macro_f1_tuned']:.4f} |")
    table = "\n".join(lines)
    import platform

    head = f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} threads; run: {a.run}; {results[0]['texts']} test texts"
    print(head + "\n\n" + table)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (a.out_dir / f"predict-{stamp}.json").write_text(json.dumps({"run": a.run, "results": results}, indent=2) + "\n")
    (a.out_dir / f"predict-{stamp}.md").write_text(head + "\n\n" + table + "\n")
    return results


if __name__ == "__main__":
    main()
