"""The assembled test bed: token server, three distribution registries, nginx CDN, tag pager, pushed images."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import images as img
from ._util import LOOPBACK, TestbedError, ThreadedUvicorn
from .cdn import Cdn
from .images import Image, ImageSpec
from .pager import PagingRelay
from .registry import Registry
from .tokens import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    OTHER_PASSWORD,
    OTHER_USER,
    PRIVATE_PASSWORD,
    PRIVATE_USER,
    Scope,
    TokenServer,
    parse_scopes,
)

HUB, GHCR, QUAY = "hub", "ghcr", "quay"
SERVICES = {HUB: "hub.test", GHCR: "ghcr.test", QUAY: "quay.test"}
TOKEN_PATHS = {HUB: "/token", GHCR: "/token", QUAY: "/v2/auth"}
MANYTAGS_COUNT = 230
AMD64_ARM64 = ("linux/amd64", "linux/arm64/v8")


def image_specs(big_blob_mib: int) -> list[ImageSpec]:
    """The images every test bed holds (keys of ``Testbed.images`` are the spec names)."""
    many = tuple(f"v{i:03d}" for i in range(MANYTAGS_COUNT))
    return [
        ImageSpec("bigimage", HUB, "library/bigimage", ("1.0",), big_layer_mib=big_blob_mib),
        ImageSpec("alpine", HUB, "library/alpine", ("3.20", "latest"), AMD64_ARM64, index=True, api_tags=("latest",)),
        ImageSpec("busybox", HUB, "library/busybox", ("1.36",), AMD64_ARM64, index=True, format="v2s2"),
        ImageSpec("tool", HUB, "someorg/tool", ("1.0",), format="v2s2"),
        ImageSpec("manytags", HUB, "library/manytags", many, layer_sizes=(8 * 1024,), api_tags=many[1:]),
        ImageSpec("app", GHCR, "org/app", ("v1",), AMD64_ARM64, index=True),
        ImageSpec("secret-app", GHCR, "private/secret-app", ("v1",), layer_sizes=(24 * 1024,)),
        ImageSpec("etcd", QUAY, "coreos/etcd", ("v3.5",), format="v2s2", layer_sizes=(32 * 1024,)),
    ]


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def as_tuple(self) -> tuple[str, str]:
        return (self.username, self.password)


@dataclass(frozen=True)
class Upstream:
    """One registry as a client sees it."""

    name: str
    #: where clients should talk to (for hub: the paging front; for the others: the registry itself)
    url: str
    #: the distribution registry itself
    registry_url: str
    #: the token endpoint (``realm`` of the Bearer challenge)
    realm: str
    service: str
    token_path: str
    storage_dir: Path
    log_path: Path

    @property
    def host_port(self) -> str:
        """``127.0.0.1:NNNN`` of :attr:`url`."""
        return self.url.removeprefix("http://")

    @property
    def registry_host_port(self) -> str:
        return self.registry_url.removeprefix("http://")

    def to_json(self) -> dict[str, str]:
        return {
            "url": self.url,
            "registry_url": self.registry_url,
            "host_port": self.host_port,
            "registry_host_port": self.registry_host_port,
            "realm": self.realm,
            "service": self.service,
            "token_path": self.token_path,
            "storage_dir": str(self.storage_dir),
            "log": str(self.log_path),
        }


class Testbed:
    """A running test bed. Create it only through :meth:`start`."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        *,
        workdir: Path,
        tokens: TokenServer,
        upstreams: dict[str, Upstream],
        cdn: Cdn,
        pager: PagingRelay,
        big_blob_mib: int,
    ) -> None:
        self.workdir = workdir
        self.big_blob_mib = big_blob_mib
        self.tokens = tokens
        self.upstreams = upstreams
        self.hub = upstreams[HUB]
        self.ghcr = upstreams[GHCR]
        self.quay = upstreams[QUAY]
        #: the nginx CDN (``.url``, ``.requests``, ``.reset()``, ``.access_log_path``)
        self.cdn = cdn
        self.cdn_url = cdn.url
        self.pager = pager
        self.credentials = Credentials(PRIVATE_USER, PRIVATE_PASSWORD)
        self.admin_credentials = Credentials(ADMIN_USER, ADMIN_PASSWORD)
        #: valid credentials that do not grant access to private/ repositories
        self.other_credentials = Credentials(OTHER_USER, OTHER_PASSWORD)
        self.images: dict[str, Image] = {}
        self.start_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, *, big_blob_mib: int = 256, token_ttl: int = 300) -> Iterator[Testbed]:
        """Start everything, push the images, yield the bed; stop every process and thread on exit."""
        started = time.monotonic()
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        specs = image_specs(big_blob_mib)
        with contextlib.ExitStack() as stack:
            builders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="testbed-build")
            stack.callback(builders.shutdown, wait=True, cancel_futures=True)
            layouts: dict[str, Future[str]] = {
                spec.name: builders.submit(img.build_layout, spec, workdir / "layouts" / spec.name) for spec in specs
            }

            tokens = TokenServer(ttl=token_ttl)
            for name in (HUB, GHCR, QUAY):
                tokens.add_endpoint(TOKEN_PATHS[name], SERVICES[name])
            tokens.start()
            stack.callback(tokens.stop)
            cert = tokens.write_certificate(workdir / "token-signer.pem")

            registries = {
                name: Registry(
                    name,
                    workdir,
                    realm=tokens.realm(TOKEN_PATHS[name]),
                    service=SERVICES[name],
                    issuer=tokens.issuer,
                    rootcertbundle=cert,
                )
                for name in (HUB, GHCR, QUAY)
            }
            cdn = Cdn(workdir, registries[HUB].storage_dir)
            cdn.start()
            stack.callback(cdn.stop)
            registries[HUB].redirect_baseurl = cdn.url + "/"
            for registry in registries.values():
                registry.start()
                stack.callback(registry.stop)

            pager = PagingRelay(registries[HUB].url)
            pager_server = ThreadedUvicorn(pager, name="hub-pager", lifespan="on")
            pager_server.start()
            stack.callback(pager_server.stop)

            upstreams = {
                name: Upstream(
                    name=name,
                    url=pager_server.url if name == HUB else registry.url,
                    registry_url=registry.url,
                    realm=registry.realm,
                    service=registry.service,
                    token_path=TOKEN_PATHS[name],
                    storage_dir=registry.storage_dir,
                    log_path=registry.log_path,
                )
                for name, registry in registries.items()
            }
            bed = cls(
                workdir=workdir,
                tokens=tokens,
                upstreams=upstreams,
                cdn=cdn,
                pager=pager,
                big_blob_mib=big_blob_mib,
            )
            bed._push_all(specs, layouts)
            tokens.reset()
            cdn.reset()
            pager.paginated_requests = pager.relayed_requests = 0
            bed.start_seconds = time.monotonic() - started
            (workdir / "testbed.json").write_text(json.dumps(bed.describe(), indent=2))
            yield bed

    def _push_all(self, specs: Sequence[ImageSpec], layouts: dict[str, Future[str]]) -> None:
        policy = self.workdir / "skopeo-policy.json"
        policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        logs = self.workdir / "push-logs"
        logs.mkdir(exist_ok=True)
        creds = f"{ADMIN_USER}:{ADMIN_PASSWORD}"

        def push(spec: ImageSpec) -> Image:
            upstream = self.upstreams[spec.upstream]
            ref = layouts[spec.name].result()
            img.skopeo_push(
                self.workdir / "layouts" / spec.name,
                ref,
                f"{upstream.registry_host_port}/{spec.repo}:{spec.tags[0]}",
                fmt=spec.format,
                creds=creds,
                policy=policy,
                log_path=logs / f"{spec.name}.log",
            )
            token = self.admin_token(spec.upstream, f"repository:{spec.repo}:pull,push")
            with httpx.Client(timeout=60, trust_env=False) as client:
                if spec.api_tags:
                    media_type, body = img.fetch_manifest(client, upstream.registry_url, spec.repo, spec.tags[0], token)
                    for tag in spec.api_tags:
                        img.put_manifest(
                            client, upstream.registry_url, spec.repo, tag, media_type=media_type, body=body, token=token
                        )
                return img.read_back(client, upstream.registry_url, spec, spec.tags, token)

        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="testbed-push") as pushers:
            futures = {spec.name: pushers.submit(push, spec) for spec in specs}
            errors: list[str] = []
            for name, future in futures.items():
                try:
                    self.images[name] = future.result()
                except Exception as exc:  # collect all failures, then report
                    errors.append(f"{name}: {exc}")
        if errors:
            raise TestbedError("pushing images failed:\n" + "\n".join(errors))
        self._verify_pushed()
        # the big layer now lives in the registry storage; do not keep a second copy on disk
        shutil.rmtree(self.workdir / "layouts" / "bigimage", ignore_errors=True)

    def _verify_pushed(self) -> None:
        expected = {"busybox": img.DOCKER_LIST, "alpine": img.OCI_INDEX, "tool": img.DOCKER_MANIFEST}
        for name, media_type in expected.items():
            if self.images[name].media_type != media_type:
                raise TestbedError(f"{name} was stored as {self.images[name].media_type}, not {media_type}")
        for digest, (media_type, _) in self.images["busybox"].manifests.items():
            if digest != self.images["busybox"].digest and media_type != img.DOCKER_MANIFEST:
                raise TestbedError(f"busybox child {digest} is {media_type}")

    # ------------------------------------------------------------------ helpers
    def upstream(self, name: str) -> Upstream:
        try:
            return self.upstreams[name]
        except KeyError:
            raise KeyError(f"unknown upstream {name!r}; known: {sorted(self.upstreams)}") from None

    def admin_token(self, upstream: str, scope: str | Sequence[str]) -> str:
        """A token for ``upstream`` granting exactly the requested scopes (minted in-process, not counted)."""
        token, _ = self.tokens.mint(self.upstream(upstream).service, ADMIN_USER, parse_scopes(scope))
        return token

    def token(self, upstream: str, scope: str | Sequence[str], user: str | None = None) -> str:
        """A token as the server's policy would grant it to ``user`` (None: anonymous); not counted."""
        granted = [Scope(s.type, s.name, self.tokens.grant(user, s)) for s in parse_scopes(scope)]
        token, _ = self.tokens.mint(self.upstream(upstream).service, user or "", granted)
        return token

    def image(self, upstream: str, repo: str) -> Image:
        for image in self.images.values():
            if image.upstream == upstream and image.repo == repo:
                return image
        raise KeyError(f"{upstream}/{repo}")

    def describe(self) -> dict[str, object]:
        """A JSON-able description (what the CLI prints)."""
        return {
            "workdir": str(self.workdir),
            "start_seconds": round(self.start_seconds, 2),
            "big_blob_mib": self.big_blob_mib,
            "token_server": self.tokens.url,
            "token_issuer": self.tokens.issuer,
            "token_ttl": self.tokens.ttl,
            "token_key_id": self.tokens.key_id,
            "cdn_url": self.cdn_url,
            "upstreams": {name: u.to_json() for name, u in self.upstreams.items()},
            "credentials": {"username": self.credentials.username, "password": self.credentials.password},
            "admin_credentials": {
                "username": self.admin_credentials.username,
                "password": self.admin_credentials.password,
            },
            "images": {name: image.to_json() for name, image in self.images.items()},
            "loopback": LOOPBACK,
        }
