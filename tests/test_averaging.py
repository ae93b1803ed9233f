"""Weight averaging over epoch ends (goemo.averaging.EpochAveraging, `--weight_averaging.start_epoch`).

Unit tests drive the callback by hand on a small module; the slow ones fit the tiny BERT of `learned_run` with
averaging and compare with it: training is unchanged, the checkpoints hold the mean, a killed fit resumes exactly.
"""

import json
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

import goemo
from goemo.averaging import EpochAveraging
from goemo.data import read_split
from goemo.errors import GoemoError
from goemo.report import label_scores
from goemo.runs import load_checkpoint
from goemo.thresholds import apply_thresholds
from tests.conftest import LABELS4, ONE_THREAD, records, run_main
from tests.test_resume import LAST, SLOW, fit_args, resume, saved_step, start, wait_for_save


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.register_buffer("thresholds", torch.full((2,), 0.5))


def trainer(epoch: int, last: bool = True, fn: str = "fit") -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, is_last_batch=last, num_training_batches=4, accumulate_grad_batches=1,
                           state=SimpleNamespace(fn=fn))


def saved(module: nn.Module) -> dict:
    """The module's state dict as a file would hold it (copies, not views of the live tensors)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def end_epoch(cb: EpochAveraging, module: Small, epoch: int, weight: float) -> None:
    """Set the trained weights to `weight`, then run the epoch's last batch end."""
    with torch.no_grad():
        module.layer.weight.fill_(weight)
    cb.on_train_batch_end(trainer(epoch), module, None, None, 3)


def test_the_mean_starts_at_start_epoch_and_is_swapped_in_for_validation_only():
    cb, m = EpochAveraging(start_epoch=1), Small()
    end_epoch(cb, m, 0, 10.0)  # before start_epoch: not averaged, validation sees the trained weights
    cb.on_validation_epoch_start(trainer(0), m)
    assert m.layer.weight.eq(10.0).all()
    cb.on_validation_epoch_end(trainer(0), m)
    for epoch, w in ((1, 1.0), (2, 2.0), (3, 6.0)):
        end_epoch(cb, m, epoch, w)
    cb.on_train_batch_end(trainer(3), m, None, None, 3)  # the same epoch again: counted once
    cb.on_train_batch_end(trainer(4, last=False), m, None, None, 1)  # not an epoch's last batch
    with torch.no_grad():
        m.thresholds.fill_(0.3)
    cb.on_validation_epoch_start(trainer(3), m)
    assert m.layer.weight.eq(3.0).all()  # (1 + 2 + 6) / 3
    assert m.thresholds.eq(0.3).all()  # buffers stay the live ones
    cb.on_validation_epoch_end(trainer(3), m)
    assert m.layer.weight.eq(6.0).all()  # the trained weights back, exactly
    cb.on_validation_epoch_start(trainer(0, fn="validate"), m)  # `validate` of a checkpoint: it holds the mean already
    assert m.layer.weight.eq(6.0).all()


def test_validate_after_fit_keeps_the_mean_that_training_left_in_place():
    cb, m = EpochAveraging(start_epoch=0), Small()
    for epoch, w in ((0, 2.0), (1, 4.0)):
        end_epoch(cb, m, epoch, w)
    cb.on_train_end(trainer(1), m)
    assert m.layer.weight.eq(3.0).all()
    cb.on_validation_epoch_start(trainer(1, fn="validate"), m)
    cb.on_validation_epoch_end(trainer(1, fn="validate"), m)
    assert m.layer.weight.eq(3.0).all()  # not the trained 4.0: a following trainer.test scores the mean


def test_weights_only_checkpoints_are_refused_and_a_start_past_the_last_epoch_is_said(capsys):
    cb = EpochAveraging(start_epoch=2)

    def fit(weights_only: bool, max_epochs: int) -> SimpleNamespace:
        ckpt = SimpleNamespace(save_weights_only=weights_only)
        return SimpleNamespace(checkpoint_callbacks=[ckpt], max_epochs=max_epochs, is_global_zero=True)

    with pytest.raises(GoemoError, match="weight averaging needs full checkpoints: unset checkpoint.save_weights_only"):
        cb.setup(fit(True, 4), Small(), "fit")  # the files would hold the trained weights, not the mean
    cb.setup(fit(False, 3), Small(), "fit")
    assert capsys.readouterr().err == ""
    cb.setup(fit(False, 2), Small(), "fit")  # e.g. a 1-epoch smoke run of configs/minilm.yaml (start_epoch 1)
    assert capsys.readouterr().err == (
        "note: weight_averaging.start_epoch 2 averages no epoch of trainer.max_epochs 2 (epochs count from 0: 1 averages the last one)\n"
    )


