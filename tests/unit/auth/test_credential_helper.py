"""Accounts whose secret a docker credential helper gives (``helper = "fake"``), in process.

The helper is a real program: ``docker-credential-fake``, a Python script written into a temp
directory put on ``PATH``, that speaks the docker-credential-helpers protocol (``get``, the server
address on standard input, ``{"ServerURL", "Username", "Secret"}`` on standard output) and answers
from files the test controls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
from pathlib import Path

import httpx
import pytest

from gateway.http.errors import ConfigError
from gateway.routing.routes import Credentials, GatewayTokens
from gateway.routing.routes_file import parse_routes
from gateway.settings import Settings
from tests.unit.conftest import GatewayClient
from tests.unit.fake_registry import REALM, REGISTRY, FakeRegistry, registry_error, response

SECRET = "s3cret-from-the-helper"
ROTATED = "r0tated-secret"
USER = "robot"

HELPER = """#!{python}
import json, pathlib, sys, time

state = pathlib.Path({state!r})
server = sys.stdin.read()  # docker-credential-helpers: "get" reads the server address on stdin
assert sys.argv[1:] == ["get"], sys.argv
with (state / "calls").open("a") as f:
    f.write(server + "\\n")
mode = (state / "mode").read_text().strip()
answer = json.loads((state / "answer.json").read_text())
if mode == "fail":
    print(answer["Secret"])  # stdout holds secrets: the gateway must never log or quote it
    print("boom: credentials not found in native keychain", file=sys.stderr)
    sys.exit(3)
if mode == "junk":
    print("not json " + answer["Secret"])
    sys.exit(0)
if mode == "slow":
    time.sleep(30)
time.sleep(0.2)  # long enough for concurrent requests to overlap
json.dump(dict(answer, ServerURL=server), sys.stdout)
"""


class Helper:
    """The fake helper's state: what it answers, how, and the server addresses it was asked for."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.answer(USER, SECRET)
        self.mode("ok")

    def answer(self, username: str, secret: str) -> None:
        (self.state / "answer.json").write_text(json.dumps({"Username": username, "Secret": secret}))

    def mode(self, mode: str) -> None:
        (self.state / "mode").write_text(mode)

    @property
    def calls(self) -> list[str]:
        path = self.state / "calls"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Helper:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "docker-credential-fake"
    program.write_text(HELPER.format(python=sys.executable, state=str(tmp_path)))
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return Helper(tmp_path)


class Realm:
    """The fake registry's token endpoint, accepting one user's password (which the test may change)."""

    def __init__(self, password: str = SECRET) -> None:
        self.fake = FakeRegistry()
        self.password = password
        self.statuses: list[int] = []
        self.fake.override = self.handle

    def handle(self, request: httpx.Request) -> httpx.Response | None:
        if not str(request.url).startswith(REALM):
            return None
        value = request.headers.get("authorization", "")
        login = base64.b64decode(value[6:]).decode() if value.startswith("Basic ") else None
        if login != f"{USER}:{self.password}":
            self.statuses.append(401)
            return registry_error(401, "UNAUTHORIZED", "incorrect username or password")
        self.statuses.append(200)
        token = f"token-{len(self.statuses)}"
        self.fake.valid_tokens.add(token)
        return response(200, json.dumps({"token": token, "expires_in": 300}).encode())


def route(helper: str = "fake", **entry: object) -> dict[str, object]:
    return {
        "name": "registry.test",
        "upstream": REGISTRY,
        "default": True,
        "credentials": [{"name": "robots", "repositories": ["acme/**"], "helper": helper, **entry}],
    }


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text
        assert ROTATED not in text


def test_a_helper_account_loads_without_the_helper_and_keeps_its_name() -> None:
    # Resolved lazily: the file validates where docker-credential-absent is not installed.
    auth = parse_routes({"route": [route("absent")]}, "routes.toml", {}).routes[0].auth
    assert isinstance(auth, GatewayTokens)
    [credentials] = auth.candidates("acme/app")
    assert (credentials.helper, credentials.identity) == ("absent", "account:robots")
    assert SECRET not in repr(Credentials(USER, SECRET, "robots"))


