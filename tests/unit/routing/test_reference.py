import pytest
from hypothesis import given, strategies as st

from gateway.http.errors import RegistryError
from gateway.routing.reference import (
    ApiPath,
    Kind,
    check_manifest_reference,
    check_name,
    check_raw_path,
    is_digest,
    is_valid_name,
    parse_api_path,
)

SHA = "sha256:" + "a" * 64

VALID_NAMES = [
    "a",
    "alpine",
    "library/alpine",
    "org/team/app",
    "a.b",
    "a_b",
    "a__b",
    "a-b",
    "a---b",
    "0/1/2",
    "k8s-artifacts-prod/images/pause",
    "x" * 255,
]
INVALID_NAMES = [
    "",
    "Alpine",
    "a/",
    "/a",
    "a//b",
    "a..b",
    "a___b",
    "-a",
    "a-",
    "a.",
    "_a",
    "a b",
    "a:b",
    "a@b",
    "x" * 256,
    "..",
    "a/../b",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name):
    assert is_valid_name(name)
    check_name(name)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names(name):
    assert not is_valid_name(name)
    with pytest.raises(RegistryError) as info:
        check_name(name)
    assert info.value.status == 400
    assert info.value.code == "NAME_INVALID"


@pytest.mark.parametrize(
    ("digest", "ok"),
    [
        (SHA, True),
        ("sha512:" + "b" * 128, True),
        ("sha256:" + "A" * 64, False),  # registered algorithms use lowercase hex
        ("sha256:" + "a" * 63, False),
        ("sha256:totallywrong", False),
        ("sha256:", False),
        ("sha256", False),
        ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", True),
        ("SHA256:" + "a" * 64, False),
    ],
)
def test_digests(digest, ok):
    assert is_digest(digest) is ok


@pytest.mark.parametrize("ref", ["latest", "v1.2.3", "_x", "A" * 128, SHA])
def test_valid_manifest_references(ref):
    check_manifest_reference(ref)


@pytest.mark.parametrize(
    ("ref", "status", "code"),
    [(".x", 404, "MANIFEST_UNKNOWN"), ("A" * 129, 404, "MANIFEST_UNKNOWN"), ("sha256:x", 400, "DIGEST_INVALID")],
)
def test_invalid_manifest_references(ref, status, code):
    with pytest.raises(RegistryError) as info:
        check_manifest_reference(ref)
    assert (info.value.status, info.value.code) == (status, code)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/", ApiPath(Kind.PING)),
        ("/v2", ApiPath(Kind.PING)),
        ("/v2/alpine/manifests/latest", ApiPath(Kind.MANIFEST, "alpine", "latest")),
        ("/v2/library/alpine/blobs/" + SHA, ApiPath(Kind.BLOB, "library/alpine", SHA)),
        ("/v2/ghcr.io/org/app/tags/list", ApiPath(Kind.TAGS, "ghcr.io/org/app")),
        ("/v2/org/app/referrers/" + SHA, ApiPath(Kind.REFERRERS, "org/app", SHA)),
        # A repository may itself contain "manifests" or "blobs": the tail decides.
        ("/v2/foo/manifests/manifests/latest", ApiPath(Kind.MANIFEST, "foo/manifests", "latest")),
        ("/v2/blobs/blobs/" + SHA, ApiPath(Kind.BLOB, "blobs", SHA)),
        ("/v2/v2/manifests/latest", ApiPath(Kind.MANIFEST, "v2", "latest")),
        ("/v2/alpine/blobs/uploads/", ApiPath(Kind.UPLOAD, "alpine")),
        ("/v2/alpine/blobs/uploads", ApiPath(Kind.UPLOAD, "alpine")),
        ("/v2/alpine/blobs/uploads/1234-abcd", ApiPath(Kind.UPLOAD, "alpine")),
    ],
)
def test_parse_api_path(path, expected):
    assert parse_api_path(path) == expected


@pytest.mark.parametrize(
    "path",
    ["/v2/_catalog", "/v2/alpine", "/v2/alpine/manifests", "/v2/alpine/tags/other", "/v2//manifests/x", "/v3/x"],
)
def test_unknown_endpoints_are_registry_404s(path):
    with pytest.raises(RegistryError) as info:
        parse_api_path(path)
    assert info.value.status == 404
    assert info.value.code == "UNSUPPORTED"


@pytest.mark.parametrize(
    "raw",
    [
        b"/v2/a%2fb/manifests/x",
        b"/v2/a%2Fb/manifests/x",
        b"/v2/%2e%2e/manifests/x",
        b"/v2/a/../b/manifests/x",
        b"/v2/a/./b/manifests/x",
        b"/v2/a\x00/manifests/x",
        b"/v2/a b/manifests/x",
        b"/v2/a/manifests/..",
    ],
)
def test_raw_path_refusals(raw):
    with pytest.raises(RegistryError) as info:
        check_raw_path(raw)
    assert info.value.code == "NAME_INVALID"


def test_raw_path_accepts_every_valid_shape():
    check_raw_path(b"/v2/ghcr.io/org/app-x_y.z/manifests/" + SHA.encode())
    check_raw_path(b"/v2/localhost:5000/app/manifests/V1.0_rc")


@given(st.text(max_size=300))
def test_parse_api_path_only_raises_registry_errors(path):
    try:
        api = parse_api_path("/v2/" + path)
    except RegistryError as exc:
        status = exc.status
    else:
        status = 200
        assert isinstance(api.kind, Kind)
    assert status in (200, 400, 404)
