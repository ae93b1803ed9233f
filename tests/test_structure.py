"""The package's shape: no import cycles, every module imports alone, the private Lightning/torch APIs goemo still
uses exist (so a Lightning release that changes one fails here, not in a user's run), and a run's saved config.yaml
re-runs to the same result."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ONE_THREAD, REPO, records, run_main

MODULES = sorted(p.stem for p in (REPO / "goemo").glob("*.py") if p.stem != "__init__")


def import_graph() -> dict[str, set[str]]:
    """goemo module -> the goemo modules it imports anywhere in its file (top level or inside functions)."""
    graph = {}
    for name in MODULES:
        deps = set()
        for node in ast.walk(ast.parse((REPO / "goemo" / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "goemo":
                parts = node.module.split(".")
                deps.update(parts[1:2] if len(parts) > 1 else (a.name for a in node.names))
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("goemo."))
        graph[name] = {d for d in deps if d in MODULES and d != name}
    return graph


def test_import_graph_is_acyclic():
    graph, done, path = import_graph(), set(), []

    def visit(node: str) -> None:
        if node in path:
            pytest.fail(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for name in MODULES:
        visit(name)


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_alone(name):
    r = subprocess.run([sys.executable, "-c", f"import goemo.{name}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# Each private name goemo still uses, where, and why (the comment at each use names the upstream issue).
PRIVATE = [
    ("lightning.pytorch.loops.fit_loop", "_FitLoop", ["_load_combined_loader_states", "_combined_loader_states_to_load"]),
    ("lightning.pytorch.loggers", "TensorBoardLogger", ["_get_next_version"]),
    ("lightning.pytorch.cli", "LightningCLI", ["_parse_ckpt_path", "_prepare_subcommand_parser"]),
    ("lightning.pytorch.callbacks", "ModelCheckpoint", ["_save_last_checkpoint", "_should_skip_saving_checkpoint", "_monitor_candidates"]),
]


@pytest.mark.parametrize("module,cls,names", PRIVATE)
def test_private_apis_goemo_relies_on_still_exist(module, cls, names):
    import importlib

    klass = getattr(importlib.import_module(module), cls)
    for name in names:
        assert hasattr(klass, name) or name in klass.__init__.__code__.co_names, f"{cls}.{name} is gone: see its use in goemo"


def test_fit_loop_keeps_the_loader_state_attribute():
    from lightning.pytorch.loops.fit_loop import _FitLoop

    assert "_combined_loader_states_to_load" in _FitLoop.__init__.__code__.co_names


def test_every_private_lightning_call_names_its_issue():
    """A call of a private method on a Lightning object (`trainer.fit_loop._x(`, `super()._x(`) has an issue
    reference (#NNNN) on its line or in the lines just above it."""
    for path in (REPO / "goemo").glob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.search(r"(fit_loop|super\(\)|experiment)\._[a-z]\w*\(", line):
                context = "\n".join(lines[max(0, i - 12) : i + 1])
                assert re.search(r"#\d{3,5}", context), f"{path.name}:{i + 1}: private call without an issue reference"


@pytest.mark.slow
def test_rerunning_a_runs_config_reproduces_it(learned_run, tmp_path):
    """`fit --config lightning_logs/version_0/config.yaml` is the same run: same config, same validation metrics."""
    work = tmp_path / "work"
    shutil.copytree(learned_run, work)
    r = run_main("fit", "--config", "lightning_logs/version_0/config.yaml", cwd=work, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = work / "lightning_logs"
    assert yaml.safe_load((runs / "version_1/config.yaml").read_text()) == yaml.safe_load((runs / "version_0/config.yaml").read_text())
    recs = records(work)  # the config's RecordValidation appended the re-run's epochs
    assert len(recs) == 4 and recs[2:] == recs[:2]
