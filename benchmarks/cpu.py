"""goemo against the seed notebook's recipe, on this machine, in one command.

    python benchmarks/cpu.py --train-rows 8192 --epochs 1

Writes a subset of the release (the first N training rows; dev and test whole or limited) to a temp
folder, then runs one after the other, each as a child process:

- seed:  `python benchmarks/seed_recipe.py` (HF Trainer, the notebook's recipe: batch 16/32, lr 2e-5)
- goemo: `python main.py fit --config configs/minilm.yaml` with a fresh tokenization cache, so startup
         and tokenization count, and the Throughput callback attached from the command line.

Same model, data and number of epochs; each side keeps its own recipe (batch sizes, schedule). An
untimed warm-up (imports, model files) comes first, so neither side starts from a colder cache. Per
child: wall time of the whole command and peak RSS (`os.wait4` on that child: the largest resident set
of the child and of any process it waited for, e.g. dataloader workers). Prints the machine and a
markdown table, and saves table, JSON and the children's logs to benchmarks/out/ (git-ignored).

A shared VM's speed drifts 10-15% from one run to the next, so one pair of runs can land either side of a
target. `--repeat N` runs the pair N times, alternating which side goes first (seed-goemo, goemo-seed, ...),
each goemo run with a fresh tokenization cache, and reports each figure's median with its range.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

# Throughput ceilings from issue 4, for MiniLM-L6 on the project's 2-core CPU (elsewhere the fractions
# are only indicative): the CPU does ~107 GFLOP/s of fp32 matmul and a training sample of GoEmotions
# (~18 tokens) costs ~1.18 GFLOP, forward and backward; a loop with no padding at batch 64 trains at
# ~78 samples/s. Evaluation (forward only) costs a third of training: ~267 samples/s, about 2.1x the
# seed recipe's evaluation rate.
TRAIN_CEILING = 78.0  # samples/s
EVAL_CEILING = 267.0  # samples/s


def machine() -> dict:
    """CPU model, cores and library versions (read without importing torch here)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    libs = {name: version(name) for name in ("torch", "transformers", "lightning", "datasets")}
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), **libs}


def copy_rows(src: Path, dst: Path, limit: Optional[int]) -> int:
    """Copy the first `limit` rows (all when None) of a TSV split byte for byte; returns the row count.

    Rows are counted with the csv module, so a quoted row spanning lines stays whole.
    """
    from goemo.data import read_release_text

    text = read_release_text(src)  # the embedded release's splits are gzipped
    reader = csv.reader(text.splitlines(keepends=True), delimiter="\t")
    rows = 0
    for _ in reader:
        rows += 1
        if limit is not None and rows == limit:
            break
    lines = text.splitlines(keepends=True)[: reader.line_num]
    dst.write_text("".join(lines), encoding="utf-8")
    return rows


def write_subset(data: Path, out: Path, train_rows: Optional[int], eval_rows: Optional[int]) -> dict[str, int]:
    """A data folder with the first rows of each split, and labels.txt."""
    from goemo.data import release_file

    out.mkdir(parents=True)
    shutil.copy(release_file(data, "labels.txt"), out / "labels.txt")
    return {
        "train": copy_rows(release_file(data, "train.tsv"), out / "train.tsv", train_rows),
        "dev": copy_rows(release_file(data, "dev.tsv"), out / "dev.tsv", eval_rows),
        "test": copy_rows(release_file(data, "test.tsv"), out / "test.tsv", eval_rows),
    }


def run_child(cmd: list[str], log: Path, cwd: Path, env: dict) -> dict:
    """Run `cmd` to completion; its wall time, peak RSS (MiB) and exit code. Output goes to `log`."""
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would mix in earlier children.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so tell Popen
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "returncode": proc.returncode}


def warm_up(env: dict, model_path: str) -> None:
    """Import the libraries and read the model files once, untimed, so whichever side runs first does
    not pay for a cold page cache that the second then finds warm."""
    code = "import torch, transformers, datasets, lightning, sklearn, tensorboard"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    model_dir = Path(model_path)
    if model_dir.is_dir():  # a Hub id is left to the children
        for f in model_dir.iterdir():
            if f.is_file():
                f.read_bytes()


