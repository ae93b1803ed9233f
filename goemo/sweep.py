"""`python -m goemo.sweep --config C --space S --trials N`: a hyperparameter search on Optuna; every trial an
ordinary run.

Each trial is `python main.py fit --config C --KEY VALUE ...` (goemo.cli's main) in a child process: its own
`lightning_logs/version_N/` with its full config and checkpoints, so `test --ckpt_path lightning_logs/version_N`,
the reports and `goemo.compare` work on any trial. The objective is a logged validation metric (default
`val/f1_macro`), its best value over the run's validations. The trial's validations are reported to Optuna as they
come (`goemo.sweep.OptunaReport`, a callback in the trial's config), so Optuna's pruner stops unpromising trials.

The study lives in a database: a SQLite file in lightning_logs/ by default, or any SQLAlchemy URL
(`--storage postgresql+psycopg://...`), which is how several workers on several machines share one study (Optuna's
own distributed mode). Workers send heartbeats; a worker killed mid-trial loses only that trial, which the next
worker to look marks failed and runs again (Optuna's RetryHeartbeatStaleTrialCallback). `--trials N` counts finished
trials (complete or pruned) over all workers. At the end the summary (best trial, its run folder and config,
each parameter's importance) is printed and saved beside the study as summary.json / summary.md.

The space file maps config keys to distributions:

    model.learning_rate: {float: [1.0e-5, 3.0e-4], log: true}
    model.head_learning_rate: {float: [1.0e-4, 1.0e-2], log: true}
    data.train_batch_size: {categorical: [16, 32, 64]}
    model.warmup_ratio: {float: [0.0, 0.1], step: 0.02}
    trainer.max_epochs: {int: [1, 4]}
    seed_everything: {grid: [42, 1, 7]}

`grid` keys are searched exhaustively (Optuna's GridSampler; then every key must be a grid), each point once;
`--seeds 42,1,7` runs the config once per seed, a seed group. A space with `seed_everything` is never pruned: a
seed group's mean needs every seed run to the end.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.callbacks import Callback

from goemo.errors import ArgumentParser, GoemoError, exit_on_error

KINDS = ("float", "int", "categorical", "grid")
# Each trial's fit, and the space check's --print_config: goemo's CLI from a one-line launcher (a goemo installed
# without its repository has no main.py; `-m goemo.cli` would run a __main__ copy of the module). From a checkout
# (pyproject.toml beside goemo/) that checkout goes first on the path, so the trials run the goemo the sweep runs,
# not whichever one is installed or sits in the working folder.
_ROOT = Path(__file__).resolve().parent.parent
_PATH = [str(_ROOT)] if (_ROOT / "pyproject.toml").is_file() else []
CLI = [sys.executable, "-c", f"import sys; sys.path[:0] = {_PATH!r}; from goemo.cli import main; main()"]
# The validation metrics goemo logs: an objective must be one, and a loss is minimized, an F1 or exact match maximized.
METRICS = ("val/loss", *(f"val/{m}{s}" for m in ("f1_micro", "f1_macro", "exact_match") for s in ("", "_tuned")))


# -- the space file --------------------------------------------------------------------------------------------
class SpaceLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-5` (no dot) is a string; a space file's numbers are read as YAML 1.2 and
    the CLI's config parser read them, so `{float: [1e-5, 1e-4]}` is a range of floats."""


SpaceLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: yaml.safe_load is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+.0123456789")
)


