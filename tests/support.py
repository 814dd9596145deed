"""Helpers for tests that run real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.testbed._util import free_port as free_port  # the one free_port: test bed, bench and tests

ROOT = Path(__file__).resolve().parents[1]


def wait_for_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last!r}")


@dataclass
class Gateway:
    url: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@contextlib.contextmanager
def run_gateway(
    routes: str, workdir: Path, *, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Iterator[Gateway]:
    """Run ``python -m gateway`` with ``routes`` (TOML text) until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    routes_file = workdir / "routes.toml"
    routes_file.write_text(routes)
    port = free_port()
    log = workdir / f"gateway-{port}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("GATEWAY_ROUTES", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "--routes",
                str(routes_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *(args or []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=workdir,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield Gateway(url=f"http://127.0.0.1:{port}", port=port, log=log, proc=proc)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process is still there after 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Whether ``predicate`` came true within ``timeout`` seconds (a gateway logs and counts a request
    just after its answer, so tests that read its log or metrics wait for them)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
