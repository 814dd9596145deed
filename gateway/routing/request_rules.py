"""The relay's pure decisions about a request and its answer: no I/O, testable in tables.

- what a client may send (header sizes), and which of its headers and query parameters go
  upstream (an allow-list: ``n``/``last`` for tags, ``artifactType`` for referrers; ``ns``
  selects a route and everything else is ignored);
- the validators of a ``304`` and the entity-tag of a cached manifest (RFC 9110 13.1.2, 15.4.5);
- the start of a ``tags/list`` body renamed into the client's namespace;
- the request itself, read once from its ASGI scope (``read_request``) and judged
  (``admissible``), so that the layers below the relay's entry see parsed facts, never the scope.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from gateway.http.asgi import Headers, Scope
from gateway.http.errors import PAGINATION_NUMBER_INVALID, TAG_INVALID, UNSUPPORTED, RegistryError, unsupported_method
from gateway.http.util import FORWARD_REQUEST_HEADERS
from gateway.routing.reference import ApiPath, Kind, check_raw_path, check_reference, parse_api_path

# Tag list pages: distribution-spec allows any n; the cap only stops absurd values.
MAX_PAGE_SIZE = 100_000
# Real clients send a few hundred bytes of headers. These caps keep oversized values
# (an Accept of 100 KB, a cookie jar) from being forwarded or parsed at all.
MAX_HEADER_VALUE = 8 << 10
MAX_HEADERS_TOTAL = 32 << 10


# RFC 9110 15.4.5: a 304 carries what a 200 would have in these fields, and no content headers.
NOT_MODIFIED_HEADERS = frozenset({b"etag", b"cache-control", b"expires", b"vary", b"docker-content-digest"})


def entity_tag_of(headers: Headers) -> str | None:
    """A cached manifest's entity-tag: the upstream's ETag, else its digest quoted (distribution's ETag)."""
    found = dict(headers)
    if b"etag" in found:
        return found[b"etag"].decode("latin-1")
    digest = found.get(b"docker-content-digest")
    return f'"{digest.decode("latin-1")}"' if digest else None


def renamed_tag_list_start(start: bytes, upstream_name: str, client_name: str, *, complete: bool) -> bytes | None:
    """The first bytes of a ``tags/list`` body with ``name`` in the client's namespace; None: need more bytes.

    distribution-spec "Listing Tags": ``{"name": "<name>", "tags": [...]}``, where ``<name>``
    is the repository the client asked for. The name member comes first in what registries
    write (Go's encoding/json, compact; Python's json, with a space), so only the start of
    the body is rewritten and the rest streams as it comes. A body that starts otherwise
    passes unchanged. ``complete``: the body has no more bytes.
    """
    quoted = json.dumps(upstream_name).encode()
    for key in (b'{"name":', b'{"name": '):
        expected = key + quoted
        if start.startswith(expected):
            return key + json.dumps(client_name).encode() + start[len(expected) :]
        if expected.startswith(start) and not complete:
            return None
    return start


def _headers_too_large() -> RegistryError:
    return RegistryError(
        431,
        UNSUPPORTED,
        f"request headers too large (at most {MAX_HEADER_VALUE} bytes per header, {MAX_HEADERS_TOTAL} in all)",
    )


def _bad_request(code: str, message: str) -> RegistryError:
    return RegistryError(400, code, message)


def upstream_query(kind: Kind, query_string: bytes) -> tuple[str, str | None]:
    """(query to send upstream, ns) from the client's query string.

    Only parameters the endpoint defines go upstream (``n``/``last`` for tags,
    ``artifactType`` for referrers); ``ns`` selects a route and everything else is
    ignored, never an error (containerd adds ``ns``; other clients add their own).
    """
    ns: str | None = None
    forward: list[tuple[str, str]] = []
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "ns":
            ns = ns or value
        elif kind is Kind.TAGS and key == "n":
            if not (value.isascii() and value.isdigit()) or len(value) > 6 or int(value) > MAX_PAGE_SIZE:
                raise _bad_request(PAGINATION_NUMBER_INVALID, f"n must be an integer from 0 to {MAX_PAGE_SIZE}")
            forward.append((key, value))
        elif kind is Kind.TAGS and key == "last":
            if len(value) > 128:
                raise _bad_request(TAG_INVALID, "last must be a tag (at most 128 characters)")
            forward.append((key, value))
        elif kind is Kind.REFERRERS and key == "artifactType":
            if len(value) > 255:
                raise _bad_request(UNSUPPORTED, "artifactType is too long")
            forward.append((key, value))
    return urlencode(forward), ns


def upstream_headers(scope: Scope) -> dict[str, str]:
    """The client headers that go upstream; repeated ones (Docker sends one Accept per type) joined."""
    out: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key in FORWARD_REQUEST_HEADERS:
            name = key.decode("latin-1")
            if not value.isascii():
                # Registry clients only send ASCII here; other bytes cannot be forwarded faithfully.
                raise RegistryError(400, UNSUPPORTED, f"the {name} header must be ASCII")
            text = value.decode("ascii")
            out[name] = f"{out[name]}, {text}" if name in out else text
    # Bodies are relayed raw, so the upstream must not pick an encoding the client
    # did not ask for; with no Accept-Encoding at all, ask for none.
    out.setdefault("accept-encoding", "identity")
    return out


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the relay needs of a request, read from its ASGI scope once, at the relay's entry."""

    method: str
    api: ApiPath
    host: str | None
    authorization: str | None
    query_string: bytes

    @property
    def head(self) -> bool:
        return self.method == "HEAD"


def read_request(scope: Scope) -> Incoming:
    """The request's headers and raw path checked, its path parsed; raises a ``RegistryError``.

    One pass over the headers checks their sizes and picks the two the relay routes and
    admits by (the first of each, as ``header_value`` would). The raw path is checked before
    it is parsed: no percent-encoding, no dot segments (``check_raw_path``), so what is routed
    is what the client sent.
    """
    host = authorization = None
    total = 0
    for key, value in scope["headers"]:
        total += len(key) + len(value)
        if len(value) > MAX_HEADER_VALUE or total > MAX_HEADERS_TOTAL:
            raise _headers_too_large()
        if key == b"host" and host is None:
            host = value.decode("latin-1")
        elif key == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    check_raw_path(scope.get("raw_path") or scope["path"].encode())
    return Incoming(scope["method"], parse_api_path(scope["path"]), host, authorization, scope.get("query_string", b""))


def admissible(incoming: Incoming) -> tuple[str, str | None]:
    """(query to send upstream, ns) for a request the relay serves; raises for what it does not.

    A read-only gateway: only GET and HEAD, and never an upload (405 UNSUPPORTED, as
    distribution-spec's conformance expects of a registry that refuses pushes). The ping
    (``/v2/``) takes no reference and no query.
    """
    api = incoming.api
    if incoming.method not in ("GET", "HEAD") or api.kind is Kind.UPLOAD:
        raise unsupported_method(incoming.method)
    if api.kind is Kind.PING:
        return "", None
    check_reference(api)
    return upstream_query(api.kind, incoming.query_string)
