import json

import pytest
import yaml

from tests.conftest import LABELS4, run_main


@pytest.mark.slow
def test_fit_then_test_best_in_a_new_process(tiny_data, tiny_model, tmp_path):
    """fit (tiny) -> `test --ckpt_path best` in a new process: tuned metrics logged, report in the run folder."""
    fit = run_main(
        "fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
        "--data.cache_dir", str(tmp_path / "cache"), "--model.loss", "focal", "--model.focal_alpha", "0.25",
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    test = run_main("test", "--ckpt_path", "best", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    out = test.stdout
    for name in ("test/f1_macro", "test/f1_micro_tuned", "test/f1_macro_tuned", "test/exact_match_tuned"):
        assert name in out
    report = json.loads((run / "test_report.json").read_text())
    assert report["labels"] == LABELS4 and report["num_examples"] == 32
    assert set(report["fixed"]["per_label"]) == set(LABELS4)
    assert (run / "test_report.md").read_text().startswith("# Test report")
    # the tuned thresholds in the report are those of the best checkpoint, tuned on validation
    from goemo.runs import best_checkpoint, load_checkpoint

    best = load_checkpoint(best_checkpoint(run))
    assert report["thresholds"]["tuned"] == pytest.approx(best["state_dict"]["thresholds"].tolist())
    # which checkpoint was scored (goemo.compare checks it is still the run's best)
    assert report["checkpoint"] == {"file": best_checkpoint(run).name, "global_step": best["global_step"]} and best["global_step"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = set()  # the PR curves sit at the scored checkpoint's step too (a test run's own step is 0)
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        curves |= {(tag, e.step) for tag in acc.Tags()["tensors"] if tag.startswith("test_pr/") for e in acc.Tensors(tag)}
    assert curves == {(f"test_pr/{name}", best["global_step"]) for name in LABELS4}
    scalars = set()  # and the test metrics with them (Lightning logs a test run's at step 0)
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        scalars |= {(tag, e.step) for tag in acc.Tags()["scalars"] if tag.startswith("test/") for e in acc.Scalars(tag)}
    tags = {tag for tag, _ in scalars}
    assert {"test/f1_macro", "test/f1_macro_tuned", "test/loss"} <= tags and scalars == {(t, best["global_step"]) for t in tags}
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]  # every key is saved, defaults included
    assert (model["loss"], model["focal_alpha"]) == ("focal", 0.25)
    # a later `validate` of other settings logs into the run folder too; goemo.compare keeps showing the fit's validation
    from goemo.compare import VAL, run_row

    fit_row = {tag: run_row(run)[tag] for tag in VAL}
    validate = run_main("validate", "--ckpt_path", "best", "--model.threshold", "0.999", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert fit_row["val/f1_micro"] > 0 and "val/f1_micro │ 0.0 " in " ".join(validate.stdout.split())  # differ: the check can fail
    assert {tag: run_row(run)[tag] for tag in VAL} == fit_row
