"""Fixed thresholds for glibc's malloc, so that the memory a blob's chunks leave is reused, not refaulted.

Every read of a blob body arrives as a fresh ``bytes`` (uvloop copies its read buffer into one,
up to 256 KiB). glibc's defaults are dynamic: a freed block over the mmap threshold raises it to
that size, and the trim threshold to twice that, so a few hundred KiB of free memory at the top of
the heap is handed back to the kernel (``sbrk`` down) at once and faulted in again, page by page
and zeroed, at the next reads. A shared fetch frees its chunks in the order they came (the window's
tail, the head once no second client came, the hash's lag), so its heap top is freed and grown
again all the time: 16,000-40,000 minor page faults per GiB relayed, about 0.3 CPU s/GiB of a
lone unverified pull (docs/performance.md, "A lone verified pull"). Fixed thresholds (mallopt(3):
setting either turns off the dynamic adjustment) keep the freed blocks for the next reads.

``TRIM`` is above the most a fetch frees at once (its head, ``blobs.terms.HEAD``, less the tail
it keeps), so that memory stays for the next chunks instead of going back. Memory kept this way
was in use a moment before: it does not raise a worker's peak, which is what the container's
limit counts (``sizing.py``). ``MMAP`` keeps every chunk and hashing batch (at most 1 MiB) on the
heap. An operator's own ``GLIBC_TUNABLES`` malloc settings win: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TRIM = 64 << 20
MMAP = 4 << 20


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Set glibc malloc's thresholds for this process; whether they were set (not glibc, or the
    operator's ``GLIBC_TUNABLES`` already tune malloc: False)."""
    env = os.environ if environ is None else environ
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", "") or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM))
