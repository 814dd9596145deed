"""The gateway's process tree, watched from /proc and /metrics: RSS, open fds, threads, gauges.

The leak signals: open fds and threads of every process of the tree (/proc/<pid>/fd,
/proc/<pid>/status), the gateway's count of its asyncio tasks (``registry_gateway_asyncio_tasks``,
counted at the scrape), and the gauges ``registry_gateway_streams_in_flight`` and
``registry_gateway_shared_fetches_in_flight``.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import procs

GAUGES = (
    "registry_gateway_asyncio_tasks",
    "registry_gateway_streams_in_flight",
    "registry_gateway_shared_fetches_in_flight",
    "registry_gateway_shared_window_bytes",
)


def _fds(pid: int) -> list[str]:
    """What each open fd of ``pid`` points at (``socket:[inode]``, a path, ``pipe:[...]``)."""
    out: list[str] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        with contextlib.suppress(OSError):  # closed while we looked
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return out


def _tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) of every TCP socket of the machine."""
    found: dict[str, tuple[int, int, str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            found[inode] = (int(local.rpartition(":")[2], 16), int(remote.rpartition(":")[2], 16), state)
    return found


def _threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def snapshot(root: int, port: int | None = None) -> dict[str, int]:
    """RSS (KiB), open fds and threads, summed over the gateway's process tree.

    With the gateway's ``port``, the fds are also split: sockets of client connections (local
    port = the gateway's), sockets to upstreams (the idle keep-alive pool, which the gateway
    keeps and prunes only when it next takes one: not a leak), and the rest (files, pipes,
    listening sockets, event fds), which must come back to where they were.
    """
    pids = procs.descendants(root)
    links = [link for pid in pids for link in _fds(pid)]
    out = {
        "processes": len(pids),
        "rss_kib": sum(procs.memory_kib(pid).get("VmRSS", 0) for pid in pids),
        "fds": len(links),
        "threads": sum(_threads(pid) for pid in pids),
    }
    if port is not None:
        tcp = _tcp_sockets()
        clients = upstreams = 0
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if not link.startswith("socket:[") or inode not in tcp:
                continue
            local, remote, state = tcp[inode]
            if state == "0A":  # LISTEN
                continue
            if local == port:
                clients += 1
            else:
                upstreams += 1
        out |= {"client_sockets": clients, "upstream_sockets": upstreams, "other_fds": len(links) - clients - upstreams}
    return out


def gauges(url: str) -> dict[str, float]:
    """The leak gauges from /metrics, summed over their labels."""
    totals = dict.fromkeys(GAUGES, 0.0)
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    for line in text.splitlines():
        match = re.match(r"([a-zA-Z_:]+)(?:\{.*\})? (\S+)$", line)
        if match is not None and match[1] in totals:
            totals[match[1]] += float(match[2])
    return totals


@dataclass
class Watcher:
    """Samples :func:`snapshot` every ``interval`` seconds; keeps the peak RSS."""

    root: int
    interval: float = 0.5
    peak_rss_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name="soak-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss_kib = max(self.peak_rss_kib, snapshot(self.root)["rss_kib"])
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