def test_checkpoints_hold_the_mean_and_keep_the_trained_weights_for_resuming():
    cb, m = EpochAveraging(start_epoch=0), Small()
    ckpt = {"state_dict": saved(m)}
    cb.on_save_checkpoint(trainer(0), m, ckpt)
    assert "current_model_state" not in ckpt  # nothing averaged yet: saved as without averaging
    end_epoch(cb, m, 0, 1.0)
    end_epoch(cb, m, 1, 4.0)
    with torch.no_grad():
        m.thresholds.fill_(0.2)
    ckpt = {"state_dict": saved(m)}
    cb.on_save_checkpoint(trainer(1), m, ckpt)
    assert ckpt["state_dict"]["layer.weight"].eq(2.5).all() and ckpt["current_model_state"]["layer.weight"].eq(4.0).all()
    assert ckpt["state_dict"]["thresholds"].eq(0.2).all()
    cb.on_train_end(trainer(1), m)  # the mean in the module after fit; a save then still keeps the trained weights
    assert m.layer.weight.eq(2.5).all()
    after = {"state_dict": saved(m)}
    cb.on_save_checkpoint(trainer(1), m, after)
    assert after["current_model_state"]["layer.weight"].eq(4.0).all() and after["state_dict"]["layer.weight"].eq(2.5).all()

    # A resumed fit trains on from the trained weights and carries on the mean; test and predict keep the mean.
    tested = Small()
    tested.load_state_dict(ckpt["state_dict"])
    fresh = EpochAveraging(start_epoch=0)
    fresh.on_load_checkpoint(trainer(1, fn="test"), tested, ckpt)
    assert tested.layer.weight.eq(2.5).all()
    resumed = Small()
    resumed.load_state_dict(ckpt["state_dict"])  # what Lightning loads before the callbacks' hooks
    fresh.on_load_checkpoint(trainer(1), resumed, ckpt)
    fresh.load_state_dict(cb.state_dict())
    assert resumed.layer.weight.eq(4.0).all()
    end_epoch(fresh, resumed, 2, 7.0)
    fresh.on_validation_epoch_start(trainer(2), resumed)
    assert resumed.layer.weight.eq(4.0).all()  # (1 + 4 + 7) / 3
    assert set(fresh._mean) == {"layer.weight", "layer.bias"}  # frozen parameters are not averaged


def test_a_resumed_mean_goes_on_only_with_the_start_and_spacing_it_began_with():
    """A mean of epochs 0-1 resumed with start_epoch 2 would validate (1 + 4 + 7) / 3 where the config says 7."""
    cb, m = EpochAveraging(start_epoch=0), Small()
    end_epoch(cb, m, 0, 1.0)
    end_epoch(cb, m, 1, 4.0)
    state = cb.state_dict()
    for first, updates in ((2, 1), (1, 1), (0, 4)):
        with pytest.raises(GoemoError, match=rf"^weight_averaging: this fit's mean began at start_epoch 0 with "
                           rf"updates_per_epoch 1, now start_epoch {first} with updates_per_epoch {updates}; resume"):
            EpochAveraging(start_epoch=first, updates_per_epoch=updates).load_state_dict(state)
    again = EpochAveraging(start_epoch=0)
    again.load_state_dict(state)  # the same settings go on
    assert again._count == 2 and again._last == (1, 3)
    EpochAveraging(start_epoch=None).load_state_dict(state)  # averaging turned off for the rest: allowed
    fresh = EpochAveraging(start_epoch=2)  # nothing averaged yet: any start may go on
    fresh.load_state_dict(EpochAveraging(start_epoch=3).state_dict())
    # A checkpoint from before these keys: an averaged epoch before the new start is the mismatch it shows.
    old = {"count": 2, "last_epoch": 1, "last_batch": 3}
    with pytest.raises(GoemoError, match=r"^weight_averaging: this fit's mean began at epoch 1 or earlier with updates_per_epoch 1, now start_epoch 2"):
        EpochAveraging(start_epoch=2).load_state_dict(old)
    EpochAveraging(start_epoch=1).load_state_dict(old)

