"""What an ensemble buys over its members, measured on the validation split alone (test is never read).

    python benchmarks/ensemble_cv.py RUN RUN RUN [--repeats 10] [--threshold-resamples N]
    python benchmarks/ensemble_cv.py RUN            # one run's held-out score alone, on the same halves
    python benchmarks/ensemble_cv.py RUN RUN RUN --shrink 0    # each label's threshold on its own (no pull)
    python benchmarks/ensemble_cv.py RUN --baseline BASE       # RUN minus BASE, half by half (paired)

A test macro-F1 at tuned thresholds moves by about 0.01 between seeds of one recipe (docs/results.md), so one test
figure cannot say whether averaging members helps. This splits the validation rows in two at random, tunes goemo's
per-label thresholds on one half (as the runs' `model.threshold_resamples` says, or `--threshold-resamples`) and
scores macro-F1 on the other (and the other way round), `--repeats` times, for
each member and for the average of the members' probabilities. Prints mean ± std (the spread of the halves: numpy's
std, ddof 0) over the 2 x repeats held-out halves and the ensemble's gain over the members' mean on the same halves;
JSON to benchmarks/out/.

`--baseline RUN [RUN ...]`: also scores that run (or those runs' ensemble) on the same halves and prints the
candidate's (the ensemble's, for several runs) score minus the baseline's, half by half: the spread of that paired
difference is what a comparison between the two can lean on (their separate spreads are mostly the halves' own). The
JSON keeps every half's scores. The halves depend only on the number of validation rows (seed 0), so runs scored in
separate invocations are scored on the same halves. Tuning sees half the rows goemo tunes on: a change to the tuning
itself (resampling, shrinkage) is judged at half its sample size. Each run is scored with its best checkpoint, which
its fit picked on the whole validation split (checkpoint.monitor, val/f1_micro by default): the held-out halves had a
say in that pick, a small optimistic bias shared by the runs compared (not by a run saved only at its last epoch).

`--shrink K` (default: the first run's `model.threshold_shrink`): each label's tuned threshold t_j becomes
`w t_j + (1 - w) g`, w = n_j / (n_j + K), n_j the label's positives among the tuning rows and g the one grid threshold
with the best macro-F1 there: a label with few positives leans on the threshold all labels share (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from goemo.errors import GoemoError  # noqa: E402
from goemo.thresholds import apply_thresholds, prf, tune_thresholds  # noqa: E402


def macro_f1(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> float:
    """Macro-F1 of (N, L) `probs` against 0/1 `targets` at (L,) `thresholds` (`p > t`)."""
    y, pred = targets.astype(bool), apply_thresholds(probs, thresholds)
    return float(prf((pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0))[2].mean())


def heldout_macro(
    probs: np.ndarray, targets: np.ndarray, tune_rows: np.ndarray, score_rows: np.ndarray, resamples: int = 0,
    fallback: float = 0.5, shrink: float = 0.0,
) -> float:
    """Macro-F1 on `score_rows` at the thresholds tuned on `tune_rows` (`resamples`, `fallback`, `shrink`: see
    tune_thresholds; the runs tune with their model.threshold as the fallback); (N, L)."""
    t = tune_thresholds(probs[tune_rows], targets[tune_rows], fallback=fallback, resamples=resamples, shrink=shrink).numpy()
    return macro_f1(probs[score_rows], targets[score_rows], t)


def cross_validate(
    members: list[np.ndarray], targets: np.ndarray, repeats: int = 10, seed: int = 0, resamples: int = 0,
    fallback: float = 0.5, shrink: float = 0.0, baseline: np.ndarray | None = None,
) -> dict:
    """Held-out macro-F1 of each member and of their mean probability over 2 x `repeats` random halves; with
    `baseline` ((N, L) probabilities), the candidate's (the mean's) score minus the baseline's, half by half."""
    rng = np.random.default_rng(seed)
    candidates = [*members, np.mean(members, axis=0)] if len(members) > 1 else members  # one run: its own "mean"
    candidates += [baseline] if baseline is not None else []
    scores = []  # (2 * repeats, candidates)
    for _ in range(repeats):
        order = rng.permutation(len(targets))
        a, b = order[: len(order) // 2], order[len(order) // 2 :]
        for tune_rows, score_rows in ((a, b), (b, a)):
            scores.append([heldout_macro(p, targets, tune_rows, score_rows, resamples, fallback, shrink) for p in candidates])
    s = np.asarray(scores)  # (halves, candidates)
    base, s = (s[:, -1], s[:, :-1]) if baseline is not None else (None, s)
    m = s[:, : len(members)]  # (halves, members)
    gain = s[:, -1] - m.mean(1)  # ensemble minus the members' mean, half by half
    r = {"members": m.mean(0).tolist(), "members_std": m.std(0).tolist(),
         "ensemble": float(s[:, -1].mean()), "ensemble_std": float(s[:, -1].std()),
         "gain": float(gain.mean()), "gain_std": float(gain.std()), "halves": len(s), "threshold_resamples": resamples,
         "shrink": shrink, "rows": len(targets), "seed": seed, "per_half": s.tolist()}  # fmt: skip
    if base is not None:
        diff = s[:, -1] - base  # the candidate (the ensemble, for several members) minus the baseline
        r |= {"baseline": float(base.mean()), "baseline_std": float(base.std()), "baseline_per_half": base.tolist(),
              "vs_baseline": float(diff.mean()), "vs_baseline_std": float(diff.std()),
              "vs_baseline_wins": int((diff > 0).sum())}  # fmt: skip
    return r


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (their best checkpoints); one run is scored alone")
    parser.add_argument("--repeats", type=int, default=10, help="random 2-way splits of the validation rows")
    parser.add_argument("--threshold-resamples", type=int, default=None, metavar="N",
                        help="bootstrap resamples per threshold tuning (default: the first run's model.threshold_resamples)")
    parser.add_argument("--shrink", type=float, default=None, metavar="K",
                        help="pull each label's threshold toward one shared threshold, by K / (positives + K); 0: none "
                        "(default: the first run's model.threshold_shrink)")  # fmt: skip
    parser.add_argument("--baseline", nargs="+", metavar="RUN", default=None,
                        help="run folder(s) to compare with on the same halves (several: their ensemble)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = parser.parse_args(argv)
    try:
        return measure(args)
    except GoemoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def measure(args: argparse.Namespace) -> dict:
    import goemo
    from goemo.ensemble import Ensemble, note_differing, splits_of
    from goemo.files import check_writable
    from goemo.runs import resolve_checkpoint

    if args.repeats < 1 or (args.threshold_resamples is not None and args.threshold_resamples < 0):
        raise GoemoError(f"--repeats must be at least 1 and --threshold-resamples at least 0, got {args.repeats} and {args.threshold_resamples}")
    if args.shrink is not None and not 0 <= args.shrink < float("inf"):
        raise GoemoError(f"--shrink must be a number >= 0 (0: none), got {args.shrink}")
    check_writable(args.out, "--out")  # before any model is loaded
    # An ensemble's load checks that the members share one label set.
    runs = goemo.load(args.runs).members if len(args.runs) > 1 else [goemo.load(args.runs[0])]
    if len(args.runs) == 1 and isinstance(runs[0], Ensemble):
        raise GoemoError(f"{args.runs[0]}: an ensemble's folder; give its member runs (their average is scored too)")
    val = splits_of(runs[0])["validation"]
    resamples = args.threshold_resamples
    if resamples is None:
        resamples = int(runs[0].model.hparams.threshold_resamples)
    shrink = args.shrink
    if shrink is None:
        shrink = float(getattr(runs[0].model.hparams, "threshold_shrink", 0.0))  # 0 for runs from before the option
    fallback = float(runs[0].model.hparams.threshold)  # as the runs' own tuning and goemo.ensemble
    keys = ["threshold"] + (["threshold_resamples"] if args.threshold_resamples is None else [])
    keys += ["threshold_shrink"] if args.shrink is None else []
    baseline, base_runs = None, []
    if args.baseline:
        base_runs = goemo.load(args.baseline).members if len(args.baseline) > 1 else [goemo.load(args.baseline[0])]
        if base_runs[0].label_names != runs[0].label_names:
            raise GoemoError(f"--baseline {args.baseline[0]}: its labels differ from {args.runs[0]}'s")
    others = [*zip(args.runs[1:], runs[1:]), *((f"--baseline {b}", m) for b, m in zip(args.baseline or [], base_runs))]
    for name, m in others:  # the halves are of row positions: every run must score the first run's rows
        if splits_of(m, ("validation",))["validation"]["text"] != val["text"]:
            raise GoemoError(f"{name}: its validation rows differ from {args.runs[0]}'s; compare runs of one data set")
    members = [m.predict_proba(val["text"]) for m in runs]
    if base_runs:
        baseline = np.mean([m.predict_proba(val["text"]) for m in base_runs], axis=0)
    # then a run's row here is not its score alone, and the order of the runs moves the figures
    note_differing([*runs, *base_runs], keys, "every run and the ensemble are")
    r = cross_validate(members, val["targets"], args.repeats, resamples=resamples, fallback=fallback, shrink=shrink,
                       baseline=baseline)  # fmt: skip
    lines = ["| run | held-out validation macro-F1 (tuned on the other half) |", "| --- | --- |"]
    lines += [f"| {run} | {m:.4f} ± {s:.4f} |" for run, m, s in zip(args.runs, r["members"], r["members_std"])]
    if len(args.runs) > 1:
        lines += [f"| ensemble of {len(args.runs)} | {r['ensemble']:.4f} ± {r['ensemble_std']:.4f} |",
                  f"| ensemble minus the members' mean | {r['gain']:+.4f} ± {r['gain_std']:.4f} |"]  # fmt: skip
    if baseline is not None:
        name, candidate = " + ".join(args.baseline), "ensemble" if len(args.runs) > 1 else args.runs[0]
        diff = f"{r['vs_baseline']:+.4f} ± {r['vs_baseline_std']:.4f}, higher in {r['vs_baseline_wins']} of {r['halves']} halves"
        lines += [f"| baseline {name} | {r['baseline']:.4f} ± {r['baseline_std']:.4f} |",
                  f"| {candidate} minus the baseline (paired) | {diff} |"]  # fmt: skip
    pulled = f", thresholds shrunk with K {shrink:g}" if shrink else ""
    print(f"{len(val['text'])} validation rows, {r['halves']} held-out halves, {resamples} threshold resamples{pulled}\n" + "\n".join(lines))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    resolved = [str(resolve_checkpoint(run)[0]) for run in args.runs]  # which checkpoint each run's score is of
    checkpoints = {"runs": args.runs, "checkpoints": resolved, "baseline_runs": args.baseline}
    (args.out / f"ensemble-cv-{stamp}.json").write_text(json.dumps({**checkpoints, **r}, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
