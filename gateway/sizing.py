"""How much memory the shared windows of each worker may hold, from the container's memory limit.

A pod or container has a memory limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``);
past it the kernel kills the process, and every pull through it breaks. So when
``GATEWAY_SHARED_MEMORY_BYTES`` is not set, each worker's budget is sized so that
``workers x (budget + BASELINE)`` stays under ``HEADROOM`` of the limit (found in #21: the
shipped pod, 2 workers of 512 MiB each under a 512 MiB limit, could be OOM-killed mid-rollout).
With no limit, today's default stays. An explicit setting wins, and is refused at start when it
cannot fit. Pure arithmetic apart from ``container_limit``, which reads the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT = 512 << 20  # with no limit: the windows' cap per worker, as before
# What one worker holds apart from its windows (interpreter, modules, connections, buffers,
# hashing batches): measured about 60-80 MiB RSS under load (bench: peak RSS of 16 unshared streams).
BASELINE = 96 << 20
HEADROOM = 0.8  # of the limit: the kernel's own use of the cgroup (page cache, sockets) and slack
# A v1 cgroup with no limit reports a huge number (the page counter's maximum), not "max".
_NO_LIMIT = 1 << 60
LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True, slots=True)
class Budget:
    per_worker: int  # bytes the shared windows of one worker may hold
    limit: int | None  # the container's memory limit, if any
    source: str  # "setting", "limit" or "default"


class DoesNotFit(ValueError):
    """An explicit budget that the container's memory limit cannot hold."""


def own_limit_files(proc_cgroup: str = "/proc/self/cgroup") -> list[str]:
    """The limit files of this process's own cgroup (``/proc/self/cgroup``: ``0::/path`` on v2,
    ``N:memory:/path`` on v1), then the cgroup root's (in a container, the container's own)."""
    found = []
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.strip("/")
        if controllers == "" and path:
            found.append(f"/sys/fs/cgroup/{path}/memory.max")
        elif "memory" in controllers.split(",") and path:
            found.append(f"/sys/fs/cgroup/memory/{path}/memory.limit_in_bytes")
    return [*found, *LIMIT_FILES]


def container_limit(files: Sequence[str] | None = None) -> int | None:
    """The memory limit of the cgroup this process runs in, or None when there is none."""
    for name in own_limit_files() if files is None else files:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None
        value = int(text)
        return None if value >= _NO_LIMIT else value
    return None


def budget(explicit: int | None, workers: int, limit: int | None) -> Budget:
    """Each worker's window budget; ``DoesNotFit`` when an explicit one cannot fit ``limit``."""
    if explicit is not None:
        if limit is not None and workers * (explicit + BASELINE) > limit:
            need = workers * (explicit + BASELINE) >> 20
            raise DoesNotFit(
                f"GATEWAY_SHARED_MEMORY_BYTES={explicit} with {workers} worker(s) needs about {need} MiB "
                f"(each worker's windows plus {BASELINE >> 20} MiB), over the container's limit of "
                f"{limit >> 20} MiB: lower it, run fewer workers, or leave it unset to size it from the limit"
            )
        return Budget(explicit, limit, "setting")
    if limit is None:
        return Budget(DEFAULT, None, "default")
    room = int(limit * HEADROOM) // workers - BASELINE
    return Budget(max(0, min(DEFAULT, room)), limit, "limit")
