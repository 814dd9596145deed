"""skopeo pulls every kind of image through the gateway, in every addressing mode, byte for byte."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.clients import Skopeo, verify_dir_copy
from tests.support import Gateway
from tests.testbed.bed import Testbed

# (image key, mode, reference with {p} for the gateway's port)
CASES = [
    ("alpine", "default", "127.0.0.1:{p}/alpine:3.20"),
    ("alpine", "default-library", "127.0.0.1:{p}/library/alpine:latest"),
    ("alpine", "prefix", "gw.test:{p}/docker.io/alpine:3.20"),
    ("alpine", "prefix-library", "gw.test:{p}/docker.io/library/alpine:3.20"),
    ("alpine", "host", "docker.gw.test:{p}/alpine:3.20"),
    ("alpine", "blob-redirect-pass", "pass.gw.test:{p}/alpine:3.20"),
    ("busybox", "default", "127.0.0.1:{p}/busybox:1.36"),
    ("busybox", "host", "docker.gw.test:{p}/library/busybox:1.36"),
    ("tool", "default", "127.0.0.1:{p}/someorg/tool:1.0"),
    ("tool", "prefix", "gw.test:{p}/docker.io/someorg/tool:1.0"),
    ("app", "prefix", "gw.test:{p}/ghcr.io/org/app:v1"),
    ("app", "host", "ghcr.gw.test:{p}/org/app:v1"),
    ("secret-app", "host-with-credentials", "ghcr.gw.test:{p}/private/secret-app:v1"),
    ("secret-app", "prefix-with-credentials", "gw.test:{p}/ghcr.io/private/secret-app:v1"),
    ("etcd", "prefix", "gw.test:{p}/quay.io/coreos/etcd:v3.5"),
    ("etcd", "host", "quay.gw.test:{p}/coreos/etcd:v3.5"),
    ("bigimage", "default", "127.0.0.1:{p}/bigimage:1.0"),
]


@pytest.mark.parametrize(("key", "mode", "ref"), CASES, ids=[f"{k}-{m}" for k, m, _ in CASES])
def test_copy_all_is_byte_identical(skopeo: Skopeo, gateway: Gateway, testbed: Testbed, tmp_path, key, mode, ref):
    image = testbed.images[key]
    dest = skopeo.copy_all(ref.format(p=gateway.port), tmp_path / "copy")
    verify_dir_copy(dest, image)


def test_pull_by_digest(skopeo: Skopeo, gateway: Gateway, testbed: Testbed, tmp_path):
    image = testbed.images["app"]
    dest = skopeo.copy_all(f"ghcr.gw.test:{gateway.port}/org/app@{image.digest}", tmp_path / "copy")
    verify_dir_copy(dest, image)


def test_private_image_needs_the_routes_credentials(skopeo: Skopeo, gateway: Gateway, tmp_path):
    with pytest.raises(AssertionError) as info:
        skopeo.copy_all(f"anon.gw.test:{gateway.port}/private/secret-app:v1", tmp_path / "copy")
    assert "unauthorized" in str(info.value).lower()


def test_missing_tag_is_manifest_unknown(skopeo: Skopeo, gateway: Gateway):
    with pytest.raises(AssertionError) as info:
        skopeo("inspect", "--tls-verify=false", f"docker://gw.test:{gateway.port}/ghcr.io/org/app:nope")
    assert "manifest unknown" in str(info.value).lower()


def test_unknown_registry_prefix_is_refused(skopeo: Skopeo, gateway: Gateway):
    with pytest.raises(AssertionError) as info:
        skopeo("inspect", "--tls-verify=false", f"docker://gw.test:{gateway.port}/evil.example.com/x/y:1")
    assert "no route for registry" in str(info.value)


@pytest.mark.parametrize(
    "ref",
    ["gw.test:{p}/docker.io/manytags", "docker.gw.test:{p}/manytags", "127.0.0.1:{p}/library/manytags"],
)
def test_list_tags_follows_every_page(skopeo: Skopeo, gateway: Gateway, testbed: Testbed, ref):
    out = skopeo("list-tags", "--tls-verify=false", f"docker://{ref.format(p=gateway.port)}").stdout
    import json

    tags = json.loads(out)["Tags"]
    assert sorted(tags) == sorted(testbed.images["manytags"].tags)
    assert len(tags) == len(set(tags)) > 200


def test_inspect_raw_matches_pushed_manifest(skopeo: Skopeo, gateway: Gateway, testbed: Testbed):
    image = testbed.images["busybox"]
    raw = subprocess.run(
        [
            "skopeo",
            "--policy",
            str(skopeo.policy),
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://127.0.0.1:{gateway.port}/busybox:1.36",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert raw == image.manifest