def test_averaging_turned_on_at_a_resume_past_its_start_says_the_mean_starts_later(capsys):
    """A fit that ran without averaging, resumed in epoch 3 with start_epoch 1: epochs 1-2 ended unaveraged."""
    def at(epoch: int) -> SimpleNamespace:
        return SimpleNamespace(current_epoch=epoch, is_global_zero=True)

    EpochAveraging(start_epoch=1).on_train_start(at(3), Small())
    assert capsys.readouterr().err == ("note: weight_averaging.start_epoch 1, but this fit resumes in epoch 3 with no mean "
                                       "begun: the mean starts with epoch 3's weights\n")  # fmt: skip
    for cb, epoch in ((EpochAveraging(start_epoch=1), 1), (EpochAveraging(start_epoch=1), 0), (EpochAveraging(), 3)):
        cb.on_train_start(at(epoch), Small())  # at or before its start, or no averaging: nothing missed
    began = EpochAveraging(start_epoch=1)
    began.load_state_dict({"count": 2, "last_epoch": 2, "last_batch": 3, "start_epoch": 1, "updates_per_epoch": 1})
    began.on_train_start(at(3), Small())  # a mean under way resumes whole
    assert capsys.readouterr().err == ""


def test_a_resumed_bf16_fit_carries_on_the_exact_mean_not_the_saved_rounded_one():
    """Under bf16-true the state_dict holds the mean rounded to bf16 (what validation scored); a resumed fit must go
    on from the float32 mean, or the rest of the averaging drifts from an uninterrupted fit's."""
    weights = [1.0, 1.0078125, 1.015625, 1.0234375, 1.03125]  # each exact in bf16, their running means are not

    def final_mean(resume_after: Optional[int]) -> float:
        cb, m = EpochAveraging(start_epoch=0), Small().to(torch.bfloat16)
        for epoch, w in enumerate(weights):
            end_epoch(cb, m, epoch, w)
            if epoch == resume_after:  # saved, then a new process resumes from the file
                ckpt = {"state_dict": saved(m)}
                cb.on_save_checkpoint(trainer(epoch), m, ckpt)
                assert ckpt["state_dict"]["layer.weight"].dtype == torch.bfloat16
                state, m = cb.state_dict(), Small().to(torch.bfloat16)
                m.load_state_dict(ckpt["state_dict"])
                cb = EpochAveraging(start_epoch=0)
                cb.on_load_checkpoint(trainer(epoch), m, ckpt)
                cb.load_state_dict(state)
        return cb._mean["layer.weight"][0, 0].item()

    assert final_mean(None) == sum(weights) / 5 == final_mean(1)
    ckpt = {"state_dict": saved(Small())}
    cb, m = EpochAveraging(start_epoch=0), Small()
    end_epoch(cb, m, 0, 1.0)
    cb.on_save_checkpoint(trainer(0), m, ckpt)
    assert "averaging_mean" not in ckpt  # float32 weights: the state_dict holds the mean exactly, nothing extra


def test_updates_per_epoch_averages_the_weights_after_evenly_spaced_batches():
    cb, m = EpochAveraging(start_epoch=1, updates_per_epoch=2), Small()  # 4 batches: after batches 2 and 4

    def after_batch(epoch: int, batch_idx: int, weight: float) -> None:
        with torch.no_grad():
            m.layer.weight.fill_(weight)
        cb.on_train_batch_end(trainer(epoch, last=batch_idx == 3), m, None, None, batch_idx)

    for batch_idx, w in enumerate((50.0, 60.0, 70.0, 80.0)):
        after_batch(0, batch_idx, w)  # before start_epoch
    for batch_idx, w in enumerate((90.0, 1.0, 100.0, 3.0)):
        after_batch(1, batch_idx, w)
    after_batch(1, 3, 200.0)  # the same batch again (a resumed fit): counted once
    cb.on_validation_epoch_start(trainer(1), m)
    assert m.layer.weight.eq(2.0).all() and cb.state_dict() == {"count": 2, "last_epoch": 1, "last_batch": 3,
                                                                "start_epoch": 1, "updates_per_epoch": 2}
    cb.on_validation_epoch_end(trainer(1), m)
    # A state saved before updates_per_epoch existed (epoch ends only) resumes after that epoch's end.
    old = EpochAveraging(start_epoch=1, updates_per_epoch=2)
    old.load_state_dict({"count": 1, "last_epoch": 1})
    old._mean = {"layer.weight": torch.full((2, 3), 4.0), "layer.bias": torch.zeros(2)}
    old.on_train_batch_end(trainer(1), m, None, None, 3)  # epoch 1 is in the mean already
    with torch.no_grad():
        m.layer.weight.fill_(6.0)
    old.on_train_batch_end(trainer(2, last=False), m, None, None, 1)
    old.on_validation_epoch_start(trainer(2), m)
    assert m.layer.weight.eq(5.0).all()  # (4 + 6) / 2
    # Every batch when k exceeds the batches; only the last one when their number is unknown.
    assert EpochAveraging(0, updates_per_epoch=9)._update_points(4) == {1, 2, 3, 4}
    assert EpochAveraging(0, updates_per_epoch=3)._update_points(10) == {4, 7, 10}
    assert EpochAveraging(0, updates_per_epoch=3)._update_points(float("inf")) == set()


