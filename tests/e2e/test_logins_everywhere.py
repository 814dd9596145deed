"""Logins on a shared host (#11) end to end: passthrough by prefix, by ``ns`` and as the default route.

Three gateways on 127.0.0.1, their routes taken from docs/clients.md with the test bed's upstreams:

- ``shared``: the default route ``docker.io`` (the bed's hub, the gateway's anonymous credentials,
  ``library = true``) and a passthrough route ``ghcr.io`` (the bed's ghcr, no host pattern: it is
  reachable by prefix and ``ns`` only);
- ``mirror``: the default route passes logins through (the hub, holding a private repository for
  this module), for Docker's ``registry-mirrors``; a host-mode passthrough route beside it;
- ``plain``: ``shared`` with ``ghcr.io`` using the gateway's own (anonymous) credentials, the
  baseline for the cost of the login challenge.

Each upstream sits behind a ``FaultFront`` that records the ``Authorization`` of every request it
relays, so the tests can say exactly what reached the registries: the client's own upstream
token for passthrough, the gateway's token otherwise, never a grant. Every client runs the
documented commands (skopeo, podman, docker, ctr), and every pull is compared digest for digest
with what the bed pushed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shlex
import statistics
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.auth.grants import Grants
from tests.e2e.clients import (
    CLOSED,
    Containerd,
    Dockerd,
    Podman,
    Skopeo,
    start_dockerd,
    verify_dir_copy,
)
from tests.e2e.conftest import require
from tests.e2e.guides import adapt, example
from tests.support import Gateway, run_gateway
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront
from tests.testbed.images import Image
from tests.testbed.tokens import ADMIN_PASSWORD, ADMIN_USER, OTHER_PASSWORD, Scope, TokenRequest, TokenServer

SECRET_REPO = "private/secret-app"  # on the bed's ghcr, and copied into its hub by ``hub_private``
SECRET_SCOPE = f"repository:{SECRET_REPO}:pull"
DOC_IMAGE = "my-org/private-app"  # the docs' name for it
DOC_USER = "my-user"
WRONG_PASSWORD = "not-the-password-42"
DOC_UPSTREAMS = {"hub": "https://registry-1.docker.io", "ghcr": "https://ghcr.io"}
GRANT_PREFIX = "rg1."

# Every token request the bed's token server saw during this module (``_collect_token_requests``).
TOKEN_REQUESTS: list[TokenRequest] = []


# --- the gateways ---------------------------------------------------------------------------


@dataclass
class Fronts:
    hub: FaultFront
    ghcr: FaultFront


@dataclass
class Gw:
    """A gateway under test and the ``GATEWAY_TOKEN_SECRET`` it signs its grants with."""

    gateway: Gateway
    secret: str

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def access(self) -> list[dict[str, object]]:
        """Its access lines once it has logged every request answered so far (it logs just after answering)."""
        seen = -1
        deadline = time.monotonic() + 5
        while True:
            lines = [json.loads(line) for line in self.gateway.log_lines() if '"event":"access"' in line]
            if len(lines) == seen or time.monotonic() > deadline:
                return lines
            seen = len(lines)
            time.sleep(0.15)


def bed_routes(documented: str, fronts: Fronts) -> str:
    """A documented routes.toml with the real registries swapped for the bed's (behind the fronts)."""
    for key, url in (("hub", fronts.hub.url), ("ghcr", fronts.ghcr.url)):
        documented = documented.replace(
            f'upstream = "{DOC_UPSTREAMS[key]}"', f'upstream = "{url}"\nallow_private_addresses = true'
        )
    assert "https://" not in documented
    return documented


@pytest.fixture(scope="module")
def fronts(testbed: Testbed) -> Iterator[Fronts]:
    with FaultFront(testbed.hub.url) as hub, FaultFront(testbed.ghcr.url) as ghcr:
        yield Fronts(hub, ghcr)


@contextlib.contextmanager
def gateway_for(routes: str, workdir: Path) -> Iterator[Gw]:
    secret = secrets.token_hex(32)
    with run_gateway(routes, workdir, env={"GATEWAY_TOKEN_SECRET": secret}) as gw:
        yield Gw(gw, secret)


