import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from goemo.report import bootstrap_f1, build_report, f1_figure, log_tensorboard, print_report, write_report

NAMES = ["joy", "anger", "fear", "neutral", "grief"]


@pytest.fixture
def arrays():
    rng = np.random.default_rng(1)
    n = 400
    targets = (rng.random((n, 5)) < [0.3, 0.15, 0.08, 0.4, 0.0]).astype(np.int64)  # grief: no support
    probs = np.clip(0.4 * targets + 0.65 * rng.random((n, 5)), 0, 1).astype(np.float32)
    tuned = np.array([0.3745, 0.42, 0.3, 0.5, 0.9], dtype=np.float32)  # 0.3745: a mean over resamples, off the grid
    return probs, targets, tuned


def sk_scores(preds, targets):
    p, r, f, s = precision_recall_fscore_support(targets, preds, average=None, zero_division=0)
    micro = precision_recall_fscore_support(targets, preds, average="micro", zero_division=0)
    macro = precision_recall_fscore_support(targets, preds, average="macro", zero_division=0)
    return p, r, f, s, micro, macro


def test_report_values_match_sklearn(arrays, tmp_path):
    probs, targets, tuned = arrays
    rep = build_report(probs, targets, NAMES, 0.5, tuned, resamples=200)
    assert rep["num_examples"] == 400 and rep["labels"] == NAMES
    assert rep["thresholds"]["fixed"] == 0.5 and rep["thresholds"]["tuned"] == pytest.approx(tuned.tolist(), abs=1e-6)
    for key, thr in (("fixed", np.full(5, 0.5, dtype=np.float32)), ("tuned", tuned)):
        preds = (probs > thr).astype(int)
        p, r, f, s, micro, macro = sk_scores(preds, targets)
        section = rep[key]
        for i, name in enumerate(NAMES):
            row = section["per_label"][name]
            assert set(row) == {"precision", "recall", "f1", "support", "threshold"}
            assert [row["precision"], row["recall"], row["f1"]] == pytest.approx([p[i], r[i], f[i]])
            assert row["support"] == s[i] and row["threshold"] == pytest.approx(thr[i])
        assert [section["micro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(micro[:3])
        assert [section["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(macro[:3])
        assert section["micro"]["f1"] == pytest.approx(f1_score(targets, preds, average="micro", zero_division=0))
        assert section["micro"]["support"] == section["macro"]["support"] == targets.sum()
        assert section["exact_match"] == pytest.approx((preds == targets).all(1).mean())
        for avg in ("micro", "macro"):
            low, high = section[avg]["ci"]
            assert low <= section[avg]["f1"] <= high

    js, md = write_report(rep, tmp_path / "run")
    assert js.name == "test_report.json" and md.name == "test_report.md"
    assert json.loads(js.read_text()) == json.loads(json.dumps(rep))
    text = md.read_text()
    assert "| grief | 0 |" in text and "**macro**" in text and "95% CI" in text
    assert f"{rep['tuned']['macro']['f1']:.4f}" in text


def test_bootstrap_is_deterministic_and_brackets_the_estimate(arrays):
    probs, targets, _ = arrays
    preds = probs > 0.5
    a = bootstrap_f1(preds, targets, resamples=1000, seed=7)
    assert a == bootstrap_f1(preds, targets, resamples=1000, seed=7)
    assert a != bootstrap_f1(preds, targets, resamples=1000, seed=8)
    micro = f1_score(targets, preds, average="micro", zero_division=0)
    macro = f1_score(targets, preds, average="macro", zero_division=0)
    assert a["f1_micro"][0] < micro < a["f1_micro"][1]
    assert a["f1_macro"][0] < macro < a["f1_macro"][1]
    assert 0 < a["f1_micro"][1] - a["f1_micro"][0] < 0.2  # a real spread, not degenerate
    # the report's intervals are those of the seed (and resamples) it names
    tuned = np.full(probs.shape[1], 0.4)
    rep = build_report(probs, targets, NAMES, 0.5, tuned, resamples=1000, seed=7)
    assert rep["bootstrap"]["seed"] == 7 and (rep["fixed"]["micro"]["ci"], rep["fixed"]["macro"]["ci"]) == (a["f1_micro"], a["f1_macro"])


def test_bootstrap_matches_a_plain_loop(arrays):
    """The vectorised resampling equals resampling row indices one resample at a time."""
    probs, targets, _ = arrays
    preds = probs > 0.5
    got = bootstrap_f1(preds, targets, resamples=150, seed=3)  # two chunks (100 + 50)
    rng = np.random.default_rng(3)
    micro, macro = [], []
    for start in (0, 100):
        idx = rng.integers(0, len(preds), size=(min(100, 150 - start), len(preds)))
        for row in idx:
            micro.append(f1_score(targets[row], preds[row], average="micro", zero_division=0))
            macro.append(f1_score(targets[row], preds[row], average="macro", zero_division=0))
    assert got["f1_micro"] == pytest.approx(np.percentile(micro, [2.5, 97.5]).tolist())
    assert got["f1_macro"] == pytest.approx(np.percentile(macro, [2.5, 97.5]).tolist())


def test_terminal_table_and_tensorboard(arrays, tmp_path):
    from rich.console import Console

    probs, targets, tuned = arrays
    rep = build_report(probs, targets, NAMES, 0.5, tuned, resamples=50)
    console = Console(record=True, width=120)
    print_report(rep, console)
    out = console.export_text()
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.split("│")[1:-1]] for line in out.splitlines()) if c}
    for n in NAMES:  # support, F1 fixed, F1 tuned, the tuned threshold of each label's row
        a, b = rep["fixed"]["per_label"][n], rep["tuned"]["per_label"][n]
        assert rows[n] == [str(a["support"]), f"{a['f1']:.3f}", f"{b['f1']:.3f}", f"{b['threshold']:.2f}"]
    assert rows["grief"][0] == "0" and rows["grief"][3] == "0.90"
    for k in ("micro", "macro"):
        assert rows[k] == [str(rep["fixed"][k]["support"]), f"{rep['fixed'][k]['f1']:.3f}", f"{rep['tuned'][k]['f1']:.3f}", ""]
    ci = rep["tuned"]["macro"]["ci"]
    assert f"tuned [{ci[0]:.3f}, {ci[1]:.3f}]" in " ".join(out.split())  # the caption may wrap

    fig = f1_figure(rep)
    assert len(fig.axes[0].patches) == 2 * len(NAMES)  # a bar per label and threshold kind

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "tb") as w:
        log_tensorboard(w, rep, probs, targets, step=3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert ev.Tags()["images"] == ["test/f1_per_label"]
    assert sorted(ev.Tags()["tensors"]) == sorted(f"test_pr/{n}" for n in NAMES)


def test_label_names_with_table_syntax_stay_in_their_cells(arrays, tmp_path):
    from rich.console import Console

    probs, targets, tuned = arrays
    names = ["a|b", "[bold]x", "fear", "neutral", "grief"]  # custom label files may hold any text
    rep = build_report(probs, targets, names, 0.5, tuned, resamples=20)
    _, md = write_report(rep, tmp_path)
    rows = [line for line in md.read_text().splitlines() if line.startswith("| a")]
    assert len(rows) == 1 and rows[0].startswith("| a\\|b | ") and rows[0].replace("\\|", "").count("|") == 10
    console = Console(record=True, width=120)
    print_report(rep, console)
    assert "[bold]x" in console.export_text()  # shown as written, not taken as markup
