"""HTTP helpers shared by the relay and the token client: header policy, links, capped reads.

Header policy is an allow-list in both directions. Towards the upstream only what
a registry uses is sent (never the client's ``Authorization``, cookies or forwarding
headers); towards the client only registry and content headers are returned, so an
upstream or CDN header (``Set-Cookie``, ``x-amz-*``, ``WWW-Authenticate`` naming
the upstream's realm) never reaches a client by accident.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import TypeAlias
from urllib.parse import urlsplit

import httpx

# A piece of a body as it streams: the upstream connection hands on each read as a view of the
# buffer it was read into (``net/connections.py``), anything else is ``bytes``. Both have len(),
# slicing, hashing and a transport's write; a view has no bytes methods (find, decode, +).
Chunk: TypeAlias = bytes | memoryview

# Client -> upstream. Range/If-Range for resumable blob pulls (distribution-spec
# "Pulling Blobs"); Accept decides which manifest format comes back.
FORWARD_REQUEST_HEADERS = frozenset(
    {b"accept", b"accept-encoding", b"range", b"if-range", b"if-none-match", b"if-modified-since", b"user-agent"}
)

# Docker Hub's pull-limit headers (and their x- spellings): clients and operators read them,
# on success and on 429 alike.
RATE_LIMIT_HEADERS = frozenset(
    {
        "retry-after",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "docker-ratelimit-source",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    }
)

# Upstream -> client.
FORWARD_RESPONSE_HEADERS = RATE_LIMIT_HEADERS | frozenset(
    {
        "content-type",
        "content-length",
        "content-range",
        "content-encoding",
        "accept-ranges",
        "docker-content-digest",
        "etag",
        "last-modified",
        "cache-control",
        "expires",
        "vary",
        # Referrers API (distribution-spec "Listing Referrers").
        "oci-filters-applied",
        "oci-subject",
    }
)

# Headers kept on error answers that are re-encoded as registry JSON.
ERROR_RESPONSE_HEADERS = RATE_LIMIT_HEADERS

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def response_headers(
    headers: httpx.Headers, allowed: frozenset[str] = FORWARD_RESPONSE_HEADERS
) -> list[tuple[bytes, bytes]]:
    """The upstream headers a client may see, as ASGI header pairs (repeats kept).

    Names are lowercased, as ASGI requires: headers the gateway sets itself (``content-length``
    on a manifest it holds) then replace the upstream's whatever its spelling, never duplicate them.
    """
    out = []
    for key, value in headers.raw:
        lower = key.lower()
        if lower.decode("latin-1") in allowed:
            out.append((lower, value))
    return out


_LINK_RE = re.compile(r"<([^>]*)>\s*(.*)")


def entity_tag_matches(if_none_match: Iterable[str], etag: str | None) -> bool:
    """Whether an ``If-None-Match`` (all its field values) matches ``etag``: RFC 9110 13.1.2.

    ``*`` matches any current representation; otherwise the comparison is weak (a ``W/``
    prefix on either side is ignored) against each entity-tag of the comma-separated list.
    An unquoted digest matches too, as distribution accepts it (handlers/helpers.go etagMatch).
    """
    wanted = _opaque_tag(etag) if etag is not None else None
    for value in if_none_match:
        for candidate in value.split(","):
            candidate = candidate.strip()
            if candidate == "*":
                return True
            if wanted is not None and _opaque_tag(candidate) == wanted:
                return True
    return False


def _opaque_tag(entity_tag: str) -> str:
    return entity_tag.removeprefix("W/").strip('"')


def rewrite_next_link(value: str, client_path_name: str) -> str | None:
    """Rewrite a tags/list ``Link`` into the client's namespace.

    Registries send ``</v2/library/alpine/tags/list?n=100&last=x>; rel="next"``
    (relative; some send an absolute URL). The client must follow it back through
    the gateway, under the name it used (``docker.io/alpine``), so the path is
    replaced and only the query (``n``, ``last``) is kept. containers/image takes
    only the path and query of a next link (docker/docker_image.go), Docker and
    containerd resolve it against the request URL; a relative link suits all.
    """
    match = _LINK_RE.match(value.strip())
    if match is None:
        return None
    target, params = match.groups()
    try:
        query = urlsplit(target).query
    except ValueError:
        return None
    path = f"/v2/{client_path_name}/tags/list"
    return f"<{path}{'?' + query if query else ''}>" + (f"; {params.lstrip('; ')}" if params else "")


def split_links(values: Iterable[str]) -> list[str]:
    """Split ``Link`` header values into single links (a value may join several with commas)."""
    out: list[str] = []
    for value in values:
        depth = 0
        start = 0
        for i, ch in enumerate(value):
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth = max(0, depth - 1)
            elif ch == "," and depth == 0:
                out.append(value[start:i].strip())
                start = i + 1
        tail = value[start:].strip()
        if tail:
            out.append(tail)
    return out


async def read_capped(resp: httpx.Response, limit: int, *, raw: bool = False) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (checked as it arrives).

    ``raw`` keeps any Content-Encoding. Otherwise gzip and deflate are decoded here, a
    bounded step at a time, so the limit applies to the decoded size and a small
    compressed bomb is cut off after ``limit`` bytes instead of being inflated whole
    (httpx's own decoder inflates each chunk completely). Other encodings give None.
    """
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    encoding = "" if raw else resp.headers.get("content-encoding", "").strip().lower()
    decoder: zlib._Decompress | None = None
    if encoding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decoder = zlib.decompressobj()
    elif encoding not in ("", "identity"):
        return None
    chunks: list[bytes] = []
    size = received = 0
    async for chunk in resp.aiter_raw():
        received += len(chunk)
        if received > limit:
            return None
        if decoder is not None:
            try:
                chunk = decoder.decompress(chunk, limit + 1 - size)
            except zlib.error:
                return None
            if decoder.unconsumed_tail:
                return None
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
