"""`python -m goemo.ensemble RUN RUN ... --out DIR`: several trained runs as one classifier.

The members' probabilities are averaged (members may differ in model and tokenizer; each reads the texts its own
way), per-label thresholds are tuned on the averaged validation probabilities (never on test), and DIR gets
`test_report.json`/`.md` with bootstrap intervals, as a single run's `test` writes, plus `ensemble.json` (the
members' checkpoint files, labels and thresholds; written last) and the averaged probabilities
(`validation_probs.npy`, `test_probs.npy`). `goemo.load(DIR)` or `goemo.load([RUN, RUN])` then predicts with the
ensemble.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from goemo.classifier import as_texts
from goemo.errors import ArgumentParser, GoemoError, exit_on_error
from goemo.onnx_backend import load_backend
from goemo.predict import to_records
from goemo.runs import ENSEMBLE_FILE, RUNS_DIR


class Ensemble:
    def __init__(self, members: list, thresholds: Optional[np.ndarray] = None) -> None:
        """Averages the probabilities of `members` (goemo.classifier.Classifier), same labels in the same order.

        Args:
            members: Loaded classifiers.
            thresholds: Per-label thresholds (L,) for `predict`; unset: tuned on the averaged validation
                probabilities of the members' data (see `tune`), which runs every member over the validation split.
        """
        names = [list(m.label_names) for m in members]
        if any(n != names[0] for n in names):
            other = next(n for n in names if n != names[0])
            raise GoemoError(
                f"ensemble members have different labels ({len(names[0])}: {', '.join(names[0][:3])}, ... vs "
                f"{len(other)}: {', '.join(other[:3])}, ...); combine runs trained on one label set"
            )
        self.members, self.label_names = members, names[0]
        self.thresholds = np.asarray(thresholds, dtype=np.float32) if thresholds is not None else None

    def predict_proba(self, texts) -> np.ndarray:
        """The members' mean probability, float32 (number of texts, num_labels), rows in input order."""
        texts = as_texts(texts)
        return np.mean([m.predict_proba(texts) for m in self.members], axis=0).astype(np.float32)

    def predict(self, texts) -> list[dict]:
        """One `{"text", "labels", "scores"}` record per text, as a single run's `predict`."""
        texts = as_texts(texts)
        if self.thresholds is None:
            self.tune()
        return to_records(texts, self.predict_proba(texts), self.label_names, self.thresholds)

    def tune(self, resamples: Optional[int] = None, shrink: float | None = None) -> dict:
        """Tune the thresholds on the averaged validation probabilities; returns the split data it used.

        Args:
            resamples: Bootstrap resamples the thresholds are averaged over (goemo.thresholds.tune_thresholds);
                unset: the first member's `model.threshold_resamples`.
            shrink: K of the pull toward one shared threshold (tune_thresholds' `shrink`); unset: the first member's
                `model.threshold_shrink` (0 for runs from before it).
        """
        from goemo.thresholds import tune_thresholds

        data = splits_of(self.members[0])
        check_same_data(self.members, data)
        probs = self.predict_proba(data["validation"]["text"])
        hp = self.members[0].model.hparams
        keys = ["threshold"] + (["threshold_resamples"] if resamples is None else []) + (["threshold_shrink"] if shrink is None else [])
        note_differing(self.members, keys, "the ensemble is")
        self.resamples = int(hp.threshold_resamples if resamples is None else resamples)
        self.shrink = float(getattr(hp, "threshold_shrink", 0.0) if shrink is None else shrink)
        targets = data["validation"]["targets"]
        self.thresholds = tune_thresholds(probs, targets, float(hp.threshold), self.resamples, shrink=self.shrink).numpy()
        return {**data, "validation_probs": probs}


def note_differing(members: list, keys: list[str], what: str) -> None:
    """A note on stderr when the members' threshold settings `keys` (model hparams) differ: `what` (e.g. "the
    ensemble is") tuned with the first member's, so the members' order moves the result."""
    differ = [k for k in keys if len({float(getattr(m.model.hparams, k, 0.0)) for m in members}) > 1]
    if differ:
        first = ", ".join(f"{k} {getattr(members[0].model.hparams, k, 0.0)}" for k in differ)
        print(f"note: the runs' model.{' and model.'.join(differ)} differ: {what} tuned with the first run's ({first})",
              file=sys.stderr)


