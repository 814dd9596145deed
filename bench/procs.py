"""What /proc says about the servers under test: process trees, CPU seconds, resident memory.

Everything here reads Linux's /proc directly, so it costs the measured processes nothing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, in seconds (None when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def all_pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process on the machine."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent_pid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    return children


def descendants(root: int, *, include_root: bool = True) -> list[int]:
    """``root`` and every process below it."""
    children = children_map()
    found: list[int] = [root] if include_root else []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def pids_matching(needle: str) -> list[int]:
    """Processes whose command line contains ``needle``, with everything below them."""
    roots = [pid for pid in all_pids() if pid != os.getpid() and needle in cmdline(pid)]
    result: set[int] = set()
    for root in roots:
        result.update(descendants(root))
    return sorted(result)


def total_cpu(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds per live process."""
    out: dict[int, float] = {}
    for pid in pids:
        seconds = cpu_seconds(pid)
        if seconds is not None:
            out[pid] = seconds
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`total_cpu` snapshots (a process born in between counts from zero)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds from /proc/stat: busy (not idle or iowait), steal, and the total."""
    fields = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    idle = fields[3] + fields[4]
    return {"busy": (total - idle) / CLOCK_TICKS, "steal": fields[7] / CLOCK_TICKS, "total": total / CLOCK_TICKS}


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        with (PROC / str(pid) / "status").open() as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        return {}
    return out


@dataclass
class RssPeaks:
    """What a :class:`RssSampler` saw: peak VmRSS per process, and the peak of their sum at one instant."""

    per_process_kib: dict[int, int] = field(default_factory=dict)
    peak_total_kib: int = 0
    samples: int = 0

    @property
    def max_process_kib(self) -> int:
        return max(self.per_process_kib.values(), default=0)

    @property
    def sum_of_peaks_kib(self) -> int:
        return sum(self.per_process_kib.values())


class RssSampler:
    """Polls VmRSS of a process set every ``interval`` seconds in a thread, between ``start()`` and ``stop()``.

    ``pids`` is asked again about once a second, so workers that appear late are caught.
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.05) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peaks = RssPeaks()

    def _run(self) -> None:
        pids = self._pids()
        refreshed = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 1.0:
                pids = self._pids()
                refreshed = time.monotonic()
            total = 0
            for pid in pids:
                rss = memory_kib(pid).get("VmRSS")
                if rss is None:
                    continue
                total += rss
                if rss > self.peaks.per_process_kib.get(pid, 0):
                    self.peaks.per_process_kib[pid] = rss
            self.peaks.peak_total_kib = max(self.peaks.peak_total_kib, total)
            self.peaks.samples += 1
            self._stop.wait(self._interval)

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> RssPeaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.peaks
