"""One study shared by two workers through PostgreSQL; one worker is killed with kill -9 mid-trial.

PostgreSQL refuses to run as root, so the server is started as the unprivileged user `nobody` in a temp folder
(as the current user when that is not root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, write_tiny_data
from tests.test_research import space_file, tiny_fit_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="goemo-pg-"))  # not under pytest's tmp folders: those are root's alone (0700)
    data, port = folder / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    subprocess.run([*as_user, "initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    opts = f"-k {folder} -p {port} -h 127.0.0.1"
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "start"], check=True, capture_output=True)
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def worker(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "goemo.sweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(postgres_url, tmp_path, tiny_model):
    import optuna
    from goemo.sweep import retry_callback
    from optuna.trial import TrialState

    data = write_tiny_data(tmp_path / "data")
    space = space_file(tmp_path, "model.learning_rate: {float: [1.0e-3, 1.0e-1], log: true}\n")
    fit = [*tiny_fit_args(tiny_model, data, tmp_path / "cache"), "--trainer.callbacks+=tests.helpers.SlowSteps",
           "--trainer.callbacks.seconds", "0.3"]  # fmt: skip
    args = ["--space", str(space), "--study", "pg", "--trials", "3", "--storage", postgres_url, "--heartbeat", "2",
            "--no-prune", "--", *fit]  # fmt: skip
    # One storage for all of the test's reads: each load_study(url) opens a connection pool that stays open until
    # garbage collection, and polling with new ones fills the server's max_connections.
    storage = optuna.storages.RDBStorage(postgres_url)
    a = worker(args, tmp_path)
    # wait until worker a runs a trial, then start b and kill a (and so its fit) with kill -9
    end = time.monotonic() + 180
    while True:
        assert a.poll() is None, a.communicate()[1][-3000:]
        assert time.monotonic() < end, "worker a started no trial"
        try:
            study = optuna.load_study(study_name="pg", storage=storage)
            if any(t.state == TrialState.RUNNING for t in study.get_trials()):
                break
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    b = worker(args, tmp_path)
    time.sleep(3)
    a.send_signal(signal.SIGKILL)
    a.wait()
    _, err = b.communicate(timeout=600)
    assert b.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="pg", storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3  # exactly the trials asked for
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(killed) == 1
    retried = [t for t in trials if retry_callback()[0].retried_trial_number(t) == killed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == killed[0].params
    runs = [t.user_attrs["run"] for t in trials if t.state == TrialState.COMPLETE]
    assert len(set(runs)) == 3 and all((Path(r) / "config.yaml").is_file() for r in runs)