def test_updates_land_on_optimizer_steps_when_gradients_accumulate():
    """With gradients accumulated over a batches, a point on a batch that ends no step added the step before's
    weights twice (10 batches, a 4, k 3: points {4, 7, 10}; steps after batches 4, 8 and 10)."""
    assert EpochAveraging(0, updates_per_epoch=3)._update_points(10, 4) == {4, 8, 10}
    assert EpochAveraging(0, updates_per_epoch=2)._update_points(10, 3) == {6, 10}  # steps after 3, 6, 9, 10
    cb, m = EpochAveraging(start_epoch=0, updates_per_epoch=2), Small()  # 6 batches, steps after batches 4 and 6
    for batch_idx in range(6):
        with torch.no_grad():
            m.layer.weight.fill_(float(batch_idx))
        t = SimpleNamespace(**{**vars(trainer(0, last=batch_idx == 5)), "num_training_batches": 6, "accumulate_grad_batches": 4})
        cb.on_train_batch_end(t, m, None, None, batch_idx)
    cb.on_validation_epoch_start(trainer(0), m)
    assert m.layer.weight.eq((3.0 + 5.0) / 2).all()  # the weights after batches 4 and 6 (was 3 and 6: batch 3 steps none)
    for n in range(1, 30):
        for a in range(1, 7):
            for k in range(1, 6):
                points = EpochAveraging(0, updates_per_epoch=k)._update_points(n, a)
                steps = -(-n // a)
                assert all(p % a == 0 or p == n for p in points) and n in points  # each after a step, the last last
                assert len(points) == min(k, steps)  # k distinct steps where the epoch has them
                if a == 1:
                    assert points == {-(-i * n // k) for i in range(1, k + 1)}  # as without accumulation


def test_unset_start_epoch_averages_nothing_and_a_negative_one_is_refused():
    cb, m = EpochAveraging(), Small()
    end_epoch(cb, m, 0, 1.0)
    ckpt = {"state_dict": saved(m)}
    cb.on_save_checkpoint(trainer(0), m, ckpt)
    assert "current_model_state" not in ckpt
    with pytest.raises(GoemoError, match="weight_averaging.start_epoch must be >= 0"):
        EpochAveraging(start_epoch=-1)
    with pytest.raises(GoemoError, match="weight_averaging.updates_per_epoch must be >= 1"):
        EpochAveraging(start_epoch=0, updates_per_epoch=0)


# -- the CLI, on the tiny BERT of learned_run ----------------------------------------------------
AVERAGE = ("--weight_averaging.start_epoch", "0", "--checkpoint.save_top_k", "-1")
CKPTS = Path("lightning_logs/version_0/checkpoints")


@pytest.fixture(scope="module")
def averaged_run(learned_run, tiny_model, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("averaged")
    r = run_main(*fit_args(learned_run, tiny_model), *AVERAGE, cwd=work, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def assert_state_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_an_averaged_fit_trains_as_without_and_saves_the_mean_of_the_epoch_ends(averaged_run, learned_run):
    first, last = load_checkpoint(averaged_run / CKPTS / "epoch00-step12.ckpt"), load_checkpoint(averaged_run / LAST)
    plain = load_checkpoint(learned_run / LAST)
    weights = lambda state: {k: v for k, v in state.items() if k != "thresholds"}  # those are tuned on the mean
    assert_state_close(weights(last["current_model_state"]), weights(plain["state_dict"]))  # training unchanged
    assert_state_close(first["state_dict"], first["current_model_state"])  # after one epoch the mean is the weights
    mean = {k: (v + last["current_model_state"][k]) / 2 if v.is_floating_point() else v
            for k, v in first["current_model_state"].items()}  # fmt: skip
    mean["thresholds"] = last["current_model_state"]["thresholds"]  # a buffer: the live one
    assert_state_close(last["state_dict"], mean)
    got, want = records(averaged_run), records(learned_run)
    assert got[0] == want[0]  # epoch 0 validated the trained weights (= the mean of one)
    assert got[1]["metrics"] != want[1]["metrics"]  # epoch 1 validated the mean of two epochs
    assert torch.equal(last["state_dict"]["thresholds"], torch.tensor(got[1]["thresholds"]))  # tuned on the mean

    # `test` scores the mean (the checkpoint's state_dict), as goemo.load does: the same report from both
    r = run_main("test", "--ckpt_path", str(averaged_run / LAST), cwd=averaged_run, env=ONE_THREAD)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    report = json.loads((averaged_run / "lightning_logs/version_0/test_report.json").read_text())
    split = read_split(learned_run / "data" / "test.tsv", num_labels=4)
    targets = np.zeros((len(split["labels"]), 4), dtype=bool)
    for i, ids in enumerate(split["labels"]):
        targets[i, ids] = True
    probs = goemo.load(str(averaged_run / LAST)).predict_proba(split["text"])
    want = label_scores(apply_thresholds(probs, np.full(4, 0.5, np.float32)), targets, LABELS4)
    prf = lambda scores: [scores["per_label"][n][k] for n in LABELS4 for k in ("precision", "recall", "f1")]
    assert prf(report["fixed"]) == pytest.approx(prf(want)) and report["fixed"]["exact_match"] == pytest.approx(want["exact_match"])


@pytest.mark.slow
def test_an_averaged_fit_killed_mid_epoch_resumes_to_the_same_mean(averaged_run, learned_run, tiny_model, tmp_path):
    proc = start([*fit_args(learned_run, tiny_model), *AVERAGE, *SLOW], tmp_path)
    step = wait_for_save(proc, tmp_path / LAST, min_step=13)  # a step save in epoch 1, after epoch 0 was averaged
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 12 < saved_step(tmp_path / LAST) == step < 24
    assert "current_model_state" in load_checkpoint(tmp_path / LAST)
    resume(tmp_path)
    got, want = load_checkpoint(tmp_path / LAST), load_checkpoint(averaged_run / LAST)
    assert_state_close(got["state_dict"], want["state_dict"])
    assert_state_close(got["current_model_state"], want["current_model_state"])
    assert records(tmp_path) == records(averaged_run)


QUARTERS = ("--weight_averaging.start_epoch", "0", "--weight_averaging.updates_per_epoch", "3", "--checkpoint.save_top_k", "-1")


def averaging_state(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("EpochAveraging"))


@pytest.mark.slow
def test_updates_per_epoch_averages_inside_epochs_and_resumes_after_a_kill(averaged_run, learned_run, tiny_model, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    r = run_main(*fit_args(learned_run, tiny_model), *QUARTERS, cwd=whole, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    last, by_epoch = load_checkpoint(whole / LAST), load_checkpoint(averaged_run / LAST)
    assert averaging_state(last) == {"count": 6, "last_epoch": 1, "last_batch": 11, "start_epoch": 0,
                                     "updates_per_epoch": 3}  # 12 batches: after 4, 8 and 12
    weights = lambda state: {k: v for k, v in state.items() if k != "thresholds"}
    assert_state_close(weights(last["current_model_state"]), weights(by_epoch["current_model_state"]))  # same training
    assert not torch.allclose(last["state_dict"]["head.weight"], by_epoch["state_dict"]["head.weight"])  # another mean

    proc = start([*fit_args(learned_run, tiny_model), *QUARTERS, *SLOW], killed)
    step = wait_for_save(proc, killed / LAST, min_step=17)  # after epoch 1's first update (step 16), before its second
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 16 < saved_step(killed / LAST) == step < 24
    resume(killed)
    got = load_checkpoint(killed / LAST)
    assert averaging_state(got) == averaging_state(last)
    assert_state_close(got["state_dict"], last["state_dict"])
    assert_state_close(got["current_model_state"], last["current_model_state"])
    assert records(killed) == records(whole)