DATA_KEYS = ("data_dir", "hub_dataset", "hub_config", "taxonomy")  # what splits_of reads the splits from


def check_same_data(members: list, data: dict) -> None:
    """One line unless every member was trained on the splits of the first (`data`, splits_of's): the report is
    scored on those, which a member trained on other data may have learned from. Members whose data settings differ
    (a copy of the data elsewhere, the Hub against a folder) are compared by their splits' texts and labels."""
    first = getattr(members[0], "data_hparams", None) or {}
    for m in members[1:]:
        hp = getattr(m, "data_hparams", None) or {}
        if all(hp.get(k) == first.get(k) for k in DATA_KEYS):
            continue
        try:
            other = splits_of(m)
        except GoemoError as e:  # trained on a copy elsewhere (another machine's): nothing here to compare with
            print(f"note: an ensemble member was trained on data that cannot be read here ({e}); it is taken to be "
                  "the first member's", file=sys.stderr)  # fmt: skip
            continue
        same = all(
            other[s]["text"] == data[s]["text"] and np.array_equal(other[s]["targets"], data[s]["targets"]) for s in data
        )  # fmt: skip
        if not same:
            differ = ", ".join(f"{k} {first.get(k)} / {hp.get(k)}" for k in DATA_KEYS if hp.get(k) != first.get(k))
            raise GoemoError(f"ensemble members were trained on different data ({differ}: their validation and test "
                             "splits differ); combine runs of one dataset")  # fmt: skip


def splits_of(member, splits: tuple[str, ...] = ("validation", "test")) -> dict:
    """{split: {"text": [...], "targets": (N, L) 0/1}} of the data the member was trained on, for each of `splits`."""
    from goemo.data import GoEmotionsDataModule

    hp = member.data_hparams
    keys = ("data_dir", "hub_dataset", "hub_config", "taxonomy")
    dm = GoEmotionsDataModule(tokenizer_name="unused", **{k: hp[k] for k in keys if k in hp})
    raw = dm._raw_splits()
    out = {}
    for split in splits:
        out[split] = {"text": list(raw[split]["text"]), "targets": dm.targets(raw[split]["labels"]).astype(np.uint8)}
    return out


def load_ensemble(
    runs: Union[list, str, Path], device: str = "cpu", batch_size: int = 64, backend: str = "torch", runs_dir: Union[str, Path] = RUNS_DIR
) -> Ensemble:
    """An Ensemble of run folders (thresholds tuned at the first predict), or of an ensemble folder (its thresholds);
    `best`/`last` among the runs look in `runs_dir`."""
    if isinstance(runs, (str, Path)):
        spec = read_spec(Path(runs) / ENSEMBLE_FILE)
        members = [load_backend(m, device, batch_size, backend=backend) for m in check_members(runs, spec)]
        ens = Ensemble(members, np.asarray(spec["thresholds"], dtype=np.float32))
        if ens.label_names != spec["labels"]:
            raise GoemoError(f"ensemble {runs}: its members' labels are not those its thresholds were tuned for; build the ensemble again")
        return ens
    if len(runs) < 2:
        raise GoemoError(f"an ensemble needs at least 2 runs, got {len(runs)}")
    check_distinct(runs, runs_dir)
    return Ensemble([load_backend(r, device, batch_size, runs_dir, backend) for r in runs])


