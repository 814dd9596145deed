"""Small process, port and server helpers shared by the test bed components."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
import uvicorn

LOOPBACK = "127.0.0.1"


class TestbedError(RuntimeError):
    """Raised when a component of the test bed cannot be started or misbehaves."""

    __test__ = False  # not a pytest test class


def bind_socket() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a kernel-chosen free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    """A port that was free a moment ago (for subprocesses that must bind it themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A subprocess in its own session, with stdout/stderr going to a log file.

    ``stop()`` sends SIGTERM to the process group it leads (so e.g. nginx workers go too),
    then SIGKILL after a grace period. Only the group created for this process is signalled.
    """

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")  # closed in stop()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise TestbedError(
                f"{self.name} exited with status {self.proc.returncode}; log {self.log_path}:\n{tail(self.log_path)}"
            )

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.proc.send_signal(sig)

    def stop(self, grace: float = 5.0) -> None:
        try:
            if self.alive():
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(timeout=grace)
            # Reap any leftovers in the group (e.g. orphaned workers) quietly.
            self._signal_group(signal.SIGKILL)
        finally:
            self._log.close()


class ThreadedUvicorn:
    """Serve an ASGI app with uvicorn in a background thread (own event loop) on a pre-bound socket."""

    def __init__(self, app: Callable[..., Any], *, name: str, lifespan: str = "off") -> None:
        self.name = name
        self._sock = bind_socket()
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="error",
            access_log=False,
            lifespan=lifespan,  # type: ignore[arg-type]
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
            limit_concurrency=None,
            backlog=512,
        )
        self._server = uvicorn.Server(config)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"testbed-{name}", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # pragma: no cover - reported by start()/stop()
            self._error = exc

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise TestbedError(f"{self.name} failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TestbedError(f"{self.name} did not start within {timeout}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
        self._sock.close()
