"""Find runs and checkpoints under lightning_logs/, so `--ckpt_path best|last` works in a new process.

Plain Lightning only knows `best` inside the process that ran `fit`. Here `best`/`last` (or a run
folder, or a checkpoint file inside one) name a checkpoint on disk, and the command reuses that
run's saved `config.yaml` and logs into the same run folder (`version_N`, or the name its fit gave it).
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from goemo.errors import GoemoError

RUNS_DIR = Path("lightning_logs")
ALIASES = ("best", "last")
LOGGER_FOLDER_FLAGS = tuple(f"--trainer.logger.{a}{k}" for a in ("init_args.", "") for k in ("save_dir", "name"))
ENSEMBLE_FILE = "ensemble.json"  # what marks a folder `python -m goemo.ensemble` wrote
NO_VALUE_FLAGS = ("-h", "--help", "--print_config")  # the CLI's flags that take no separate value


def options(args: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value) of each flag, for `--flag value`, `--flag=value` (and `-cFILE`) alike, -c named --config; a
    separate value is skipped as a flag (`--trainer.logger.init_args.name -cv` names no config file -cv)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if flag.startswith("-c") and len(flag) > 2 and not flag.startswith("--") and not eq:  # -cFILE, as argparse reads it
            flag, eq, value = "-c", "=", a[2:]
        if not flag.startswith("-"):  # the subcommand, or a value the loop did not expect
            i += 1
            continue
        takes_next = not eq and flag not in NO_VALUE_FLAGS and i + 1 < len(args)
        out.append(("--config" if flag == "-c" else flag, value if eq else args[i + 1] if takes_next else None))
        i += 2 if takes_next else 1
    return out


def config_files(args: list[str]) -> list[str]:
    """The config files given by --config/-c, in order."""
    return [value for flag, value in options(args) if flag == "--config" and value is not None]


def read_config(value: str, strict: bool = False) -> Any:
    """A YAML config: the file `value` names, else `value` itself (as jsonargparse reads `--trainer FILE|YAML`).
    None where it cannot be read (the parser then says why), or with `strict` a one-line error for a file that is not
    UTF-8 text (jsonargparse's UnicodeDecodeError would be a traceback)."""
    import yaml

    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else value
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        if strict:
            raise GoemoError(f"{value}: not UTF-8 text, so not a YAML config file; give the config's .yaml file") from None
        return None
    except (OSError, yaml.YAMLError):
        return None


def run_config(run: Path) -> dict:
    """The run's config.yaml as a dict ({} where it has none or it cannot be read)."""
    config = read_config(str(run / "config.yaml")) if (run / "config.yaml").is_file() else None
    return config if isinstance(config, dict) else {}


def checkpoint_dir(run: Path) -> Path:
    """Where the run's checkpoints are: its checkpoints/ folder, or the `checkpoint.dirpath` its config.yaml gives
    (relative to the working folder, as at fit)."""
    section = run_config(run).get("checkpoint")
    dirpath = section.get("dirpath") if isinstance(section, dict) else None
    return Path(dirpath).expanduser() if dirpath else run / "checkpoints"


def _version(run: Path) -> int:
    m = re.fullmatch(r"version_(\d+)", run.name)
    return int(m.group(1)) if m else -1


def _started(run: Path) -> float:
    """When the run's fit (or its latest resume) started: the mtime of its config.yaml, which LightningCLI writes then
    and nothing else rewrites (an evaluation adds config_<stage>.yaml and reports, moving the folder's own mtime; Linux
    keeps no creation time). A run without one: its folder's."""
    own = run / "config.yaml"
    return (own if own.is_file() else run).stat().st_mtime


def newest(runs: list[Path]) -> Path | None:
    """The newest of `runs`: of the version_N folders the highest N, as Lightning numbers them in the order it makes
    them; a named run (`--trainer.logger.init_args.version NAME`) has no number, so named runs are ordered, and the
    newest of them weighed against that version_N, by `_started` (a tie goes to the version_N)."""
    numbered, named = [r for r in runs if _version(r) >= 0], [r for r in runs if _version(r) < 0]
    top = [max(numbered, key=_version)] if numbered else []
    top += [max(named, key=lambda r: (_started(r), r.name))] if named else []
    return max(top, key=_started, default=None)


def _saved(run: Path) -> bool:
    """Whether the run holds a checkpoint, in checkpoints/ or its checkpoint.dirpath (checkpoints/ too for a dirpath
    run: last_checkpoint says why)."""
    return any(checkpoint_dir(run).glob("*.ckpt")) or (run / "checkpoints" / "last.ckpt").is_file()


def _subfolders(root: Path) -> list[Path]:
    """The folders right under `root`: version_N, and runs named by their fit (a sweep's, an ensemble's or an export's
    folder holds neither a config.yaml nor checkpoints/, so the callers' tests leave it out)."""
    return [p for p in root.glob("*") if p.is_dir() and (_version(p) >= 0 or _named_run(p))]


def _named_run(folder: Path) -> bool:
    """Whether the folder is a run its fit named (`--trainer.logger.init_args.version NAME`), as its config.yaml says:
    not a copy of a run (`cp -r version_0 keep_v0`, which would be the newest by its fresh config.yaml)."""
    return str(logger_args(folder).get("version")) == folder.name


def logger_args(run: Path) -> dict:
    """The init_args of the run's first logger, as its config.yaml holds them ({} where it holds none)."""
    config = read_config(str(run / "config.yaml")) if (run / "config.yaml").is_file() else None
    logger = ((config or {}).get("trainer") or {}).get("logger") if isinstance(config, dict) else None
    logger = logger[0] if isinstance(logger, list) and logger else logger
    args = logger.get("init_args") if isinstance(logger, dict) else None
    return args if isinstance(args, dict) else {}


def newest_run(root: Path = RUNS_DIR) -> Path:
    """The newest run under `root` (see `newest`) that holds a checkpoint."""
    run = newest([p for p in _subfolders(root) if _saved(p)])
    if run is None:
        raise GoemoError(
            f"no run with checkpoints under {root}/: train one first (python main.py fit --config configs/minilm.yaml) "
            f"or pass --ckpt_path PATH/TO/FILE.ckpt"
        )
    return run


def _run_folder(path: Path) -> Path:
    """The run folder `path` names: itself, or the run whose checkpoints/ it is. A folder plainly something else (a
    working folder, a folder of runs, a model folder, a dirpath's checkpoints) is said in one line, not reported as a
    run whose checkpoints/ is empty."""
    if any((path / f).exists() for f in ("config.yaml", "hparams.yaml", "checkpoints", ENSEMBLE_FILE)):
        return path  # a run (an ensemble's folder, one with no checkpoints: last_checkpoint says so)
    if path.name == "checkpoints" and (path.parent / "config.yaml").is_file():
        return path.parent  # RUN/checkpoints: one run it can mean
    if (path / "config.json").is_file():  # what save_pretrained (and goemo.export) write
        raise GoemoError(f"{path} is a model folder, not a run; --model.model_name_or_path takes it")
    inner = path / RUNS_DIR if (path / RUNS_DIR).is_dir() else path
    try:
        hint: Path | None = newest_run(inner)
    except GoemoError:
        hint = None
    if inner != path:
        raise GoemoError(f"{path}: a working folder, not a run; give its run (--ckpt_path {hint or inner / 'version_N'}), "
                         f"or run from {path} with --ckpt_path best|last")  # fmt: skip
    if hint is not None:
        raise GoemoError(f"{path}: a folder of runs, not a run; give one of them (--ckpt_path {hint}: the newest)")
    if any(path.glob("*.ckpt")):
        raise GoemoError(f"{path}: a folder of checkpoint files, not a run; give one of its .ckpt files, or its run's folder")
    return path


def load_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """torch.load with `weights_only=True` (never runs pickled code), turning failures into one line.

    A file that needs more than tensors and plain data to unpickle (a class, a function: what a crafted
    pickle uses to run code) is refused, and nothing in it runs.
    """
    try:
        with warnings.catch_warnings():  # an old-style pickle gets a warning about its protocol, then refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap needs torch's zip format; an old-style file (or one that is no zip at all) is read whole
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # "Weights only load failed" with an unsupported GLOBAL: what a pickle that runs code needs. (Other failures,
        # e.g. "Unsupported operand", are bytes the safe unpickler cannot read: not a checkpoint.)
        if any("Weights only load failed" in line for line in lines) and any("GLOBAL" in line for line in lines):
            # torch names what it refused in a line such as "Trying to load unsupported GLOBAL posix.system whose
            # module posix is blocked." (between paragraphs of advice, one of which is to load it unsafely)
            what = next((line for line in lines if re.search("unsupported|GLOBAL", line, re.I) and "file an issue" not in line), "")
            what = what.removeprefix("WeightsUnpickler error:").strip().split(". ")[0].rstrip(".")
            what = what or "objects other than tensors and plain data"
            raise GoemoError(
                f"{path}: refused to load: it holds pickled Python objects, not only tensors and plain data "
                f"({what[:160]}); goemo loads checkpoints with weights_only=True and runs no code from them"
            ) from None
        raise GoemoError(f"{path}: not a loadable checkpoint ({_reason(e)})") from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, KeyError (not a pickle), ...
        raise GoemoError(f"{path}: not a loadable checkpoint ({_reason(e)})") from None


def load_lightning_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """`load_checkpoint`, refused in one line unless it is a Lightning checkpoint (a dict with a state_dict)."""
    ckpt = load_checkpoint(path, map_location, mmap)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise GoemoError(f"{path}: not a Lightning checkpoint (no state_dict)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise GoemoError(f"{path}: not a Lightning checkpoint (its state_dict holds more than named tensors)")
    return ckpt


def _reason(e: Exception) -> str:
    """What torch.load's exception says, in a few words."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, EOFError) or (not first and not isinstance(e, KeyError)):
        return "the file is empty or cut short"
    if isinstance(e, KeyError) or not re.search("[A-Za-z]{3}", first) or "Weights only load failed" in first:
        # e.g. KeyError('101') for a text file, "Unsupported operand" from the safe unpickler for other bytes
        return "not a file written by torch.save"
    return first.split(". ")[0][:200]  # torch goes on with advice about miniz and bug reports


def last_checkpoint(run: Path) -> Path:
    ckpts = checkpoint_dir(run)
    # A run fitted with checkpoint.dirpath by goemo before 2026-12-07 saved its periodic last.ckpt in checkpoints/ and
    # the epoch checkpoints' (and Ctrl-C's) in the dirpath: the later step of the two.
    lasts = [f for f in dict.fromkeys((ckpts / "last.ckpt", run / "checkpoints" / "last.ckpt")) if f.is_file()]
    if lasts:
        return max(lasts, key=lambda f: (step if (step := saved_step(f)) is not None else -1, f.parent == ckpts))
    files = sorted(ckpts.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not files and (run / ENSEMBLE_FILE).is_file():
        raise GoemoError(f"{run}: an ensemble's folder, not a run: its test report is {run / 'test_report.md'}, "
                         f"and goemo.load({str(run)!r}) predicts with it")  # fmt: skip
    if not files:
        raise GoemoError(f"{ckpts}: no checkpoint files (the fit stopped before its first save?); give a run that has them, or a .ckpt file")
    return files[-1]


def saved_step(path: Path) -> int | None:
    """The global step a checkpoint holds (memory-mapped: only that number is read); None where it cannot be read."""
    try:
        ckpt = load_checkpoint(path, mmap=True)
        return int(ckpt["global_step"]) if isinstance(ckpt, dict) else None  # another shape: said by the caller's checks
    except (GoemoError, KeyError, TypeError, ValueError):
        return None


def best_checkpoint(run: Path) -> Path:
    """The best checkpoint recorded by the run's `checkpoint` callback in the run's newest checkpoint."""
    last = last_checkpoint(run)
    ckpt = load_checkpoint(last, mmap=True)
    state = ckpt.get("callbacks", {}) if isinstance(ckpt, dict) else None  # a weights-only file has none: {}
    if not isinstance(state, dict):
        raise GoemoError(f"{last}: not a Lightning checkpoint (no dict of callbacks' states); give a .ckpt file of the run instead")
    cb = _checkpoint_state(run, state, last)
    if cb is not None and cb.get("best_model_path"):
        # Look it up by name in this run: the run folder may have moved since training.
        best = checkpoint_dir(run) / Path(cb["best_model_path"]).name
        if not best.is_file():  # not `last` in its place: that would be another epoch's weights, without a word
            raise GoemoError(f"{run}: its best checkpoint {best.name} is gone; restore it, or give `last` or a .ckpt file of the run")
        return best
    return last  # nothing monitored (e.g. no validation ran): the newest is the best we know


def _checkpoint_state(run: Path, states: dict, last: Path) -> dict | None:
    """The state of goemo's `checkpoint` callback: trainer.callbacks may hold other ModelCheckpoints (monitoring
    val/loss, say), so it is found by its state_key, made from the run's config.yaml as Lightning makes it."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    found = {k: v for k, v in states.items() if isinstance(k, str) and k.startswith("ModelCheckpoint") and isinstance(v, dict)}
    section = run_config(run).get("checkpoint")
    if isinstance(section, dict):
        keys = ("monitor", "mode", "every_n_train_steps", "every_n_epochs", "train_time_interval")
        try:
            key = ModelCheckpoint(**{k: section[k] for k in keys if k in section}).state_key
        except (MisconfigurationException, TypeError, ValueError):  # a setting it refuses: the fit could not have run with it
            key = None
        if key in found:
            return found[key]
        # A key not rebuilt exactly (train_time_interval is saved as text, the key holds a timedelta): its monitor.
        same = [v for v in found.values() if "monitor" in section and v.get("monitor") == section["monitor"]]
        if len(same) == 1:
            return same[0]
    if len(found) > 1:
        raise GoemoError(f"{last}: it holds the states of {len(found)} ModelCheckpoint callbacks and the run's config.yaml does "
                         f"not tell which is its `checkpoint` section's; give the .ckpt file to use (in {last.parent})")  # fmt: skip
    return next(iter(found.values()), None)


def resolve_checkpoint(value: str, root: Path = RUNS_DIR, resume: bool = False) -> tuple[Path, Optional[Path]]:
    """`best` | `last` | a run folder (or its checkpoints/) | a .ckpt file  ->  (checkpoint file, its run folder or None).

    A run folder means its best checkpoint, or with `resume` (for `fit`) its last one: training goes on
    from where it stopped, not from its best epoch.
    """
    if value in ALIASES:
        run = newest_run(root)
        # Fits started after `run` that stopped before their first save: resuming `run` would not go on with the newest.
        # Each is weighed against `run` alone: named runs and version_N are ordered by different keys.
        fits = [p for p in _subfolders(root) if (p / "config.yaml").is_file()] if resume else []  # fits started
        unsaved = [p for p in fits if not _saved(p) and newest([p, run]) == p]
        if unsaved:
            started = newest(unsaved)
            raise GoemoError(
                f"{started}, the newest run, has no checkpoint (it stopped before its first save), so there is nothing "
                f"of it to resume: start it again, or resume an older run by its folder (--ckpt_path {run})"
            )
    else:
        path = Path(value).expanduser()
        if path.is_file():
            run = path.parent.parent if path.parent.name == "checkpoints" else None
            return path, run if run is not None and (run / "config.yaml").is_file() else None
        if not path.is_dir():
            raise GoemoError(f"--ckpt_path {value!r}: no such file or run folder; use best, last, a run folder or a .ckpt file")
        run = _run_folder(path)
    ckpt = last_checkpoint(run) if value == "last" or (resume and value != "best") else best_checkpoint(run)
    return ckpt, run


def rewrite_args(argv: list[str], root: Path = RUNS_DIR) -> tuple[list[str], Optional[Path]]:
    """Rewrite `SUBCOMMAND ... --ckpt_path best ...` to use the checkpoint file and its run's config.

    The run's config.yaml goes first, so every flag the user typed still overrides it.
    Returns the new argv and the run folder (None when nothing was resolved).
    """
    sub = next((i for i, a in enumerate(argv) if a in ("fit", "validate", "test", "predict")), None)
    if sub is None:
        return argv, None
    args = list(argv)
    given = [i for i, a in enumerate(args) if a == "--ckpt_path" or a.startswith("--ckpt_path=")]
    if len(given) > 1:  # the parser takes the last; resolving the first would mix one run's config with another's weights
        raise GoemoError(f"--ckpt_path is given {len(given)} times; give it once: one checkpoint, with its run's config and folder")
    if not given or (args[given[0]] == "--ckpt_path" and given[0] + 1 == len(args)):
        return argv, None
    i = given[0]
    if args[i] == "--ckpt_path":
        idx, value = i + 1, args[i + 1]
    else:
        value = args[i].split("=", 1)[1]
        args[i : i + 1] = ["--ckpt_path", value]
        idx = i + 1
    if value in ("", "null", "None"):
        return argv, None
    if value in ALIASES:  # resolved before parsing: a logger flag or config file would not move where `best` looks
        folder, typed = {"save_dir": ".", "name": "lightning_logs"}, False  # the CLI's logger defaults
        for flag, given_value in options(args):  # in order: a later flag or file wins, as in the parser
            if flag in LOGGER_FOLDER_FLAGS and given_value is not None:
                folder[flag.rsplit(".", 1)[1]], typed = given_value, True
            elif flag in ("--config", "--trainer") and given_value is not None:
                config = read_config(given_value)  # a config file, or a trainer file or YAML (--trainer FILE|YAML)
                if found := _logger_folder(config.get("trainer") if flag == "--config" and isinstance(config, dict) else config):
                    folder, typed = {**folder, **found}, True
        if typed and Path(folder["save_dir"], folder["name"]).resolve() != root.resolve():
            raise GoemoError(f"--ckpt_path {value} takes the newest run in {root}, not in {Path(folder['save_dir'], folder['name'])} "
                             "where the logger settings point; give the run folder instead (--ckpt_path DIR/version_N)")  # fmt: skip
    ckpt, run = resolve_checkpoint(value, root, resume=argv[sub] == "fit")
    args[idx] = str(ckpt)
    if run is not None and (run / "config.yaml").is_file():
        args[sub + 1 : sub + 1] = ["--config", str(run / "config.yaml")]
    return args, run


def _logger_folder(trainer: Any) -> dict:
    """The save_dir and name that a trainer section gives the (first) logger; {} where it gives none."""
    logger = trainer.get("logger") if isinstance(trainer, dict) else None
    logger = logger[0] if isinstance(logger, list) and logger else logger
    args = logger.get("init_args", logger) if isinstance(logger, dict) else None
    return {k: str(args[k]) for k in ("save_dir", "name") if isinstance(args, dict) and args.get(k) is not None}
