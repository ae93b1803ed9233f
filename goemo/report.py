"""The test report: per-label precision, recall, F1 and support at the fixed and the tuned thresholds.

Written as `test_report.json` and `test_report.md` in the run folder, printed as a table, and logged
to TensorBoard (a per-label F1 bar chart and one PR curve per label). Micro and macro F1 come with
a bootstrap 95% interval: resample the test examples with replacement, recompute, take percentiles.
Conventions match the logged torchmetrics values: `p > t` predicts a label, 0/0 counts as 0, and
macro averages every label (also those with no support).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from goemo.errors import GoemoError
from goemo.files import write_text
from goemo.thresholds import apply_thresholds, prf

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
JSON_NAME, MD_NAME = "test_report.json", "test_report.md"


def label_scores(preds: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict:
    """Per-label, micro and macro precision/recall/F1/support, and exact match, of (N, L) 0/1 arrays."""
    preds, targets = preds.astype(bool), targets.astype(bool)
    tp, fp, fn = (preds & targets).sum(0), (preds & ~targets).sum(0), (~preds & targets).sum(0)  # (L,) each
    p, r, f = prf(tp, fp, fn)
    support = targets.sum(0)
    mp, mr, mf = prf(tp.sum(), fp.sum(), fn.sum())
    row = lambda p_, r_, f_, s: {"precision": float(p_), "recall": float(r_), "f1": float(f_), "support": int(s)}
    return {
        "per_label": {name: row(p[i], r[i], f[i], support[i]) for i, name in enumerate(label_names)},
        "micro": row(mp, mr, mf, support.sum()),
        "macro": row(p.mean(), r.mean(), f.mean(), support.sum()),
        "exact_match": float((preds == targets).all(1).mean()),
    }


def bootstrap_f1(
    preds: np.ndarray,
    targets: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals {"f1_micro": [low, high], "f1_macro": [low, high]} over examples.

    Each resample draws N row indices with replacement; its counts are `W @ X` with W (R, N) the
    number of times each row was drawn and X (N, L) the per-row tp/fp/fn indicators, so all
    resamples are computed at once (in chunks of 100 to bound memory at ~100 N floats).
    """
    preds, targets = preds.astype(bool), targets.astype(bool)
    n = len(preds)
    x_tp = (preds & targets).astype(np.float32)  # (N, L)
    x_fp = (preds & ~targets).astype(np.float32)
    x_fn = (~preds & targets).astype(np.float32)
    rng = np.random.default_rng(seed)
    micro, macro = [], []
    for start in range(0, resamples, 100):
        r = min(100, resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        # (r, N) draw counts: one bincount over row-offset indices instead of r separate ones
        w = np.bincount((idx + n * np.arange(r)[:, None]).ravel(), minlength=r * n).reshape(r, n).astype(np.float32)
        tp, fp, fn = w @ x_tp, w @ x_fp, w @ x_fn  # (r, L) each
        macro.append(prf(tp, fp, fn)[2].mean(1))
        micro.append(prf(tp.sum(1), fp.sum(1), fn.sum(1))[2])
    q = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
    return {
        "f1_micro": np.percentile(np.concatenate(micro), q).tolist(),
        "f1_macro": np.percentile(np.concatenate(macro), q).tolist(),
    }


def build_report(
    probs: np.ndarray,
    targets: np.ndarray,
    label_names: list[str],
    fixed_threshold: float,
    tuned_thresholds: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """The report as a JSON-ready dict; `probs` (N, L), `targets` (N, L) 0/1, `tuned_thresholds` (L,)."""
    probs = np.asarray(probs, dtype=np.float32)  # float32 comparisons, as in goemo.thresholds
    targets = np.asarray(targets).astype(bool)
    tuned = np.asarray(tuned_thresholds, dtype=np.float32)
    out = {
        "num_examples": int(len(probs)),
        "labels": list(label_names),
        "thresholds": {"fixed": float(fixed_threshold), "tuned": [round(float(t), 6) for t in tuned]},
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "unit": "example"},
    }
    for key, thr in (("fixed", np.full(len(label_names), fixed_threshold, dtype=np.float32)), ("tuned", tuned)):
        preds = apply_thresholds(probs, thr)
        scores = label_scores(preds, targets, label_names)
        for i, name in enumerate(label_names):
            scores["per_label"][name]["threshold"] = round(float(thr[i]), 6)
        ci = bootstrap_f1(preds, targets, resamples, seed)
        scores["micro"]["ci"], scores["macro"]["ci"] = ci["f1_micro"], ci["f1_macro"]
        out[key] = scores
    return out


def to_markdown(report: dict) -> str:
    """The report as Markdown: a summary with the intervals, then one row per label."""
    pct = int(round(100 * report["bootstrap"]["confidence"]))
    fx, tu = report["fixed"], report["tuned"]
    lines = [
        "# Test report",
        "",
        f"{report['num_examples']} test examples. Fixed threshold: {report['thresholds']['fixed']:g}; "
        "tuned: per label, chosen on validation.",
        f"Intervals: {pct}% percentile bootstrap over examples ({report['bootstrap']['resamples']} resamples, "
        f"seed {report['bootstrap']['seed']}).",
        "",
        f"| thresholds | micro-F1 [{pct}% CI] | macro-F1 [{pct}% CI] | exact match |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in (("fixed", fx), ("tuned", tu)):
        mi, ma = s["micro"], s["macro"]
        lines.append(
            f"| {name} | {mi['f1']:.4f} [{mi['ci'][0]:.4f}, {mi['ci'][1]:.4f}] "
            f"| {ma['f1']:.4f} [{ma['ci'][0]:.4f}, {ma['ci'][1]:.4f}] | {s['exact_match']:.4f} |"
        )
    lines += [
        "",
        "| label | support | P (fixed) | R (fixed) | F1 (fixed) | threshold (tuned) | P (tuned) | R (tuned) | F1 (tuned) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [(n.replace("|", "\\|"), fx["per_label"][n], tu["per_label"][n], f"{tu['per_label'][n]['threshold']:.2f}")
            for n in report["labels"]]  # fmt: skip (a "|" in a label name would split its row)
    rows += [(f"**{k}**", fx[k], tu[k], "") for k in ("micro", "macro")]
    for name, a, b, thr in rows:
        lines.append(
            f"| {name} | {a['support']} | {a['precision']:.4f} | {a['recall']:.4f} | {a['f1']:.4f} "
            f"| {thr} | {b['precision']:.4f} | {b['recall']:.4f} | {b['f1']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write test_report.json and test_report.md into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / JSON_NAME, out_dir / MD_NAME
    write_text(js, json.dumps(report, indent=2) + "\n")  # atomic: a crash never leaves a half-written report
    write_text(md, to_markdown(report))
    return js, md


def print_report(report: dict, console=None) -> None:
    """A short terminal table: per-label support and F1 at both thresholds, then micro and macro with intervals."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    fx, tu = report["fixed"], report["tuned"]
    pct = int(round(100 * report["bootstrap"]["confidence"]))
    ci = lambda s: f"[{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
    caption = "; ".join(f"{k}-F1 {pct}% CI: fixed {ci(fx[k])}, tuned {ci(tu[k])}" for k in ("micro", "macro"))
    table = Table(title=f"test: per-label F1 ({report['num_examples']} examples)", caption=caption)
    for col in ("label", "support", "F1 fixed", "F1 tuned", "tuned threshold"):
        table.add_column(col, justify="left" if col == "label" else "right", no_wrap=True)
    for n in report["labels"]:
        a, b = fx["per_label"][n], tu["per_label"][n]
        table.add_row(Text(n), str(a["support"]), f"{a['f1']:.3f}", f"{b['f1']:.3f}", f"{b['threshold']:.2f}")
    table.add_section()
    for k in ("micro", "macro"):
        table.add_row(k, str(fx[k]["support"]), f"{fx[k]['f1']:.3f}", f"{tu[k]['f1']:.3f}", "")
    (console or Console()).print(table)


def f1_figure(report: dict):
    """A matplotlib Figure: horizontal bars of per-label F1, fixed vs tuned thresholds."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names = report["labels"]
    y = np.arange(len(names))
    fig = Figure(figsize=(7, 0.28 * len(names) + 1.2))
    ax = fig.subplots()
    legend = {"fixed": f"fixed threshold {report['thresholds']['fixed']:g}", "tuned": "thresholds tuned on validation"}
    for off, key in ((-0.2, "fixed"), (0.2, "tuned")):
        ax.barh(y + off, [report[key]["per_label"][n]["f1"] for n in names], height=0.4, label=legend[key])
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # label id 0 on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("test F1")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def log_tensorboard(experiment, report: dict, probs: np.ndarray, targets: np.ndarray, step: Optional[int] = None) -> None:
    """Per-label F1 bar chart (`test/f1_per_label`) and PR curves (`test_pr/LABEL`) on a SummaryWriter."""
    try:
        experiment.add_figure("test/f1_per_label", f1_figure(report), global_step=step)
    except ImportError:  # matplotlib missing: the JSON/Markdown report still has the numbers
        print("note: matplotlib is not installed, so the per-label F1 chart is not logged", flush=True)
    for i, name in enumerate(report["labels"]):
        experiment.add_pr_curve(f"test_pr/{name}", np.asarray(targets)[:, i], np.asarray(probs)[:, i], global_step=step)


class TestReport(Callback):
    __test__ = False  # not a pytest test class

    def __init__(self, resamples: int = BOOTSTRAP_RESAMPLES) -> None:
        """After `test`: test_report.json/.md in the run folder, a terminal table, and in TensorBoard a per-label
        F1 chart and PR curves (rank 0), from the test predictions the model gathered from all ranks.

        Args:
            resamples: Bootstrap resamples of the test examples for the micro/macro-F1 intervals.
        """
        if resamples < 1:
            raise GoemoError(f"test_report.resamples must be at least 1, got {resamples}")
        self.resamples = resamples

    def on_test_end(self, trainer, pl_module) -> None:
        # log_dir is a broadcast from rank 0 that every rank must join (Lightning's note on Trainer.log_dir): read
        # here, by rank 0 alone it was one collective more than the others made (a traceback or a hang under DDP).
        log_dir = trainer.log_dir
        outputs = getattr(pl_module, "test_predictions", None)
        if outputs is None or not trainer.is_global_zero:
            return
        probs, targets = (x.cpu().numpy() for x in outputs)
        tuned = pl_module.thresholds.cpu().numpy()
        rep = build_report(probs, targets, pl_module.label_names, pl_module.hparams.threshold, tuned, self.resamples)
        # What was scored: goemo.compare puts these figures beside the best checkpoint's only if they are its.
        step = pl_module.tested_step()
        rep["checkpoint"] = {"file": Path(trainer.ckpt_path).name if trainer.ckpt_path else None, "global_step": step}
        if trainer.received_sigterm:  # it came during the bootstrap, after the loop's last check: stop as the loop would
            raise SIGTERMException()  # (goemo.reliability.Interrupts says so; goemo.cli exits 143)
        js, md = write_report(rep, log_dir or ".")
        print_report(rep)
        print(f"test report: {js} and {md}", flush=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_pr_curve"):  # a TensorBoard SummaryWriter
            log_tensorboard(experiment, rep, probs, targets, step)  # at the scored checkpoint's step, as the report