@pytest.mark.parametrize(
    ("helper", "entry", "message"),
    [
        ("fake", {"username": "u"}, r"credentials #1 \(robots\): helper: set helper or username, not both"),
        ("fake", {"password_env": "X"}, "helper: set helper or password_env, not both"),
        ("fake", {"username_env": "U", "password_file": "/x"}, "username_env/password_file, not both"),
        ("../bin/evil", {}, "not a plain program name"),
        ("a b", {}, "not a plain program name"),
        ("..", {}, "not a plain program name"),
    ],
)
def test_helper_configuration_errors(helper: str, entry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_routes({"route": [route(helper, **entry)]}, "routes.toml", {"X": "x", "U": "u"})
    assert "\n" not in str(caught.value)


async def test_first_use_calls_the_helper_once_for_concurrent_requests(
    gateway_client: GatewayClient, helper: Helper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    realm = Realm()
    async with gateway_client([route()], registry=realm.fake) as client:
        # Eight repositories: eight token fetches (no token is shared), one helper call.
        answers = await asyncio.gather(*(client.get(f"/v2/acme/app{i}/manifests/v1") for i in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert (await client.get("/v2/acme/other/manifests/v1")).status_code == 200
    assert helper.calls == ["registry.test"]  # the registry host, as docker asks for it
    assert realm.statuses == [200] * 9
    assert_no_secret(caplog.text)


async def test_a_rotated_secret_is_asked_again_after_a_401(
    gateway_client: GatewayClient, helper: Helper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    realm = Realm()
    async with gateway_client([route()], registry=realm.fake) as client:
        assert (await client.get("/v2/acme/app/manifests/v1")).status_code == 200
        # The cloud rotates the password: the helper answers the new one, the endpoint refuses the old.
        helper.answer(USER, ROTATED)
        realm.password = ROTATED
        answers = await asyncio.gather(*(client.get(f"/v2/acme/new{i}/manifests/v1") for i in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        assert (await client.get("/v2/acme/later/manifests/v1")).status_code == 200
    assert len(helper.calls) == 2  # once at first use, once after the refusal (not once per request)
    assert realm.statuses[0] == 200
    assert 401 in realm.statuses
    assert realm.statuses[-1] == 200
    assert_no_secret(caplog.text)


async def test_a_refused_fresh_answer_is_a_502_after_one_retry(
    gateway_client: GatewayClient, helper: Helper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    realm = Realm(password="something-else")
    async with gateway_client([route()], registry=realm.fake) as client:
        answer = await client.get("/v2/acme/app/manifests/v1")
    assert answer.status_code == 502
    assert answer.json()["errors"][0]["code"] == "UNAUTHORIZED"
    # Per token fetch: the cached answer, then the helper asked once more and the fetch retried once.
    assert len(helper.calls) >= 2
    assert realm.statuses.count(401) == len(helper.calls)
    assert_no_secret(caplog.text, answer.text)


@pytest.mark.parametrize(
    ("mode", "program", "reason"),
    [
        ("fail", "fake", "exited with status 3"),
        ("junk", "fake", "not JSON"),
        ("slow", "fake", "no answer within 0.5 seconds"),
        ("ok", "missing", "docker-credential-missing is not on PATH"),
    ],
)
async def test_a_failing_helper_is_a_502_naming_the_helper_and_the_account(
    gateway_client: GatewayClient,
    helper: Helper,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    program: str,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    helper.mode(mode)
    realm = Realm()
    settings = Settings(manifest_cache_bytes=0, credential_helper_timeout=0.5)
    async with gateway_client([route(program)], settings=settings, registry=realm.fake) as client:
        answer = await client.get("/v2/acme/app/manifests/v1")
    assert answer.status_code == 502
    error = answer.json()["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert f"docker-credential-{program} (account robots)" in error["message"]
    assert reason in error["message"]
    assert realm.statuses == []  # nothing was sent upstream with a half-known credential
    if mode == "fail":
        assert "boom: credentials not found" in caplog.text  # stderr is logged, stdout never
    assert_no_secret(caplog.text, answer.text)


async def test_other_accounts_and_anonymous_repositories_never_run_the_helper(
    gateway_client: GatewayClient, helper: Helper
) -> None:
    realm = Realm()
    async with gateway_client([route()], registry=realm.fake) as client:
        # Not under acme/: no account, anonymous; the fake realm refuses anonymous tokens.
        answer = await client.get("/v2/other/app/manifests/v1")
    assert answer.status_code == 401
    assert helper.calls == []


async def test_a_failed_helper_is_not_run_again_for_every_request(
    gateway_client: GatewayClient, helper: Helper
) -> None:
    helper.mode("fail")
    realm = Realm()
    async with gateway_client([route()], registry=realm.fake) as client:
        answers = [await client.get("/v2/acme/app/manifests/v1") for _ in range(5)]
    assert {a.status_code for a in answers} == {502}
    assert all("exited with status 3" in a.json()["errors"][0]["message"] for a in answers)
    assert len(helper.calls) == 1  # the failure stands for FAILURE_SECONDS; then the helper is asked again
