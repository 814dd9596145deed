"""Security and resilience end to end: passed-through logins, gateway logins, failover, policy."""

from __future__ import annotations

import json
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.e2e.clients import Dockerd, Podman, Skopeo, verify_dir_copy
from tests.e2e.conftest import gateway_routes
from tests.support import Gateway, free_port, run_gateway
from tests.testbed.bed import Testbed


def test_passthrough_login_with_skopeo(skopeo: Skopeo, gateway: Gateway, testbed: Testbed, tmp_path: Path, token_stats):
    ref = f"login.gw.test:{gateway.port}/private/secret-app:v1"
    creds = f"{testbed.credentials.username}:{testbed.credentials.password}"
    dest = skopeo.copy_all(ref, tmp_path / "copy", "--src-creds", creds)
    verify_dir_copy(dest, testbed.images["secret-app"])
    # The client's own credentials reached the token server, relayed by the gateway.
    assert testbed.credentials.username in {r.basic_user for r in token_stats.requests}
    # Without them, or with a user who may not pull it, the private image stays private.
    with pytest.raises(AssertionError, match="(?i)unauthorized|denied"):
        skopeo.copy_all(ref, tmp_path / "anon")
    other = f"{testbed.other_credentials.username}:{testbed.other_credentials.password}"
    with pytest.raises(AssertionError, match="(?i)unauthorized|denied"):
        skopeo.copy_all(ref, tmp_path / "other", "--src-creds", other)
    with pytest.raises(AssertionError, match="(?i)unauthorized|denied"):
        skopeo.copy_all(ref, tmp_path / "wrong", "--src-creds", "ghcr-user:wrong-password")


def test_passthrough_podman_login_and_pull(podman: Podman, gateway: Gateway, testbed: Testbed, tmp_path: Path):
    """Host mode (``login.gw.test`` is the passthrough route's host): podman's own login, relayed."""
    registry = f"login.gw.test:{gateway.port}"
    ref = f"{registry}/private/secret-app:v1"
    conf = tmp_path / "registries.conf"
    conf.write_text("unqualified-search-registries = []\n")
    authfile = tmp_path / "auth.json"
    authfile.write_text('{"auths": {}}')
    flags = ["--tls-verify=false", "--authfile", str(authfile)]
    user, password = testbed.credentials.as_tuple()
    with pytest.raises(AssertionError, match="(?i)unauthorized|denied|authentication required"):
        podman("pull", *flags, ref, registries_conf=conf)
    with pytest.raises(AssertionError, match="(?i)invalid username/password|unauthorized"):
        podman("login", *flags, "-u", user, "--password-stdin", registry, registries_conf=conf, stdin="wrong\n")
    login = podman(
        "login", *flags, "-u", user, "--password-stdin", registry, registries_conf=conf, stdin=password + "\n"
    )
    assert "Login Succeeded" in login.stdout
    podman("pull", *flags, ref, registries_conf=conf)
    assert podman.digest(ref, conf) == testbed.images["secret-app"].digest
    podman("rmi", ref, registries_conf=conf)


def test_passthrough_docker_login_and_pull(dockerd: Dockerd, gateway: Gateway, testbed: Testbed):
    registry = f"login.gw.test:{gateway.port}"
    ref = f"{registry}/private/secret-app:v1"
    with pytest.raises(AssertionError, match="(?i)unauthorized|denied|no basic auth"):
        dockerd.docker("pull", ref)
    with pytest.raises(AssertionError, match="(?i)unauthorized|incorrect"):
        dockerd.docker("login", registry, "-u", testbed.credentials.username, "--password-stdin", stdin="wrong\n")
    dockerd.docker(
        "login",
        registry,
        "-u",
        testbed.credentials.username,
        "--password-stdin",
        stdin=testbed.credentials.password + "\n",
    )
    try:
        dockerd.docker("pull", ref)
        assert f"{registry}/private/secret-app@{testbed.images['secret-app'].digest}" in dockerd.repo_digests(ref)
        dockerd.docker("image", "rm", ref)
    finally:
        dockerd.docker("logout", registry)


def test_gateway_login_with_htpasswd(dockerd: Dockerd, skopeo: Skopeo, testbed: Testbed, tmp_path: Path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:" + bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(rounds=6)).decode() + "\n")
    env = {"GATEWAY_HTPASSWD": str(htpasswd), "E2E_GHCR_USER": "u", "E2E_GHCR_PASS": "p"}
    routes = gateway_routes(testbed).replace('auth = "passthrough"\n', "")  # incompatible with gateway logins
    with run_gateway(routes, tmp_path / "gw", env=env) as gw:
        assert httpx.get(f"{gw.url}/v2/").status_code == 401
        with pytest.raises(AssertionError, match="(?i)unauthorized|authentication required"):
            skopeo.copy_all(f"127.0.0.1:{gw.port}/alpine:3.20", tmp_path / "anon")
        dest = skopeo.copy_all(f"127.0.0.1:{gw.port}/alpine:3.20", tmp_path / "copy", "--src-creds", "alice:alice-pw")
        verify_dir_copy(dest, testbed.images["alpine"])
        registry = f"127.0.0.1:{gw.port}"
        dockerd.docker("login", registry, "-u", "alice", "--password-stdin", stdin="alice-pw\n")
        try:
            dockerd.docker("pull", f"{registry}/someorg/tool:1.0")
            assert f"{registry}/someorg/tool@{testbed.images['tool'].digest}" in dockerd.repo_digests(
                f"{registry}/someorg/tool:1.0"
            )
            dockerd.docker("image", "rm", f"{registry}/someorg/tool:1.0")
        finally:
            dockerd.docker("logout", registry)


def test_failover_past_a_dead_upstream(skopeo: Skopeo, testbed: Testbed, tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}"
    routes = f"""
[[route]]
name = "docker.io"
upstream = ["{dead}", "{testbed.hub.url}"]
default = true
library = true
allow_private_addresses = true
"""
    with run_gateway(routes, tmp_path / "gw", env={"GATEWAY_BREAKER_FAILURES": "2"}) as gw:
        for name in ("alpine:3.20", "busybox:1.36", "someorg/tool:1.0"):
            key = {"alpine:3.20": "alpine", "busybox:1.36": "busybox", "someorg/tool:1.0": "tool"}[name]
            verify_dir_copy(skopeo.copy_all(f"127.0.0.1:{gw.port}/{name}", tmp_path / key), testbed.images[key])
        metrics = httpx.get(f"{gw.url}/metrics").text
        lines = [json.loads(line) for line in gw.log_lines() if '"event":"access"' in line]
    # The dead upstream cost two connection errors, then the breaker skipped it.
    assert 'registry_gateway_upstream_errors_total{reason="connect",route="docker.io"} 2.0' in metrics
    assert {r["upstream"] for r in lines if r.get("route") == "docker.io"} == {testbed.hub.url}


def test_realm_policy_without_the_opt_in(testbed: Testbed, tmp_path: Path, token_stats):
    """The bed's token server is on 127.0.0.1: a route that did not opt in must refuse to call it."""
    routes = f'[[route]]\nname = "ghcr.io"\nupstream = "{testbed.ghcr.url}"\ndefault = true\n'
    with run_gateway(routes, tmp_path / "gw") as gw:
        resp = httpx.get(f"{gw.url}/v2/org/app/manifests/v1")
    assert resp.status_code == 502
    assert "refused address" in resp.json()["errors"][0]["message"]
    assert token_stats.requests == []
