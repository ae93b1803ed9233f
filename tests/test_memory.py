"""goemo.memory: training maps its large blocks, evaluation keeps them in the heap, GOEMO_MMAP_THRESHOLD fixes one
threshold for all; free heap pages go back between phases (glibc only)."""

import json
import subprocess
import sys

import pytest

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
from goemo.memory import lean_malloc
if sys.argv[1] == "lean":
    os.environ["GOEMO_MMAP_THRESHOLD"] = str(1 << 20)
lean_malloc()  # unset: glibc's default
libc.free(libc.malloc(8 << 20))  # freeing an 8 MiB mapping raises glibc's dynamic threshold to 8 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)  # 4 MiB: a mapping of its own only if the threshold stayed below it
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("mode,mapped", [("default", 0), ("lean", 1)])
def test_large_blocks_stay_mappings(mode, mapped):
    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO)), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == mapped


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


def test_every_fit_releases_free_memory(tiny_run):
    """ReleaseFreeMemory is one of the callbacks the CLI always adds (tiny_run records the fit's callbacks)."""
    names = json.loads((tiny_run / "callbacks.json").read_text())
    assert "ReleaseFreeMemory" in names and "ExactResume" in names


PHASES = MALLINFO + """
import types
if sys.argv[1] == "fixed":
    os.environ["GOEMO_MMAP_THRESHOLD"] = str(1 << 20)
from goemo.memory import ReleaseFreeMemory, lean_malloc
lean_malloc()

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
@pytest.mark.parametrize(
    "mode,expected",
    [
        # fit from its start (sanity check included): mapped; its validations: heap; training again: mapped; test: heap
        ("phases", "1 1 1 0 1 0"),
        ("fixed", "1 1 1 1 1 1"),  # GOEMO_MMAP_THRESHOLD=1 MiB: the user's threshold in every phase
    ],
)
def test_training_maps_large_blocks_and_evaluation_keeps_them_in_the_heap(mode, expected):
    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-c", PHASES.format(repo=str(REPO)), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == expected
