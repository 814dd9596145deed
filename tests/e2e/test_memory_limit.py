"""The windows' budget from a real memory cgroup (gateway/sizing.py): the gateway started inside one.

The test makes a cgroup v1 memory controller of its own (writable on these machines), limits it to
the shipped pod's 512 MiB, and starts ``python -m gateway`` in it: unset, the budget is sized from
the limit and logged; an explicit budget that cannot fit is refused at start with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e

V1 = Path("/sys/fs/cgroup/memory")
LIMIT = 512 << 20


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if not (V1 / "cgroup.procs").exists() or os.geteuid() != 0:
        pytest.skip("no writable cgroup v1 memory controller")
    path = V1 / f"registry-gateway-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(LIMIT))
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            subprocess.run(["kill", "-9", pid], check=False)
        path.rmdir()


def start_in(cgroup: Path, env: dict[str, str], tmp_path: Path) -> subprocess.Popen[bytes]:
    routes = tmp_path / "routes.toml"
    routes.write_text('[[route]]\nname = "docker.io"\nupstream = "https://registry-1.docker.io"\ndefault = true\n')
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" -m gateway --routes "$1" --host 127.0.0.1 --port 0'
    return subprocess.Popen(
        ["sh", "-c", script, sys.executable, str(routes)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_the_budget_is_sized_from_the_limit_and_an_explicit_one_that_cannot_fit_is_refused(
    cgroup: Path, tmp_path: Path
) -> None:
    proc = start_in(cgroup, {"GATEWAY_WORKERS": "1"}, tmp_path)
    try:
        assert proc.stdout is not None
        start = json.loads(proc.stdout.readline())
        assert start["event"] == "start"
        assert (start["memory_limit"], start["shared_memory_from"]) == (LIMIT, "limit")
        assert 0 < start["shared_memory_bytes"] <= int(LIMIT * 0.8) - (96 << 20)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()

    refused = start_in(cgroup, {"GATEWAY_WORKERS": "2", "GATEWAY_SHARED_MEMORY_BYTES": str(LIMIT)}, tmp_path)
    _, err = refused.communicate(timeout=30)
    assert refused.returncode != 0
    assert b"over the container's limit of 512 MiB" in err
