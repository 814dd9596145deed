"""The gateway process on IPv4 and IPv6: one dual-stack socket, or one socket per address.

Everything runs on 127.0.0.1 and ::1. A machine without IPv6 on loopback fails these
tests, with a message saying so, instead of skipping them: the default listener is
dual-stack, and CI must show it working.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, stop, wait_for_http

ROUTES = '[[route]]\nname = "local.test"\nupstream = "http://127.0.0.1:1"\ndefault = true\n'
V4 = "http://127.0.0.1:{port}"
V6 = "http://[::1]:{port}"


def port_free_on_both() -> int:
    """A port free on 127.0.0.1 and ::1 alike (bound once, dual-stack, then released)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError as exc:
            pytest.fail(f"this machine has no IPv6 on loopback (ip -6 addr show lo): {exc}")
        return int(s.getsockname()[1])


@contextlib.contextmanager
def gateway(
    tmp_path: Path, args: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
    """``python -m gateway`` with exactly these listening options (support.run_gateway adds --host 127.0.0.1)."""
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    port = port_free_on_both()
    log = tmp_path / f"gateway-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--routes", str(routes), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp_path,
        )
    try:
        yield port, proc, log
    finally:
        stop(proc)


def access_clients(log: Path) -> list[str]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line["client"] for line in lines if line.get("event") == "access" and line.get("path") == "/v2/"]


def answers(url: str) -> int:
    return httpx.get(f"{url}/v2/", timeout=10).status_code


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param([], None, id="default"),
        pytest.param(["--host", "::"], None, id="--host ::"),
        pytest.param(["--host", "127.0.0.1", "--host", "::1"], None, id="--host 127.0.0.1 --host ::1"),
        pytest.param([], {"GATEWAY_HOST": "127.0.0.1,::1", "GATEWAY_WORKERS": "2"}, id="GATEWAY_HOST list, 2 workers"),
        pytest.param(["--host", "::", "--workers", "2"], None, id="--host :: with 2 workers"),
    ],
)
def test_ipv4_and_ipv6_clients_are_both_served(tmp_path, args, env):
    with gateway(tmp_path, args, env) as (port, proc, log):
        wait_for_http(f"{V4.format(port=port)}/healthz", proc=proc)
        wait_for_http(f"{V6.format(port=port)}/healthz", proc=proc)
        assert answers(V4.format(port=port)) == 200
        assert answers(V6.format(port=port)) == 200
    # A dual-stack socket's IPv4 client is logged as 127.0.0.1, never ::ffff:127.0.0.1.
    assert sorted(access_clients(log)) == ["127.0.0.1", "::1"]


def test_an_ipv4_only_listener_refuses_ipv6(tmp_path):
    with gateway(tmp_path, ["--host", "0.0.0.0"]) as (port, proc, _):
        wait_for_http(f"{V4.format(port=port)}/healthz", proc=proc)
        with pytest.raises(httpx.ConnectError):
            answers(V6.format(port=port))


def test_a_taken_address_is_one_line_on_stderr(tmp_path):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        routes = tmp_path / "routes.toml"
        routes.write_text(ROUTES)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "--routes", str(routes), "--port", str(port), "--host", "127.0.0.1,::1"],
            capture_output=True,
            text=True,
            env={**env, "PYTHONPATH": str(ROOT)},
            timeout=60,
        )
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"registry-gateway: error: cannot listen on [::1]:{port}: Address already in use"


def test_forwarded_for_from_a_mapped_loopback_proxy(tmp_path):
    # The default GATEWAY_FORWARDED_ALLOW_IPS lists 127.0.0.1: through the dual-stack socket that
    # proxy is ::ffff:127.0.0.1, and must still be believed.
    with gateway(tmp_path, ["--host", "::"]) as (port, proc, log):
        wait_for_http(f"{V4.format(port=port)}/healthz", proc=proc)
        for url, client in ((V4, "2001:db8::7"), (V6, "203.0.113.9"), (V4, "::ffff:198.51.100.1")):
            resp = httpx.get(f"{url.format(port=port)}/v2/", headers={"X-Forwarded-For": client}, timeout=10)
            assert resp.status_code == 200
    assert access_clients(log) == ["2001:db8::7", "203.0.113.9", "198.51.100.1"]


def test_the_rate_limit_counts_a_mapped_client_as_its_ipv4_address(tmp_path):
    env = {"GATEWAY_RATE_LIMIT": "0.001", "GATEWAY_RATE_BURST": "1"}
    with gateway(tmp_path, ["--host", "::"], env) as (port, proc, _):
        wait_for_http(f"{V4.format(port=port)}/healthz", proc=proc)  # /healthz is not limited
        assert answers(V4.format(port=port)) == 200
        limited = httpx.get(f"{V4.format(port=port)}/v2/", timeout=10)
        assert limited.status_code == 429
        assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        # The same client named by a trusted proxy's X-Forwarded-For shares the bucket...
        forwarded = httpx.get(f"{V6.format(port=port)}/v2/", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=10)
        assert forwarded.status_code == 429
        # ...and ::1, another client, has its own.
        assert answers(V6.format(port=port)) == 200


def test_sigterm_closes_both_families(tmp_path):
    with gateway(tmp_path, ["--host", "::"], {"GATEWAY_SHUTDOWN_TIMEOUT": "5"}) as (port, proc, _):
        wait_for_http(f"{V4.format(port=port)}/healthz", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        for url in (V4, V6):
            with pytest.raises(httpx.ConnectError):
                answers(url.format(port=port))
