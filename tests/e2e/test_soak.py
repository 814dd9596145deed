"""The soak (``python -m bench.soak``, issue 21) for 60 seconds: its counts, never its times.

The soak starts its own test bed, fronts, gateway and clients (skopeo, ctr, curl) and injects
faults all the time (``bench/soak/chaos.py``); this runs it as a process, as a user would, and
reads the JSON it writes. What must hold on any machine, however loaded: pulls happened and
some came through intact, no client ever got a clean end of wrong bytes, the gateway answered
no 5xx of its own making, and once the load stopped nothing was left in flight and the fds came
back to their baseline. (A transfer cut while an upstream was healthy is counted and reported;
``--strict`` makes it fail, once the resumes move to the next upstream.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import require
from tests.support import ROOT
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront

pytestmark = pytest.mark.e2e


def test_status_fault_answers_from_the_front(testbed: Testbed) -> None:
    """The ``status`` fault (the soak's 429 and 5xx): answered by the front, with its headers, once."""
    with FaultFront(testbed.ghcr.registry_url) as front:
        front.fault("/v2/", "status", status=429, headers={"Retry-After": "1"})
        with httpx.Client(trust_env=False) as client:
            first = client.get(f"{front.url}/v2/")
            second = client.get(f"{front.url}/v2/")  # the same connection: still usable after a canned answer
        assert (first.status_code, first.headers["retry-after"]) == (429, "1")
        assert first.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert second.status_code == 401  # relayed: the registry's own challenge
        assert [(r.status, r.fault) for r in front.requests] == [(429, "status"), (401, None)]


def test_soak_for_a_minute(tmp_path: Path) -> None:
    # The soak starts a test bed, a gateway and containerd of its own (as `python -m bench.soak` does).
    require("skopeo", "unshare", "containerd", "ctr", "curl", "nginx")
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "bench.soak", "--seconds", "60", "--out", str(out), "--workdir", str(tmp_path / "w")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    fig = result["figures"]
    print(proc.stdout)
    assert fig["pulls"] > 0, proc.stdout
    assert fig["intact"] > 0, proc.stdout
    assert {"skopeo", "ctr", "curl"} <= set(fig["by_client"]), fig["by_client"]
    assert sum(fig["faults_armed"].values()) > 0
    assert fig["token_outages"] >= 1
    assert fig["edge_cut_by_expiry"] + fig["edge_refused_expired"] > 0  # CDN URLs did expire
    assert fig["wrong_bytes_ended_cleanly"] == 0, fig["failed_samples"]
    assert fig["gateway_5xx_of_its_own"] == 0, fig["own_5xx_samples"]
    assert fig["gateway_alive"]
    assert fig["gauges_end"]["registry_gateway_streams_in_flight"] == 0
    assert fig["gauges_end"]["registry_gateway_shared_fetches_in_flight"] == 0
    start, end = fig["process"]["start"], fig["process"]["end"]
    assert end["client_sockets"] <= start["client_sockets"]
    assert end["other_fds"] <= start["other_fds"] + 2
    # Whatever else the soak judged (RSS growth included) is in its exit status.
    assert proc.returncode == 0, result["invariants_failed"]
