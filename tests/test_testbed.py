"""Checks of the test bed itself, against the raw registries (no gateway involved)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import subprocess
import urllib.parse

import httpx
import pytest

from gateway.auth.challenge import parse_www_authenticate, pick_challenge
from tests.testbed import Testbed, TokenServer
from tests.testbed.images import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.testbed.tokens import Scope

pytestmark = pytest.mark.e2e

ALL_TYPES = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


def parse_challenge(header: str) -> dict[str, str]:
    """The Bearer challenge's parameters, read by name with the gateway's own parser."""
    challenge = pick_challenge(parse_www_authenticate(header))
    assert challenge is not None, header
    assert challenge.scheme == "bearer", header
    return dict(challenge.params)


def fetch_token(challenge: dict[str, str], auth: tuple[str, str] | None = None) -> httpx.Response:
    params = {"service": challenge["service"]}
    if "scope" in challenge:
        params["scope"] = challenge["scope"]
    return httpx.get(challenge["realm"], params=params, auth=auth)


def bearer(token: str, accept: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if accept is not None:
        headers["Accept"] = accept
    return headers


@pytest.mark.parametrize("name", ["alpine", "app", "etcd"])
def test_anonymous_token_flow(testbed: Testbed, token_stats: TokenServer, name: str) -> None:
    image = testbed.images[name]
    upstream = testbed.upstream(image.upstream)
    url = f"{upstream.registry_url}/v2/{image.repo}/manifests/{image.tag}"

    ping = httpx.get(upstream.registry_url + "/v2/")
    assert ping.status_code == 401
    assert parse_challenge(ping.headers["www-authenticate"]) == {"realm": upstream.realm, "service": upstream.service}

    first = httpx.get(url, headers={"Accept": ALL_TYPES})
    assert first.status_code == 401
    challenge = parse_challenge(first.headers["www-authenticate"])
    assert challenge["scope"] == f"repository:{image.repo}:pull"

    token_response = fetch_token(challenge)
    assert token_response.status_code == 200
    body = token_response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == testbed.tokens.ttl
    assert dt.datetime.fromisoformat(body["issued_at"]).tzinfo is not None
    claims = testbed.tokens.decode(body["token"], service=upstream.service)
    assert claims["access"] == [{"type": "repository", "name": image.repo, "actions": ["pull"]}]
    assert {"iss", "sub", "aud", "exp", "nbf", "iat", "jti"} <= set(claims)

    second = httpx.get(url, headers=bearer(body["token"], ALL_TYPES))
    assert second.status_code == 200
    assert second.headers["docker-content-digest"] == image.digest
    assert second.content == image.manifest

    (record,) = token_stats.requests
    assert (record.service, record.scopes, record.account, record.path, record.status) == (
        upstream.service,
        (f"repository:{image.repo}:pull",),
        None,
        upstream.token_path,
        200,
    )


def test_quay_token_path_is_v2_auth(testbed: Testbed, token_stats: TokenServer) -> None:
    assert urllib.parse.urlsplit(testbed.quay.realm).path == "/v2/auth"
    assert urllib.parse.urlsplit(testbed.hub.realm).path == "/token"
    assert urllib.parse.urlsplit(testbed.ghcr.realm).path == "/token"
    challenge = parse_challenge(httpx.get(testbed.quay.registry_url + "/v2/").headers["www-authenticate"])
    assert challenge["realm"] == testbed.quay.realm
    # quay's service is only served on /v2/auth, hub's only on /token
    wrong = httpx.get(testbed.tokens.url + "/token", params={"service": testbed.quay.service})
    assert wrong.status_code == 400
    assert httpx.get(testbed.quay.realm, params={"service": testbed.hub.service}).status_code == 400
    assert [r.path for r in token_stats.requests] == ["/token", "/v2/auth"]


def test_scope_may_repeat_and_account_is_recorded(testbed: Testbed, token_stats: TokenServer) -> None:
    response = httpx.get(
        testbed.hub.realm,
        params=[
            ("service", testbed.hub.service),
            ("scope", "repository:library/alpine:pull"),
            ("scope", "repository:library/busybox:pull,push"),
            ("account", "someone"),
        ],
    )
    assert response.status_code == 200
    claims = testbed.tokens.decode(response.json()["token"], service=testbed.hub.service)
    assert claims["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]},
        {"type": "repository", "name": "library/busybox", "actions": ["pull"]},
    ]
    (record,) = token_stats.requests
    assert record.scopes == ("repository:library/alpine:pull", "repository:library/busybox:pull,push")
    assert record.account == "someone"


def test_private_repo_needs_credentials(testbed: Testbed, token_stats: TokenServer) -> None:
    image = testbed.images["secret-app"]
    assert image.repo.startswith("private/")
    url = f"{testbed.ghcr.registry_url}/v2/{image.repo}/manifests/{image.tag}"
    challenge = parse_challenge(httpx.get(url).headers["www-authenticate"])

    anonymous = fetch_token(challenge)
    assert anonymous.status_code == 200
    claims = testbed.tokens.decode(anonymous.json()["token"])
    assert claims["access"] == [{"type": "repository", "name": image.repo, "actions": []}]
    assert httpx.get(url, headers=bearer(anonymous.json()["token"], ALL_TYPES)).status_code == 401

    assert fetch_token(challenge, auth=(testbed.credentials.username, "wrong")).status_code == 401
    assert fetch_token(challenge, auth=("nobody", testbed.credentials.password)).status_code == 401
    other = fetch_token(challenge, auth=testbed.other_credentials.as_tuple())
    assert other.status_code == 200
    assert testbed.tokens.decode(other.json()["token"])["access"] == [
        {"type": "repository", "name": image.repo, "actions": []}
    ]

    authed = fetch_token(challenge, auth=testbed.credentials.as_tuple())
    assert authed.status_code == 200
    allowed = httpx.get(url, headers=bearer(authed.json()["token"], ALL_TYPES))
    assert allowed.status_code == 200
    assert allowed.headers["docker-content-digest"] == image.digest

    assert [(r.account, r.basic_user, r.status) for r in token_stats.requests] == [
        (None, None, 200),
        (None, testbed.credentials.username, 401),
        (None, "nobody", 401),
        (testbed.other_credentials.username, testbed.other_credentials.username, 200),
        (testbed.credentials.username, testbed.credentials.username, 200),
    ]


def test_public_ghcr_repo_anonymous_and_push_denied(testbed: Testbed) -> None:
    challenge = {"realm": testbed.ghcr.realm, "service": testbed.ghcr.service, "scope": "repository:org/app:pull,push"}
    token = fetch_token(challenge).json()["token"]
    assert testbed.tokens.decode(token)["access"] == [{"type": "repository", "name": "org/app", "actions": ["pull"]}]
    upload = httpx.post(f"{testbed.ghcr.registry_url}/v2/org/app/blobs/uploads/", headers=bearer(token))
    assert upload.status_code == 401


def test_token_signing_kid_and_x5c(testbed: Testbed) -> None:
    """distribution 2.8 accepts the libtrust kid or an x5c chain; nothing else."""
    assert re.fullmatch(r"([A-Z2-7]{4}:){11}[A-Z2-7]{4}", testbed.tokens.key_id)
    access = [Scope("repository", "library/alpine", ("pull",))]
    url = f"{testbed.hub.registry_url}/v2/library/alpine/tags/list"
    service = testbed.hub.service

    def status(**kwargs: object) -> int:
        token, _ = testbed.tokens.mint(service, "", access, **kwargs)  # type: ignore[arg-type]
        return httpx.get(url, headers=bearer(token)).status_code

    assert status(header_mode="kid") == 200
    assert status(header_mode="x5c") == 200
    assert status(header_mode="none") == 401
    assert status(header_mode="kid", key_id=testbed.tokens.key_id.replace(":", "")) == 401
    assert status(issuer="someone-else") == 401
    assert status(ttl=-30) == 200  # distribution allows 60 s of clock skew
    assert status(ttl=-120) == 401


def test_hub_blob_get_redirects_to_cdn(testbed: Testbed) -> None:
    image = testbed.images["alpine"]
    layer = image.layers["linux/amd64"][0]
    token = testbed.token("hub", "repository:library/alpine:pull")
    for base in (testbed.hub.registry_url, testbed.hub.url):
        for method in ("GET", "HEAD"):
            response = httpx.request(method, f"{base}/v2/library/alpine/blobs/{layer}", headers=bearer(token))
            assert response.status_code == 307, (base, method)
            location = response.headers["location"]
            assert location.startswith(testbed.cdn_url + "/"), location
            assert layer.removeprefix("sha256:") in location


def test_cdn_serves_exact_bytes_range_and_rejects_authorization(testbed: Testbed) -> None:
    image = testbed.images["alpine"]
    layer = image.layers["linux/arm64/v8"][0]
    size = image.blobs[layer]
    token = testbed.token("hub", "repository:library/alpine:pull")
    location = httpx.get(f"{testbed.hub.registry_url}/v2/library/alpine/blobs/{layer}", headers=bearer(token)).headers[
        "location"
    ]

    testbed.cdn.reset()
    full = httpx.get(location)
    assert full.status_code == 200
    assert "sha256:" + hashlib.sha256(full.content).hexdigest() == layer
    assert int(full.headers["content-length"]) == size

    head = httpx.head(location)
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == size

    partial = httpx.get(location, headers={"Range": "bytes=10-109"})
    assert partial.status_code == 206
    assert partial.headers["content-range"] == f"bytes 10-109/{size}"
    assert partial.content == full.content[10:110]

    tail = httpx.get(location, headers={"Range": "bytes=-16"})
    assert tail.status_code == 206
    assert tail.content == full.content[-16:]

    refused = httpx.get(location, headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 400
    assert b"InvalidArgument" in refused.content
    assert httpx.head(location, headers={"Authorization": "Basic eDp5"}).status_code == 400

    logged = testbed.cdn.wait_for_requests(6)
    assert [(r.method, r.status, r.digest, r.authorization) for r in logged] == [
        ("GET", 200, layer, False),
        ("HEAD", 200, layer, False),
        ("GET", 206, layer, False),
        ("GET", 206, layer, False),
        ("GET", 400, layer, True),
        ("HEAD", 400, layer, True),
    ]
    assert logged[0].bytes == size
    assert logged[2].range == "bytes=10-109"


def test_big_image_layer(testbed: Testbed) -> None:
    image = testbed.images["bigimage"]
    (layer,) = image.layers["linux/amd64"]
    manifest = json.loads(image.manifest)
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert image.blobs[layer] >= testbed.big_blob_mib * 1024 * 1024
    token = testbed.token("hub", "repository:library/bigimage:pull")
    location = httpx.head(f"{testbed.hub.url}/v2/library/bigimage/blobs/{layer}", headers=bearer(token)).headers[
        "location"
    ]
    head = httpx.head(location)
    assert int(head.headers["content-length"]) == image.blobs[layer]


def test_pager_paginates_manytags(testbed: Testbed) -> None:
    image = testbed.images["manytags"]
    assert len(image.tags) > 200
    token = testbed.token("hub", "repository:library/manytags:pull")
    seen: list[str] = []
    path: str | None = "/v2/library/manytags/tags/list?n=64"
    pages = 0
    with httpx.Client(base_url=testbed.hub.url, headers=bearer(token)) as client:
        while path is not None:
            response = client.get(path)
            assert response.status_code == 200
            page = response.json()
            assert page["name"] == "library/manytags"
            assert len(page["tags"]) <= 64
            seen += page["tags"]
            pages += 1
            link = response.headers.get("link")
            if link is None:
                path = None
            else:
                match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
                assert match, link
                path = match.group(1)
                assert path.startswith("/v2/library/manytags/tags/list?n=64&last=")
        assert pages == -(-len(image.tags) // 64)
        assert seen == sorted(image.tags)
        assert len(set(seen)) == len(seen)

        empty = client.get("/v2/library/manytags/tags/list", params={"n": "0"})
        assert empty.status_code == 200
        assert empty.json()["tags"] == []
        assert "link" not in empty.headers
        after = client.get("/v2/library/manytags/tags/list", params={"last": "v227"})
        assert after.json()["tags"] == ["v228", "v229"]
        assert "link" not in after.headers
        # Without n the front pages by default, like ghcr.io and quay.io.
        first = client.get("/v2/library/manytags/tags/list")
        assert first.json()["tags"] == sorted(image.tags)[: testbed.pager.default_page_size]
        assert first.headers["link"].startswith("</v2/library/manytags/tags/list?n=100&last=")
        assert client.get("/v2/library/manytags/tags/list", params={"n": "x"}).status_code == 400

    # the registry's own answer is relayed when it is not 200 (here: no token)
    unauthorized = httpx.get(f"{testbed.hub.url}/v2/library/manytags/tags/list", params={"n": "5"})
    assert unauthorized.status_code == 401
    assert parse_challenge(unauthorized.headers["www-authenticate"])["scope"] == "repository:library/manytags:pull"


def test_pager_relays_manifests_and_uploads(testbed: Testbed) -> None:
    image = testbed.images["busybox"]
    token = testbed.admin_token("hub", "repository:library/pager-upload:pull,push")
    with httpx.Client(base_url=testbed.hub.url) as client:
        read = testbed.token("hub", "repository:library/busybox:pull")
        listed = client.get(f"/v2/library/busybox/manifests/{image.tag}", headers=bearer(read, ALL_TYPES))
        assert listed.status_code == 200
        assert listed.headers["content-type"] == DOCKER_LIST
        assert listed.content == image.manifest
        head = client.head(f"/v2/library/busybox/manifests/{image.tag}", headers=bearer(read, ALL_TYPES))
        assert head.headers["content-length"] == str(len(image.manifest))
        assert head.content == b""

        blob = b"relayed through the pager\n" * 1000
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        start = client.post("/v2/library/pager-upload/blobs/uploads/", headers=bearer(token))
        assert start.status_code == 202
        location = start.headers["location"]
        assert location.startswith(testbed.hub.url + "/"), location  # the registry sees the front's Host
        sep = "&" if "?" in location else "?"
        done = client.put(f"{location}{sep}digest={digest}", headers=bearer(token), content=blob)
        assert done.status_code == 201, done.text
        assert done.headers["docker-content-digest"] == digest


def test_distribution_accept_quirks(testbed: Testbed) -> None:
    """Facts about distribution 2.8 that gateway tests may rely on."""
    base = testbed.hub.registry_url
    alpine, busybox = testbed.images["alpine"], testbed.images["busybox"]
    token = testbed.token("hub", ["repository:library/alpine:pull", "repository:library/busybox:pull"])
    # an OCI index is not served without an OCI type in Accept
    no_oci = httpx.get(f"{base}/v2/library/alpine/manifests/3.20", headers=bearer(token, DOCKER_MANIFEST))
    assert no_oci.status_code == 404
    assert alpine.media_type == OCI_INDEX
    assert alpine.tags[:2] == ("3.20", "latest")
    # a Docker manifest list is rewritten to the amd64 manifest without the list type in Accept
    single = httpx.get(f"{base}/v2/library/busybox/manifests/1.36", headers=bearer(token, DOCKER_MANIFEST))
    assert single.status_code == 200
    assert single.headers["docker-content-digest"] == busybox.platform_digest("linux/amd64")
    assert {mt for d, (mt, _) in busybox.manifests.items() if d != busybox.digest} == {DOCKER_MANIFEST}


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_skopeo_inspect_raw_matches_recorded_digest(testbed: Testbed) -> None:
    image = testbed.images["alpine"]
    raw = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://{testbed.hub.registry_host_port}/{image.repo}:{image.tag}",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.digest
    assert json.loads(raw)["mediaType"] == OCI_INDEX


def test_token_oauth_password_grant(testbed: Testbed, token_stats: TokenServer) -> None:
    """containerd POSTs an OAuth2 password grant first when it has credentials; other grants fall back to GET."""
    form = {
        "grant_type": "password",
        "username": testbed.credentials.username,
        "password": testbed.credentials.password,
        "service": testbed.ghcr.service,
        "scope": "repository:private/secret-app:pull repository:org/app:pull",
        "client_id": "testbed",
    }
    response = httpx.post(testbed.ghcr.realm, data=form)
    assert response.status_code == 200
    claims = testbed.tokens.decode(response.json()["access_token"], service=testbed.ghcr.service)
    assert [a["actions"] for a in claims["access"]] == [["pull"], ["pull"]]
    refresh = httpx.post(testbed.ghcr.realm, data={**form, "grant_type": "refresh_token", "refresh_token": "x"})
    assert refresh.status_code == 400
    wrong = httpx.post(testbed.ghcr.realm, data={**form, "password": "nope"})
    assert wrong.status_code == 401
    assert [(r.method, r.status, r.account) for r in token_stats.requests] == [
        ("POST", 200, testbed.credentials.username),
        ("POST", 400, None),
        ("POST", 401, None),
    ]
