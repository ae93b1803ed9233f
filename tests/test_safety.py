"""Loading runs no code: checkpoints load with weights_only=True everywhere, trust_remote_code stays off, configs
are plain YAML. Crafted files that would run code are refused in one line, and the code never runs."""

import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

from goemo import load
from goemo.cli import main
from goemo.export import main as export_main
from goemo.errors import GoemoError
from tests.conftest import REPO, run_main

GOEMO = REPO / "goemo"


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=["zip", "legacy"])
def evil_ckpt(request, tmp_path) -> tuple[Path, Path]:
    """A checkpoint-looking file whose unpickling would create `marker` (torch's zip format, or a bare pickle)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    if request.param == "zip":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"x": RunsCode(marker)}}, path)
    else:  # torch's pickle protocol, no tensors (a pickled tensor is refused too, before the payload)
        path.write_bytes(pickle.dumps({"state_dict": {}, "hyper_parameters": {"x": RunsCode(marker)}}, protocol=2))
    return path, marker


def test_the_payload_does_run_code_when_unpickled_unsafely(tmp_path):
    # the control: the files below are dangerous, so refusing them means something
    marker = tmp_path / "code-ran"
    torch.save({"x": RunsCode(marker)}, tmp_path / "evil.ckpt")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


REFUSED = re.compile(
    r"error: .*evil\.ckpt: refused to load: it holds pickled Python objects, not only tensors and plain data "
    r"\(Trying to load unsupported GLOBAL posix\.system whose module posix is blocked\); "
    r"goemo loads checkpoints with weights_only=True and runs no code from them"
)


def test_goemo_load_refuses(evil_ckpt):
    path, marker = evil_ckpt
    with pytest.raises(GoemoError) as e:
        load(path)
    assert REFUSED.fullmatch(f"error: {e.value}") and not marker.exists()


def test_export_refuses(evil_ckpt, tmp_path, capsys):
    path, marker = evil_ckpt
    with pytest.raises(SystemExit) as e:
        export_main([str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and REFUSED.fullmatch(err), err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_refuses_in_process(evil_ckpt, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    path, marker = evil_ckpt
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as e:
        main(["test", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data), "--ckpt_path", str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and REFUSED.fullmatch(err.splitlines()[-1]), err[-3000:]
    assert not marker.exists()


@pytest.mark.slow
def test_cli_refuses_as_a_process(tiny_model, tiny_data, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": RunsCode(marker)}}, path)
    r = run_main("test", "--model.model_name_or_path", str(tiny_model), "--data.data_dir", str(tiny_data),
                 "--ckpt_path", str(path), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and REFUSED.fullmatch(r.stderr.strip().splitlines()[-1]), r.stderr[-3000:]
    assert not marker.exists()


def test_model_folder_with_its_own_code_is_refused(tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    # A config.json that points transformers at Python files in the folder (auto_map): never imported.
    folder = tmp_path / "custom-model"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        '{"model_type": "custombert", "auto_map": {"AutoConfig": "modeling.Config", "AutoModel": "modeling.Model"}}'
    )
    (folder / "modeling.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # were it to ask "run the custom code? [y/N]", nobody answers
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.model_name_or_path", str(folder), "--data.data_dir", str(tiny_data)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and "[y/N]" not in err, err[-3000:]
    assert err.splitlines()[-1] == (
        f"error: cannot load model '{folder}': it needs Python code shipped with it (custom code), "
        f"which goemo never runs (trust_remote_code stays off); use a model of a family transformers knows"
    )
    assert not marker.exists()


def test_yaml_config_cannot_run_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    (tmp_path / "evil.yaml").write_text(f'model:\n  learning_rate: !!python/object/apply:os.system ["touch {marker}"]\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "evil.yaml"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(
        "error: Problems parsing config: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' in evil.yaml"
    ), err
    assert not marker.exists()


# -- the source: every load goes through the safe paths ----------------------------------------------------
def sources() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in GOEMO.glob("*.py")}


def test_no_trust_remote_code_and_every_from_pretrained_gets_hub_kwargs():
    for name, text in sources().items():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), name
        for call in re.findall(r"\.from_pretrained\(([^)]*)\)", text):
            assert "hub_kwargs(" in call, (name, call)  # hub_kwargs sets trust_remote_code=False
    from goemo.hub import hub_kwargs

    assert hub_kwargs(str(REPO))["trust_remote_code"] is False
    assert hub_kwargs("some-org/some-model")["trust_remote_code"] is False


def test_hub_kwargs_takes_only_the_local_cache_when_the_hub_is_down(tmp_path, monkeypatch):
    import goemo.hub
    from goemo.hub import hub_kwargs

    monkeypatch.setattr(goemo.hub, "hub_reachable", lambda: False)
    assert hub_kwargs("org/model") == {"trust_remote_code": False, "local_files_only": True}
    assert hub_kwargs(str(tmp_path)) == {"trust_remote_code": False}  # a local folder: nothing to fetch anyway


def test_every_torch_load_is_weights_only():
    calls = [(name, m) for name, text in sources().items() for m in re.findall(r"torch\.load\(([^)]*)\)", text)]
    assert calls and all("weights_only=True" in args for _, args in calls), calls
    assert [name for name, _ in calls] == ["runs.py"]  # the one place; everything else calls runs.load_checkpoint
