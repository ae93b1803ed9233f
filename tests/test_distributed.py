"""Scale-out: the batch sampler deals batches to ranks itself; 2-process DDP on the CPU (gloo) scores like 1 process."""

import itertools
import json
import math
import random
import re
import shutil

import pytest
import yaml
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from goemo.batching import LengthGroupedBatchSampler, ResumableDataLoader
from goemo.errors import GoemoError
from goemo.runs import load_checkpoint
from tests.conftest import LEARNING_ARGS, ONE_THREAD, RECORD, records, run_main

LENGTHS = [random.Random(0).randint(3, 40) for _ in range(101)]


def batches(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


# -- the sampler, one process -------------------------------------------------------------------------
@pytest.mark.parametrize("pool_batches", [64, 1])  # length-grouped, plain random
def test_training_epoch_covers_every_row_once(pool_batches):
    s = LengthGroupedBatchSampler(LENGTHS, 8, shuffle=True, seed=3, pool_batches=pool_batches)
    got = batches(s)
    assert len(got) == len(s) == 13 and sorted(i for b in got for i in b) == list(range(101))


def test_lightning_sets_the_epoch():
    # Lightning calls set_epoch on dataloader.batch_sampler.sampler, as on a torch BatchSampler
    s = LengthGroupedBatchSampler(LENGTHS, 8, shuffle=True, seed=3)
    loader = DataLoader(list(range(101)), batch_sampler=s)
    first = batches(s)
    _set_sampler_epoch(loader, 1)
    assert s.epoch == 1 and batches(s) != first
    _set_sampler_epoch(loader, 0)
    assert batches(s) == first  # deterministic per (seed, epoch)


def test_loader_resumes_where_the_epoch_stopped():
    def loader():
        s = LengthGroupedBatchSampler(LENGTHS, 8, shuffle=True, seed=3)
        return ResumableDataLoader(list(range(101)), batch_sampler=s, collate_fn=list)

    a = loader()
    _set_sampler_epoch(a, 2)
    whole = list(a)
    it = iter(a)
    taken = [next(it) for _ in range(5)]
    state = a.state_dict()
    assert taken == whole[:5] and state == {"epoch": 2, "consumed": 5, "batch_size": 8, "rows": 101, "seed": 3, "pool_batches": 64,
                                         "lengths": a.batch_sampler._lengths_digest(), "processes": 1, "order": 2}
    b = loader()  # a new process
    b.load_state_dict(state)
    _set_sampler_epoch(b, 2)  # Lightning sets the same epoch again
    assert list(b) == whole[5:]
    assert list(b) == whole  # the next pass over the same epoch starts over
    _set_sampler_epoch(b, 3)
    assert b.state_dict() == {"epoch": 3, "consumed": 0, "batch_size": 8, "rows": 101, "seed": 3, "pool_batches": 64,
                              "lengths": a.batch_sampler._lengths_digest(), "processes": 1, "order": 2}


# -- the sampler, several ranks ---------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3, 4])
def test_training_batches_are_dealt_out_in_equal_numbers(world):
    one = batches(LengthGroupedBatchSampler(LENGTHS, 8, shuffle=True, seed=3))
    ranks = [LengthGroupedBatchSampler(LENGTHS, 8, shuffle=True, seed=3, num_replicas=world, rank=r) for r in range(world)]
    got = [batches(s) for s in ranks]
    assert {len(b) for b in got} == {len(ranks[0])} == {-(-13 // world)}  # every rank steps together
    dealt = [b for i in range(len(got[0])) for b in (g[i] for g in got)]
    assert dealt[:13] == one and all(b in one for b in dealt[13:])  # one process's order, the first repeated


@pytest.mark.parametrize("n,bs,world", [(101, 8, 2), (101, 32, 3), (32, 8, 2), (5, 32, 4), (64, 5, 3)])
def test_evaluation_scores_every_row_exactly_once(n, bs, world):
    lengths = LENGTHS[:n] if n <= len(LENGTHS) else LENGTHS
    ranks = [LengthGroupedBatchSampler(lengths, bs, shuffle=False, num_replicas=world, rank=r) for r in range(world)]
    got = [batches(s) for s in ranks]
    assert len({len(b) for b in got}) == 1 and len(got[0]) == len(ranks[0])
    rows = [i for g in got for b in g for i in b]
    assert sorted(rows) == list(range(len(lengths)))
    assert all(0 < len(b) <= bs for g in got for b in g)


@pytest.mark.parametrize("n", [101, 96])  # 13 batches of 8 (divides no world size), 12 (divides 2, 3 and 4)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_evaluation_batches_are_one_process_batches_halved_to_divide(world, n):
    lengths = LENGTHS[:n]
    one = batches(LengthGroupedBatchSampler(lengths, 8, shuffle=False))
    ranks = [batches(LengthGroupedBatchSampler(lengths, 8, shuffle=False, num_replicas=world, rank=r)) for r in range(world)]
    dealt = [b for i in range(len(ranks[0])) for b in (g[i] for g in ranks)]  # batch i went to rank i % world
    assert [i for b in dealt for i in b] == [i for b in one for i in b]  # the same rows in the same order
    assert len(one) <= len(dealt) < len(one) + world and len(dealt) % world == 0
    cuts = lambda bs: set(itertools.accumulate(len(b) for b in bs))  # noqa: E731
    assert cuts(one) <= cuts(dealt)  # only splits: no batch mixes rows that the one-process run kept apart
    assert (dealt == one) == (len(one) % world == 0)  # when they divide: the same batches, so the same padding


def test_device_count_reads_the_parsed_devices_as_lightning_does():
    from types import SimpleNamespace

    from goemo.cli import device_count

    cases = [(2, "cpu", 2), ("2", "cpu", 2), ([0, 1], "gpu", 2), ("0,1", "gpu", 2), ("0,", "gpu", 1), (1, "cpu", 1),
             ("auto", "cpu", 1), ("auto", "gpu", torch.cuda.device_count() if torch.cuda.is_available() else 1)]  # fmt: skip
    for devices, accelerator, n in cases:
        assert device_count(SimpleNamespace(devices=devices, accelerator=accelerator)) == n, (devices, accelerator)


def test_too_few_evaluation_rows_for_the_processes():
    with pytest.raises(GoemoError, match="3 evaluation rows cannot be cut into equal numbers of batches for 4 processes"):
        LengthGroupedBatchSampler([5, 6, 7], 2, shuffle=False, num_replicas=4, rank=0)
    with pytest.raises(GoemoError, match="for 4 processes; use fewer devices$"):  # no larger batch helps 3 rows
        LengthGroupedBatchSampler([5, 6, 7], 1, shuffle=False, num_replicas=4, rank=0)
    with pytest.raises(GoemoError, match="5 evaluation rows .* 2 processes; use fewer devices or an evaluation batch size above 1"):
        LengthGroupedBatchSampler([5, 6, 7, 8, 9], 1, shuffle=False, num_replicas=2, rank=0)


def test_one_row_batches_are_joined_in_pairs_when_halving_cannot_divide():
    """Rows of four lengths at batch size 2 are four one-row batches (a length change ends a half-full batch):
    three processes get three batches, the two longest rows joined."""
    ranks = [batches(LengthGroupedBatchSampler([1, 6, 5, 3], 2, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert ranks == [[[1, 2]], [[3]], [[0]]]


@pytest.mark.parametrize("rank", [0, 1])
def test_notes_are_said_by_rank_zero_alone(rank, monkeypatch, capsys):
    from lightning.pytorch.utilities import rank_zero_only

    from goemo.cli import note

    monkeypatch.setattr(rank_zero_only, "rank", rank)  # what Lightning reads from LOCAL_RANK/RANK at import
    note("something changed")
    assert capsys.readouterr().err == ("note: something changed\n" if rank == 0 else "")


@pytest.mark.parametrize("loss, said", [(float("nan"), "(nan)"), (0.7, "(on another process)")])
def test_a_non_finite_loss_on_any_rank_stops_every_rank_saying_which(loss, said, tmp_path):
    from types import SimpleNamespace

    from goemo.reliability import StopOnNonFiniteLoss

    decided = []
    strategy = SimpleNamespace(reduce_boolean_decision=lambda bad, all: decided.append(bad) or True)  # another rank's nan
    trainer = SimpleNamespace(world_size=2, strategy=strategy, checkpoint_callbacks=[], global_step=5, current_epoch=1)
    with pytest.raises(GoemoError, match="^" + re.escape(f"non-finite training loss {said} at step 5 (epoch 1)")):
        StopOnNonFiniteLoss().on_before_backward(trainer, None, torch.tensor(loss))
    assert decided == [math.isnan(loss)]  # this rank's own verdict went into the shared decision


# -- DDP on the CPU ----------------------------------------------------------------------------------
def ddp(*args: str) -> tuple[str, ...]:
    return ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", *args)


@pytest.mark.slow
def test_two_process_validation_scores_like_one(learned_run, tiny_model, tmp_path):
    ckpt = tmp_path / "fixed.ckpt"  # outside any run folder: each validate logs into its own folder
    (best,) = (learned_run / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    shutil.copy(best, ckpt)
    common = ("validate", "--model.model_name_or_path", str(tiny_model), "--model.pooling", "mean",
              "--data.data_dir", str(learned_run / "data"), "--data.cache_dir", str(learned_run / "cache"),
              "--data.eval_batch_size", "8", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt), *RECORD)  # fmt: skip
    results = {}
    for n, extra in ((1, ("--trainer.devices", "1", "--trainer.accelerator", "cpu")), (2, ddp())):
        work = tmp_path / f"p{n}"
        work.mkdir()
        r = run_main(*common, *extra, cwd=work, env=ONE_THREAD, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results[n] = records(work)
        assert len(results[n]) == 1  # rank 0 alone records (as it alone writes configs and reports)
        assert (work / "lightning_logs" / "version_0" / "config_validate.yaml").is_file()
        assert not (work / "lightning_logs" / "version_1").exists()
    one, two = results[1][0], results[2][0]
    assert two["thresholds"] == one["thresholds"]  # tuned on predictions gathered from both ranks
    for name in ("f1_micro", "f1_macro", "exact_match", "f1_micro_tuned", "f1_macro_tuned", "exact_match_tuned"):
        assert two["metrics"][f"val/{name}"] == one["metrics"][f"val/{name}"], name
    assert two["metrics"]["val/loss"] == pytest.approx(one["metrics"]["val/loss"], abs=1e-6)
    assert 0.5 < one["metrics"]["val/f1_micro"] < 1.0  # a model that has learned something, not a trivial score


@pytest.mark.slow
@pytest.mark.parametrize("strategy, runs_as", [("auto", "ddp"), ("ddp_spawn", "ddp_spawn")])
def test_two_process_fit_trains_and_rank_zero_saves(learned_run, tiny_model, tmp_path, strategy, runs_as):
    """ddp_spawn: rank 0 hands the trained weights to the main process in a file of the state dict alone."""
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(learned_run / "data"),
                 "--data.cache_dir", str(learned_run / "cache"), *LEARNING_ARGS, "--trainer.max_epochs", "1",
                 "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", strategy, cwd=tmp_path,
                 env=ONE_THREAD, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # strategy `auto` picks DDP for two devices; mean pooling (LEARNING_ARGS) needs it to look for unused parameters
    note = f"note: mean pooling leaves the encoder's pooler unused, so DDP runs as {runs_as}_find_unused_parameters_true"
    assert r.stderr.count(note) == 1, r.stderr[-3000:]  # said once, though every rank parses the command
    cfg = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert cfg["trainer"]["strategy"] == f"{runs_as}_find_unused_parameters_true"  # said in the run's config
    run = tmp_path / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["epoch00-step6.ckpt", "last.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6  # 12 batches over 2 ranks
    assert (run / "config.yaml").is_file() and not (tmp_path / "lightning_logs" / "version_1").exists()
    assert torch.isfinite(load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]["head.weight"]).all()


@pytest.mark.slow
def test_two_process_self_distill_reads_both_ranks_predictions(learned_run, tiny_model, tmp_path):
    """model.self_distill under DDP: each rank predicts its own rows; the next epoch's targets hold every row's."""
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(learned_run / "data"),
                 "--data.cache_dir", str(learned_run / "cache"), *LEARNING_ARGS, "--trainer.max_epochs", "2",
                 "--model.self_distill", "0.5", *ddp(), cwd=tmp_path, env=ONE_THREAD, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")["self_distill"]
    assert state["epoch"] == 1 and state["prev"].shape[0] == 96
    assert not state["prev"].isnan().any()  # epoch 0's predictions from both ranks
    # epoch 1's from both ranks too: the file is rank 0's, and a fit resumed from it must not lose rank 1's rows
    assert not state["next"].isnan().any()


@pytest.mark.slow
def test_sigterm_to_rank_zero_before_the_loops_is_one_line(learned_run, tiny_model, tmp_path):
    """Rank 0 stops with its one line; the other rank, waiting at a collective, is ended with it (no traceback)."""
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(learned_run / "data"),
                 "--data.cache_dir", str(learned_run / "cache"), *LEARNING_ARGS, "--trainer.max_epochs", "1",
                 *ddp("--trainer.callbacks+=tests.helpers.TermRank0InSetup"), cwd=tmp_path, env=ONE_THREAD, timeout=300)  # fmt: skip
    assert r.returncode == 143, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: interrupted by SIGTERM outside the training and evaluation loops (loading, tokenizing): nothing more was saved"
    )
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_an_error_on_rank_zero_alone_ends_every_rank_with_its_one_line(learned_run, tiny_model, tmp_path):
    """An error raised on rank 0 alone (here its save refusing non-finite weights) left the other rank waiting at
    the save's barrier: a traceback on gloo once rank 0 was gone, a wait for the process-group timeout under NCCL."""
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(learned_run / "data"),
                 "--data.cache_dir", str(learned_run / "cache"), *LEARNING_ARGS, "--trainer.max_epochs", "2",
                 *ddp("--trainer.callbacks+=tests.helpers.NanWeightsOnRank0"), cwd=tmp_path, env=ONE_THREAD, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: not saving "), r.stderr[-3000:]
    assert "the weights are not finite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    saved = list((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in saved] == ["last.ckpt"]  # from a step before the validation: no epoch checkpoint of nan weights
    assert torch.isfinite(load_checkpoint(saved[0])["state_dict"]["head.weight"]).all()


@pytest.mark.slow
def test_two_process_test_writes_its_report_and_exits_cleanly(learned_run, tiny_model, tmp_path):
    """Trainer.log_dir is a broadcast every rank must join: read by rank 0 alone in the report's hook, `test` under
    DDP wrote the report and then died in a mismatched collective (exit 1, a traceback; a hang under NCCL)."""
    ckpt = tmp_path / "fixed.ckpt"  # outside any run folder: the test logs into its own folder
    (best,) = (learned_run / "lightning_logs" / "version_0" / "checkpoints").glob("epoch*.ckpt")
    shutil.copy(best, ckpt)
    r = run_main("test", "--model.model_name_or_path", str(tiny_model), "--model.pooling", "mean",
                 "--data.data_dir", str(learned_run / "data"), "--data.cache_dir", str(learned_run / "cache"),
                 "--data.eval_batch_size", "8", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt), *ddp(),
                 cwd=tmp_path, env=ONE_THREAD, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "lightning_logs" / "version_0" / "test_report.json").read_text())
    assert rep["num_examples"] == 32  # every test row once, gathered from both ranks


@pytest.mark.slow
def test_two_process_sweep_trial_reports_to_its_study(learned_run, tiny_model, tmp_path):
    """goemo.sweep's OptunaReport under DDP (a trial on a multi-GPU node): its rank-0-only read of Trainer.log_dir
    made the other rank take that answer for SaveConfigCallback's broadcast, and every such trial failed at setup."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    trial = study.ask()  # RUNNING, as the sweep leaves it while its fit runs
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(learned_run / "data"),
                 "--data.cache_dir", str(learned_run / "cache"), *LEARNING_ARGS, "--trainer.max_epochs", "1",
                 *ddp("--trainer.callbacks+=goemo.sweep.OptunaReport", "--trainer.callbacks.storage", storage,
                      "--trainer.callbacks.study", "s", "--trainer.callbacks.trial", str(trial.number)),
                 cwd=tmp_path, env=ONE_THREAD, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = optuna.load_study(study_name="s", storage=storage).trials[0]
    assert recorded.user_attrs["run"] == str((tmp_path / "lightning_logs" / "version_0").resolve())
    assert list(recorded.intermediate_values) == [0]  # epoch 0's validation, reported by rank 0
