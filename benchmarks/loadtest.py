"""Load test of `python -m goemo.serve` with Locust: dynamic batching on against off, 16 and 64 clients.

    python benchmarks/loadtest.py lightning_logs/version_0            # 60 s per setting, on 127.0.0.1 only

For each server setting (batching on: up to 32 requests a forward pass, 10 ms window; off: one request a pass) the
server starts on a free local port and is warmed up; then headless Locust runs N clients (each posting one random
test-split text at a time, no pause) for `--seconds`, for N in `--users`. Reports requests/s, p50 and p99 latency,
failed requests, and the server's memory after warm-up and at the end: the RSS of its processes summed (pages they
share counted once per process) and their PSS (each shared page split between them; the memory they hold). Prints a
table; JSON and the table go to benchmarks/out/.

Before the servers start, the same model is timed in this process without HTTP (`model_gain`): texts predicted one
per call against random groups of as many texts as there are clients. Batching cannot make the server faster than
it makes the model, so that ratio bounds the server's on/off ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SETTINGS = {"batching on": ["--max-batch", "32", "--batch-timeout", "0.01"], "batching off": ["--max-batch", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process and all its descendants (Linux /proc), MiB. RSS counts each page a process maps, so
    its sum counts the pages the processes share (the model's weights in forked workers) once per process; PSS gives
    each process its share of them, so its sum is the memory the tree holds."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()  # Linux 4.14+
            pss += int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return round(rss / 1024, 1), round(pss / 1024, 1)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.read().decode().strip('"') == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: the server did not come up")


def model_gain(run: str, backend: str, texts: list[str], group: int, calls: int = 200, seed: int = 0) -> dict:
    """Milliseconds per text of `goemo.load(run, backend=...)`: one text a call, then `group` random texts a call.

    Each timing predicts the same number of texts (`calls` single calls against `calls // group` group calls).
    """
    from goemo import load

    clf = load(run, backend=backend)
    clf.predict(texts[:group])  # warm-up: lazy initialisation
    rng = random.Random(seed)
    out = {"backend": backend, "group": group}
    for name, size, n in (("single", 1, calls), ("grouped", group, max(1, calls // group))):
        picks = [rng.sample(texts, size) for _ in range(n)]
        start = time.perf_counter()
        for p in picks:
            clf.predict(p)
        out[f"{name}_ms_per_text"] = round((time.perf_counter() - start) * 1000 / (n * size), 2)
    out["gain"] = round(out["single_ms_per_text"] / out["grouped_ms_per_text"], 2)
    return out


def locust(url: str, users: int, seconds: int, prefix: Path, env: dict) -> dict:
    cmd = ["locust", "-f", str(REPO / "benchmarks" / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "10"]  # fmt: skip
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv", encoding="utf-8")))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    return {
        "requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
        "requests_per_s": round(float(total["Requests/s"]), 1), "p50_ms": float(total["50%"]), "p99_ms": float(total["99%"]),
    }  # fmt: skip


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run folder")
    p.add_argument("--users", default="16,64", help="client counts (default 16,64)")
    p.add_argument("--seconds", type=int, default=60, help="seconds per client count (default 60)")
    p.add_argument("--backend", default="torch", help="the server's backend (torch, onnx, int8)")
    p.add_argument("--only", default=None, help="one setting: 'on' or 'off'")
    p.add_argument("--server-args", default="", help="more flags for both servers, e.g. --server-args=--fast-queue")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "out")
    a = p.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    work = a.out_dir / f"load-{stamp}"
    work.mkdir()
    from goemo.classifier import load_run
    from goemo.ensemble import splits_of

    texts = [t.replace("\n", " ") for t in splits_of(load_run(a.run))["test"]["text"]]
    (work / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    users = [int(u) for u in a.users.split(",")]
    gains = [model_gain(a.run, a.backend, texts, n) for n in users]
    for g in gains:
        print(f"the model alone ({a.backend}): {g['single_ms_per_text']} ms a text one at a time, {g['grouped_ms_per_text']} ms "
              f"in groups of {g['group']}: {g['gain']}x", flush=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GOEMO_LOAD_TEXTS": str(work / "texts.txt")}
    results = []
    for name, flags in SETTINGS.items():
        if a.only and not name.endswith(a.only):
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "goemo.serve", a.run, "--port", str(port), "--backend", a.backend, *flags,
                                   *a.server_args.split()],
                                  env=env, stdout=open(work / f"server-{name.split()[1]}.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        try:
            wait_healthy(url, server)
            locust(url, 4, 5, work / "warmup", env)  # warm-up: the first requests pay for lazy initialisation
            rss_start, pss_start = tree_memory_mib(server.pid)
            for n in users:
                print(f"{name}, {n} clients, {a.seconds} s ...", flush=True)
                row = locust(url, n, a.seconds, work / f"{name.split()[1]}-{n}", env)
                rss_end, pss_end = tree_memory_mib(server.pid)
                results.append({"setting": name, "users": n, **row, "rss_start_mib": rss_start, "rss_end_mib": rss_end,
                                "pss_start_mib": pss_start, "pss_end_mib": pss_end})  # fmt: skip
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(server.pid, signal.SIGKILL)  # LitServe's worker processes too
            except ProcessLookupError:
                pass
    header = ("| setting | clients | requests/s | p50 (ms) | p99 (ms) | failed | server RSS after warm-up -> end (MiB) "
              "| server PSS after warm-up -> end (MiB) |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        lines.append(f"| {r['setting']} | {r['users']} | {r['requests_per_s']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['failures']} of {r['requests']} | {r['rss_start_mib']:,} -> {r['rss_end_mib']:,} | "
                     f"{r['pss_start_mib']:,} -> {r['pss_end_mib']:,} |")  # fmt: skip
    lines += ["", "| the model alone | texts a call | ms a text, one a call | ms a text, grouped | gain |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {g['backend']} | {g['group']} | {g['single_ms_per_text']} | {g['grouped_ms_per_text']} | {g['gain']}x |" for g in gains]
    table = "\n".join(lines)
    print(table)
    (a.out_dir / f"load-{stamp}.json").write_text(json.dumps({"server": results, "model": gains}, indent=2) + "\n")
    (a.out_dir / f"load-{stamp}.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
