"""``registry-gateway check`` as a real process against the test bed's registries (all on 127.0.0.1).

The routes check: the test bed's own routes are all good (exit 0); a closed port, refused
credentials and a realm outside the address policy are each one line of reason (exit 1); a
broken routes file is the server's own one-line error. ``check IMAGE``: each addressing mode
names the route and repository the running gateway really uses (read from its access log),
and refusals name their registry error code. The example in docs/operations.md runs too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import gateway_routes
from tests.support import ROOT, Gateway, free_port
from tests.testbed.bed import Testbed

DOCS = ROOT / "docs" / "operations.md"
MANIFEST_TYPES = ",".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
WRONG_PASSWORD = "not-the-password-42"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` with no GATEWAY_* settings and no egress proxy: only 127.0.0.1 is reached."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k.lower() not in proxies}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, env=full_env, cwd=cwd
    )


def credentials_env(testbed: Testbed, password: str | None = None) -> dict[str, str]:
    return {
        "E2E_GHCR_USER": testbed.credentials.username,
        "E2E_GHCR_PASS": password or testbed.credentials.password,
    }


def rows(stdout: str) -> dict[tuple[str, str], str]:
    """The table's rows by (route, upstream)."""
    found = {}
    for line in stdout.splitlines()[1:]:
        cells = line.split()
        if len(cells) >= 3 and cells[2].startswith("http://"):
            found[(cells[0], cells[2])] = line
    return found