def stamp(path: Union[str, Path]) -> list[int]:
    """[size, mtime in ns] of a file: what tells a checkpoint rewritten in place (a resumed fit's last.ckpt)."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def check_members(folder: Union[str, Path], spec: dict) -> list[str]:
    """The checkpoint files of an ensemble folder's members, each still there and, where the spec has their
    stamps, unchanged since the ensemble was built (its thresholds and report are for those weights)."""
    stamps = spec.get("stamps") or [None] * len(spec["members"])
    for m, st in zip(spec["members"], stamps):
        if not Path(m).exists():
            raise GoemoError(f"ensemble {folder}: its member {m} is gone; restore it, or build the ensemble again")
        if st is not None and stamp(m) != st:
            raise GoemoError(f"ensemble {folder}: its member {m} changed since the ensemble was built (a resumed fit "
                             "rewrites last.ckpt); build the ensemble again")  # fmt: skip
    return spec["members"]


def read_spec(path: Path) -> dict:
    """An ensemble folder's `ensemble.json`, checked: members, and one threshold for each of its labels."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoemoError(f"{path}: cannot read the ensemble file ({str(e).splitlines()[0]}); build the ensemble again") from None
    ok = (
        isinstance(spec, dict)
        and isinstance(spec.get("members"), list) and len(spec["members"]) > 0
        and all(isinstance(m, str) for m in spec["members"])
        and isinstance(spec.get("labels"), list) and isinstance(spec.get("thresholds"), list)
        and len(spec["thresholds"]) == len(spec["labels"]) > 0
        and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in spec["thresholds"])
        and (spec.get("stamps") is None or (isinstance(spec["stamps"], list) and len(spec["stamps"]) == len(spec["members"])
             and all(isinstance(st, list) and len(st) == 2 and all(type(x) is int for x in st) for st in spec["stamps"])))
    )  # fmt: skip
    if not ok:
        raise GoemoError(f"{path}: not an ensemble file (members, labels and one threshold per label); build the ensemble again")
    return spec


