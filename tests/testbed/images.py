"""Build OCI image layouts on disk (no container engine), push them with skopeo, read back what was pushed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ._util import TestbedError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ALL_MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
REF_NAME = "org.opencontainers.image.ref.name"
CREATED = "2024-01-01T00:00:00Z"
MTIME = 1704067200


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def _fast_random_stream(size: int, chunk: int = 8 << 20) -> list[int]:
    """Chunk sizes for streaming ``size`` random bytes."""
    sizes = [chunk] * (size // chunk)
    if size % chunk:
        sizes.append(size % chunk)
    return sizes


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self, **extra: object) -> dict[str, object]:
        out: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        out.update(extra)
        return out


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        return cls(parts[0], parts[1], parts[2] if len(parts) > 2 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class ImageSpec:
    """What to build and where to push it."""

    name: str
    upstream: str
    repo: str
    tags: tuple[str, ...]
    platforms: tuple[str, ...] = ("linux/amd64",)
    #: push an index/list even for a single platform
    index: bool = False
    #: "oci" keeps the OCI layout's types; "v2s2" makes skopeo convert to Docker schema2 (lists too)
    format: str = "oci"
    #: sizes of the gzip'ed random layers per platform
    layer_sizes: tuple[int, ...] = (48 * 1024, 16 * 1024)
    #: if set: a single uncompressed layer of at least this many MiB instead of layer_sizes
    big_layer_mib: int | None = None
    #: tags beyond the first that are added by direct manifest PUTs (after skopeo pushed the first)
    api_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    """What the registry actually holds for an image after the push (read back from the registry)."""

    name: str
    upstream: str
    repo: str
    tags: tuple[str, ...]
    #: top-level manifest digest and media type
    digest: str
    media_type: str
    #: every manifest (top-level and children): digest -> (media type, raw bytes)
    manifests: dict[str, tuple[str, bytes]]
    #: every blob (configs and layers): digest -> size
    blobs: dict[str, int]
    #: platform ("linux/amd64", "linux/arm64/v8") -> digest of the single-platform manifest
    platforms: dict[str, str] = field(default_factory=dict)
    #: layer digests (no configs) in manifest order, per platform
    layers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.tags[0]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def manifest(self) -> bytes:
        return self.manifests[self.digest][1]

    def platform_digest(self, platform: str = "linux/amd64") -> str:
        if platform in self.platforms:
            return self.platforms[platform]
        for key, digest in self.platforms.items():
            if key.startswith(platform + "/"):
                return digest
        raise KeyError(platform)

    def to_json(self) -> dict[str, object]:
        return {
            "upstream": self.upstream,
            "repo": self.repo,
            "tags": list(self.tags) if len(self.tags) <= 10 else [*self.tags[:3], "...", self.tags[-1]],
            "tag_count": len(self.tags),
            "digest": self.digest,
            "media_type": self.media_type,
            "manifests": {d: {"media_type": mt, "size": len(b)} for d, (mt, b) in self.manifests.items()},
            "platforms": self.platforms,
            "blobs": self.blobs,
        }


# --------------------------------------------------------------------------- layout writing
class OciLayout:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._refs: list[dict[str, object]] = []

    def put(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256_digest(data)
        (self.blob_dir / digest.removeprefix("sha256:")).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def put_json(self, document: dict[str, object], media_type: str) -> Descriptor:
        return self.put(json.dumps(document, indent=2).encode(), media_type)

    def put_stream(self, write: Callable[[Callable[[bytes], None]], None], media_type: str) -> Descriptor:
        """Write a blob through ``write(emit)`` without holding it in memory."""
        tmp = self.blob_dir / ".incoming"
        hasher = hashlib.sha256()
        size = 0
        with tmp.open("wb") as out:

            def emit(chunk: bytes) -> None:
                nonlocal size
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)

            write(emit)
        digest = "sha256:" + hasher.hexdigest()
        tmp.rename(self.blob_dir / hasher.hexdigest())
        return Descriptor(media_type, digest, size)

    def add_ref(self, descriptor: Descriptor, ref: str) -> None:
        self._refs.append(descriptor.to_json(annotations={REF_NAME: ref}))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self._refs}
        (self.root / "index.json").write_text(json.dumps(index, indent=2))


def small_layer_tar(label: str, sizes: tuple[int, ...]) -> bytes:
    """An uncompressed tar with a directory and random files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        top = tarfile.TarInfo(f"testbed/{label}")
        top.type = tarfile.DIRTYPE
        top.mode = 0o755
        top.mtime = MTIME
        for parent in ("testbed",):
            info = tarfile.TarInfo(parent)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = MTIME
            tar.addfile(info)
        tar.addfile(top)
        for i, size in enumerate(sizes):
            info = tarfile.TarInfo(f"testbed/{label}/file{i}.bin")
            info.size = size
            info.mode = 0o644
            info.mtime = MTIME
            tar.addfile(info, io.BytesIO(random_bytes(size)))
    return buf.getvalue()


