"""What every measurement of one run shares: its options, targets, figures and notes, and ``attempt``, which
records a failed measurement instead of raising it."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import clients
from bench.clients import Target
from bench.figures import Figures
from bench.options import Options
from bench.report import PATHS, Figure
from bench.servers import Gateway, NginxProxy, ServerError, tail

T = TypeVar("T")
MB = 1e6
GIB = float(1 << 30)
#: the route key that lets a gateway reach the test bed on 127.0.0.1 (it refuses private addresses by default)
PRIVATE_KEY = "allow_private_addresses"


def rotated(paths: list[str], n: int) -> list[str]:
    """The paths in a different order each repeat, so no path always runs first (or right after another)."""
    if not paths:
        return paths
    k = n % len(paths)
    return paths[k:] + paths[:k]


class Session:
    """One run's state and bookkeeping; ``bench.run.Run`` starts the servers and calls the measurements."""

    #: what the measurements fetch, set once the test bed is up (``Run.execute``)
    big_digest: str
    big_size: int
    small_digest: str
    small_size: int
    manifest_digest: str
    big_path: str
    small_path: str
    manifest_path: str

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.figures = Figures()
        self.figures.rename(options)
        self.errors: list[dict[str, str]] = []
        self.warnings: list[str] = []
        self.generator = options.load_generator
        self.failed: dict[str, str] = {}
        self.targets: dict[str, Target] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.nginx: NginxProxy | None = None
        self.gateway: Gateway | None = None
        self.upstream_pids: list[int] = []
        self.progress_started = time.monotonic()

    # ------------------------------------------------------------------ bookkeeping
    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.progress_started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def live_paths(self) -> list[str]:
        return [p for p in PATHS if p in self.targets and p not in self.failed]

    def attempt(self, what: str, path: str, action: Callable[[], T], figures: list[Figure] | None = None) -> T | None:
        """Run one measurement; a failure is recorded (and a dead server marks its path failed), never raised."""
        if path in self.failed:
            return None
        try:
            return action()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.errors.append({"measurement": what, "path": path, "error": message})
            self.log(f"ERROR {what} via {path}: {message}")
            server = {"gateway": self.gateway, "nginx": self.nginx}.get(path)
            if server is not None and not server.alive():
                reason = f"{path} process exited with {server.returncode()} during {what}:\n{tail(server.log_path)}"
                self.fail_path(path, reason)
            for figure in figures or []:
                figure.missing.setdefault(path, message)
            if not isinstance(exc, (clients.ClientError, ServerError)):
                self.extra.setdefault("tracebacks", []).append(traceback.format_exc())
            return None

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log(f"WARNING {message}")

    def fail_path(self, path: str, reason: str) -> None:
        if path not in self.failed:
            self.failed[path] = reason
            self.log(f"{path.upper()} FAILED: {reason}")
        for figure in self.figures.ordered():
            if path not in figure.samples:
                figure.missing.setdefault(path, reason.splitlines()[0])

    def server_pids(self, path: str) -> list[int]:
        if path == "gateway" and self.gateway is not None:
            return self.gateway.pids()
        if path == "nginx" and self.nginx is not None:
            return self.nginx.worker_pids()
        return []
