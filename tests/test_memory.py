"""goemo.memory.lean_malloc: with GOEMO_MMAP_THRESHOLD set, large blocks stay separate mappings after a free (glibc only)."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, os, sys
sys.path.insert(0, {repo!r})
libc = ctypes.CDLL("libc.so.6")

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
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
