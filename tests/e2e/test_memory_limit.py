"""The windows' budget from a real memory cgroup (gateway/sizing.py): the gateway started inside one.

The tests make a cgroup v1 memory controller of their own (writable on these machines), limit it to
the shipped pod's memory limit (512 MiB, read from deploy/kubernetes/registry-gateway.yaml), and
start ``python -m gateway`` in it:

- unset, the budget is sized from the limit and logged; an explicit budget that cannot fit is
  refused at start with one line;
- the gateway as deploy/ ships it (the Deployment's environment: one worker, no explicit budget),
  in front of the test bed, serves a node rollout of an image with 3 big layers: 8 clients pull
  the 3 blobs at once each (as containerd pulls 3 layers at once), 3 of them slow, 1 that goes
  away mid-body. It is never OOM-killed, the cgroup's peak stays under the limit, every pull that
  completed hashes to the pushed digest, and the upstream (hub's CDN, its access log) is asked
  for each blob once, plus once per reader that fell out of the shared window and went on alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_herd import MIB, Blob, Pull, memory, push_bytes, windows_empty
from tests.e2e.test_integrity import blob_gets, log_events, metric
from tests.support import ROOT, Gateway, free_port, stop, wait_for, wait_for_http
from tests.testbed.bed import Testbed

pytestmark = pytest.mark.e2e

V1 = Path("/sys/fs/cgroup/memory")
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "registry-gateway.yaml"
_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def shipped_container() -> dict[str, Any]:
    """The gateway container of the rendered Deployment, as deploy/ ships it."""
    docs = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes the chart uses)."""
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return int(text.removesuffix(suffix)) * factor
    return int(text)


LIMIT = quantity(shipped_container()["resources"]["limits"]["memory"])  # 512Mi


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


# ---------------------------------------------------------------------- a rollout inside the limit
# 3 layers of 300 MiB: more than a shared window each (128 MiB, GATEWAY_SHARED_WINDOW_BYTES), so that
# slow readers can hold 3 full windows (384 MiB), more than the budget the limit leaves (about 313 MiB).
LAYERS = 3
LAYER = 300 * MIB
CLIENTS = 8
# curl --limit-rate: about 19 s a layer, far behind the others. 3 of them can hold up to a window of
# each layer at once (3 x 128 MiB, past the budget), so the memory cap may have to act.
SLOW = ("node-4", "node-5", "node-6")
SLOW_RATE = "16M"
GONE = "node-7"  # killed once each of its 3 pulls has this much
GONE_AT = 48 * MIB
REPO = "library/rollout"


