"""No credential or token ever appears in any log line, even at debug level."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx

from tests.e2e.clients import Skopeo, verify_dir_copy
from tests.e2e.conftest import gateway_routes
from tests.support import run_gateway
from tests.testbed.bed import Testbed


def test_no_secret_in_any_log_line(testbed: Testbed, skopeo: Skopeo, tmp_path: Path):
    user, password = testbed.credentials.username, testbed.credentials.password
    env = {"E2E_GHCR_USER": user, "E2E_GHCR_PASS": password}
    client_token = testbed.token("ghcr", "repository:org/app:pull")
    with run_gateway(gateway_routes(testbed), tmp_path / "gw", env=env, args=["--log-level", "debug"]) as gw:
        # Pulls that need the configured credentials, tokens, redirects and errors.
        dest = skopeo.copy_all(f"ghcr.gw.test:{gw.port}/private/secret-app:v1", tmp_path / "copy")
        verify_dir_copy(dest, testbed.images["secret-app"])
        skopeo.copy_all(f"127.0.0.1:{gw.port}/alpine:3.20", tmp_path / "copy2")
        # A client that sends its own credentials (they are not forwarded, and not logged).
        httpx.get(f"{gw.url}/v2/ghcr.io/org/app/manifests/v1", headers={"authorization": f"Bearer {client_token}"})
        httpx.get(f"{gw.url}/v2/alpine/manifests/3.20", auth=("someone", "client-password-123"))
        httpx.get(f"{gw.url}/v2/ghcr.io/org/app/manifests/v1?token=secret-in-query-1")
        lines = gw.log_lines()
    assert len(lines) > 20
    for line in lines:
        json.loads(line)  # every line is one JSON object
    text = "\n".join(lines)
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    for secret in (password, basic, client_token, "client-password-123", "secret-in-query-1", "Bearer ey", "eyJ"):
        assert secret not in text, f"{secret[:12]}... leaked into the log"
    assert any('"route":"ghcr.io"' in line and '"status":200' in line for line in lines)
