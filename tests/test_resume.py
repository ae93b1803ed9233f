"""Crash and resume: kill -9 mid-epoch, SIGTERM, Ctrl-C, a nan loss; atomic checkpoint files.

A resumed fit (`fit --ckpt_path last`, new process, same version_N folder) must end exactly as the
uninterrupted `learned_run`: same validation metrics and thresholds, same weights.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from goemo.errors import GoemoError
from goemo.reliability import SafeCheckpointIO
from goemo.runs import load_checkpoint
from tests.conftest import LEARNING_ARGS, ONE_THREAD, RECORD, REPO, records, run_main
from tests.test_e2e import scalar_tags

SLOW = ("--trainer.callbacks+=tests.helpers.SlowSteps", "--trainer.callbacks.seconds", "0.25")
LAST = Path("lightning_logs/version_0/checkpoints/last.ckpt")


def loader_state(ckpt: dict) -> dict:
    """The train loader's saved position; its digest of the rows' token counts checked for form and left out."""
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert re.fullmatch(r"[0-9a-f]{16}", state.pop("lengths"))
    return state


def fit_args(learned_run: Path, tiny_model: Path) -> list[str]:
    """The learned run's command line, on its data and tokenized cache."""
    return ["fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(learned_run / "data"),
            "--data.cache_dir", str(learned_run / "cache"), *LEARNING_ARGS, *RECORD]  # fmt: skip


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python main.py ARGS` in the background, as run_main would run it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **ONE_THREAD}
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def saved_step(path: Path) -> int:
    return int(load_checkpoint(path, mmap=True)["global_step"]) if path.is_file() else -1


def wait_for_save(proc: subprocess.Popen, path: Path, min_step: int, timeout: float = 240) -> int:
    """Poll until `path` holds a checkpoint of at least `min_step` steps (atomic saves: always loadable)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (step := saved_step(path)) >= min_step:
            return step
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint of step >= {min_step} within {timeout} s")


def assert_same_as_uninterrupted(work: Path, learned_run: Path) -> None:
    assert records(work) == records(learned_run)  # val metrics and tuned thresholds of both epochs, exactly
    got = load_checkpoint(work / LAST)
    want = load_checkpoint(learned_run / LAST)
    assert got["global_step"] == want["global_step"] == 24
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)


def resume(work: Path) -> subprocess.CompletedProcess:
    r = run_main("fit", "--ckpt_path", "last", cwd=work, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "using run lightning_logs/version_0" in r.stderr
    assert not (work / "lightning_logs" / "version_1").exists()  # the same run folder
    return r


@pytest.mark.slow
def test_sigterm_then_kill_9_then_resume_ends_as_uninterrupted(learned_run, tiny_model, tmp_path):
    # 1. SIGTERM in the first epoch, a step or so after the first step save: the process saves its own last.ckpt
    proc = start(fit_args(learned_run, tiny_model) + list(SLOW), tmp_path)  # SlowSteps goes into config.yaml
    wait_for_save(proc, tmp_path / LAST, min_step=5)
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    step = saved_step(tmp_path / LAST)
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted by SIGTERM at step {step} (epoch 0): saved lightning_logs/version_0/checkpoints/last.ckpt; "
        f"resume with: python main.py fit --ckpt_path last"
    ), err[-3000:]
    assert "Traceback" not in err and 5 <= step < 12
    # the train loader's position: `step` batches of epoch 0 taken, and what the epoch's cut depends on
    assert loader_state(load_checkpoint(tmp_path / LAST)) == {
        "epoch": 0, "consumed": step, "batch_size": 8, "rows": 96, "seed": 42, "pool_batches": 64, "processes": 1, "order": 2}  # fmt: skip

    # 2. resumed (slow too: the run's config has SlowSteps), then kill -9 at a step save inside the second epoch
    proc = start(["fit", "--ckpt_path", "last"], tmp_path)
    step = wait_for_save(proc, tmp_path / LAST, min_step=13)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(tmp_path / LAST)
    assert ckpt["global_step"] == step and step % 12  # mid-epoch
    assert loader_state(ckpt) == {"epoch": 1, "consumed": step - 12, "batch_size": 8, "rows": 96, "seed": 42, "pool_batches": 64, "processes": 1, "order": 2}
    ckpts = sorted(p.name for p in (tmp_path / LAST.parent).glob("*.ckpt"))
    assert ckpts == ["epoch00-step12.ckpt", "last.ckpt"]  # one last.ckpt, never last-v1.ckpt

    # 3. resumed again, to the end: the same numbers and weights as never stopping
    resume(tmp_path)
    assert_same_as_uninterrupted(tmp_path, learned_run)
    run = tmp_path / "lightning_logs" / "version_0"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["ckpt_path"].endswith("last.ckpt")  # the resumed fit rewrote the run's config
    # TensorBoard: the three processes' event files in one folder; the last one's curve goes on from the step
    # it resumed at (what the killed process logged after its last flush is lost with it).
    events = sorted(run.glob("events.out.tfevents.*"))
    assert len(events) == 3 and len(scalar_tags(run)["val/f1_micro"]) == 2
    assert logged_steps(events[-1], "train/loss") == list(range(step, 24))


def logged_steps(events: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [ev.step for ev in EventFileLoader(str(events)).Load() for v in ev.summary.value if v.tag == tag]


@pytest.mark.slow
def test_ctrl_c_stops_after_the_batch_and_saves(learned_run, tiny_model, tmp_path):
    proc = start(fit_args(learned_run, tiny_model) + list(SLOW), tmp_path)
    wait_for_save(proc, tmp_path / LAST, min_step=5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    step = saved_step(tmp_path / LAST)
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted by Ctrl-C at step {step} (epoch 0): saved lightning_logs/version_0/checkpoints/last.ckpt; "
        f"resume with: python main.py fit --ckpt_path last"
    ), err[-3000:]
    assert "Traceback" not in err
    assert loader_state(load_checkpoint(tmp_path / LAST)) == {
        "epoch": 0, "consumed": step, "batch_size": 8, "rows": 96, "seed": 42, "pool_batches": 64, "processes": 1, "order": 2}  # fmt: skip


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(learned_run, tiny_model, tmp_path):
    nan = ("--trainer.callbacks+=tests.helpers.NanLossAt", "--trainer.callbacks.step", "7")
    r = run_main(*fit_args(learned_run, tiny_model), *nan, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: non-finite training loss (nan) at step 7 (epoch 0): training stopped and saved nothing; "
        "the last checkpoint, lightning_logs/version_0/checkpoints/last.ckpt (step 5), is kept; "
        "lower --model.learning_rate or check the data"
    )
    assert "Traceback" not in r.stderr
    ckpt = load_checkpoint(tmp_path / LAST)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# -- atomic checkpoint files -----------------------------------------------------------------------------
class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("fails half-way through the save")


def test_failed_save_keeps_the_previous_file(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "later": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left


def test_non_finite_weights_are_never_saved(tmp_path):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    with pytest.raises(GoemoError, match=r"not saving .*last\.ckpt: the weights are not finite \(first: w\)"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    # Under weight averaging the state dict holds the (still finite) mean; a resume trains on from these:
    averaged = {"state_dict": {"w": torch.ones(2)}, "current_model_state": {"w": torch.tensor([float("inf"), 1.0])}}
    with pytest.raises(GoemoError, match=r"not saving .*last\.ckpt: the weights are not finite \(first: w\)"):
        SafeCheckpointIO().save_checkpoint(averaged, path)
    assert load_checkpoint(path)["global_step"] == 1


def test_safe_checkpoint_io_refuses_weights_only_false(tmp_path):
    """Lightning's own loading with weights_only=False (a Trainer built in Python, `fit(ckpt_path=..., weights_only=False)`)
    would run code from the file: refused before the file is opened."""
    with pytest.raises(GoemoError, match="^weights_only=False: goemo loads checkpoints with weights_only=True only"):
        SafeCheckpointIO().load_checkpoint(tmp_path / "never-opened.ckpt", weights_only=False)


# A child that saves ever larger checkpoints over one path, forever; killed while one is being written.
SAVER = """
import sys, torch
from goemo.reliability import SafeCheckpointIO
io, path = SafeCheckpointIO(), sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "global_step": 0}, path)
print("ready", flush=True)
step = 0
while True:
    step += 1
    io.save_checkpoint({"state_dict": {"w": torch.full((16_000_000,), float(step))}, "global_step": step}, path)
"""


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"

    def mid_write() -> bool:  # a save's partial file already holds more than 1 MB
        for partial in tmp_path.glob(".last.ckpt.*.partial"):
            try:
                if partial.stat().st_size > 1_000_000:
                    return True
            except FileNotFoundError:  # renamed over last.ckpt in between
                pass
        return False

    end = time.monotonic() + 120
    try:
        while not mid_write():
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.005)
    finally:  # also when the wait failed: the saver loops forever
        proc.kill()
        proc.wait()
    ckpt = load_checkpoint(path)  # the previous save, whole
    step = ckpt["global_step"]
    assert ckpt["state_dict"]["w"].eq(float(step)).all()



@pytest.mark.slow
def test_last_ckpt_is_written_once_and_at_the_final_step(tiny_run, learned_run, tiny_model, tmp_path):
    """LastCheckpoint writes last.ckpt when training ends unless a checkpoint callback just wrote it at that step:
    never the same file twice, never a stale last.ckpt."""
    # every 5 steps over 24: saved at step 20; the second epoch was not the best, so no epoch save at 24 either
    assert load_checkpoint(learned_run / LAST)["global_step"] == 24
    # every 500 steps (the default): more than these fits have
    saves = [int(s) for s in (tiny_run / "saves.txt").read_text().split()]  # global step of every save
    assert saves == [6, 6, 12]  # epoch 0: best and last; epoch 1 (not better): last only, at training end
    assert load_checkpoint(tiny_run / LAST)["global_step"] == 12
    r = run_main(
        "fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_run / "data"),
        "--data.cache_dir", str(tiny_run / "cache"), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=tests.helpers.RecordSaves", "--trainer.callbacks.path", "saves.txt", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "saves.txt").read_text().split() == ["6", "6"]  # best and last, not last again at the end
    assert load_checkpoint(tmp_path / LAST)["global_step"] == 6


@pytest.mark.slow
def test_a_step_save_is_not_put_off_when_no_validation_follows_the_epochs_last_batch(tiny_run, tiny_model, tmp_path):
    """Validating every 4 of an epoch's 6 batches, the save due at step 6 (the epoch's last batch) was put off to
    the next validation, at step 10: a crash in between lost 4 more steps."""
    r = run_main(
        "fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_run / "data"),
        "--data.cache_dir", str(tiny_run / "cache"), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "4", "--last_checkpoint.every_n_train_steps", "6",
        "--trainer.callbacks+=tests.helpers.RecordSaves", "--trainer.callbacks.path", "saves.txt", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    saves = [int(s) for s in (tmp_path / "saves.txt").read_text().split()]
    assert 6 in saves and 12 in saves and saves == sorted(saves), saves
    assert load_checkpoint(tmp_path / LAST)["global_step"] == 12


@pytest.mark.slow
def test_a_self_distilled_fit_killed_mid_epoch_resumes_to_the_same_weights(learned_run, tiny_model, tmp_path):
    """model.self_distill: epoch 0's predictions (epoch 1's targets) ride in last.ckpt, so a fit killed in epoch 1
    and resumed ends with the weights and validation records of one never stopped."""
    args = [*fit_args(learned_run, tiny_model), "--model.self_distill", "0.5"]
    whole, work = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), work.mkdir()
    r = run_main(*args, cwd=whole, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start([*args, *SLOW], work)
    step = wait_for_save(proc, work / LAST, min_step=13)  # a step save in epoch 1, which reads epoch 0's predictions
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 12 < step < 24
    resume(work)
    got, want = load_checkpoint(work / LAST), load_checkpoint(whole / LAST)
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
    assert records(work) == records(whole)
    plain = load_checkpoint(learned_run / LAST)["state_dict"]["head.weight"]  # the same fit without self_distill
    assert not torch.allclose(want["state_dict"]["head.weight"], plain, atol=1e-4)


@pytest.mark.slow
def test_a_kill_in_the_validation_after_an_epochs_last_step_save_resumes_as_uninterrupted(learned_run, tiny_model, tmp_path):
    """Every 6 steps saves at step 12, epoch 0's last batch, before its validation: Lightning resumes such a save as
    a finished epoch and skips that validation (its thresholds, checkpoint and ranking), so the save waits for the
    validation. Step 24 too: the final last.ckpt holds the final validation's thresholds."""
    r = run_main(*fit_args(learned_run, tiny_model), "--last_checkpoint.every_n_train_steps", "6",
                 "--trainer.callbacks+=tests.helpers.ExitInValidation", "--trainer.callbacks.step", "12", cwd=tmp_path, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 137 and (tmp_path / "exited").is_file(), r.stderr[-3000:]
    assert saved_step(tmp_path / LAST) == 6  # step 12's save waited for the validation the kill cut short
    resume(tmp_path)
    assert_same_as_uninterrupted(tmp_path, learned_run)  # both validations ran: records, weights, thresholds
    names = sorted(p.name for p in (tmp_path / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))
    assert names == sorted(p.name for p in (learned_run / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))


@pytest.mark.slow
def test_a_run_resumed_from_another_folder_keeps_its_checkpoint_ranking(learned_run, tiny_model, tmp_path):
    """`fit --ckpt_path /abs/.../version_0` from another working folder: the checkpoints' folder is spelled otherwise
    than when they were ranked (relative then, absolute now), and Lightning dropped the ranking: the epoch-1 save
    then kept epoch 0's file beside its own and `best` named whichever came last."""
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir(), other.mkdir()
    proc = start([*fit_args(learned_run, tiny_model), *SLOW], cwd=work)
    wait_for_save(proc, work / LAST, min_step=20)  # in epoch 1: epoch 0 validated and ranked
    proc.kill()
    proc.wait()
    r = run_main("fit", "--ckpt_path", str(work / "lightning_logs/version_0"), cwd=other, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dirpath has changed" not in r.stderr
    assert records(work) + records(other) == records(learned_run)  # validation.jsonl is written where fit runs
    names = sorted(p.name for p in (work / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))
    assert names == sorted(p.name for p in (learned_run / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt"))
    state = next(v for k, v in load_checkpoint(work / LAST)["callbacks"].items() if k.startswith("ModelCheckpoint"))
    want = next(v for k, v in load_checkpoint(learned_run / LAST)["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert Path(state["best_model_path"]).name == Path(want["best_model_path"]).name
    assert state["best_model_score"] == want["best_model_score"]
    # The CLI built the resumed model with pretrained false (the checkpoint holds the weights): its saves still say
    # the encoder started from the pretrained weights, for goemo.compare.
    assert load_checkpoint(work / LAST)["encoder_start"] == load_checkpoint(learned_run / LAST)["encoder_start"] == "pretrained"


@pytest.mark.slow
def test_a_refused_resume_leaves_the_runs_config_as_it_was(tiny_run, tmp_path):
    """The config is written once the checkpoint is restored: a later `test --ckpt_path best` reads it."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    config = work / "lightning_logs/version_0/config.yaml"
    before = config.read_bytes()
    r = run_main("fit", "--ckpt_path", "last", "--model.pooling", "cls+mean", "--data.max_length", "16", cwd=work, env=ONE_THREAD)
    assert r.returncode == 2 and "error: " in r.stderr.strip().splitlines()[-1], r.stderr[-3000:]
    assert config.read_bytes() == before


@pytest.mark.slow
def test_a_resume_on_other_training_rows_or_another_self_distill_is_refused(tiny_run, tmp_path):
    """The checkpoint carries a digest of the training rows: a resume on another data folder (here one text changed,
    the same number of rows, which the batch sampler's own check lets through) or another data.holdout_fold would
    go on training other rows, and a self_distill table would give each row another text's predictions."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(tiny_run, work)
    data = tmp_path / "data"
    shutil.copytree(tiny_run / "data", data)
    train = (data / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    train[0] = "changed " + train[0]
    (data / "train.tsv").write_text("".join(train), encoding="utf-8")
    refused = "error: this fit started on other training rows (another data folder, data.holdout_fold"
    for args in (["--data.data_dir", str(data)], ["--data.holdout_fold", "0"]):
        r = run_main("fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", *args, cwd=work, env=ONE_THREAD)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(refused), r.stderr[-3000:]
    r = run_main("fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", "--model.self_distill", "0.5", cwd=work, env=ONE_THREAD)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == ("error: this fit started with model.self_distill 0.0, now 0.5; resume "
                                                 "with the settings it started with, or start a new fit")  # fmt: skip
    # Lightning would restore the old rates over the new one (and PyTorch fail on other parameter groups)
    for flag, was, now in (("--model.learning_rate", "2e-05", "0.001"), ("--model.layer_decay", "1.0", "0.8")):
        r = run_main("fit", "--ckpt_path", "last", "--trainer.max_epochs", "3", flag, now, cwd=work, env=ONE_THREAD)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
            f"error: this fit started with {flag[2:]} {was}, now {now}; resume with the settings"), r.stderr[-3000:]
    assert not list((work / "lightning_logs/version_0/checkpoints").glob("epoch02*"))  # nothing trained


def test_ctrl_c_again_while_saving_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C saves last.ckpt at the batch end; a second one landing in that save stops it (the previous
    file stays whole, SafeCheckpointIO) and the message names the kept checkpoint, not a save that never finished."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn

    from goemo.reliability import Interrupts

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / LAST.parent
    folder.mkdir(parents=True)
    torch.save({"global_step": 3}, folder / "last.ckpt")

    def save_checkpoint(path, weights_only=False):
        raise KeyboardInterrupt  # the second Ctrl-C, mid-save

    checkpoint = ModelCheckpoint(dirpath=folder)
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING, stage=RunningStage.TRAINING),
                              checkpoint_callbacks=[checkpoint], global_step=5, current_epoch=0, is_global_zero=True,
                              save_checkpoint=save_checkpoint)  # fmt: skip
    stop = Interrupts()
    stop._sigint = True  # the first Ctrl-C, seen at the batch end
    try:
        stop.on_exception(trainer, None, KeyboardInterrupt())
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped with the generic message")
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: interrupted by Ctrl-C at step 5 (epoch 0), then by Ctrl-C while saving: kept the last checkpoint, "
        f"{folder / 'last.ckpt'} (step 3); resume with: "
    ), err
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 3


def weights_and_records(work: Path) -> tuple[dict, list[dict]]:
    return load_checkpoint(work / LAST)["state_dict"], records(work)


def assert_same_run(work: Path, whole: Path) -> None:
    (got, got_records), (want, want_records) = weights_and_records(work), weights_and_records(whole)
    assert got_records == want_records  # every validation ran, with the same metrics and thresholds
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [2, 3], ids=["mid-accumulation", "validation-follows"])
def test_ctrl_c_waits_for_the_optimizer_step_and_the_validation_that_follow(learned_run, tiny_model, tmp_path, batch):
    """Accumulating 2 batches a step and validating every 4 batches: Ctrl-C during batch 2 (0-based; its step ends
    with batch 3) saved gradients of half a group that no checkpoint holds, and during batch 3 (validation follows)
    saved before that validation, which the resumed fit then skipped. Both now stop after batch 5 (6 taken, 3 steps)
    and resume as a fit never stopped."""
    args = [*fit_args(learned_run, tiny_model), "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "4"]
    whole, work = tmp_path / "whole", tmp_path / "work"
    whole.mkdir(), work.mkdir()
    assert run_main(*args, cwd=whole, env=ONE_THREAD).returncode == 0
    r = run_main(*args, "--trainer.callbacks+=tests.helpers.SignalAtBatch", "--trainer.callbacks.batch", str(batch), cwd=work, env=ONE_THREAD)
    assert r.returncode == 1 and "interrupted by Ctrl-C at step 3 (epoch 0)" in r.stderr, r.stderr[-3000:]
    assert loader_state(load_checkpoint(work / LAST))["consumed"] == 6
    assert len(records(work)) == 1  # the validation after batch 3 ran before the stop
    resume(work)
    assert_same_run(work, whole)


@pytest.mark.slow
def test_ctrl_c_stops_even_where_a_validation_follows_every_batch(learned_run, tiny_model, tmp_path):
    """Validating after every batch, a Ctrl-C that waited for each validation never stopped: it waits for one."""
    r = run_main(*fit_args(learned_run, tiny_model), "--trainer.val_check_interval", "1", "--trainer.max_epochs", "1",
                 "--trainer.callbacks+=tests.helpers.SignalAtBatch", "--trainer.callbacks.batch", "2", cwd=tmp_path, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 1 and "interrupted by Ctrl-C at step 4 (epoch 0): saved" in r.stderr, r.stderr[-3000:]
    assert len(records(tmp_path)) == 3  # the validations after steps 1, 2 and 3 (the one it waited for); not 4's


@pytest.mark.slow
def test_sigterm_inside_an_accumulation_group_saves_and_says_what_the_step_will_miss(learned_run, tiny_model, tmp_path):
    """Lightning raises SIGTERM after any training batch: one inside an accumulation group saves the group's
    position without the gradients taken so far (the resumed step misses them), and now says so."""
    r = run_main(*fit_args(learned_run, tiny_model), "--trainer.accumulate_grad_batches", "2", "--last_checkpoint.every_n_train_steps", "3",
                 "--trainer.callbacks+=tests.helpers.SignalAtBatch", "--trainer.callbacks.batch", "2",
                 "--trainer.callbacks.signal", "SIGTERM", cwd=tmp_path, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 143, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: interrupted by SIGTERM at step 1 (epoch 0), 1 batch(es) into an accumulation group of 2, whose step will miss "
        "their gradients: saved lightning_logs/version_0/checkpoints/last.ckpt; resume with: python main.py fit --ckpt_path last"
    ), r.stderr[-3000:]  # fmt: skip
    assert loader_state(load_checkpoint(tmp_path / LAST))["consumed"] == 3


@pytest.mark.slow
def test_a_step_save_that_a_mid_epoch_validation_follows_waits_for_it(learned_run, tiny_model, tmp_path):
    """Saving every step, accumulating 2 batches a step, validating every 4 batches: the save at step 2 (batch 3)
    came before its validation, and a kill in that validation resumed past it; after the resume, the first batch
    (half a step) saved again at step 1, without the gradients of that half."""
    args = [*fit_args(learned_run, tiny_model), "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "4",
            "--last_checkpoint.every_n_train_steps", "1"]  # fmt: skip
    whole, work = tmp_path / "whole", tmp_path / "work"
    whole.mkdir(), work.mkdir()
    assert run_main(*args, cwd=whole, env=ONE_THREAD).returncode == 0
    r = run_main(*args, "--trainer.callbacks+=tests.helpers.ExitInValidation", "--trainer.callbacks.step", "2",
                 "--trainer.callbacks+=tests.helpers.RecordSaves", "--trainer.callbacks.path", "saves.txt", cwd=work, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 137 and (work / "exited").is_file(), r.stderr[-3000:]
    assert saved_step(work / LAST) == 1  # step 2's save waited for the validation the kill cut short
    assert (work / "saves.txt").read_text().split() == ["1"]
    (work / "saves.txt").unlink()
    resume(work)
    assert (work / "saves.txt").read_text().split()[0] == "2"  # not step 1 again, half a group later
    assert_same_run(work, whole)


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 1])
def test_a_step_save_due_at_an_epochs_end_is_made_once_after_its_validation(learned_run, tiny_model, tmp_path, top_k):
    """Every 6 steps over epochs of 12: the save due at step 12 waits for epoch 0's end. At the default
    val_check_interval 1.0 Lightning's end-of-validation save does nothing for a callback that saves at epoch ends,
    so that save was dropped where the epoch checkpoint wrote no last.ckpt (save_top_k 0); and where it did (epoch 0
    is the best), last.ckpt was written twice at step 12, by this save and by the epoch checkpoint after it."""
    r = run_main(*fit_args(learned_run, tiny_model), "--last_checkpoint.every_n_train_steps", "6", "--checkpoint.save_top_k", str(top_k),
                 "--trainer.callbacks+=tests.helpers.RecordSaves", "--trainer.callbacks.path", "saves.txt", cwd=tmp_path, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    saves = [int(s) for s in (tmp_path / "saves.txt").read_text().split()]
    assert sorted(set(saves)) == [6, 12, 18, 24], saves
    assert saves.count(12) == 1 + top_k, saves  # last.ckpt once, and epoch 0's best checkpoint when kept


@pytest.mark.slow
def test_a_run_logged_by_a_csv_logger_is_not_resumed_into_another_folder(learned_run, tiny_model, tmp_path):
    """Only a TensorBoard logger's version is pinned: a CSV logger's resume logged into a new version_1, so the
    checkpoint callbacks' folder changed and Lightning dropped their ranking (`best` then named a later epoch); pinned
    to the run's folder, Lightning's CSV logger deletes the metrics.csv there. Refused, the run left as it was."""
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "."]
    r = run_main(*fit_args(learned_run, tiny_model), *csv, "--trainer.max_epochs", "1", cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = run_main("fit", "--ckpt_path", "last", "--trainer.max_epochs", "2", cwd=tmp_path, env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: resuming lightning_logs/version_0: its first logger (lightning.pytorch.loggers.CSVLogger) cannot log into "
        "the run's folder again; resume with --trainer.logger goemo.cli.HParamsTensorBoardLogger (goemo's default) or a "
        "TensorBoardLogger first"), r.stderr[-3000:]  # fmt: skip
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    r = run_main("test", "--ckpt_path", "best", cwd=tmp_path, env=ONE_THREAD)  # evaluations: a new folder, as Lightning's
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "metrics.csv").read_bytes() == before["metrics.csv"]


def test_cuda_random_states_restore_on_fewer_visible_gpus(monkeypatch):
    """One state per visible GPU was saved and restored: a run saved with 4 GPUs visible failed to resume with 2
    (IndexError in torch's set_rng_state_all). Now this device's state alone; older files give theirs for it."""
    from goemo.reliability import rng_states, set_rng_states

    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([d], dtype=torch.uint8) for d in range(4)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_to.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: set_to.extend([99] * len(states)))
    states = rng_states()
    assert torch.equal(states["cuda"], torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    set_rng_states(states)
    set_rng_states({**states, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in range(4)]})  # an older checkpoint
    set_rng_states({**states, "cuda": [torch.tensor([0], dtype=torch.uint8)]})  # saved with fewer GPUs than device 1
    assert set_to == [7, 1]


def interrupted(capsys, callbacks: list, save_checkpoint=None, global_step: int = 5, ckpt_path=None) -> str:
    """Interrupts.on_exception after a Ctrl-C seen at a batch end, on a stub trainer: what it printed."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import RunningStage, TrainerFn

    from goemo.reliability import Interrupts

    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING, stage=RunningStage.TRAINING), checkpoint_callbacks=callbacks,
                              global_step=global_step, current_epoch=0, is_global_zero=True, save_checkpoint=save_checkpoint,
                              ckpt_path=ckpt_path)  # fmt: skip
    stop = Interrupts()
    stop._sigint = True
    stop.on_exception(trainer, None, KeyboardInterrupt())
    return capsys.readouterr().err


def test_ctrl_c_saves_where_last_checkpoint_saves_not_in_another_callbacks_folder(tmp_path, monkeypatch, capsys):
    """A ModelCheckpoint of the user's (trainer.callbacks come first) has its own dirpath: the resume would miss a save there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from goemo.reliability import LastCheckpoint

    monkeypatch.chdir(tmp_path)
    saved = []
    err = interrupted(capsys, [ModelCheckpoint(dirpath=tmp_path / "extra"), LastCheckpoint(dirpath=str(tmp_path / "own"))],
                      lambda path, weights_only=False: saved.append(path))  # fmt: skip
    assert saved == [tmp_path / "own" / "last.ckpt"] and f"saved {tmp_path / 'own' / 'last.ckpt'}; resume with: " in err


def test_a_save_that_fails_during_an_interrupt_is_said_and_keeps_the_interrupt(tmp_path, monkeypatch, capsys):
    """A full disk while Ctrl-C (or SIGTERM, for a requeue) saves: the interrupt's exit, with the reason, not exit 2."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from goemo.errors import GoemoError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    torch.save({"global_step": 3}, tmp_path / "ckpts" / "last.ckpt")

    def full(path, weights_only=False):
        raise GoemoError("no space left on device while saving it")

    err = interrupted(capsys, [ModelCheckpoint(dirpath=tmp_path / "ckpts")], full)
    assert err.startswith("error: interrupted by Ctrl-C at step 5 (epoch 0), then the save failed (no space left on device while "
                          f"saving it): kept the last checkpoint, {tmp_path / 'ckpts' / 'last.ckpt'} (step 3); resume with: ")  # fmt: skip


def test_ctrl_c_before_a_resumed_fit_trains_says_its_checkpoint_stands(tmp_path, monkeypatch, capsys):
    """In setup (tokenizing) nothing is restored yet and the checkpoint folder is unresolved: not 'nothing to resume'."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    err = interrupted(capsys, [ModelCheckpoint()], global_step=0, ckpt_path="lightning_logs/version_0/checkpoints/last.ckpt")
    assert err == ("error: interrupted by Ctrl-C before training went on: lightning_logs/version_0/checkpoints/last.ckpt is as "
                   "it was; run the same command to resume\n")  # fmt: skip


def test_a_dataloader_worker_ignores_the_ctrl_c_handler_it_inherited(capsys):
    from goemo.reliability import Interrupts

    stop = Interrupts()
    stop._pid = -1  # another process's: this one is a forked worker
    stop._on_sigint(2, None)
    assert not stop._sigint and capsys.readouterr().err == ""
    stop._pid = os.getpid()
    stop._on_sigint(2, None)
    assert stop._sigint and capsys.readouterr().err.startswith("\nCtrl-C: stopping after this batch")


def test_a_save_into_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    from goemo.errors import GoemoError
    from goemo.reliability import SafeCheckpointIO

    (tmp_path / "afile").write_text("x")
    with pytest.raises(GoemoError, match=r"^cannot save .*afile/ck/last.ckpt \(Not a directory\); the previous file there is kept"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "afile" / "ck" / "last.ckpt")