def layer_bytes(seed: int) -> bytes:
    """A layer's bytes, the same on every run and cheap to make: one random MiB, each copy of it
    numbered in its first 8 bytes (nothing in the path compresses or deduplicates bodies)."""
    block = random.Random(seed).randbytes(MIB)
    return b"".join(n.to_bytes(8, "big") + block[8:] for n in range(LAYER // MIB))


@pytest.fixture(scope="module")
def layers(testbed: Testbed) -> list[Blob]:
    """The 3 layers, pushed to hub (which redirects blob GETs to its CDN)."""
    return [push_bytes(testbed, layer_bytes(seed), "hub", (REPO,)) for seed in range(LAYERS)]


@contextlib.contextmanager
def shipped_gateway_in(cgroup: Path, testbed: Testbed, workdir: Path) -> Iterator[Gateway]:
    """``python -m gateway`` started inside ``cgroup`` with the Deployment's environment (its own
    port aside), routed to the test bed's hub; its log in ``workdir``."""
    shipped = {e["name"]: e["value"] for e in shipped_container()["env"] if "value" in e}
    assert shipped["GATEWAY_WORKERS"] == "1"
    assert not [name for name in shipped if name.startswith("GATEWAY_SHARED_")]  # sized from the limit
    workdir.mkdir(parents=True, exist_ok=True)
    routes = workdir / "routes.toml"
    routes.write_text(
        f'[[route]]\nname = "docker.io"\nupstream = "{testbed.hub.registry_url}"\n'
        "allow_private_addresses = true\ndefault = true\nlibrary = true\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(shipped, GATEWAY_PORT=str(port), PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" -m gateway --routes "$1" --host 127.0.0.1'
    log = workdir / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script, sys.executable, str(routes)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        yield Gateway(url=f"http://127.0.0.1:{port}", port=port, log=log, proc=proc)
    finally:
        stop(proc)


def cgroup_value(cgroup: Path, name: str) -> int:
    return int((cgroup / name).read_text())


def oom_kills(cgroup: Path) -> int:
    """``oom_kill`` of memory.oom_control (kernels since 4.13): processes the OOM killer killed here."""
    fields = dict(line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines())
    return int(fields.get("oom_kill", 0))


def test_a_rollout_of_three_big_layers_stays_inside_the_shipped_pods_limit(
    cgroup: Path, testbed: Testbed, layers: list[Blob], tmp_path: Path
) -> None:
    with shipped_gateway_in(cgroup, testbed, tmp_path / "gateway") as gw:
        [start] = log_events(gw, "start")
        assert (start["memory_limit"], start["shared_memory_from"]) == (LIMIT, "limit")
        budget = start["shared_memory_bytes"]
        pid = gw.proc.pid  # sh exec'd the gateway: the same process, inside the cgroup
        assert str(pid) in (cgroup / "cgroup.procs").read_text().split()

        # Every node pulls the 3 layers at once; each pull is curl, its body hashed as it arrives.
        nodes = [f"node-{n}" for n in range(CLIENTS)]
        pulls = {
            (node, blob.digest): Pull(
                f"{gw.url}/v2/{REPO}/blobs/{blob.digest}", f"{node}-{i}", rate=SLOW_RATE if node in SLOW else None
            )
            for node in nodes
            for i, blob in enumerate(layers)
        }
        gone = [p for (node, _), p in pulls.items() if node == GONE]
        for p in gone:
            p.wait_for_bytes(GONE_AT, timeout=60)
            p.kill()
        for (node, digest), p in pulls.items():
            if node != GONE:
                p.wait()
                p.got(next(b for b in layers if b.digest == digest))
        assert wait_for(lambda: all(len(blob_gets(gw, b.digest)) == CLIENTS for b in layers))
        assert wait_for(lambda: windows_empty(gw))

        # Never killed, never restarted, never at the limit.
        assert gw.proc.poll() is None
        assert len(log_events(gw, "start")) == 1
        peak, failcnt, kills = (
            cgroup_value(cgroup, "memory.max_usage_in_bytes"),
            cgroup_value(cgroup, "memory.failcnt"),
            oom_kills(cgroup),
        )
        rss_peak = memory(pid, "VmHWM")
        held_now = metric(gw, "registry_gateway_shared_window_bytes")

        # Upstream: the CDN's access log, per layer (hub redirects every blob GET there).
        counts: dict[str, dict[str, Any]] = {}
        for blob in layers:
            lines = blob_gets(gw, blob.digest)
            detached = sorted(a["request_id"] for a in lines if a["share"] == "detached")
            fetches = [e for e in log_events(gw, "shared_fetch_ended") if e["digest"] == blob.digest]

            def cdn_gets(blob: Blob = blob) -> list[Any]:
                return [r for r in testbed.cdn.requests if r.digest == blob.digest and r.method == "GET"]

            # nginx logs a request once its answer is done: wait for the ones the gateway made.
            made = len(fetches) + len(detached)

            def all_logged(made: int = made) -> bool:
                return len(cdn_gets()) >= made

            wait_for(all_logged)
            got = cdn_gets()
            shares = sorted(a["share"] for a in lines)
            counts[blob.digest] = {
                "gets": len(got),
                "whole": len([r for r in got if r.range is None]),
                "ranges": len([r for r in got if r.range is not None]),
                "fetches": len(fetches),
                "merged": len([e for e in fetches if e["outcome"] == "merged"]),
                "shares": shares,
                "detached": detached,
            }
            # Each completed pull checked whole by the gateway too; the one that went away, cut short.
            for a in lines:
                if a["request_id"].startswith(GONE):
                    assert a["error"] == "client_disconnected"
                else:
                    assert (a["status"], a["bytes"], a["verified"]) == (200, LAYER, "ok"), a

    print(
        f"\n{CLIENTS} nodes x {LAYERS} layers of {LAYER >> 20} MiB in a {LIMIT >> 20} MiB cgroup: peak "
        f"{peak / MIB:.0f} MiB (gateway VmHWM {rss_peak / MIB:.0f} MiB), windows' budget {budget / MIB:.0f} MiB, "
        f"failcnt {failcnt}, oom_kill {kills}, window bytes held at the end {held_now:.0f}"
    )
    for n, blob in enumerate(layers):
        c = counts[blob.digest]
        print(
            f"layer {n}: {c['gets']} upstream GETs ({c['whole']} whole, {c['ranges']} ranges), "
            f"{c['fetches']} shared fetch(es), {c['merged']} merged; "
            f"shares {c['shares']}; detached {c['detached']}"
        )

    assert (kills, failcnt) == (0, 0)
    assert peak < LIMIT
    for blob in layers:
        c = counts[blob.digest]
        # No layer was turned away from sharing by the memory cap (that would cost 8 GETs).
        assert "bypassed" not in c["shares"]
        # The bound (docs/operations.md#memory): one shared fetch per layer read to its end; one
        # more whole GET for each younger fetch that a late client opened, which caught up and merged
        # into it (closed then: the bytes that client missed); and one Range GET for each reader that
        # fell out of the shared window and went on alone. All 8 nodes start at once, so the younger
        # fetches are few or none; the detached readers are the slow ones, or any the memory cap let go.
        assert c["whole"] == c["fetches"]
        assert c["fetches"] - c["merged"] == 1
        assert c["ranges"] == len(c["detached"])
        assert c["gets"] <= 1 + len(c["detached"]) + c["merged"]