def check_distinct(runs: list, runs_dir: Union[str, Path] = RUNS_DIR) -> None:
    """Raise a one-line GoemoError if two of `runs` name the same checkpoint: it would count twice in the mean."""
    from goemo.runs import resolve_checkpoint, saved_step

    seen: dict[Path, tuple[str, int | None]] = {}  # checkpoint file: (the member as given, its step)
    for r in runs:
        path = resolve_checkpoint(str(r), Path(runs_dir))[0].resolve()
        if path in seen:
            raise GoemoError(f"{r} and {seen[path][0]} are the same checkpoint ({path}); give each member once")
        # Two files of one model: a run's best checkpoint and the last.ckpt saved at its step, or a copy. Only files
        # at one step are compared (the seeds of one recipe are, and differ in their weights).
        step = saved_step(path)
        for other, (name, other_step) in seen.items():
            if step is not None and other_step == step and same_weights(path, other):
                raise GoemoError(f"{r} and {name} hold the same weights (step {step}); give each member once")
        seen[path] = (str(r), step)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoint files hold equal state_dicts (memory-mapped; stops at the first tensor that differs)."""
    from goemo.runs import load_checkpoint

    try:
        sa, sb = load_checkpoint(a, mmap=True).get("state_dict"), load_checkpoint(b, mmap=True).get("state_dict")
    except (GoemoError, AttributeError):
        return False  # not checkpoints goemo can read: the members' loading says so
    if not isinstance(sa, dict) or not isinstance(sb, dict) or sa.keys() != sb.keys():
        return False
    return all(isinstance(sa[k], torch.Tensor) and isinstance(sb[k], torch.Tensor) and sa[k].shape == sb[k].shape
               and torch.equal(sa[k], sb[k]) for k in sa)  # fmt: skip


def build(
    runs: list[str], out: Path, resamples: int = 1000, threshold_resamples: Optional[int] = None,
    threshold_shrink: float | None = None,
) -> dict:
    """Average, tune on validation (`threshold_resamples`, `threshold_shrink`: see Ensemble.tune), write the report
    into `out`."""
    from goemo import report
    from goemo.files import AtomicFile, check_writable, write_text
    from goemo.runs import resolve_checkpoint

    out = Path(out)
    if resamples < 1:
        raise GoemoError(f"--resamples must be at least 1 (bootstrap resamples for the intervals), got {resamples}")
    if threshold_resamples is not None and threshold_resamples < 0:
        raise GoemoError(f"--threshold-resamples must be >= 0 (0: tune once on the validation rows), got {threshold_resamples}")
    if threshold_shrink is not None and not 0 <= threshold_shrink < float("inf"):
        raise GoemoError(f"--threshold-shrink must be a number >= 0 (0: none), got {threshold_shrink}")
    if len(runs) < 2:
        raise GoemoError(f"an ensemble needs at least 2 runs, got {len(runs)}")
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():  # its reports would become the ensemble's
        raise GoemoError(f"--out {out}: a run's folder; give the ensemble a folder of its own (e.g. --out ens)")
    if not (out / ENSEMBLE_FILE).is_file() and not _ensembles_report(out / report.JSON_NAME):
        # Another tool's report (an export's, a copy of a run's) would be replaced; an ensemble's cut short keeps
        # its members in it and is built again.
        raise GoemoError(f"--out {out}: holds a {report.JSON_NAME} of no ensemble; give the ensemble a folder of its own (e.g. --out ens)")
    # The members' checkpoint files, not their folders: a member resumed later gets a new best checkpoint, which
    # these thresholds were not tuned for (the ensemble then says its member is gone rather than mix the two).
    # Stamped before loading those files: one rewritten from then on (last.ckpt of a fit still running) is refused.
    members = [str(resolve_checkpoint(str(r))[0].resolve()) for r in runs]
    check_writable(out, "--out")  # before any model is loaded
    if (out / ENSEMBLE_FILE).is_file():  # built again: the same members (a rerun, a member's new best) or others
        try:
            before = read_spec(out / ENSEMBLE_FILE)["members"]
        except GoemoError:  # a damaged one is built again
            before = members
        if sorted(before) != sorted(members):
            print(f"note: --out {out} held an ensemble of other checkpoints ({', '.join(before)}); this one replaces it",
                  file=sys.stderr)  # fmt: skip
    stamps = [stamp(m) for m in members]
    ens = load_ensemble(members)
    data = ens.tune(threshold_resamples, threshold_shrink)
    test_probs = ens.predict_proba(data["test"]["text"])
    fixed = float(ens.members[0].model.hparams.threshold)
    rep = report.build_report(test_probs, data["test"]["targets"], ens.label_names, fixed, ens.thresholds, resamples)
    rep["members"] = [str(r) for r in runs]
    (out / ENSEMBLE_FILE).unlink(missing_ok=True)  # written last: a folder cut short mid-write is no ensemble
    report.write_report(rep, out)
    for name, probs in (("validation_probs.npy", data["validation_probs"]), ("test_probs.npy", test_probs)):
        with AtomicFile(out / name, "wb") as f:
            np.save(f, probs)
    spec = {"members": members, "thresholds": [float(t) for t in ens.thresholds],
            "threshold_resamples": ens.resamples, "threshold_shrink": ens.shrink, "labels": ens.label_names, "stamps": stamps}
    write_text(out / ENSEMBLE_FILE, json.dumps(spec, indent=2) + "\n")
    report.print_report(rep)
    return rep


def _ensembles_report(path: Path) -> bool:
    """Whether `path` is free for an ensemble's report: no file there, or an ensemble's report (it names its members)."""
    if not path.is_file():
        return True
    try:
        return "members" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


class Terminated(BaseException):
    """SIGTERM, raised where the process is (by `terminate`, main's handler); a BaseException, as KeyboardInterrupt,
    so that no `except Exception` on the way (a checkpoint's loading) takes it for a failure of its own."""


def terminate(signum: int, frame) -> None:
    raise Terminated()


def main(argv: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="python -m goemo.ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (their best checkpoints) or .ckpt files; 2 or more")
    parser.add_argument("--out", type=Path, required=True, help="folder for test_report.json/.md and ensemble.json")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--threshold-resamples", type=int, default=None, metavar="N",
                        help="bootstrap resamples the tuned thresholds are averaged over; 0: none "
                        "(default: the first run's model.threshold_resamples)")  # fmt: skip
    parser.add_argument("--threshold-shrink", type=float, default=None, metavar="K",
                        help="pull each label's threshold toward one shared threshold, by K / (positives + K); 0: none "
                        "(default: the first run's model.threshold_shrink)")  # fmt: skip
    args = parser.parse_args(argv)
    # SIGTERM as Ctrl-C: one line and its own exit status, not a silent end (its default action) or a traceback.
    # Only where signal handlers can be set, over the default, and put back after (main called from Python).
    default = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, terminate) if default else None
    try:
        with exit_on_error():
            build(args.runs, args.out, args.resamples, args.threshold_resamples, args.threshold_shrink)
    except (KeyboardInterrupt, Terminated) as e:
        what, signum = ("SIGTERM", signal.SIGTERM) if isinstance(e, Terminated) else ("Ctrl-C", signal.SIGINT)
        print(f"error: interrupted by {what}: {args.out} holds no new ensemble (ensemble.json is written last); "
              "run the command again", file=sys.stderr)  # fmt: skip
        sys.exit(128 + signum)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"ensemble of {len(args.runs)} runs: {args.out / 'test_report.json'}, {args.out / 'test_report.md'}")


if __name__ == "__main__":
    main()
