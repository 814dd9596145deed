"""The command line: one clear line for every configuration error, no traceback; --help; the real start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port, wait_for_http


def gateway_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30, env=full_env, cwd=cwd
    )


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("[[route]\n", {}, "invalid TOML"),
        (
            '[[route]]\nname = "ghcr.io"\nupstream = "https://ghcr.io"\nupstrem = 1\n',
            {},
            "route #1 (ghcr.io): upstrem: unknown key",
        ),
        (
            '[[route]]\nname = "a.io"\nupstream = "https://a.io"\nhosts = ["x.*"]\n[[route]]\nname = "b.io"\nupstream = "https://b.io"\nhosts = ["x.*"]\n',
            {},
            "host pattern 'x.*' is already claimed by route 'a.io'",
        ),
        (
            '[[route]]\nname = "a.io"\nupstream = "gopher://a.io"\n',
            {},
            "upstream: 'gopher://a.io' is not an http:// or https:// URL",
        ),
        (
            '[[route]]\nname = "a.io"\nupstream = "https://a.io"\nusername = "u"\npassword_env = "MISSING_PW"\n',
            {},
            "password_env: environment variable MISSING_PW is not set",
        ),
    ],
)
def test_configuration_errors_are_one_line(tmp_path, toml, env, expected):
    routes = tmp_path / "routes.toml"
    routes.write_text(toml)
    proc = gateway_cli("--routes", str(routes), env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"registry-gateway: error: {routes}: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_routes_file(tmp_path):
    proc = gateway_cli(cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "registry-gateway: error: routes.toml: file not found"


def test_bad_setting_from_environment(tmp_path):
    proc = gateway_cli("--routes", str(ROOT / "routes.toml"), env={"GATEWAY_PORT": "not-a-port"})
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("registry-gateway: error: GATEWAY_PORT:")


def test_help_lists_the_options():
    out = gateway_cli("--help").stdout
    for option in ("--routes", "--host", "--port", "--workers", "GATEWAY_"):
        assert option in out


def test_starts_with_the_default_routes_and_settings_from_the_environment(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {"PYTHONPATH": str(ROOT), "GATEWAY_PORT": str(port), "GATEWAY_HOST": "127.0.0.1", "GATEWAY_WORKERS": "2"}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        assert httpx.get(f"http://127.0.0.1:{port}/v2/").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert "docker.io" in ready["routes"]
        # A request that needs no upstream: an unknown registry is refused locally.
        resp = httpx.get(f"http://127.0.0.1:{port}/v2/evil.example/x/manifests/1")
        assert resp.status_code == 404
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert b'"event":"start"' in out
