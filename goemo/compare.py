"""`python -m goemo.compare RUN [RUN ...]`: one table row per run, read from the run folders alone.

RUN is a run folder, a folder holding runs (lightning_logs), or a sweep's folder (lightning_logs/sweeps/NAME: the
runs of its trials).

A row holds the config keys that differ between the runs (only those), the seed, the epochs trained up to the best
checkpoint, validation micro/macro-F1 and exact match there (from its TensorBoard events), and the test figures of its
`test_report.json` at the fixed and the tuned thresholds, with their bootstrap intervals. Runs whose configs differ
only in `seed_everything` are one seed group: one row of mean ± standard deviation over its n runs (a teacher_weight or
teacher_temperature without a teacher, and a shipped teacher named by its `pkg:` name or a copy's path, do not split a
group). Printed as
Markdown; `--md FILE` and `--csv FILE` write it too. The results tables of goemo's documents come from here.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from goemo.errors import ArgumentParser, GoemoError, exit_on_error

# Keys that name where things are, not what the run did.
IGNORED = ("ckpt_path", "config", "output", "data.cache_dir", "data.predict_file", "trainer.logger", "trainer.default_root_dir",
           "checkpoint.dirpath", "last_checkpoint.dirpath")
# Settings that decide what a test report scored (the split's rows, labels and truncation, the fixed threshold; the
# tuned thresholds are the checkpoint's): a test run with other values than the fit's config scored something else.
SCORED_WITH = ("data.data_dir", "data.hub_dataset", "data.hub_config", "data.max_length", "data.taxonomy", "model.threshold")
SWEEP_REPORT = "goemo.sweep.OptunaReport"
# Settings added after runs were made, at what those runs did: a run without the key is the same recipe as one with it.
# A new model, data or weight-averaging option goes here too (tests/test_research.py checks the signatures against it).
BEFORE = {
    "model.pretrained": True,  # an old resumed fit's config says false: what its checkpoints say (run_config)
    "model.head_bias": "zero", "model.head_init": "random", "model.aux_taxonomy": None, "model.aux_weight": 0.5,
    "model.layer_decay": 1.0, "model.lr_schedule": "linear",
    "model.threshold_resamples": 0,  # before bagging, thresholds were tuned on the validation rows themselves
    "model.threshold_shrink": 0.0, "model.self_distill": 0.0, "model.teacher": None, "model.teacher_weight": 0.5,
    "model.teacher_temperature": 1.0, "model.token_cutoff": 0.0,
    "data.holdout_fold": None, "data.num_folds": 2, "data.fold_seed": 0,
    "weight_averaging.start_epoch": None, "weight_averaging.updates_per_epoch": 1,
}  # fmt: skip
# Sections added after runs were made: their keys are filled in where the section is missing too.
LATER_SECTIONS = ("weight_averaging",)
VAL = ("val/f1_micro", "val/f1_macro", "val/exact_match")
COLUMNS = [  # (column, where it comes from)
    ("val micro-F1", "val/f1_micro"), ("val macro-F1", "val/f1_macro"), ("val exact", "val/exact_match"),
    ("test micro-F1", "fixed/micro"), ("test macro-F1", "fixed/macro"),
    ("test micro-F1 tuned", "tuned/micro"), ("test macro-F1 tuned", "tuned/macro"), ("test exact tuned", "tuned/exact"),
]  # fmt: skip


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A config as `a.b.c: value` pairs; lists stay whole (as JSON text)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: json.dumps(d, sort_keys=True) if isinstance(d, list) else d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def run_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    if not path.is_file():
        raise GoemoError(f"{run}: not a run folder (no config.yaml)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise GoemoError(f"{path}: cannot read the run's config ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise GoemoError(f"{path}: not a run's config (a mapping of settings); compare run folders that goemo wrote")
    callbacks = (config.get("trainer") or {}).get("callbacks")
    if isinstance(callbacks, list):  # a sweep trial's report to its study (trial number, database) is not a setting
        keep = [c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") == SWEEP_REPORT)]
        config["trainer"]["callbacks"] = keep
    flat = flatten(config)
    if flat.get("ckpt_path") and flat.get("model.pretrained") is False:
        # A resumed fit's config.yaml: the CLI sets pretrained false with --ckpt_path (the checkpoint holds the
        # weights), whatever the fit started from. Its checkpoints say what that was; those from before they did:
        # the encoder's pretrained weights, the usual start.
        flat["model.pretrained"] = encoder_start(run) != "random"
    for key, value in BEFORE.items():
        section = key.split(".")[0]
        if isinstance(config.get(section), dict) or (section in LATER_SECTIONS and config.get(section) is None):
            flat.setdefault(key, value)
    if "model.teacher" in flat:
        if flat["model.teacher"] is None:  # no teacher: its weight did nothing, so it does not split the runs
            flat.pop("model.teacher_weight", None)
            flat.pop("model.teacher_temperature", None)
        else:
            flat["model.teacher"] = shipped_name(flat["model.teacher"])
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED)}


def shipped_name(value: Any) -> Any:
    """`pkg:goemo/teachers/NAME` for an absolute path to a copy of a teacher file goemo ships (the same bytes, as the
    files are now), so runs that named the file either way are one recipe; any other value (a relative path: the run
    may have started in another folder) as it is."""
    path = Path(value).expanduser() if isinstance(value, str) and not value.startswith("pkg:") else None
    if path is None or not path.is_absolute() or not path.is_file():
        return value
    for shipped in sorted((Path(__file__).parent / "teachers").glob("*.npz")):
        if shipped.stat().st_size == path.stat().st_size and shipped.read_bytes() == path.read_bytes():
            return f"pkg:goemo/teachers/{shipped.name}"
    return value


def encoder_start(run: Path) -> str | None:
    """What the encoder of the run's best checkpoint started from ("pretrained", "random"), or None if it does not say."""
    from goemo.runs import best_checkpoint, load_checkpoint

    try:
        return load_checkpoint(best_checkpoint(run), mmap=True).get("encoder_start")
    except (GoemoError, TypeError, ValueError, AttributeError):
        return None