def write_big_layer_tar(emit: Callable[[bytes], None], size: int) -> None:
    """Stream a tar with one random file of ``size`` bytes."""
    directory = tarfile.TarInfo("bigdata")
    directory.type = tarfile.DIRTYPE
    directory.mode = 0o755
    directory.mtime = MTIME
    emit(directory.tobuf(format=tarfile.USTAR_FORMAT))
    info = tarfile.TarInfo("bigdata/blob.bin")
    info.size = size
    info.mode = 0o644
    info.mtime = MTIME
    emit(info.tobuf(format=tarfile.USTAR_FORMAT))
    # AES-CTR keystream: uniformly random-looking, much faster than os.urandom for hundreds of MiB
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(8 << 20)
    for chunk in _fast_random_stream(size):
        emit(encryptor.update(zeros[:chunk]))
    emit(bytes((-size) % 512))  # pad the member to a block boundary
    emit(bytes(1024))  # end-of-archive marker


def _image_config(platform: Platform, diff_ids: list[str], label: str) -> dict[str, object]:
    config: dict[str, object] = {
        "created": CREATED,
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.opencontainers.image.title": label},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"testbed layer {i}"} for i in range(len(diff_ids))],
    }
    if platform.variant:
        config["variant"] = platform.variant
    return config


def build_layout(spec: ImageSpec, root: Path) -> str:
    """Write the image as an OCI layout under ``root``; returns the layout reference name."""
    layout = OciLayout(root)
    children: list[tuple[Platform, Descriptor]] = []
    for platform_text in spec.platforms:
        platform = Platform.parse(platform_text)
        layers: list[Descriptor] = []
        diff_ids: list[str] = []
        if spec.big_layer_mib is not None:
            big_size = spec.big_layer_mib * 1024 * 1024

            def write_big(emit: Callable[[bytes], None], big_size: int = big_size) -> None:
                write_big_layer_tar(emit, big_size)

            descriptor = layout.put_stream(write_big, OCI_LAYER)
            layers.append(descriptor)
            diff_ids.append(descriptor.digest)
        else:
            for i, size in enumerate(spec.layer_sizes):
                tar = small_layer_tar(f"{spec.name}-{platform.architecture}-{i}", (size, 100 + i))
                diff_ids.append(sha256_digest(tar))
                layers.append(layout.put(gzip.compress(tar, compresslevel=1, mtime=0), OCI_LAYER_GZIP))
        config = layout.put_json(_image_config(platform, diff_ids, spec.name), OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [d.to_json() for d in layers],
        }
        children.append((platform, layout.put_json(manifest, OCI_MANIFEST)))
    ref = "image"
    if len(children) == 1 and not spec.index:
        layout.add_ref(children[0][1], ref)
    else:
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [d.to_json(platform=p.to_json()) for p, d in children],
        }
        layout.add_ref(layout.put_json(index, OCI_INDEX), ref)
    return ref