def fmt(x: Optional[float], digits: int) -> str:
    """A number with `digits` decimals; digits < 0: a percentage."""
    if x is None:
        return "-"
    return f"{x:.0%}" if digits < 0 else f"{x:,.{digits}f}"


def summarize(runs: list[dict]) -> dict:
    """One side's figures over repeated runs: the median of each number, and under "range" its min and max."""
    out: dict = {"runs": len(runs), "range": {}}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if len(values) != len(runs):
            out[key] = runs[-1].get(key)  # text, or missing in some run: not summarised
            continue
        out[key] = statistics.median(values)
        out["range"][key] = (min(values), max(values))
    return out


def cell(side: dict, key: str, digits: int) -> str:
    """A table cell: the figure, and its range in brackets when it comes from several runs that differ."""
    text = fmt(side.get(key), digits)
    lo, hi = side.get("range", {}).get(key, (None, None))
    if side.get("runs", 1) > 1 and lo is not None and lo != hi:
        text += f" ({fmt(lo, digits)}-{fmt(hi, digits)})"
    return text


def table(res: dict, epochs: int) -> str:
    """The markdown comparison: seed, goemo, goemo/seed, and throughput as a fraction of the ceilings.

    With repeated runs each cell is the median with its (min-max) range, and the ratio is of the medians."""
    seed, goemo = res.get("seed", {}), res.get("goemo", {})
    rows = [
        ("train samples/s (training loop)", "train_samples_per_s", 1),
        (f"  of the ceiling ({TRAIN_CEILING:g}/s)", "train_of_ceiling", -1),
        ("eval samples/s", "val_samples_per_s", 1),
        (f"  of the ceiling ({EVAL_CEILING:g}/s)", "val_of_ceiling", -1),
        ("peak RSS (MiB)", "peak_rss_mib", 0),
        ("wall time of the command (s)", "wall_s", 1),
        ("  outside the train and eval loops (s)", "other_s", 1),
        (f"dev macro-F1 after {epochs} epoch(s)", "val_f1_macro", 4),
        (f"dev micro-F1 after {epochs} epoch(s)", "val_f1_micro", 4),
    ]
    out = ["| | seed (HF Trainer) | goemo | goemo/seed |", "| --- | ---: | ---: | ---: |"]
    for label, key, digits in rows:
        a, b = seed.get(key), goemo.get(key)
        ratio = f"{b / a:.2f}x" if a and b is not None and digits >= 0 else "-"
        out.append(f"| {label} | {cell(seed, key, digits)} | {cell(goemo, key, digits)} | {ratio} |")
    return "\n".join(out)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="pkg:goemo/goemotions", help="a folder with the official release (default: the copy inside goemo)")
    p.add_argument("--train-rows", type=int, default=8192, help="first N training rows (default: 8192)")
    p.add_argument("--eval-rows", type=int, default=None, help="first N dev/test rows (default: all)")
    p.add_argument("--epochs", type=int, default=1, help="epochs for both (default: 1)")
    p.add_argument("--model", default=None, help="model for both (default: the config's, MiniLM-L6)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "minilm.yaml", help="goemo's config (default: configs/minilm.yaml)")
    p.add_argument("--only", choices=("seed", "goemo"), default=None, help="run one side only")
    p.add_argument("--repeat", type=int, default=1, help="run the pair N times, alternating which goes first; report medians (default: 1)")
    p.add_argument("--goemo-args", default="", help="extra flags for main.py fit, e.g. '--data.train_batch_size 64'")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "out", help="default: benchmarks/out")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print and save the table and the JSON report, which is also returned."""
    a = parse_args(argv)
    sys.path.insert(0, str(REPO))  # this checkout's goemo, whatever is installed
    from goemo.hub import resolve_model_path

    import yaml

    config = a.config.resolve()
    model = a.model or (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("model_name_or_path")
    if not model:
        sys.exit(f"error: {config} names no model.model_name_or_path; pass --model")
    if Path(model).expanduser().is_dir():  # a local folder: absolute, as the children run in their own folders
        model = str(Path(model).expanduser().resolve())
    model_path = resolve_model_path(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env["PYTHONUNBUFFERED"] = "1"
    if Path(model_path).is_dir():
        env["HF_HUB_OFFLINE"] = "1"  # everything is local: no Hub lookups inside the timed commands

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = a.out_dir / f"cpu-{stamp}"
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, transformers "
          f"{info['transformers']}, lightning {info['lightning']}", flush=True)  # fmt: skip

    if a.repeat < 1:
        sys.exit(f"error: --repeat must be at least 1, got {a.repeat}")
    runs: dict[str, list[dict]] = {"seed": [], "goemo": []}
    with tempfile.TemporaryDirectory(prefix="goemo-bench-") as tmp:
        tmp = Path(tmp)
        from goemo.data import resolve_data_dir

        sizes = write_subset(resolve_data_dir(a.data).resolve(), tmp / "data", a.train_rows, a.eval_rows)
        print(f"data: {sizes['train']} train, {sizes['dev']} dev, {sizes['test']} test rows; {a.epochs} epoch(s)", flush=True)
        warm_up(env, model_path)
        for i in range(a.repeat):
            run = tmp / f"run{i}"  # a fresh tokenization cache and output folders each round
            run.mkdir()
            commands = {
                "seed": [
                    sys.executable, str(REPO / "benchmarks" / "seed_recipe.py"), "--data", str(tmp / "data"),
                    "--model", model_path, "--epochs", str(a.epochs), "--out", str(run / "seed.json"),
                    "--output-dir", str(run / "seed-run"),
                ],
                "goemo": [
                    sys.executable, str(REPO / "main.py"), "fit", "--config", str(config),
                    "--data.data_dir", str(tmp / "data"), "--data.cache_dir", str(run / "cache"),
                    "--trainer.max_epochs", str(a.epochs),
                    "--trainer.callbacks+=benchmarks.throughput.Throughput", "--trainer.callbacks.path", str(run / "goemo.json"),
                    *(["--model.model_name_or_path", model] if a.model else []), *shlex.split(a.goemo_args),
                ],
            }  # fmt: skip
            order = ["seed", "goemo"] if i % 2 == 0 else ["goemo", "seed"]  # neither side always runs first
            for name in order:
                if a.only not in (None, name):
                    continue
                print(f"running {name}" + (f" ({i + 1}/{a.repeat})" if a.repeat > 1 else "") + " ...", flush=True)
                log = Path(f"{prefix}-{name}" + (f"-{i + 1}" if a.repeat > 1 else "") + ".log")
                child = run_child(commands[name], log, cwd=run, env=env)  # cwd: lightning_logs, checkpoints stay in tmp
                if child["returncode"] != 0:
                    tail = log.read_text(errors="replace").splitlines()[-25:]
                    sys.exit(f"error: {name} exited with {child['returncode']}; log: {log}\n" + "\n".join(tail))
                r = {**json.loads((run / f"{name}.json").read_text()), **child}
                # startup, imports, tokenization, model load, checkpoints: what the loops' clocks leave out
                r["other_s"] = round(child["wall_s"] - r["train_time_s"] - r["val_time_s"], 2)
                r["train_of_ceiling"] = r["train_samples_per_s"] / TRAIN_CEILING if r.get("train_samples_per_s") else None
                r["val_of_ceiling"] = r["val_samples_per_s"] / EVAL_CEILING if r.get("val_samples_per_s") else None
                runs[name].append(r)
                print(f"  {name}: {child['wall_s']} s, peak RSS {child['peak_rss_mib']} MiB", flush=True)
    results = {name: summarize(rs) if len(rs) > 1 else rs[0] for name, rs in runs.items() if rs}

    md = table(results, a.epochs)
    header = (
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}\n"
        f"data: {sizes['train']} train rows, {sizes['dev']} dev rows; model: {model}; {a.epochs} epoch(s)"
        + (f"; median (min-max) of {a.repeat} runs per side, ratios of the medians" if a.repeat > 1 else "")
        + "\n"
    )
    print("\n" + header + "\n" + md)
    report = {"args": {k: str(v) for k, v in vars(a).items()}, "machine": info, "data_rows": sizes, "results": results, "runs": runs}
    Path(f"{prefix}.md").write_text(header + "\n" + md + "\n")
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nsaved {prefix}.md, {prefix}.json and the logs")
    return report


if __name__ == "__main__":
    main()