def best_point(run: Path) -> tuple[Optional[int], Optional[int]]:
    """The global step and epoch (from 0) of the run's best checkpoint (as `test --ckpt_path RUN` picks it), or Nones.

    The epoch comes from the checkpoint, not from the events: the next epoch's first training log can fall on the
    checkpoint's step (when that step is a logging step) and carries the next epoch's number.
    """
    from goemo.runs import best_checkpoint, load_checkpoint

    try:
        ckpt = load_checkpoint(best_checkpoint(run), mmap=True)
        return int(ckpt["global_step"]), int(ckpt["epoch"]) if "epoch" in ckpt else None
    except (GoemoError, KeyError, TypeError, ValueError):
        return None, None


def scalars(run: Path, tags: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {t: {} for t in tags}
    for events in sorted(run.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in set(tags) & set(acc.Tags().get("scalars", [])):
            out[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def run_row(run: Path) -> dict[str, Any]:
    """Seed, epochs and the figures of one run (missing ones are None)."""
    config = run_config(run)
    row: dict[str, Any] = {"run": str(run), "config": config, "seed": config.get("seed_everything")}
    step, epoch = best_point(run)
    if step is not None:
        # Lightning logs a validation at the step before the global step its checkpoint records: take the last
        # value logged at or before the checkpoint's step.
        values = scalars(run, VAL)
        row.update({tag: v[max(s for s in v if s <= step)] if any(s <= step for s in v) else None for tag, v in values.items()})
    row["epochs"] = epoch + 1 if epoch is not None else None
    report = run / "test_report.json"
    if report.is_file():
        try:
            rep = json.loads(report.read_text(encoding="utf-8"))
            scored = (rep.get("checkpoint") or {}).get("global_step")  # reports before this was recorded: taken as they are
            if scored is not None and step is not None and scored != step:  # tested, then resumed to a new best
                print(f"note: {report} scored {rep['checkpoint'].get('file')} (step {scored}), not the run's best "
                      f"checkpoint (step {step}): its test figures are left out; run `python main.py test --ckpt_path "
                      f"{run}` again", file=sys.stderr)  # fmt: skip
                return row
            unlike = tested_unlike(run, rep)
            if unlike is not None:  # the report's own config (config_test.yaml, beside it) scored something else
                why, flags = unlike
                print(f"note: {report} {why}: its test figures are left out; run `python main.py test --ckpt_path {run}"
                      f"{flags}` again", file=sys.stderr)  # fmt: skip
                return row
            for kind in ("fixed", "tuned"):
                for avg in ("micro", "macro"):
                    row[f"{kind}/{avg}"] = float(rep[kind][avg]["f1"])
                    row[f"{kind}/{avg}/ci"] = rep[kind][avg].get("ci")
                row[f"{kind}/exact"] = float(rep[kind]["exact_match"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise GoemoError(f"{report}: not a test report goemo wrote ({type(e).__name__}: {str(e)[:80]}); "
                             "run `python main.py test --ckpt_path RUN` again, or remove it") from None  # fmt: skip
    return row


def tested_unlike(run: Path, report: dict) -> tuple[str, str] | None:
    """Why the run's test report did not score what the run's config.yaml says, and the flags that test it so: part
    of the split (trainer.limit_test_batches under the whole), or a SCORED_WITH setting the test was given another
    value of (its config_test.yaml; keys the run's config does not hold, from before they existed, are not compared),
    or a fixed threshold the report records as other than the config's. None when it scored the run as configured."""
    def read(name: str) -> dict:
        try:
            loaded = yaml.safe_load((run / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return flatten(loaded) if isinstance(loaded, dict) else {}

    fit, test = read("config.yaml"), read("config_test.yaml")
    limit = test.get("trainer.limit_test_batches")
    if not (limit is None or (isinstance(limit, float) and limit >= 1.0)):  # Lightning: int = batches, float = fraction
        return f"scored part of the test split (trainer.limit_test_batches {limit})", " --trainer.limit_test_batches 1.0"
    for key in SCORED_WITH:
        if key in fit and key in test and same_setting(key, test[key]) != same_setting(key, fit[key]):
            value = json.dumps(fit[key]) if fit[key] is None or isinstance(fit[key], bool) else str(fit[key])  # null, true
            return f"was made with {key} {test[key]}, the run's config.yaml says {value}", f" --{key} {shlex.quote(value)}"
    fixed = (report.get("thresholds") or {}).get("fixed")
    if isinstance(fixed, (int, float)) and isinstance(fit.get("model.threshold"), (int, float)) and fixed != fit["model.threshold"]:
        return f"scored at the fixed threshold {fixed}, the run's config.yaml says {fit['model.threshold']}", ""
    return None


def same_setting(key: str, value: Any) -> Any:
    """A setting as compared: a data folder by the folder it names (`./data` and its absolute path are one)."""
    if key == "data.data_dir" and isinstance(value, str) and not value.startswith("pkg:"):
        return str(Path(value).expanduser().resolve())
    return value


def differing_keys(rows: list[dict]) -> list[str]:
    keys = sorted(set().union(*(r["config"] for r in rows)))
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in rows}) > 1]


def group_rows(rows: list[dict]) -> list[list[dict]]:
    """Runs whose configs are equal but for the seed, together, in first-seen order. A run that repeats a seed
    of its group (a rerun, a retried sweep trial) is not another seed: it gets a row of its own, with a note."""
    out: list[list[dict]] = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = json.dumps({k: v for k, v in r["config"].items() if k != "seed_everything"}, sort_keys=True, default=str)
        group = groups.get(key)
        seeded = isinstance(r["seed"], int) and not isinstance(r["seed"], bool)  # not null/true: no fixed seed
        same = [o for o in group or [] if seeded and o["seed"] == r["seed"]]
        if same:
            print(f"note: {r['run']} has the config and seed ({r['seed']}) of {same[0]['run']}: a row of its own, "
                  "not one more seed of its group", file=sys.stderr)  # fmt: skip
            out.append([r])
            continue
        if group is None:
            group = groups[key] = []
            out.append(group)
        group.append(r)
    return out


def fmt(values: list[Optional[float]], ci: Optional[list] = None) -> str:
    """One run: `0.540 [0.521, 0.566]`; a group: `0.539 ± 0.008`; nothing measured: `-`."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(values) == 1:
        return f"{present[0]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    if len(present) < len(values):
        return f"{statistics.mean(present):.3f} (of {len(present)})"
    return f"{statistics.mean(present):.3f} ± {statistics.stdev(present):.3f}"


def table(runs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """The comparison's header and rows (strings)."""
    if not runs:
        raise GoemoError("no runs to compare: pass run folders (lightning_logs/version_N) or a folder holding them")
    rows = [run_row(r) for r in runs]
    keys = [k for k in differing_keys(rows) if k != "seed_everything"]
    header = ["run", *keys, "seed", "n", "epochs", *(c for c, _ in COLUMNS)]
    body = []
    for group in group_rows(rows):
        first = group[0]
        cells = [first["run"] if len(group) == 1 else f"{first['run']} (+{len(group) - 1})"]
        cells += [str(first["config"].get(k, "-")) for k in keys]
        cells += [", ".join(str(r["seed"]) for r in group), str(len(group))]
        cells.append(", ".join(sorted({"-" if r["epochs"] is None else str(r["epochs"]) for r in group})))  # as fmt's
        for _, src in COLUMNS:
            ci = first.get(f"{src}/ci") if len(group) == 1 else None
            cells.append(fmt([r.get(src) for r in group], ci))
        body.append(cells)
    return header, body


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], body: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *body])
    return buf.getvalue()


def expand(paths: list[Path]) -> list[Path]:
    """Run folders as given; a sweep's folder (summary.json) stands for its trials' runs; another folder that is
    not a run stands for the runs under it (each folder with a config.yaml: version_N and named runs). A run named
    twice (`lightning_logs lightning_logs/version_0`) counts once: two rows of one run would make a seed group of it."""
    runs = []
    for p in paths:
        if (p / "config.yaml").is_file():
            runs.append(p)
        elif (p / "summary.json").is_file():  # lightning_logs/sweeps/NAME, written by goemo.sweep
            try:
                trials = json.loads((p / "summary.json").read_text(encoding="utf-8")).get("runs", [])
                # finished trials only: a running one's folder is half-trained, a waiting retry names its dead trial's
                done = [Path(t["run"]) for t in trials if t["state"] in ("complete", "pruned")]
                unfinished = sum(t["state"] in ("running", "waiting") for t in trials)
            except OSError as e:
                raise GoemoError(f"{p / 'summary.json'}: cannot read it ({e.strerror or e}); check its permissions") from None
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise GoemoError(f"{p / 'summary.json'}: not a sweep summary goemo wrote ({type(e).__name__}: {str(e)[:80]}); "
                                 "give the trials' run folders instead") from None  # fmt: skip
            if unfinished:
                print(f"note: {p / 'summary.json'}: {unfinished} trial(s) still running or waiting when it was written are left out "
                      "(their runs are not trained to the end); compare again when the sweep's last worker has ended (it rewrites the summary)", file=sys.stderr)  # fmt: skip
            found = [r for r in done if (r / "config.yaml").is_file()]
            if done and not found:  # the summary names its trials' folders as the sweep saw them
                raise GoemoError(f"{p / 'summary.json'}: none of the trials' run folders it names is there (first: {done[0]}); "
                                 "give the trials' run folders where they are now")  # fmt: skip
            missing = [r for r in done if r not in found]
            if missing and found:
                print(f"note: {p / 'summary.json'}: {len(missing)} finished trial(s) are left out, their run folders are not "
                      f"there (first: {missing[0]}); give the trials' run folders where they are now", file=sys.stderr)  # fmt: skip
            runs += found
        elif p.is_dir():
            found = sorted((q.parent for q in p.rglob("config.yaml")), key=str)
            if not found:
                raise GoemoError(f"{p}: holds no run folders (none with a config.yaml)")
            runs += found
        else:
            raise GoemoError(f"{p}: no such run folder")
    unique: dict[Path, Path] = {}
    for r in runs:
        unique.setdefault(r.resolve(), r)  # the first name given for each run, in order
    return list(unique.values())


def check_not_a_run_file(path: Path, flag: str, folders: list[Path]) -> None:
    """One line if an output would replace a file that a compared run or sweep folder is read from (its config*.yaml,
    hparams.yaml, test report, sweep summary, ensemble.json) or a checkpoint."""
    out = path.expanduser().resolve()
    names = ("hparams.yaml", "test_report.json", "test_report.md", "summary.json", "summary.md", "ensemble.json")
    ours = out.name in names or out.name.startswith("config") and out.suffix == ".yaml"
    if out.suffix == ".ckpt" or ours and any(out.parent == f.expanduser().resolve() for f in folders):
        raise GoemoError(f"{flag} {path} is a file of the runs compared, which the table would replace; write it elsewhere")


def main(argv: Optional[list[str]] = None) -> None:
    from goemo.files import write_text

    parser = ArgumentParser(prog="python -m goemo.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, folders holding them (lightning_logs), or a sweep's folder (lightning_logs/sweeps/NAME)")
    parser.add_argument("--md", type=Path, default=None, help="also write the table as Markdown here")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table as CSV here")
    args = parser.parse_args(argv)
    with exit_on_error():
        from goemo.files import check_output_file

        outputs = [(flag, path) for flag, path in (("--md", args.md), ("--csv", args.csv)) if path is not None]
        for flag, path in outputs:
            check_output_file(path, flag, "results.md" if flag == "--md" else "results.csv")  # before the runs are read
        if args.md is not None and args.csv is not None and args.md.expanduser().resolve() == args.csv.expanduser().resolve():
            raise GoemoError(f"--md and --csv both name {args.md}; give each its own file")
        runs = expand(args.runs)
        for flag, path in outputs:
            check_not_a_run_file(path, flag, [*runs, *(p for p in args.runs if (p / "summary.json").is_file())])
        header, body = table(runs)
    md = to_markdown(header, body)
    print(md, end="")
    if args.md:
        write_text(args.md, md)
    if args.csv:
        write_text(args.csv, to_csv(header, body))


if __name__ == "__main__":
    main()
