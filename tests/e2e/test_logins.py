"""Logins end to end: containerd's OAuth2 token requests relayed, and two accounts on one route.

- containerd (``ctr --user``, ``ctr --refresh``) POSTs the OAuth2 form (distribution's
  docs/spec/auth/oauth.md; RFC 6749 4.3 and 6) to the realm of the gateway's challenge; the
  passthrough route relays it to the test bed's token server, whose statistics show the POSTs.
- A route with two ``[[route.credentials]]``, each allowed one namespace by the token server:
  each repository is pulled with its own account, and the token server saw which account
  asked for which scope.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.clients import Containerd, Skopeo, in_namespace, run, verify_dir_copy
from tests.support import Gateway, run_gateway
from tests.testbed.bed import Testbed
from tests.testbed.tokens import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    NAMESPACES,
    TEAM_A_PASSWORD,
    TEAM_A_USER,
    TEAM_B_PASSWORD,
    TEAM_B_USER,
    Scope,
    TokenServer,
)

SECRET_REF = "ghcr.io/private/secret-app:v1"
SECRET_SCOPE = "repository:private/secret-app:pull"


@pytest.fixture
def clean(containerd: Containerd) -> Iterator[Containerd]:
    containerd.remove_all()
    yield containerd
    containerd.remove_all()


def ctr_pull(containerd: Containerd, hosts_file: Path, hosts_dir: Path, ref: str, *auth: str) -> None:
    """``ctr images pull`` in the test's hosts namespace (``login.gw.test`` is the passthrough route)."""
    argv = ["ctr", "--address", str(containerd.socket), "--namespace", "e2e", "images", "pull"]
    run(in_namespace([*argv, "--hosts-dir", str(hosts_dir), *auth, ref], hosts_file), timeout=300)


def login_hosts(containerd: Containerd, gateway: Gateway) -> Path:
    return containerd.hosts_dir({"ghcr.io": f"http://login.gw.test:{gateway.port}"})


def secrets_in_log(gateway: Gateway, *secrets: str) -> list[str]:
    return [line for line in gateway.log_lines() if any(s in line for s in secrets)]


def test_containerd_user_login_is_an_oauth2_post_relayed(
    clean: Containerd, hosts_file: Path, gateway: Gateway, testbed: Testbed, token_stats: TokenServer
) -> None:
    user, password = testbed.credentials.as_tuple()
    ctr_pull(clean, hosts_file, login_hosts(clean, gateway), SECRET_REF, "--user", f"{user}:{password}")
    assert clean.image_digest(SECRET_REF) == testbed.images["secret-app"].digest
    # containerd POSTed the password grant; the gateway relayed it (service and scope rewritten into
    # the upstream's) and the token server granted it: no fallback to the GET form was needed.
    asked = [r for r in token_stats.requests if r.account == user]
    assert asked
    assert {(r.method, r.grant_type, r.status, r.service) for r in asked} == {
        ("POST", "password", 200, testbed.ghcr.service)
    }
    assert {s for r in asked for s in r.scopes} == {SECRET_SCOPE}
    assert all(r.granted == (SECRET_SCOPE,) for r in asked)
    relayed = [
        json.loads(line)
        for line in gateway.log_lines()
        if '"event":"access"' in line and '"kind":"token"' in line and '"method":"POST"' in line
    ]
    assert relayed
    assert {(r["route"], r["status"]) for r in relayed} == {("login-ghcr.test", 200)}
    assert not secrets_in_log(gateway, password)


def test_containerd_wrong_password_is_refused(
    clean: Containerd, hosts_file: Path, gateway: Gateway, testbed: Testbed, token_stats: TokenServer
) -> None:
    user = testbed.credentials.username
    with pytest.raises(AssertionError, match="(?i)401|unauthorized"):
        ctr_pull(clean, hosts_file, login_hosts(clean, gateway), SECRET_REF, "--user", f"{user}:not-the-password")
    posted = [r for r in token_stats.requests if r.method == "POST"]
    assert posted
    assert {(r.grant_type, r.status, r.account) for r in posted} == {("password", 401, None)}
    assert not any(r.status == 200 for r in token_stats.requests)


