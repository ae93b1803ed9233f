"""goemo.memory (opt-in): training maps its large blocks, evaluation keeps them in the heap, free heap pages go back
between phases (glibc only); the default path leaves glibc's allocator alone."""

import json
import subprocess
import sys

import pytest
import yaml

MALLINFO = """
import ctypes, os, sys
sys.path.insert(0, {repo!r})
libc = ctypes.CDLL("libc.so.6")

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
"""

PROBE = MALLINFO + """
import goemo.cli  # the default path changes nothing in glibc's malloc
libc.free(libc.malloc(8 << 20))  # freeing an 8 MiB mapping raises glibc's dynamic threshold to 8 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)  # 4 MiB: a mapping of its own only if the threshold stayed below it
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_default_path_leaves_glibcs_threshold_alone():
    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == 0  # glibc's dynamic threshold rose to 8 MiB: the 4 MiB block is in the heap


RELEASE = """
import ctypes, sys
sys.path.insert(0, {repo!r})
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
from goemo.memory import release_free_memory

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

blocks = [libc.malloc(64 << 10) for _ in range(2048)]  # 128 MiB of heap blocks (below the mmap threshold)
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)  # touched: resident
for b in blocks[:-1]:
    libc.free(b)  # free, but the last block pins the heap's top, so glibc keeps the pages
before = rss_mib()
released = release_free_memory()
print(released, before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_free_memory_returns_free_heap_pages():
    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-c", RELEASE.format(repo=str(REPO))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    released, dropped_mib = r.stdout.split()
    assert released == "True" and int(dropped_mib) > 100  # of the 128 MiB freed


def test_release_free_memory_is_opt_in(tiny_run):
    """A default fit runs the reliability callbacks, listed in its config, and not ReleaseFreeMemory (opt-in)."""
    names = json.loads((tiny_run / "callbacks.json").read_text())
    assert {"ExactResume", "Interrupts", "StopOnNonFiniteLoss"} <= set(names) and "ReleaseFreeMemory" not in names
    # Interrupts raises at a batch end: after every other callback's hook (weight averaging's update), before the checkpoints.
    assert names.index("EpochAveraging") < names.index("Interrupts") < names.index("ModelCheckpoint")
    assert names[names.index("Interrupts") + 1 :] == ["ModelCheckpoint", "LastCheckpoint"]
    config = yaml.safe_load((tiny_run / "lightning_logs/version_0/config.yaml").read_text())
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert [p for p in paths if p.startswith("goemo.")] == [
        "goemo.reliability.ExactResume", "goemo.reliability.Interrupts", "goemo.reliability.StopOnNonFiniteLoss",
    ]  # fmt: skip
    assert [p["class_path"] for p in config["trainer"]["plugins"]] == ["goemo.reliability.SafeCheckpointIO"]


PHASES = MALLINFO + """
import types
from goemo.memory import ReleaseFreeMemory

def mapped():  # does a 4 MiB block get a mapping of its own now?
    before = libc.mallinfo2().hblks
    block = libc.malloc(4 << 20)
    n = libc.mallinfo2().hblks - before
    libc.free(block)
    return n

def trainer(fn, sanity=False):
    return types.SimpleNamespace(sanity_checking=sanity, state=types.SimpleNamespace(fn=fn))

fit, cb, out = trainer("fit"), ReleaseFreeMemory(), []
cb.setup(fit, None, "fit"); out.append(mapped())
cb.on_validation_start(trainer("fit", sanity=True), None); out.append(mapped())
cb.on_validation_end(trainer("fit", sanity=True), None)
cb.on_train_epoch_start(fit, None); out.append(mapped())
cb.on_validation_start(fit, None); out.append(mapped())
cb.on_validation_end(fit, None); out.append(mapped())
ReleaseFreeMemory().setup(trainer("test"), None, "test"); out.append(mapped())
print(*out)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_training_maps_large_blocks_and_evaluation_keeps_them_in_the_heap():
    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-c", PHASES.format(repo=str(REPO))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # fit from its start (sanity check included): mapped; its validations: heap; training again: mapped; test: heap
    assert r.stdout.split("\n")[-2] == "1 1 1 0 1 0"