@pytest.fixture(scope="module")
def routes_file(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The routes the session gateway runs with (tests/e2e/conftest.py)."""
    path = tmp_path_factory.mktemp("check") / "routes.toml"
    path.write_text(gateway_routes(testbed))
    return path


def test_the_test_beds_routes_are_all_good(routes_file: Path, testbed: Testbed):
    proc = run_cli("check", "--routes", str(routes_file), env=credentials_env(testbed))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    table = rows(proc.stdout)
    assert len(table) == 6
    assert all(line.endswith(" ok") for line in table.values())
    hub, ghcr, quay = testbed.hub, testbed.ghcr, testbed.quay
    docker = table[("docker.io", hub.url)]
    assert re.search(r"\b401 \([\d.]+ ms\)", docker)
    assert f"Bearer realm={hub.realm} service={hub.service}" in docker
    assert re.search(r"allowed +anonymous: ok \([\d.]+ ms\)", docker)
    assert re.search(r"user:ghcr-user: ok \([\d.]+ ms\)", table[("ghcr.io", ghcr.url)])
    assert "anonymous: ok" in table[("anon-ghcr.test", ghcr.url)]
    assert f"Bearer realm={quay.realm} service={quay.service}" in table[("quay.io", quay.url)]
    passthrough = table[("login-ghcr.test", ghcr.url)]
    assert "passthrough" in passthrough
    assert "from clients" in passthrough
    assert proc.stdout.strip().endswith("6 routes, 6 upstreams: all good")
    assert testbed.credentials.password not in proc.stdout


def test_json_output(routes_file: Path, testbed: Testbed):
    proc = run_cli("check", "--json", "--routes", str(routes_file), env=credentials_env(testbed))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    ghcr = next(c for c in doc["checks"] if c["route"] == "ghcr.io")
    assert ghcr["ping"] == "401"
    assert ghcr["realm"] == testbed.ghcr.realm
    assert ghcr["token"] == "user:ghcr-user: ok"
    assert ghcr["ping_ms"] > 0
    assert ghcr["token_ms"] > 0


def test_each_failure_is_one_line_of_reason(testbed: Testbed, tmp_path: Path):
    closed = f"http://127.0.0.1:{free_port()}"
    routes = tmp_path / "routes.toml"
    routes.write_text(f"""
[[route]]
name = "docker.io"
upstream = "{testbed.hub.url}"
allow_private_addresses = true
default = true
library = true

[[route]]
name = "closed.test"
upstream = "{closed}"
allow_private_addresses = true

[[route]]
name = "ghcr.io"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
username_env = "E2E_GHCR_USER"
password_env = "E2E_GHCR_PASS"

# No allow_private_addresses: the upstream is trusted (the operator named it), its realm is not.
[[route]]
name = "private-realm.test"
upstream = "{testbed.ghcr.url}"
""")
    proc = run_cli("check", "--routes", str(routes), env=credentials_env(testbed, WRONG_PASSWORD))
    assert proc.returncode == 1
    table = rows(proc.stdout)
    assert table[("docker.io", testbed.hub.url)].endswith(" ok")
    assert re.search(r"unreachable \([\d.]+ ms\) +- +- +- +FAIL$", table[("closed.test", closed)])
    assert "user:ghcr-user: refused" in table[("ghcr.io", testbed.ghcr.url)]
    assert re.search(r"refused +- +FAIL$", table[("private-realm.test", testbed.ghcr.url)])
    assert proc.stdout.strip().endswith("4 routes, 4 upstreams: 3 problems")
    realm = testbed.ghcr.realm
    assert proc.stderr.splitlines() == [
        f"registry-gateway: error: route closed.test ({closed}): GET /v2/: upstream closed.test is unreachable (127.0.0.1)",
        f"registry-gateway: error: route ghcr.io ({testbed.ghcr.url}): token (user:ghcr-user): "
        f"the upstream token endpoint {realm} refused the gateway's configured credentials (401)",
        f"registry-gateway: error: route private-realm.test ({testbed.ghcr.url}): the token realm {realm} is refused "
        "by the route's address policy: 127.0.0.1 is not a public address (allow_private_addresses = true allows it)",
    ]
    assert WRONG_PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        ("[[route]\n", {}),
        ('[[route]]\nname = "a.io"\nupstream = "https://a.io"\nupstrem = 1\n', {}),
        ('[[route]]\nname = "a.io"\nupstream = "https://a.io"\nusername = "u"\npassword_env = "MISSING_PW"\n', {}),
        ('[[route]]\nname = "a.io"\nupstream = "https://a.io"\nauth = "passthrough"\n', {"GATEWAY_HTPASSWD": "/x"}),
        ('[[route]]\nname = "a.io"\nupstream = "https://a.io"\n', {"GATEWAY_CONNECT_TIMEOUT": "-1"}),
    ],
    ids=["toml", "unknown-key", "missing-secret", "passthrough-with-htpasswd", "bad-setting"],
)
def test_a_broken_configuration_is_the_servers_own_line(tmp_path: Path, toml: str, env: dict[str, str]):
    routes = tmp_path / "routes.toml"
    routes.write_text(toml)
    server = run_cli("--routes", str(routes), env=env)
    check = run_cli("check", "--routes", str(routes), env=env)
    assert server.returncode != 0
    assert check.returncode == 2
    assert check.stdout == ""
    assert len(check.stderr.splitlines()) == 1
    assert check.stderr.startswith("registry-gateway: error: ")
    assert check.stderr == server.stderr


def test_missing_routes_file_reads_the_default_like_the_server(tmp_path: Path):
    proc = run_cli("check", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "registry-gateway: error: routes.toml: file not found"


# --- check IMAGE --------------------------------------------------------------------------


def access_record(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in gateway.log_lines():
            if request_id in line and '"event":"access"' in line:
                record: dict[str, Any] = json.loads(line)
                return record
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


def alpine_digest(testbed: Testbed) -> str:
    return testbed.images["alpine"].digest


@pytest.mark.parametrize(
    ("image", "route", "repository", "why"),
    [
        ("ghcr.example.com/org/app:v1", "ghcr.io", "org/app", "host pattern: Host ghcr.example.com matches 'ghcr.*'"),
        ("example.com/quay.io/coreos/etcd:v3.5", "quay.io", "coreos/etcd", "path prefix: 'quay.io/'"),
        ("nginx", "docker.io", "library/nginx", "library/ added by Docker"),
        ("example.com/busybox:1.36", "docker.io", "library/busybox", "library/ added: route docker.io"),
        ("localhost:5000/library/alpine@{digest}", "docker.io", "library/alpine", "default route: docker.io"),
    ],
    ids=["host-pattern", "path-prefix", "default-route", "library-added", "localhost-digest"],
)
def test_check_image_names_the_route_the_server_takes(
    routes_file: Path, testbed: Testbed, gateway: Gateway, image: str, route: str, repository: str, why: str
):
    image = image.format(digest=alpine_digest(testbed))
    proc = run_cli("check", "--routes", str(routes_file), image, env=credentials_env(testbed))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert re.search(rf"^route +{re.escape(route)}$", proc.stdout, re.M)
    assert re.search(rf"^repository +{re.escape(repository)}$", proc.stdout, re.M)
    assert why in proc.stdout
    assert re.search(r"^result +ok\Z", proc.stdout.rstrip(), re.M)

    doc = json.loads(
        run_cli("check", "--json", "--routes", str(routes_file), image, env=credentials_env(testbed)).stdout
    )
    assert (doc["route"], doc["repository"]) == (route, repository)
    upstream = {"docker.io": testbed.hub, "ghcr.io": testbed.ghcr, "quay.io": testbed.quay}[route]
    assert doc["upstreams"] == [upstream.url]
    assert f"{upstream.url}/v2/{repository}/manifests/" in proc.stdout

    # The running gateway, asked the same request, takes the same route to the same repository.
    request_id = uuid.uuid4().hex
    host = doc["request"]["host"] or "mirror.test"
    httpx.get(
        gateway.url + doc["request"]["path"],
        headers={"host": host, "accept": MANIFEST_TYPES, "x-request-id": request_id},
        timeout=30,
    )
    record = access_record(gateway, request_id)
    assert (record["route"], record["repository"]) == (route, repository)


@pytest.fixture(scope="module")
def policy_routes_file(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check-policy") / "routes.toml"
    path.write_text(
        gateway_routes(testbed)
        + f"""
[[route]]
name = "public-ghcr.test"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
hosts = ["public.*"]
deny = ["private/**"]
"""
    )
    return path


@pytest.mark.parametrize(
    ("image", "error", "why"),
    [
        (
            "example.com/evil.example/x/y:1",
            "NAME_UNKNOWN: no route for registry 'evil.example': this gateway only serves its configured registries",
            "path: 'evil.example' looks like a registry host but is no route's name or prefix",
        ),
        (
            "public.example.com/private/secret-app:v1",
            "DENIED: the gateway's policy refuses 'private/secret-app' on public-ghcr.test",
            "policy: refused by route public-ghcr.test (deny private/**)",
        ),
    ],
    ids=["unknown-registry", "denied"],
)
def test_check_image_refusals(policy_routes_file: Path, testbed: Testbed, image: str, error: str, why: str):
    proc = run_cli("check", "--routes", str(policy_routes_file), image, env=credentials_env(testbed))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"registry-gateway: error: {error}"]
    assert why in proc.stdout
    assert re.search(rf"^result +refused \({error.split(':')[0]}\)\Z", proc.stdout.rstrip(), re.M)


def test_check_image_refuses_a_malformed_reference(routes_file: Path, testbed: Testbed):
    proc = run_cli("check", "--routes", str(routes_file), "nginx:-bad", env=credentials_env(testbed))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "registry-gateway: error: not an image reference: 'nginx:-bad': '-bad' is not a valid tag"
    )


# --- the documented example -----------------------------------------------------------------


def documented_commands() -> list[str]:
    match = re.search(r"<!-- example: check -->\n```sh\n(.*?)```", DOCS.read_text(), re.S)
    assert match is not None, "docs/operations.md has no <!-- example: check --> block"
    return [line for line in match.group(1).splitlines() if line.startswith("registry-gateway check")]


def test_the_documented_example_runs(routes_file: Path, testbed: Testbed):
    commands = documented_commands()
    assert len(commands) >= 2
    for command in commands:
        args = shlex.split(command.replace("/etc/registry-gateway/routes.toml", str(routes_file)))[1:]
        proc = run_cli(*args, env=credentials_env(testbed))
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert re.search(r"(: all good|^result +ok)\Z", proc.stdout.rstrip(), re.M), proc.stdout
