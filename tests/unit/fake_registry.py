"""A scriptable fake registry behind httpx.MockTransport: registry, token realm and CDN origins."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

REGISTRY = "https://registry.test"
REALM = "https://auth.test/token"
CDN = "https://cdn.test"
SERVICE = "registry.test"

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
BLOB = bytes(range(256)) * 1024
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def response(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> httpx.Response:
    # stream=: a content= body is pre-read by httpx and cannot be streamed by the relay.
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def registry_error(status: int, code: str, message: str = "x", headers: dict[str, str] | None = None) -> httpx.Response:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    return response(status, body, {"content-type": "application/json", **(headers or {})})


@dataclass
class FakeRegistry:
    """Token auth like Docker Hub: a 401 challenge, tokens from REALM, blobs redirected to CDN."""

    tokens_issued: int = 0
    expires_in: int = 300
    redirect_blobs: bool = True
    requests: list[httpx.Request] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    override: Callable[[httpx.Request], httpx.Response | None] | None = None
    tags: list[str] = field(default_factory=lambda: [f"v{i}" for i in range(5)])

    def challenge(self, repo: str) -> dict[str, str]:
        return {"www-authenticate": f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:{repo}:pull"'}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.override is not None:
            answer = self.override(request)
            if answer is not None:
                return answer
        url = str(request.url)
        if url.startswith(REALM):
            self.tokens_issued += 1
            token = f"token-{self.tokens_issued}"
            self.valid_tokens.add(token)
            return response(200, json.dumps({"token": token, "expires_in": self.expires_in}).encode())
        if url.startswith(CDN):
            if "authorization" in request.headers:
                return response(
                    400, b"<Error>Only one auth mechanism allowed</Error>", {"content-type": "application/xml"}
                )
            return self.serve_blob(request)
        path = request.url.path
        auth = request.headers.get("authorization", "")
        authorized = auth.startswith("Bearer ") and auth[7:] in self.valid_tokens
        if path == "/v2/":
            # Like Docker Hub: the ping challenges too, without a scope.
            if authorized:
                return response(200, b"{}")
            challenge = {"www-authenticate": f'Bearer realm="{REALM}",service="{SERVICE}"'}
            return registry_error(401, "UNAUTHORIZED", "authentication required", challenge)
        repo = path[4:].rsplit("/", 2)[0]
        if not authorized:
            return registry_error(401, "UNAUTHORIZED", "authentication required", self.challenge(repo))
        if "/manifests/" in path:
            if path.endswith("/missing"):
                return registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            headers = {
                "content-type": "application/vnd.oci.image.manifest.v1+json",
                "docker-content-digest": MANIFEST_DIGEST,
                "content-length": str(len(MANIFEST)),
                "etag": f'"{MANIFEST_DIGEST}"',
                "set-cookie": "session=abc",
                "x-internal": "secret-header",
            }
            return response(200, b"" if request.method == "HEAD" else MANIFEST, headers)
        if "/blobs/" in path:
            if self.redirect_blobs:
                return response(307, b"", {"location": f"{CDN}/blobs/{path.rsplit('/', 1)[1]}?X-Amz-Signature=abc"})
            return self.serve_blob(request)
        if path.endswith("/tags/list"):
            return self.serve_tags(request, repo)
        return registry_error(404, "NAME_UNKNOWN")

    def serve_blob(self, request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "application/octet-stream", "accept-ranges": "bytes", "x-amz-request-id": "r1"}
        rng = request.headers.get("range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s)
            end = int(end_s) if end_s else len(BLOB) - 1
            if start >= len(BLOB):
                return response(416, b"", {"content-range": f"bytes */{len(BLOB)}"})
            part = BLOB[start : end + 1]
            headers.update({"content-range": f"bytes {start}-{end}/{len(BLOB)}", "content-length": str(len(part))})
            return response(206, b"" if request.method == "HEAD" else part, headers)
        headers["content-length"] = str(len(BLOB))
        return response(200, b"" if request.method == "HEAD" else BLOB, headers)

    def serve_tags(self, request: httpx.Request, repo: str) -> httpx.Response:
        n = int(request.url.params.get("n", "1000"))
        last = request.url.params.get("last")
        tags = [t for t in self.tags if last is None or t > last]
        page, rest = tags[:n], tags[n:]
        headers = {"content-type": "application/json"}
        if rest and page:
            headers["link"] = f'</v2/{repo}/tags/list?last={page[-1]}&n={n}>; rel="next"'
        return response(200, json.dumps({"name": repo, "tags": page}).encode(), headers)

    def seen(self, prefix: str) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url).startswith(prefix)]
