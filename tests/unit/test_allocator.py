"""malloc's fixed thresholds (gateway/allocator.py): freed chunk memory is reused, not faulted in again.

Each case runs in a fresh interpreter: mallopt changes the whole process, and the counts must not
depend on what the test process allocated before.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import allocator

ROOT = Path(__file__).resolve().parents[2]

# Like a blob relayed through a window: 16 MiB of 256 KiB chunks (each written, as a read fills
# it) held, then freed together, twenty times over; prints the minor page faults of the rounds.
_ROUNDS = """
import resource, sys
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "tuned":
    from gateway import allocator
    assert allocator.keep_freed_memory({})
def rounds(n):
    for _ in range(n):
        chunks = [bytes(range(256)) * 1024 for _ in range(64)]
        del chunks
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode, str(ROOT)], capture_output=True, text=True, check=True, timeout=60
    )
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_chunks_are_reused_instead_of_faulted_in_again() -> None:
    # 20 rounds of 16 MiB: 81,920 pages. glibc's dynamic thresholds give most of them back to the
    # kernel at every free and fault them in again; with the fixed ones the heap keeps them.
    assert _faults("tuned") < 1000
    assert _faults("plain") > 10 * max(_faults("tuned"), 100)


def test_an_operators_glibc_tunables_win() -> None:
    assert allocator.keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) is False