def test_containerd_refresh_token_flow(
    clean: Containerd, hosts_file: Path, gateway: Gateway, testbed: Testbed, token_stats: TokenServer
) -> None:
    """A refresh token bought through the gateway (``access_type=offline``), then ``ctr --refresh``."""
    user, password = testbed.credentials.as_tuple()
    form = {
        "grant_type": "password",
        "username": user,
        "password": password,
        "service": "login-ghcr.test",  # what the gateway's challenge names
        "scope": SECRET_SCOPE,
        "client_id": "e2e",
        "access_type": "offline",
    }
    login = httpx.post(f"{gateway.url}/auth/token", data=form, headers={"host": f"login.gw.test:{gateway.port}"})
    assert login.status_code == 200, login.text
    assert login.headers["cache-control"] == "no-store"
    refresh_token = login.json()["refresh_token"]
    assert token_stats.refresh_tokens[refresh_token] == user  # the token server's own, returned as is
    ctr_pull(clean, hosts_file, login_hosts(clean, gateway), SECRET_REF, "--refresh", refresh_token)
    assert clean.image_digest(SECRET_REF) == testbed.images["secret-app"].digest
    refreshed = [r for r in token_stats.requests if r.grant_type == "refresh_token"]
    assert refreshed
    assert {(r.method, r.status, r.account, r.service) for r in refreshed} == {
        ("POST", 200, user, testbed.ghcr.service)
    }
    assert {s for r in refreshed for s in r.scopes} == {SECRET_SCOPE}
    # A refresh token the token server never issued is refused: 401, not a token.
    wrong = httpx.post(
        f"{gateway.url}/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": "forged", "service": "login-ghcr.test"},
        headers={"host": f"login.gw.test:{gateway.port}"},
    )
    assert wrong.status_code == 401
    assert wrong.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert not secrets_in_log(gateway, password, refresh_token)


# --- two accounts on one route ----------------------------------------------------------------

TEAM_IMAGES = {"team-a/app": "secret-app", "team-b/app": "app"}  # repository -> the bed image copied there


@pytest.fixture(scope="module")
def team_repositories(testbed: Testbed, skopeo: Skopeo) -> dict[str, str]:
    """The bed's ``secret-app`` and ``app`` copied (digests kept) into the two robots' namespaces."""
    registry = testbed.ghcr.registry_host_port
    admin = f"{ADMIN_USER}:{ADMIN_PASSWORD}"
    for repository, key in TEAM_IMAGES.items():
        source = f"docker://{registry}/{testbed.images[key].repo}:v1"
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
            source,
            f"docker://{registry}/{repository}:v1",
        )
    return TEAM_IMAGES


def test_two_accounts_on_one_route_each_for_its_own_namespace(
    skopeo: Skopeo, testbed: Testbed, team_repositories: dict[str, str], tmp_path: Path
) -> None:
    # The token server's policy: each robot pulls its own namespace only, which no one else may pull,
    # so the wrong account (or none) could not pull either repository.
    tokens = testbed.tokens
    for user, prefix in NAMESPACES.items():
        for other, other_prefix in NAMESPACES.items():
            granted = tokens.grant(user, Scope("repository", other_prefix + "app", ("pull",)))
            assert granted == (("pull",) if other == user else ())
        assert tokens.grant(None, Scope("repository", prefix + "app", ("pull",))) == ()
    password_file = tmp_path / "team-b-password"
    password_file.write_text(TEAM_B_PASSWORD + "\n")
    routes = f"""
[[route]]
name = "ghcr.io"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
default = true

[[route.credentials]]
name = "team-a"
repositories = ["team-a/**"]
username_env = "TEAM_A_USER"
password_env = "TEAM_A_PASS"

[[route.credentials]]
name = "team-b"
repositories = ["team-b/**"]
username = "{TEAM_B_USER}"
password_file = "{password_file}"
"""
    env = {"TEAM_A_USER": TEAM_A_USER, "TEAM_A_PASS": TEAM_A_PASSWORD}
    with run_gateway(routes, tmp_path / "gw", env=env) as gw:
        tokens.reset()
        for repository, key in team_repositories.items():
            dest = skopeo.copy_all(f"127.0.0.1:{gw.port}/{repository}:v1", tmp_path / key)
            verify_dir_copy(dest, testbed.images[key])
        # A repository no account covers is asked anonymously: the private one stays private.
        with pytest.raises(AssertionError, match="(?i)unauthorized|denied"):
            skopeo.copy_all(f"127.0.0.1:{gw.port}/private/secret-app:v1", tmp_path / "none")
        asked = tokens.requests
        leaked = secrets_in_log(gw, TEAM_A_PASSWORD, TEAM_B_PASSWORD)
    # The token server's log: which credential asked for which scope, and never for the other's.
    by_user: dict[str | None, set[str]] = {}
    for record in asked:
        by_user.setdefault(record.basic_user, set()).update(record.scopes)
    assert by_user[TEAM_A_USER] == {"repository:team-a/app:pull"}
    assert by_user[TEAM_B_USER] == {"repository:team-b/app:pull"}
    assert by_user.get(None, set()) <= {"repository:private/secret-app:pull"}
    assert set(by_user) <= {TEAM_A_USER, TEAM_B_USER, None}
    for record in asked:
        if record.basic_user in NAMESPACES:
            assert record.status == 200
            assert record.account == record.basic_user  # authenticated as itself
            assert record.granted == tuple(s for s in record.scopes)
    assert not leaked