def read_space(path: Path) -> dict[str, dict]:
    """{key: {"kind": float|int|categorical|grid, ...}} from a space file, each entry checked; GoemoError else."""
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=SpaceLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise GoemoError(f"{path}: cannot read the space file ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise GoemoError(f"{path}: a space file maps config keys to distributions, e.g. model.learning_rate: {{float: [1e-5, 1e-4], log: true}}")
    return {str(key): parse_entry(str(key), spec, path) for key, spec in raw.items()}


def parse_entry(key: str, spec: Any, path: Path) -> dict:
    where = f"{path}: {key}"
    kinds = [k for k in KINDS if isinstance(spec, dict) and k in spec]
    if len(kinds) != 1:
        raise GoemoError(f"{where}: give exactly one of {', '.join(KINDS)} (e.g. {{float: [1e-5, 1e-4]}})")
    kind, value = kinds[0], spec[kinds[0]]
    extra = set(spec) - {kind, "log", "step"}
    if extra:
        raise GoemoError(f"{where}: unknown setting {sorted(extra)[0]!r} (a distribution takes log and step)")
    used = {k for k in set(spec) - {kind} if not (k == "log" and spec[k] is False or k == "step" and spec[k] is None)}
    if kind in ("categorical", "grid") and used:  # `log: false` and `step: null` say nothing: allowed
        raise GoemoError(f"{where}: {kind} takes its list of values only ({min(used)} is for float and int)")
    if "log" in spec and not isinstance(spec["log"], bool):
        raise GoemoError(f"{where}: log must be true or false, got {spec['log']!r}")
    if kind in ("categorical", "grid"):
        if not isinstance(value, list) or not value:
            raise GoemoError(f"{where}: {kind} needs a non-empty list of values")
        if any(isinstance(v, (dict, list)) for v in value):
            raise GoemoError(f"{where}: {kind} values must be plain numbers, strings, booleans or null")
        for i, v in enumerate(value):
            same = [w for w in value[:i] if w == v]
            if same and type(same[0]) is type(v):
                raise GoemoError(f"{where}: {kind} lists {v!r} twice (each value is one trial of the same recipe)")
            if same:  # Optuna keeps a choice as its place in the list (list.index): 1, 1.0 and true are one to it
                raise GoemoError(f"{where}: {kind} lists {same[0]!r} and {v!r}, which Optuna takes for one value (it would "
                                 f"run {same[0]!r} for both); keep one of them, and sweep the other in a study of its own")  # fmt: skip
        return {"kind": kind, "values": value}
    if not (isinstance(value, list) and len(value) == 2):
        raise GoemoError(f"{where}: {kind} needs [low, high]")
    num = int if kind == "int" else (int, float)
    low, high = value
    if isinstance(low, bool) or isinstance(high, bool) or not isinstance(low, num) or not isinstance(high, num):
        raise GoemoError(f"{where}: {kind} bounds must be {'integers' if kind == 'int' else 'numbers'}, got {low!r} and {high!r}")
    big = sys.float_info.max  # Optuna draws within high - low as floats: inf, nan or a wider range is an OverflowError
    if not (abs(low) <= big and abs(high) <= big and float(high) - float(low) <= big):
        raise GoemoError(f"{where}: {kind} bounds and their distance must be finite numbers, got {low!r} and {high!r}")
    if not low < high:
        raise GoemoError(f"{where}: empty or inverted range [{low}, {high}]: low must be below high")
    if kind == "float":  # its trials get floats (1.0 to 3.0 for [1, 3]): the space check probes those
        low, high = float(low), float(high)
    log, step = spec.get("log", False), spec.get("step")
    if log and low <= 0:
        raise GoemoError(f"{where}: a log range must be above 0, got low {low}")
    if step is not None and (log or isinstance(step, bool) or not isinstance(step, num) or not 0 < step < math.inf):
        raise GoemoError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'} and cannot go with log")
    return {"kind": kind, "low": low, "high": high, "log": log, "step": step}


def config_keys(config: Optional[Path], extra: list[str]) -> dict[str, Any]:
    """Every key of the full fit config (`fit --config C --print_config`), flattened."""
    from goemo.compare import flatten

    args = [*CLI, "fit", *(["--config", str(config)] if config else []), *extra, "--print_config"]
    r = subprocess.run(args, capture_output=True, text=True, preexec_fn=CHILD_SETUP)
    if r.returncode != 0:
        raise GoemoError((r.stderr.strip().splitlines() or ["fit --print_config failed"])[-1].removeprefix("error: "))
    return flatten(yaml.safe_load(r.stdout))


def check_space(space: dict[str, dict], config: Optional[Path], extra: list[str]) -> None:
    """Every key exists in the config, and the config parser takes each bound or choice (its types and choices, as a
    run's parser checks them), before the first trial. Ranges that only a model or data module checks when it is
    built (e.g. model.teacher_weight within 0..1) are not probed: a trial given such a value fails with its one-line
    reason and the study goes on."""
    keys = config_keys(config, extra)
    for key in space:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            raise GoemoError(f"space key {key!r} is not a config key{' (did you mean ' + ', '.join(close) + '?)' if close else ''}")
    probes = max(len(s.get("values", ())) or 2 for s in space.values())
    for i in range(probes):  # low values, then high values (and the i-th choice of each categorical)
        args = []
        for key, s in space.items():
            values = s.get("values") or [s["low"], s["high"]]
            args += [f"--{key}", yaml.safe_dump(values[min(i, len(values) - 1)], default_flow_style=True).strip().removesuffix("...").strip()]
        try:
            config_keys(config, extra + args)
        except GoemoError as e:
            bad = next((k for k in space if k in str(e)), None)
            raise GoemoError(f"space key {bad or '?'!r}: {e}") from None


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    params = {}
    for key, s in space.items():
        if s["kind"] in ("categorical", "grid"):
            params[key] = trial.suggest_categorical(key, s["values"])
        elif s["kind"] == "int":
            params[key] = trial.suggest_int(key, s["low"], s["high"], step=s["step"] or 1, log=s["log"])
        else:
            params[key] = trial.suggest_float(key, s["low"], s["high"], step=s["step"], log=s["log"])
    return params


# -- the trial's side --------------------------------------------------------------------------------------------
def make_pruner(prune: bool):
    """The study's pruner, made the same way by the worker and by the trial's process: Optuna does not store
    the pruner with the study, and `load_study` would otherwise give the trial a default one."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()


class OptunaReport(Callback):
    def __init__(self, storage: str, study: str, trial: int, metric: str = "val/f1_macro", prune: bool = True) -> None:
        """Reports each validation's `metric` to an Optuna trial and stops the fit when Optuna's pruner says so.

        Put in a trial's config by `goemo.sweep`; the equivalent of optuna-integration's Lightning callback for runs
        in their own process (it finds the trial in the study's database).

        Args:
            storage: The study's database URL.
            study: The study's name.
            trial: The trial's number in the study.
            metric: The logged validation metric that is the objective.
            prune: Stop the fit when the study's median pruner says so (`goemo.sweep --no-prune`: never).
        """
        self.storage, self.study, self.trial, self.metric, self.prune = storage, study, trial, metric, prune
        self._trial = None
        self._validations = 0
        self._validated = False  # a validation ran, whether or not it logged the metric

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # log_dir is a broadcast from rank 0 that every rank must join (Lightning's note on Trainer.log_dir): read by
        # rank 0 alone, the other ranks took its answer for a later collective's (SaveConfigCallback's) under DDP.
        log_dir = trainer.log_dir
        if trainer.is_global_zero:
            import optuna
            from optuna.trial import TrialState

            try:
                study = optuna.load_study(study_name=self.study, storage=self.storage, pruner=make_pruner(self.prune))
            except KeyError:  # a trial's config fit again elsewhere, or its study deleted
                return print(f"note: study {self.study!r} is not in its database: this fit reports to no study", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 (a server that is down, a driver that is not installed)
                raise GoemoError(f"OptunaReport: cannot open study {self.study!r} ({str(e).splitlines()[0][:200]}); "
                                 "drop it from the config's trainer.callbacks to fit without the study") from None  # fmt: skip
            trial = next((t for t in study.get_trials(deepcopy=False) if t.number == self.trial), None)
            if trial is None or trial.state != TrialState.RUNNING:
                # A finished trial's config fit again (the summary's best config with another seed) or resumed:
                # Optuna refuses updates to a finished trial, and the study's result is already recorded.
                state = "not in it" if trial is None else trial.state.name.lower()
                return print(f"note: trial {self.trial} of study {self.study!r} is {state}: this fit reports to no "
                             "study", file=sys.stderr)  # fmt: skip
            self._trial = optuna.Trial(study, trial._trial_id)
            self._trial.set_user_attr("run", str(Path(log_dir).resolve()))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validated = True
        prune = False
        if self._trial is not None and self.metric in trainer.callback_metrics:  # rank 0 of a trial's fit
            # Reported at the validation's number in the run (0, 1, ...), not the optimizer step: trials of other
            # batch sizes take other step counts, and the median pruner compares trials at equal steps. With
            # validation every epoch or every fraction of one (--trainer.val_check_interval 0.25), the n-th
            # validation is the same share of training in every trial.
            value = float(trainer.callback_metrics[self.metric])
            self._trial.report(value, self._validations)
            self._validations += 1
            prune = self._trial.should_prune()
            if prune:
                self._trial.set_user_attr("pruned_at_step", trainer.global_step)
        # Every rank stops with rank 0: Lightning does not share should_stop between ranks (EarlyStopping
        # broadcasts its own decision too), and a rank left training would wait in DDP's all-reduce forever.
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._trial is not None and not self._validated:
            # The sweep's reason for a trial without a value: the fit never validated (not a metric it did not log).
            # Written only then: a write at every fit's end could fail a fit that trained well.
            self._trial.set_user_attr("no_validation", f"trainer.max_epochs {trainer.max_epochs}, limit_val_batches "
                                      f"{trainer.limit_val_batches}, check_val_every_n_epoch {trainer.check_val_every_n_epoch}")  # fmt: skip


# -- the worker's side -------------------------------------------------------------------------------------------
def failed_trial(trial, reason: str) -> float:
    """A trial whose fit failed: its one-line reason is kept with it, and nan makes Optuna record it as failed
    (without a traceback); the study goes on."""
    trial.set_user_attr("error", reason)
    print(f"trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
    return float("nan")


def failure_reason(lines: list[str], returncode: int) -> str:
    """The one line that says why a fit failed: goemo's own `error: ...` line, else the traceback's exception
    line (`SomeError: ...`; SQLAlchemy's closing "(Background on this error at: ...)" line says nothing)."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    for line in reversed(lines):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[-1] if lines else f"exit {returncode}"


def _die_with_parent() -> None:
    """In the child: SIGKILL when the worker dies (Linux), so a killed worker leaves no orphaned fit."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


CHILD_SETUP = _die_with_parent if os.name == "posix" else None


def make_sampler(study, space: dict, grid: bool, seed: Optional[int]):
    """A grid's sampler (it skips the points other workers run or ran), else TPE: seeded with `seed` plus the
    study's trials so far, so a worker that goes on with a study does not draw its first values again."""
    import optuna

    if grid:
        return optuna.samplers.GridSampler({k: s["values"] for k, s in space.items()}, seed=0)
    return optuna.samplers.TPESampler(seed=None if seed is None else seed + len(study.trials))


def fit_args(a: argparse.Namespace, params: dict[str, Any]) -> list[str]:
    """A trial's `fit` arguments without its study report: the recipe, the flags after `--`, the trial's values."""
    # The run keeps its best checkpoint by the study's metric, so the trial's score and its run's `best` are one
    # epoch (the config's own monitor, val/f1_micro by default, could keep another); flags after `--` still win.
    keep = ["--checkpoint.monitor", a.metric, "--checkpoint.mode", "max" if a.direction == "maximize" else "min"]
    args = ["fit", *(["--config", str(a.config)] if a.config else []), *keep, *a.fit_args]
    for key, value in params.items():
        args += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()]
    return args


def release_signals(a: argparse.Namespace) -> None:
    """Put back the Ctrl-C and SIGTERM handlers that run_trial set aside while it stopped an interrupted trial."""
    for s, handler in (getattr(a, "held_signals", None) or {}).items():
        signal.signal(s, handler)
    a.held_signals = None


def run_trial(trial, a: argparse.Namespace, space: dict, storage_url: str) -> float:
    import optuna

    params = suggest(trial, space)
    args = [*CLI, *fit_args(a, params)]
    args += ["--trainer.callbacks+=goemo.sweep.OptunaReport", "--trainer.callbacks.storage", storage_url,
             "--trainer.callbacks.study", a.study, "--trainer.callbacks.trial", str(trial.number),
             "--trainer.callbacks.metric", a.metric, "--trainer.callbacks.prune", str(a.prune).lower()]  # fmt: skip
    log = a.sweep_dir / f"trial_{trial.number}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, preexec_fn=CHILD_SETUP)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main turns it into one)
            # Further Ctrl-C and SIGTERM are ignored until Optuna has recorded the trial (run_sweep puts them back
            # after study.optimize): one raised in here left the trial failed as if its worker had died, its values
            # never run again; one while Optuna records it left it running, its values queued twice (here and by the
            # heartbeat's retry). A second Ctrl-C at the terminal still reaches the fit, which then stops at once,
            # unsaved. The fit's own message goes to the trial's log.
            a.held_signals = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            a.interrupted = trial.number
            print(f"stopping trial {trial.number} after its fit saves its last.ckpt (its log: {log})",
                  file=sys.stderr, flush=True)  # fmt: skip
            # SIGTERM: a fit the signal did not reach stops at its batch's end and saves, as after Ctrl-C
            proc.terminate()
            proc.wait()
            run = trial.study.trials[trial.number].user_attrs.get("run")
            if run:
                trial.set_user_attr("run", run)
            # failed without an "error" (not a reason to give up on its values), and queued again: the next
            # command runs the same values first (a grid's point would otherwise count as visited). Queued after
            # the fit stopped, not before: killed while it saves, the worker leaves the trial to the heartbeat's
            # retry, which would queue the values a second time.
            trial.set_user_attr("interrupted", True)
            trial.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            return float("nan")
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if returncode != 0:
        return failed_trial(trial, failure_reason(lines, returncode))
    # The worker's own study (not a new load_study: each would open its own connection pool, which stays open
    # until garbage collection; over many trials they fill PostgreSQL's max_connections). Optuna's cached storage
    # reads unfinished trials afresh, so this sees what the fit's OptunaReport wrote.
    fresh = trial.study.trials[trial.number]
    run = fresh.user_attrs.get("run")
    if run:
        trial.set_user_attr("run", run)
    values = list(fresh.intermediate_values.values())
    if not values and "no_validation" in fresh.user_attrs:
        return failed_trial(trial, f"no validation ran ({fresh.user_attrs['no_validation']}), so no {a.metric} to score "
                                   "the trial; give its fit at least one validation")  # fmt: skip
    if not values:
        return failed_trial(trial, f"no {a.metric} was logged (is it a validation metric of this config?)")
    if "pruned_at_step" in fresh.user_attrs:
        raise optuna.TrialPruned(f"pruned at step {fresh.user_attrs['pruned_at_step']}")
    return max(values) if a.direction == "maximize" else min(values)


def retry_callback():
    """Optuna's callback that queues a dead worker's trial again, and the RDBStorage argument it goes in: renamed in
    Optuna 4.9 (RetryFailedTrialCallback, `failed_trial_callback`, now deprecated)."""
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        return RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    except ImportError:  # Optuna < 4.9
        from optuna.storages import RetryFailedTrialCallback

        return RetryFailedTrialCallback, "failed_trial_callback"


def shown(url: str) -> str:
    """A storage URL as goemo prints it: its password masked (SQLAlchemy's own rendering)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy parses: RDBStorage below says so)
        return url


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file whatever its path holds: written as is, a ? or # would start the URL's query and
    a % an escape, and the study's database would be made elsewhere. SQLAlchemy 2.1 quotes them; an older one
    cannot, and Optuna would read braces as a template: such a path is refused."""
    from sqlalchemy.engine import URL, make_url

    url = URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)
    if make_url(url).database != str(path) or "{" in url or "}" in url:
        raise GoemoError(f"cannot name the study's database {path} in a SQLite URL with this SQLAlchemy (its path holds "
                         "?, braces or the like); run the sweep in another folder, or upgrade SQLAlchemy to 2.1")  # fmt: skip
    return url


def storage_for(a: argparse.Namespace):
    import optuna
    from sqlalchemy.engine import make_url

    url = a.storage or sqlite_url((a.sweep_dir.parent.parent / "sweeps.db").resolve())  # lightning_logs/sweeps.db
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 (RDBStorage below names what is wrong with the URL)
        password = None
    if password:  # each trial's fit gets the URL on its command line and keeps it in its config.yaml
        print(f"note: --storage {shown(url)} holds a password, which each trial's command line and config.yaml will "
              "show; keep it in ~/.pgpass or PGPASSWORD instead", file=sys.stderr)  # fmt: skip
    kwargs = {}
    if a.heartbeat > 0:
        retry, key = retry_callback()
        kwargs = {"heartbeat_interval": a.heartbeat, "grace_period": 2 * a.heartbeat, key: retry(max_retry=a.retries)}
    try:
        return url, optuna.storages.RDBStorage(url, **kwargs)
    except Exception as e:  # a bad URL, a server that is down, a driver that is not installed
        raise GoemoError(f"--storage {shown(url)}: cannot open the study database ({str(e).splitlines()[0][:200]})") from None


def finished(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def run_sweep(a: argparse.Namespace) -> dict:
    import optuna
    from optuna.trial import TrialState

    space = read_space(a.space) if a.space else {}
    if a.seeds:
        if "seed_everything" in space:
            raise GoemoError("--seeds and the space file's seed_everything both set the seeds; give one of them")
        space = {**space, "seed_everything": {"kind": "grid", "values": a.seeds}}
    if not space:
        raise GoemoError("nothing to search: give --space FILE or --seeds 42,1,7")
    grid = [k for k, s in space.items() if s["kind"] == "grid"]
    if grid and len(grid) < len(space):
        if a.seeds:
            raise GoemoError("--seeds runs a grid over seed_everything, and a grid searches every combination: make "
                             "every key of the space file a grid, or give the seeds as a grid in it")  # fmt: skip
        raise GoemoError(f"grid keys ({', '.join(grid)}) search every combination: make every key a grid, or none")
    total = math.prod(len(s["values"]) for s in space.values()) if grid else None
    trials = a.trials or total
    if not trials:
        raise GoemoError("--trials N is needed unless every key is a grid")
    if grid and trials > total:  # Optuna's GridSampler would run points again: one seed twice in a seed group
        raise GoemoError(f"--trials {trials}: the grid has {total} points, each run once; give --trials {total} or fewer, or leave it out")
    if a.prune and "seed_everything" in space:
        print("note: a sweep over seed_everything is not pruned: a seed group's mean needs every seed run to the end", file=sys.stderr)
        a.prune = False  # and every trial's config says so (OptunaReport's prune: false)
    if a.config and not Path(a.config).is_file():
        raise GoemoError(f"--config {a.config}: no such file")
    check_space(space, a.config, a.fit_args)
    a.sweep_dir.mkdir(parents=True, exist_ok=True)
    url, storage = storage_for(a)
    pruner = make_pruner(a.prune)
    study = optuna.create_study(study_name=a.study, storage=storage, pruner=pruner, direction=a.direction,
                                load_if_exists=True)  # fmt: skip
    check_recipe(study, a, space)
    study.sampler = make_sampler(study, space, grid, a.sampler_seed)

    mine: set[int] = set()  # the trials this command ran: --max-failures counts their failures, not other workers'

    def objective(trial) -> float:
        mine.add(trial.number)
        return run_trial(trial, a, space, url)

    def enough(study, trial) -> None:
        if finished(study) >= trials:
            study.stop()

    def failed() -> list:
        return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL and t.user_attrs.get("error")]

    def given_up() -> list:
        """Trials whose worker died (failed without a reason, not stopped by Ctrl-C) and that no retry runs again
        (--retries used up): Optuna's GridSampler counts their points as visited and would rerun another point."""
        all_trials = study.get_trials(deepcopy=False)
        # each retry lists the trials it runs again (read as a system attr: Optuna's getter warns it is experimental)
        retried = {n for t in all_trials for n in t.system_attrs.get("retry_history", [])}
        return [t for t in all_trials if t.state == TrialState.FAIL and t.params and t.number not in retried
                and not t.user_attrs.get("error") and not t.user_attrs.get("interrupted")]  # fmt: skip

    def done() -> int:  # a grid is done when each point finished, failed with a reason or was given up (once each)
        return finished(study) + (len({json.dumps(t.params, sort_keys=True) for t in failed() + given_up()}) if grid else 0)

    try:
        while done() < trials:
            running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
            if done() + running >= trials:  # the rest are in flight on other workers: wait for them
                if a.heartbeat <= 0:  # nothing would ever fail a dead worker's trial: do not wait forever
                    print(f"note: {running} trial(s) still running, on other workers or on dead ones (with --heartbeat 0 "
                          "nothing marks a dead worker's trial failed); this worker stops here", file=sys.stderr)  # fmt: skip
                    break
                import time

                time.sleep(min(5.0, a.heartbeat))
                optuna.storages.fail_stale_trials(study)  # a worker that died mid-trial: its trial is failed and queued again
                continue
            if grid and study.sampler.is_exhausted(study) and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                # a point Optuna counts as visited that done() cannot name (a trial that died before it took its values):
                # the GridSampler would run a random point again
                print(f"note: every grid point was tried but {trials - done()} left no result and no retry; this worker stops "
                      f"rather than run a point twice (see {a.sweep_dir / 'summary.md'})", file=sys.stderr)  # fmt: skip
                break
            study.optimize(objective, n_trials=1, callbacks=[enough])
            release_signals(a)  # held by run_trial while an interrupted trial is recorded
            if a.interrupted is not None:
                log = a.sweep_dir / f"trial_{a.interrupted}.log"
                raise Interrupted(f"trial {a.interrupted} stopped (marked failed, its log {log}); the same command runs "
                                  "its values again and goes on with the study")  # fmt: skip
            own = [t for t in failed() if t.number in mine]
            if len(own) >= a.max_failures:
                raise GoemoError(f"{len(own)} of this worker's trials failed (last: {own[-1].user_attrs['error']}); see {a.sweep_dir}")
    except BaseException:
        release_signals(a)
        # Interrupted, --max-failures, Ctrl-C while waiting: the summary still shows the study as it stands (what
        # `goemo.compare SWEEP_FOLDER` reads), and the reason the sweep stopped stays the one the worker gives
        try:
            summarize(study, a)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 (a database gone, a full disk, Ctrl-C again)
            print(f"note: {a.sweep_dir / 'summary.json'} was not updated ({(str(e).splitlines() or [type(e).__name__])[0]})",
                  file=sys.stderr)  # fmt: skip
        raise
    for t in given_up() if grid else []:
        deaths = len(t.system_attrs.get("retry_history", [])) + 1
        print(f"note: trial {t.number} ({', '.join(f'{k}={v}' for k, v in t.params.items())}) has no result: its worker "
              f"died {deaths} time(s) and it is not retried again; run the point as a plain fit, "
              f"`{shlex.join(['python', 'main.py', *fit_args(a, t.params)])}`, and compare it beside the sweep", file=sys.stderr)  # fmt: skip
    summary = summarize(study, a)
    own = [t for t in study.get_trials(deepcopy=False) if t.number in mine]
    if own and all(t.state == TrialState.FAIL for t in own):
        # Not one result: a failed command, as after --max-failures (which a grid of fewer points never reaches),
        # so scripts and job arrays see it in the exit status, not only in the summary.
        first = next((t.user_attrs["error"] for t in own if t.user_attrs.get("error")), "no reason recorded")
        raise GoemoError(f"all {len(own)} of this worker's trials failed; the first failure: {first}; see {a.sweep_dir}")
    return summary


def check_recipe(study, a: argparse.Namespace, space: dict) -> None:
    """Record what the study searches (objective, space, config, fit flags) when it is new; refuse to add trials of
    another recipe to it: the same --study (or space file name, or `seeds`) would mix two searches in one summary."""
    import hashlib

    config = hashlib.sha256(Path(a.config).read_bytes()).hexdigest() if a.config else None
    recipe = {"metric": a.metric, "direction": a.direction, "space": space, "config": config, "fit_args": a.fit_args}
    recipe = json.loads(json.dumps(recipe))  # as the database gives it back
    saved = study.user_attrs.get("recipe")
    if saved is None:
        study.set_user_attr("recipe", recipe)
        study.set_user_attr("metric", a.metric)
        return
    names = {"metric": "--metric", "direction": "--direction", "space": "--space/--seeds",
             "config": "--config's contents", "fit_args": "the flags after --"}  # fmt: skip
    diff = [names[k] for k in recipe if saved.get(k) != recipe[k]]
    if diff:
        verb = "differ" if len(diff) > 1 else "differs"
        raise GoemoError(f"study {a.study!r} in {shown(a.storage) if a.storage else 'lightning_logs/sweeps.db'} searches another recipe "
                         f"(its {', '.join(diff)} {verb}); give this search its own --study NAME, or repeat the "
                         "study's own command")  # fmt: skip


def summarize(study, a: argparse.Namespace) -> dict:
    import optuna
    from optuna.trial import TrialState

    from goemo.files import write_text

    trials = study.get_trials(deepcopy=False)
    count = {s.name.lower(): sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    summary: dict = {"study": study.study_name, "metric": a.metric, "direction": a.direction, "trials": count}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if done:
        best = study.best_trial
        run = best.user_attrs.get("run")
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params, "run": run,
                           "config": str(Path(run) / "config.yaml") if run else None}  # fmt: skip
        try:
            summary["importance"] = {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError, ImportError) as e:  # one trial, parameters that never varied, or Optuna
            # before 5.0 without scikit-learn (its default fANOVA needs it): the summary is written all the same
            summary["importance"] = f"not computed ({(str(e).splitlines() or [type(e).__name__])[0]})"
    summary["failed"] = [{"number": t.number, "error": t.user_attrs.get("error")} for t in trials if t.state == TrialState.FAIL]
    summary["runs"] = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "run": t.user_attrs["run"]}
                       for t in trials if t.user_attrs.get("run")]  # what `python -m goemo.compare SWEEP_FOLDER` reads  # fmt: skip
    keys = list(space_keys(trials))
    lines = [f"# Sweep {study.study_name}", "", f"objective: {a.direction} {a.metric}; trials: {count}", ""]
    lines += ["| trial | state | " + " | ".join(keys) + " | value | run or reason |", "|" + " --- |" * (len(keys) + 4)]
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        where = t.user_attrs.get("run") or t.user_attrs.get("error") or "-"
        lines.append("| " + " | ".join([str(t.number), t.state.name.lower(), *(str(t.params.get(k, "-")) for k in keys), value, where]) + " |")
    if "best" in summary:
        lines += ["", f"best: trial {summary['best']['number']}, {a.metric} {summary['best']['value']:.4f}, run {summary['best']['run']}",
                  f"importance: {summary.get('importance')}"]  # fmt: skip
    md = "\n".join(lines) + "\n"
    write_text(a.sweep_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_text(a.sweep_dir / "summary.md", md)
    print(md, end="")
    return summary


def space_keys(trials) -> dict:
    """The parameter names of the trials, in first-seen order."""
    return dict.fromkeys(k for t in trials for k in t.params)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m goemo.sweep", description=__doc__.splitlines()[0],
                                epilog="Flags after -- go to every trial's fit, e.g. -- --trainer.max_epochs 1")  # fmt: skip
    p.add_argument("-c", "--config", type=Path, default=None, help="the recipe every trial starts from")
    p.add_argument("--space", type=Path, default=None, help="the space file (see the module's help)")
    p.add_argument("--trials", type=int, default=None, help="finished trials (complete or pruned) wanted over all workers")
    p.add_argument("--seeds", default=None, help="run the config once per seed, e.g. 42,1,7 (a seed group)")
    p.add_argument("--study", default=None, help="study name (default: the space file's name, or seeds)")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL of the study database (default: sqlite in lightning_logs/)")
    p.add_argument("--metric", default="val/f1_macro", help="logged validation metric to optimise (default val/f1_macro)")
    p.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    p.add_argument("--no-prune", dest="prune", action="store_false", help="run every trial to the end")
    p.add_argument("--heartbeat", type=int, default=60, help="seconds between a worker's heartbeats (0: none, no retry)")
    p.add_argument("--retries", type=int, default=2, help="times a trial whose worker died is run again")
    p.add_argument("--max-failures", type=int, default=10, help="stop after this many of this command's trials failed (default 10; other workers' do not count)")
    p.add_argument("--sampler-seed", type=int, default=None,
                   help="makes a one-worker study repeatable (TPE's seed, plus the trials the study already has); "
                        "leave it unset when several workers share a study, or they draw the same values")  # fmt: skip
    argv = sys.argv[1:] if argv is None else list(argv)
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    a.fit_args = fit_args
    a.interrupted = None  # the number of a trial stopped by Ctrl-C or SIGTERM
    if a.seeds is not None:
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        if not seeds or len(set(seeds)) < len(seeds):
            raise GoemoError(f"--seeds {a.seeds!r}: give different integers separated by commas, e.g. 42,1,7")
        a.seeds = seeds
    if a.metric not in METRICS:
        raise GoemoError(f"--metric {a.metric!r} is not a validation metric goemo logs; use one of {', '.join(METRICS)}")
    best = "minimize" if a.metric == "val/loss" else "maximize"
    if a.direction != best:
        raise GoemoError(f"--metric {a.metric} with --direction {a.direction} would look for the worst run; use --direction {best}")
    if a.trials is not None and a.trials < 1:
        raise GoemoError(f"--trials must be at least 1, got {a.trials}")
    for flag, value, least in (("--max-failures", a.max_failures, 1), ("--heartbeat", a.heartbeat, 0), ("--retries", a.retries, 0)):
        if value < least:
            raise GoemoError(f"{flag} must be at least {least}, got {value}")
    a.study = a.study or (a.space.stem if a.space else "seeds")
    a.sweep_dir = Path("lightning_logs") / "sweeps" / a.study
    return a


class Interrupted(GoemoError):
    """Ctrl-C or SIGTERM: the sweep stops after its trial's fit has."""


_SIGTERM_SEEN = []


def _sigterm(signum: int, frame: Any) -> None:
    _SIGTERM_SEEN.append(signum)
    raise KeyboardInterrupt  # SIGTERM (scancel, a job's time limit) stops a worker as Ctrl-C does


def main(argv: Optional[list[str]] = None) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    with exit_on_error():
        try:
            run_sweep(parse_args(argv))
        except (KeyboardInterrupt, Interrupted) as e:  # KeyboardInterrupt: outside a trial, only the worker to stop
            what = "SIGTERM" if _SIGTERM_SEEN else "Ctrl-C"
            print(f"{what}: {str(e) or 'the sweep stopped'}", file=sys.stderr)  # an exception is true even when empty
            sys.exit(143 if _SIGTERM_SEEN else 130)


if __name__ == "__main__":
    main()