@pytest.fixture(scope="module")
def shared(fronts: Fronts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    routes = bed_routes(example("shared-host-routes"), fronts)
    with gateway_for(routes, tmp_path_factory.mktemp("shared")) as gw:
        yield gw


@pytest.fixture(scope="module")
def plain(fronts: Fronts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    documented = example("shared-host-routes")
    assert documented.count('auth = "passthrough"\n') == 1
    routes = bed_routes(documented.replace('auth = "passthrough"\n', ""), fronts)
    with gateway_for(routes, tmp_path_factory.mktemp("plain")) as gw:
        yield gw


@pytest.fixture(scope="module")
def hub_private(testbed: Testbed, skopeo: Skopeo) -> Image:
    """The bed's ``private/secret-app`` copied, digests kept, into its hub: a private Docker Hub repository."""
    admin = f"{ADMIN_USER}:{ADMIN_PASSWORD}"
    skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--src-creds",
        admin,
        "--dest-creds",
        admin,
        f"docker://{testbed.ghcr.registry_host_port}/{SECRET_REPO}:v1",
        f"docker://{testbed.hub.registry_host_port}/{SECRET_REPO}:v1",
    )
    assert testbed.tokens.grant(None, Scope("repository", SECRET_REPO, ("pull",))) == ()  # private for the anonymous
    return testbed.images["secret-app"]


@pytest.fixture(scope="module")
def mirror(fronts: Fronts, hub_private: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    routes = bed_routes(example("mirror-routes"), fronts)
    # Host mode beside it, unchanged: a host its pattern claims relays the upstream's own tokens.
    routes += f"""
[[route]]
name = "login-ghcr.test"
upstream = "{fronts.ghcr.url}"
allow_private_addresses = true
hosts = ["login.*"]
auth = "passthrough"
"""
    with gateway_for(routes, tmp_path_factory.mktemp("mirror")) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _collect_token_requests(testbed: Testbed) -> Iterator[None]:
    testbed.tokens.reset()
    yield
    TOKEN_REQUESTS.extend(testbed.tokens.requests)


# --- small helpers --------------------------------------------------------------------------


def documented_commands(name: str, gw: Gw) -> list[list[str]]:
    """The example's command lines, for this gateway on 127.0.0.1 and the bed's private image."""
    text = adapt(example(name), gw.port, scheme=False).replace("gw.test", "127.0.0.1")
    text = text.replace(DOC_IMAGE, SECRET_REPO)
    return [argv for line in text.splitlines() if (argv := shlex.split(line, comments=True))]


def tokens_of(lines: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in lines if r.get("kind") == "token"]


def new_lines(gw: Gw, before: int) -> list[dict[str, object]]:
    return gw.access()[before:]


def grant_payload(grant: str) -> dict[str, object]:
    assert grant.startswith(GRANT_PREFIX)
    payload = grant[len(GRANT_PREFIX) :].partition(".")[0]
    doc: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return doc


def challenge(gw: Gw, service: str, repository: str | None = None, host: str | None = None) -> str:
    value = f'Bearer realm="http://{host or gw.host}/auth/token",service="{service}"'
    return value + (f',scope="repository:{repository}:pull"' if repository else "")


MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def manifest(gw: Gw, path: str, token: str | None, host: str | None = None) -> httpx.Response:
    headers = {"accept": MANIFEST_ACCEPT}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if host is not None:
        headers["host"] = host
    return httpx.get(f"{gw.url}/v2/{path}", headers=headers, timeout=30)


def get_token(gw: Gw, *scopes: str, auth: tuple[str, str] | None = None, service: str = "docker.io") -> str:
    params = httpx.QueryParams([("service", service), *(("scope", s) for s in scopes)])
    resp = httpx.get(f"{gw.url}/auth/token", params=params, auth=auth, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    token: str = resp.json()["token"]
    assert resp.json()["access_token"] == token
    return token


# --- what the gateway says on the wire ------------------------------------------------------


def test_the_shared_host_challenges_and_answers_with_grants(
    shared: Gw, mirror: Gw, testbed: Testbed, token_stats: TokenServer
) -> None:
    """The ping, the token endpoint (GET and OAuth2 POST) and what the relay accepts, request by request."""
    user, password = testbed.credentials.as_tuple()
    secret_app = testbed.images["secret-app"]
    # /v2/ asks for a login on the host the client used; the service is the default route's name.
    ping = httpx.get(f"{shared.url}/v2/")
    assert ping.status_code == 401
    assert ping.headers["www-authenticate"] == challenge(shared, "docker.io")
    other_host = f"gw.test:{shared.port}"
    ping = httpx.get(f"{shared.url}/v2/", headers={"host": other_host})
    assert ping.headers["www-authenticate"] == challenge(shared, "docker.io", host=other_host)
    assert httpx.get(f"{mirror.url}/v2/").headers["www-authenticate"] == challenge(mirror, "docker.io")

    # One token request for the passthrough route's private image and the default route's public
    # one: the ghcr scope is relayed with the client's credentials, the hub one is not asked for.
    token_stats.reset()
    both = get_token(shared, f"repository:ghcr.io/{SECRET_REPO}:pull", "repository:alpine:pull", auth=(user, password))
    asked = token_stats.requests
    assert [(r.service, r.scopes, r.account, r.status) for r in asked] == [
        (testbed.ghcr.service, (SECRET_SCOPE,), user, 200)
    ]
    payload = grant_payload(both)
    assert payload["r"] == ["ghcr.io", "docker.io"]
    inner = payload["u"]
    assert isinstance(inner, str)
    claims = testbed.tokens.decode(inner, testbed.ghcr.service)
    assert claims["sub"] == user
    assert claims["access"] == [{"type": "repository", "name": SECRET_REPO, "actions": ["pull"]}]
    ok = manifest(shared, f"ghcr.io/{SECRET_REPO}/manifests/v1", both)
    assert ok.status_code == 200, ok.text
    assert ok.headers["docker-content-digest"] == secret_app.digest
    assert manifest(shared, "library/alpine/manifests/3.20", both).status_code == 200
    assert httpx.get(f"{shared.url}/v2/", headers={"authorization": f"Bearer {both}"}).status_code == 200

    # The OAuth2 form, as containerd posts it in ns mode: service names the route (ns), the
    # scope the name without prefix.
    form = {
        "grant_type": "password",
        "username": user,
        "password": password,
        "service": "ghcr.io",
        "scope": SECRET_SCOPE,
        "client_id": "e2e",
    }
    posted = httpx.post(f"{shared.url}/auth/token", data=form)
    assert posted.status_code == 200, posted.text
    ns_grant = posted.json()["access_token"]
    assert grant_payload(ns_grant)["r"] == ["ghcr.io"]
    assert manifest(shared, f"{SECRET_REPO}/manifests/v1?ns=ghcr.io", ns_grant).status_code == 200
    wrong_form = {**form, "password": WRONG_PASSWORD}
    assert httpx.post(f"{shared.url}/auth/token", data=wrong_form).status_code == 401

    # docker login: no scope, credentials checked at the login route (here the one passthrough route).
    assert get_token(shared, auth=(user, password))
    refused = httpx.get(f"{shared.url}/auth/token", params={"service": "docker.io"}, auth=(user, WRONG_PASSWORD))
    assert refused.status_code == 401
    assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"

    # What the relay refuses, each with a fresh challenge naming the route and the repository.
    anonymous = get_token(shared, "repository:library/alpine:pull")
    assert (grant_payload(anonymous)["r"], grant_payload(anonymous)["u"]) == (["docker.io"], None)
    ghcr_only = get_token(shared, f"repository:ghcr.io/{SECRET_REPO}:pull", auth=(user, password))
    mac_flipped = both[:-2] + ("AA" if not both.endswith("AA") else "BB")
    expired, _ = Grants(shared.secret.encode(), clock=lambda: time.time() - 3600).mint(["ghcr.io"], inner, 60)
    raw_upstream = testbed.token("ghcr", SECRET_SCOPE, user)  # valid at ghcr, but not a grant
    from_another_gateway = get_token(mirror, "repository:library/alpine:pull")
    secret_path = f"ghcr.io/{SECRET_REPO}/manifests/v1"
    for why, token in {
        "a grant for another route": anonymous,
        "a forged grant": mac_flipped,
        "an expired grant": expired,
        "a raw upstream token": raw_upstream,
        "another gateway's grant": from_another_gateway,
        "no token": None,
    }.items():
        resp = manifest(shared, secret_path, token)
        assert resp.status_code == 401, why
        assert resp.headers["www-authenticate"] == challenge(shared, "ghcr.io", f"ghcr.io/{SECRET_REPO}"), why
    # A grant for the passthrough route does not admit to the default route, nor does a stranger's.
    for why, token in {"a grant for another route": ghcr_only, "another gateway's grant": from_another_gateway}.items():
        resp = manifest(shared, "library/alpine/manifests/3.20", token)
        assert resp.status_code == 401, why
        assert resp.headers["www-authenticate"] == challenge(shared, "docker.io", "library/alpine"), why
    assert httpx.get(f"{shared.url}/v2/", headers={"authorization": f"Bearer {mac_flipped}"}).status_code == 401

    # Another replica with the same GATEWAY_TOKEN_SECRET: its grant is as good as this one's.
    replica, _ = Grants(shared.secret.encode()).mint(["ghcr.io"], inner, 60)
    assert manifest(shared, secret_path, replica).status_code == 200

    # The default route that passes logins through: library/ added before the scope is relayed.
    token_stats.reset()
    hub_grant = get_token(mirror, "repository:alpine:pull")
    assert [(r.service, r.scopes, r.account) for r in token_stats.requests] == [
        (testbed.hub.service, ("repository:library/alpine:pull",), None)
    ]
    assert manifest(mirror, "library/alpine/manifests/3.20", hub_grant).status_code == 200

    # Host mode is unchanged: a host its pattern claims relays the upstream's own token.
    login_host = f"login.gw.test:{mirror.port}"
    ping = httpx.get(f"{mirror.url}/v2/", headers={"host": login_host})
    assert ping.headers["www-authenticate"] == challenge(mirror, "login-ghcr.test", host=login_host)
    raw = httpx.get(
        f"{mirror.url}/auth/token",
        params={"service": "login-ghcr.test", "scope": SECRET_SCOPE},
        auth=(user, password),
        headers={"host": login_host},
    ).json()["token"]
    assert not raw.startswith(GRANT_PREFIX)
    assert testbed.tokens.decode(raw, testbed.ghcr.service)["sub"] == user
    assert manifest(mirror, f"{SECRET_REPO}/manifests/v1", raw, host=login_host).status_code == 200


# --- skopeo and podman by prefix ------------------------------------------------------------


def test_skopeo_by_prefix(shared: Gw, skopeo: Skopeo, testbed: Testbed, tmp_path: Path) -> None:
    user, password = testbed.credentials.as_tuple()
    (argv,) = documented_commands("login-prefix-skopeo", shared)
    assert argv[:4] == ["skopeo", "copy", "--src-creds", DOC_USER]
    source, dest = argv[4].removeprefix("docker://"), tmp_path / "app"
    assert source == f"{shared.host}/ghcr.io/{SECRET_REPO}:v1"
    verify_dir_copy(skopeo.copy_all(source, dest, "--src-creds", f"{user}:{password}"), testbed.images["secret-app"])
    # The default route's public image, with no login at all.
    verify_dir_copy(
        skopeo.copy_all(f"{shared.host}/library/alpine:3.20", tmp_path / "alpine"), testbed.images["alpine"]
    )
    # A wrong password: the token endpoint refuses it (ghcr's token server did), and skopeo says so.
    before = len(shared.access())
    with pytest.raises(AssertionError, match="invalid username/password: unauthorized"):
        skopeo.copy_all(source, tmp_path / "wrong", "--src-creds", f"{user}:{WRONG_PASSWORD}")
    assert [(r["route"], r["status"]) for r in tokens_of(new_lines(shared, before))] == [("ghcr.io", 401)]
    # Valid credentials without access to private/: the upstream's token admits nothing, the
    # manifest is a 401 with a fresh challenge, and skopeo says it is unauthorized.
    before = len(shared.access())
    with pytest.raises(AssertionError, match="(?i)unauthorized"):
        skopeo.copy_all(
            source, tmp_path / "other", "--src-creds", f"{testbed.other_credentials.username}:{OTHER_PASSWORD}"
        )
    lines = new_lines(shared, before)
    assert ("manifest", "ghcr.io", 401) in {(r["kind"], r.get("route"), r["status"]) for r in lines}


@pytest.fixture
def registries_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "registries.conf"
    conf.write_text("unqualified-search-registries = []\n")
    return conf


def test_podman_login_then_pull_by_prefix(
    shared: Gw, podman: Podman, testbed: Testbed, tmp_path: Path, registries_conf: Path
) -> None:
    user, password = testbed.credentials.as_tuple()
    authfile = str(tmp_path / "auth.json")
    login, pull = documented_commands("login-prefix-podman", shared)
    assert login == ["podman", "login", shared.host, "-u", DOC_USER]
    assert pull[:2] == ["podman", "pull"]
    ref = pull[2]
    flags = ["--tls-verify=false", "--authfile", authfile]

    def podman_login(secret: str) -> str:
        argv = ["login", *flags, "--password-stdin", *login[2:]]
        argv[argv.index(DOC_USER)] = user
        return podman(*argv, registries_conf=registries_conf, stdin=secret + "\n").stdout

    before = len(shared.access())
    with pytest.raises(AssertionError, match="invalid username/password"):
        podman_login(WRONG_PASSWORD)
    assert [(r["route"], r["status"]) for r in tokens_of(new_lines(shared, before))] == [("ghcr.io", 401)]
    assert "Login Succeeded" in podman_login(password)
    try:
        podman("pull", *flags, ref, registries_conf=registries_conf)
        assert podman.digest(ref, registries_conf) == testbed.images["secret-app"].digest
        # The default route's public image, logged in and not.
        public = f"{shared.host}/library/alpine:3.20"
        podman("pull", *flags, public, registries_conf=registries_conf)
        assert podman.digest(public, registries_conf) == testbed.images["alpine"].digest
        podman("rmi", public, registries_conf=registries_conf)
        (tmp_path / "none.json").write_text('{"auths": {}}')
        podman(
            "pull",
            "--tls-verify=false",
            "--authfile",
            str(tmp_path / "none.json"),
            public,
            registries_conf=registries_conf,
        )
        assert podman.digest(public, registries_conf) == testbed.images["alpine"].digest
        # --creds with a wrong password.
        with pytest.raises(AssertionError, match="invalid username/password: unauthorized"):
            podman(
                "pull",
                "--tls-verify=false",
                "--creds",
                f"{user}:{WRONG_PASSWORD}",
                ref,
                registries_conf=registries_conf,
            )
    finally:
        for image in (ref, f"{shared.host}/library/alpine:3.20"):
            with contextlib.suppress(AssertionError):
                podman("rmi", image, registries_conf=registries_conf)


# --- Docker -------------------------------------------------------------------------------------


def dockerd_for(mirror_gw: Gw, root: Path, hosts_file: Path) -> contextlib.AbstractContextManager[Dockerd]:
    """A dockerd whose registry mirror is ``mirror_gw``, as the guide's daemon.json says."""
    require("dockerd", "docker", "unshare")
    documented = json.loads(example("docker-daemon-json"))
    config = {
        "registry-mirrors": [adapt(m, mirror_gw.port) for m in documented["registry-mirrors"]],
        "insecure-registries": ["127.0.0.0/8"],
    }
    return start_dockerd(root, hosts_file, config)


@pytest.fixture(scope="module")
def docker(shared: Gw, hosts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    with dockerd_for(shared, tmp_path_factory.mktemp("dockerd"), hosts_file) as d:
        yield d


def docker_login(d: Dockerd, host: str | None, user: str, password: str) -> str:
    where = [host] if host else []
    return d.docker("login", *where, "-u", user, "--password-stdin", stdin=password + "\n").stdout


def remove_images(d: Dockerd, *refs: str) -> None:
    for ref in refs:
        with contextlib.suppress(AssertionError):
            d.docker("image", "rm", ref)


def test_docker_login_and_pull_by_prefix(docker: Dockerd, shared: Gw, testbed: Testbed) -> None:
    user, password = testbed.credentials.as_tuple()
    login, pull = documented_commands("login-prefix-docker", shared)
    assert login == ["docker", "login", shared.host, "-u", DOC_USER]
    ref = pull[2]
    assert ref == f"{shared.host}/ghcr.io/{SECRET_REPO}:v1"
    public = f"{shared.host}/library/alpine:3.20"
    try:
        before = len(shared.access())
        with pytest.raises(AssertionError, match="unauthorized: ghcr.io refused these credentials"):
            docker_login(docker, shared.host, user, WRONG_PASSWORD)
        assert ("ghcr.io", 401) in {(r.get("route"), r["status"]) for r in tokens_of(new_lines(shared, before))}
        assert "Login Succeeded" in docker_login(docker, shared.host, user, password)
        docker.docker("pull", ref)
        assert f"{shared.host}/ghcr.io/{SECRET_REPO}@{testbed.images['secret-app'].digest}" in docker.repo_digests(ref)
        # The default route after the login: Docker sends the host's credentials, the gateway a grant
        # without asking anyone (the hub route uses the gateway's own credentials).
        docker.docker("pull", public)
        assert f"{shared.host}/library/alpine@{testbed.images['alpine'].digest}" in docker.repo_digests(public)
        # registry-mirrors to this gateway, no login: the default route still needs none.
        before = len(shared.access())
        docker.docker("pull", "busybox:1.36")
        assert f"busybox@{testbed.images['busybox'].digest}" in docker.repo_digests("busybox:1.36")
        lines = new_lines(shared, before)
        assert {(r["kind"], r["status"]) for r in lines} >= {("ping", 401), ("token", 200), ("blob", 200)}
        assert all(r.get("route") in (None, "docker.io") for r in lines)
    finally:
        docker.docker("logout", shared.host)
        remove_images(docker, ref, public, "busybox:1.36")


def test_docker_registry_mirror_with_a_passthrough_default_route(
    mirror: Gw, hub_private: Image, testbed: Testbed, hosts_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    user, password = testbed.credentials.as_tuple()
    login, pull = documented_commands("login-mirror-docker", mirror)
    assert login == ["docker", "login", "-u", DOC_USER]  # Docker Hub's own login: no server name
    assert pull == ["docker", "pull", f"{SECRET_REPO}:v1"]
    mirror_host = f"gw.test:{mirror.port}"  # the daemon.json's mirror, adapted
    # A short root: dockerd's containerd socket paths must fit in sun_path (108 bytes).
    with dockerd_for(mirror, tmp_path_factory.mktemp("dockerd-mirror"), hosts_file) as d:
        # A login to the mirror's host is checked at the default route (the hub's token server)...
        before = len(mirror.access())
        with pytest.raises(AssertionError, match="unauthorized: docker.io refused these credentials"):
            docker_login(d, mirror_host, user, WRONG_PASSWORD)
        assert "Login Succeeded" in docker_login(d, mirror_host, user, password)
        assert [(r.get("route"), r["status"]) for r in tokens_of(new_lines(mirror, before))] == [
            ("docker.io", 401),
            ("docker.io", 200),
        ]
        # ...but Docker never sends it to a mirror (moby/moby#30880): the pull asks anonymously, the
        # private repository is refused, and Docker falls back to Docker Hub (a closed port here).
        before = len(mirror.access())
        with pytest.raises(AssertionError, match="registry-1.docker.io"):
            d.docker(*pull[1:])
        lines = new_lines(mirror, before)
        assert ("manifest", "docker.io", SECRET_REPO, 401) in {
            (r["kind"], r.get("route"), r.get("repository"), r["status"]) for r in lines
        }
        # What `docker login -u my-user` stores when Docker Hub accepts the password (this machine
        # has no Docker Hub): the credentials Docker then sends to its mirrors.
        config = d.root / "cli-config" / "config.json"

        def docker_hub_login(secret: str) -> None:
            doc = json.loads(config.read_text())
            entry = base64.b64encode(f"{user}:{secret}".encode()).decode()
            doc["auths"]["https://index.docker.io/v1/"] = {"auth": entry}
            config.write_text(json.dumps(doc))

        docker_hub_login(WRONG_PASSWORD)
        before = len(mirror.access())
        with pytest.raises(AssertionError, match="registry-1.docker.io"):
            d.docker(*pull[1:])
        assert [(r.get("route"), r["status"]) for r in tokens_of(new_lines(mirror, before))] == [("docker.io", 401)]

        docker_hub_login(password)
        before = len(mirror.access())
        d.docker(*pull[1:])
        assert f"{SECRET_REPO}@{hub_private.digest}" in d.repo_digests(f"{SECRET_REPO}:v1")
        lines = new_lines(mirror, before)
        assert [(r.get("route"), r["status"]) for r in tokens_of(lines)] == [("docker.io", 200)]
        fetched = {(r["kind"], r.get("repository"), r["status"]) for r in lines if r.get("route") == "docker.io"}
        assert ("manifest", SECRET_REPO, 200) in fetched
        assert {status for kind, _, status in fetched if kind == "blob"} == {200}


# --- containerd -----------------------------------------------------------------------------


@pytest.fixture
def clean(containerd: Containerd) -> Iterator[Containerd]:
    containerd.remove_all()
    yield containerd
    containerd.remove_all()


def write_documented_hosts(directory: Path, registry: str, documented: str, gw: Gw) -> None:
    doc = tomllib.loads(documented)
    text = adapt(documented, gw.port).replace("gw.test", "127.0.0.1").replace(doc["server"], f"http://{CLOSED}")
    (directory / registry).mkdir(parents=True, exist_ok=True)
    (directory / registry / "hosts.toml").write_text(text)


def test_containerd_by_ns_and_by_prefix(clean: Containerd, shared: Gw, testbed: Testbed, tmp_path: Path) -> None:
    user, password = testbed.credentials.as_tuple()
    digest = testbed.images["secret-app"].digest
    hosts = tmp_path / "certs.d"
    write_documented_hosts(hosts, "ghcr.io", example("login-ns-hosts-toml"), shared)
    write_documented_hosts(hosts, "docker.io", example("containerd-hosts-toml"), shared)

    # ns: the image name unchanged, containerd sends ?ns=ghcr.io and POSTs the OAuth2 form.
    (ns_pull,) = documented_commands("login-ns-ctr", shared)
    assert ns_pull[:7] == ["ctr", "images", "pull", "--hosts-dir", "/etc/containerd/certs.d", "--user", DOC_USER]
    ref = ns_pull[7]
    assert ref == f"ghcr.io/{SECRET_REPO}:v1"
    before = len(shared.access())
    with pytest.raises(AssertionError, match="401 Unauthorized"):
        clean.pull(ref, hosts, "--user", f"{user}:{WRONG_PASSWORD}")
    assert ("POST", "ghcr.io", 401) in {
        (r["method"], r.get("route"), r["status"]) for r in tokens_of(new_lines(shared, before))
    }
    before = len(shared.access())
    clean.pull(ref, hosts, "--user", f"{user}:{password}")
    assert clean.image_digest(ref) == digest
    lines = new_lines(shared, before)
    assert {(r["method"], r.get("route"), r["status"]) for r in tokens_of(lines)} == {("POST", "ghcr.io", 200)}
    # The manifest was asked for by its name without prefix: the route came from ns.
    assert ("manifest", f"/v2/{SECRET_REPO}/manifests/v1", 200) in {(r["kind"], r["path"], r["status"]) for r in lines}
    # The default route's public image through the same kind of hosts.toml, no credentials.
    clean.pull("docker.io/library/alpine:3.20", hosts)
    assert clean.image_digest("docker.io/library/alpine:3.20") == testbed.images["alpine"].digest

    # Prefix: the gateway's host in the image name.
    (prefix_pull,) = documented_commands("login-prefix-ctr", shared)
    assert prefix_pull[:5] == ["ctr", "images", "pull", "--user", DOC_USER]
    prefixed = prefix_pull[5]
    assert prefixed == f"{shared.host}/ghcr.io/{SECRET_REPO}:v1"
    clean.ctr("images", "pull", "--plain-http", "--user", f"{user}:{password}", prefixed)
    assert clean.image_digest(prefixed) == digest
    with pytest.raises(AssertionError, match="401 Unauthorized"):
        clean.ctr("images", "pull", "--plain-http", "--user", f"{user}:{WRONG_PASSWORD}", prefixed)


# --- what reaches the upstreams and the log ------------------------------------------------


def test_no_grant_reaches_an_upstream_and_no_secret_the_log(
    shared: Gw, mirror: Gw, fronts: Fronts, testbed: Testbed, skopeo: Skopeo, tmp_path: Path
) -> None:
    """The registries saw the client's own upstream token (passthrough) or the gateway's, never a
    grant, never Basic credentials; the token server was never sent anything but Basic; no
    password, token or grant is in any gateway log line. Checks this module's every request."""
    user, password = testbed.credentials.as_tuple()
    # Enough traffic of its own to stand alone (with -k).
    skopeo.copy_all(f"{shared.host}/ghcr.io/{SECRET_REPO}:v1", tmp_path / "a", "--src-creds", f"{user}:{password}")
    skopeo.copy_all(f"{shared.host}/library/alpine:3.20", tmp_path / "b")
    TOKEN_REQUESTS.extend(testbed.tokens.requests)
    testbed.tokens.reset()

    seen = fronts.hub.requests + fronts.ghcr.requests
    assert len(seen) > 20
    assert not [r for r in seen if r.authorization and GRANT_PREFIX in r.authorization]
    assert not [r for r in seen if r.authorization and not r.authorization.startswith("Bearer ey")]
    # The private repository was read with tokens the token server issued to the client's login.
    private = [r for r in fronts.ghcr.requests if f"/v2/{SECRET_REPO}/" in r.target and r.status == 200]
    assert private
    subjects = set()
    for r in private:
        assert r.authorization is not None
        subjects.add(testbed.tokens.decode(r.authorization.removeprefix("Bearer "), testbed.ghcr.service)["sub"])
    assert subjects == {user}
    # The token server: only Basic or the OAuth2 form reached it (a Bearer would be a 401 with no user).
    assert TOKEN_REQUESTS
    assert not [r for r in TOKEN_REQUESTS if r.status == 401 and r.basic_user is None]
    assert not [r for r in TOKEN_REQUESTS if any(GRANT_PREFIX in s for s in r.scopes)]

    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    for gw in (shared, mirror):
        text = "\n".join(gw.gateway.log_lines())
        for secret in (password, WRONG_PASSWORD, OTHER_PASSWORD, basic, GRANT_PREFIX, "eyJ", "Bearer ", gw.secret):
            assert secret not in text, f"{secret[:12]}... is in the log of {gw.host}"


# --- the cost of the login challenge ------------------------------------------------------------


@dataclass
class Measured:
    client: str
    gateway: str
    tokens_per_pull: list[int]
    seconds: list[float]
    token_ms: list[float]  # what the gateway took to answer each of those token requests


def test_the_extra_token_round_trip_of_anonymous_prefix_pulls(
    shared: Gw,
    plain: Gw,
    skopeo: Skopeo,
    containerd: Containerd,
    docker: Dockerd,
    testbed: Testbed,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Anonymous pulls of a public image by prefix, with the passthrough route (a login challenge
    on the host) and without: token requests at the gateway per pull, and the pull time (reported)."""
    pulls = 5
    image = testbed.images["alpine"]

    def skopeo_pull(gw: Gw) -> None:
        verify_dir_copy(skopeo.copy_all(f"{gw.host}/docker.io/library/alpine:3.20", tmp_path / "alpine"), image)

    def ctr_pull(gw: Gw) -> None:
        ref = f"{gw.host}/docker.io/library/alpine:3.20"
        containerd.ctr("images", "pull", "--plain-http", ref)
        assert containerd.image_digest(ref) == image.digest

    def docker_pull(gw: Gw) -> None:
        ref = f"{gw.host}/docker.io/library/alpine:3.20"
        docker.docker("pull", ref)
        assert f"{gw.host}/docker.io/library/alpine@{image.digest}" in docker.repo_digests(ref)

    def ctr_clean(gw: Gw) -> None:
        containerd.remove_all()

    def docker_clean(gw: Gw) -> None:
        remove_images(docker, f"{gw.host}/docker.io/library/alpine:3.20")

    clients: dict[str, tuple[Callable[[Gw], None], Callable[[Gw], None]]] = {
        "skopeo": (skopeo_pull, lambda gw: None),
        "ctr": (ctr_pull, ctr_clean),
        "docker": (docker_pull, docker_clean),
    }
    results: list[Measured] = []
    for name, (pull, clean) in clients.items():
        for label, gw in (("passthrough route present", shared), ("no passthrough route", plain)):
            pull(gw)  # warm: the gateway's own hub token, connections
            clean(gw)
            measured = Measured(name, label, [], [], [])
            for _ in range(pulls):
                before = len(gw.access())
                started = time.monotonic()
                pull(gw)
                measured.seconds.append(time.monotonic() - started)
                tokens = tokens_of(new_lines(gw, before))
                measured.tokens_per_pull.append(len(tokens))
                measured.token_ms.extend(float(str(r["duration_ms"])) for r in tokens)
                clean(gw)
            results.append(measured)
    report = [
        {
            "client": m.client,
            "gateway": m.gateway,
            "token_requests_per_pull": m.tokens_per_pull,
            "median_seconds": round(statistics.median(m.seconds), 3),
            "seconds": [round(s, 3) for s in m.seconds],
            "token_ms_at_the_gateway": m.token_ms,
        }
        for m in results
    ]
    record_property("token_round_trip", report)
    (tmp_path / "token-round-trip.json").write_text(json.dumps(report, indent=2))
    print("\n" + "\n".join(json.dumps(r) for r in report))
    # Without the passthrough route /v2/ is a 200 and nobody asks the gateway for a token. With it,
    # clients that ping /v2/ first (Docker, containers/image) get the login challenge and pay one
    # anonymous token request (answered without any upstream request); containerd does not ping, and
    # a route with the gateway's credentials admits a request without a token: it pays nothing.
    extra = {"skopeo": 1, "ctr": 0, "docker": 1}
    for m in results:
        per_pull = extra[m.client] if m.gateway == "passthrough route present" else 0
        assert m.tokens_per_pull == [per_pull] * pulls, m


# --- two gateway bugs this file found (fixed): reproductions kept as tests -------------------------


def test_a_scopeless_oauth2_login_checks_the_password(shared: Gw, testbed: Testbed) -> None:
    """containerd's authorizer (and so nerdctl login) POSTs grant_type=password with no scope to log in:
    the password in the form is checked at the login route like a Basic header's."""
    form = {"grant_type": "password", "username": testbed.credentials.username, "password": WRONG_PASSWORD}
    resp = httpx.post(f"{shared.url}/auth/token", data={**form, "service": "docker.io", "client_id": "e2e"})
    assert resp.status_code == 401, resp.text


def test_a_grant_sent_to_the_token_endpoint_stays_in_the_gateway(
    shared: Gw, testbed: Testbed, token_stats: TokenServer
) -> None:
    """A grant (with the upstream token of whichever route it was minted for inside) is no credential of
    any upstream: the token endpoint never sends it on."""
    grant = get_token(shared, f"repository:ghcr.io/{SECRET_REPO}:pull", auth=testbed.credentials.as_tuple())
    token_stats.reset()
    httpx.get(
        f"{shared.url}/auth/token",
        params={"service": "docker.io", "scope": f"repository:ghcr.io/{SECRET_REPO}:pull"},
        headers={"authorization": f"Bearer {grant}"},
    )
    # A Bearer header at the bed's token server is a 401 with no user ("unsupported authorization scheme").
    assert not [r for r in token_stats.requests if r.status == 401 and r.basic_user is None]