# --------------------------------------------------------------------------- pushing
def skopeo_push(
    layout_root: Path,
    ref: str,
    destination: str,
    *,
    fmt: str,
    creds: str,
    policy: Path,
    log_path: Path,
    timeout: float = 300.0,
) -> None:
    if shutil.which("skopeo") is None:
        raise TestbedError("skopeo not found (apt-get install skopeo)")
    argv = ["skopeo", "--policy", str(policy), "copy", "--all", "--retry-times", "2"]
    if fmt == "v2s2":
        argv += ["--format", "v2s2"]
    else:
        argv += ["--preserve-digests"]
    argv += [
        "--dest-creds",
        creds,
        "--dest-tls-verify=false",
        f"oci:{layout_root}:{ref}",
        f"docker://{destination}",
    ]
    with log_path.open("ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=timeout, check=False)
    if result.returncode != 0:
        raise TestbedError(f"skopeo push to {destination} failed ({result.returncode}); see {log_path}")


def fetch_manifest(client: httpx.Client, base: str, repo: str, reference: str, token: str) -> tuple[str, bytes]:
    response = client.get(
        f"{base}/v2/{repo}/manifests/{reference}",
        headers={"Authorization": f"Bearer {token}", "Accept": ", ".join(ALL_MANIFEST_TYPES)},
    )
    if response.status_code != 200:
        raise TestbedError(f"GET {repo}:{reference} -> {response.status_code} {response.text[:200]}")
    media_type = response.headers["content-type"].split(";")[0].strip()
    digest = sha256_digest(response.content)
    if response.headers.get("docker-content-digest", digest) != digest:
        raise TestbedError(f"{repo}:{reference}: Docker-Content-Digest does not match the body")
    return media_type, response.content


def put_manifest(
    client: httpx.Client, base: str, repo: str, tag: str, *, media_type: str, body: bytes, token: str
) -> None:
    response = client.put(
        f"{base}/v2/{repo}/manifests/{tag}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": media_type},
        content=body,
    )
    if response.status_code != 201:
        raise TestbedError(f"PUT {repo}:{tag} -> {response.status_code} {response.text[:200]}")


def read_back(client: httpx.Client, base: str, spec: ImageSpec, tags: tuple[str, ...], token: str) -> Image:
    """Describe what the registry holds for ``spec`` (top-level manifest, children, blobs)."""
    media_type, body = fetch_manifest(client, base, spec.repo, tags[0], token)
    digest = sha256_digest(body)
    manifests: dict[str, tuple[str, bytes]] = {digest: (media_type, body)}
    blobs: dict[str, int] = {}
    platforms: dict[str, str] = {}
    layers: dict[str, tuple[str, ...]] = {}

    def single(child_digest: str, child_type: str, child_body: bytes, platform: str | None) -> None:
        document = json.loads(child_body)
        config = document["config"]
        blobs[config["digest"]] = int(config["size"])
        for layer in document["layers"]:
            blobs[layer["digest"]] = int(layer["size"])
        if platform is None:
            platform = str(Platform.parse(spec.platforms[0]))
        platforms[platform] = child_digest
        layers[platform] = tuple(layer["digest"] for layer in document["layers"])

    if media_type in INDEX_TYPES:
        for entry in json.loads(body)["manifests"]:
            child_type, child_body = fetch_manifest(client, base, spec.repo, entry["digest"], token)
            if sha256_digest(child_body) != entry["digest"]:
                raise TestbedError(f"{spec.repo}: child {entry['digest']} digest mismatch")
            manifests[entry["digest"]] = (child_type, child_body)
            p = entry.get("platform", {})
            platform = str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
            single(entry["digest"], child_type, child_body, platform)
    elif media_type in MANIFEST_TYPES:
        single(digest, media_type, body, None)
    else:
        raise TestbedError(f"{spec.repo}: unexpected manifest media type {media_type}")
    return Image(
        name=spec.name,
        upstream=spec.upstream,
        repo=spec.repo,
        tags=tags,
        digest=digest,
        media_type=media_type,
        manifests=manifests,
        blobs=blobs,
        platforms=platforms,
        layers=layers,
    )
