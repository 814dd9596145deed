"""The OCI name, tag and digest grammar, and the shape of a ``/v2/`` request path.

Pure: no I/O. The grammar is built from named parts as in the distribution spec
("Pulling manifests": ``<name>`` MUST match the regular expression below) and in
distribution/reference's ``regexp.go``::

    name      = component ("/" component)*
    component = [a-z0-9]+ (separator [a-z0-9]+)*
    separator = "." | "_" | "__" | "-"+
    tag       = [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    digest    = algorithm ":" encoded

A request path is parsed from its *end*: the endpoint is fixed by its last two
components (``manifests/<ref>``, ``blobs/<digest>``, ``tags/list``,
``referrers/<digest>``), so a repository that itself contains a component named
``manifests`` or ``blobs`` still parses unambiguously.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from gateway.http.errors import (
    DIGEST_INVALID,
    MANIFEST_UNKNOWN,
    NAME_INVALID,
    UNSUPPORTED,
    RegistryError,
)

# distribution limits a repository name to 255 characters (reference.NameTotalLengthMax).
NAME_MAX_LENGTH = 255

# The gateway's own token endpoint (passthrough logins), the one path beside /v2 that is
# part of the registry API a client talks to.
TOKEN_PATH = "/auth/token"
# The upstream pull budget as JSON (app.py): upstream state, so behind the same client login as
# the API when that is on (access.py), unlike health and metrics.
BUDGET_STATUS_PATH = "/status/budget"


def is_api_path(path: str) -> bool:
    """``/v2`` and everything under it."""
    return path == "/v2" or path.startswith("/v2/")


def is_registry_path(path: str) -> bool:
    """What a registry client reaches: the API and the token endpoint (access control guards both)."""
    return is_api_path(path) or path == TOKEN_PATH


_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_ALGORITHM = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*"
_ENCODED = r"[a-zA-Z0-9=_-]+"

NAME_RE = re.compile(rf"{_NAME}\Z")
TAG_RE = re.compile(rf"{_TAG}\Z")
DIGEST_RE = re.compile(rf"({_ALGORITHM}):({_ENCODED})\Z")

# The registered algorithms have fixed-length lowercase hex encodings
# (image-spec descriptor.md, "Registered Algorithms"); others only need the grammar.
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+\Z")


class Kind(StrEnum):
    """The endpoint a ``/v2/`` path addresses; also a metrics label."""

    PING = "ping"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"


@dataclass(frozen=True, slots=True)
class ApiPath:
    """A parsed ``/v2/`` path: the repository as the client wrote it, and the tail."""

    kind: Kind
    name: str = ""
    # manifests/<reference>, blobs/<digest>, referrers/<digest>; "" otherwise.
    reference: str = ""

    def tail(self) -> str:
        """The part of the path after the repository name, without a leading slash."""
        if self.kind is Kind.MANIFEST:
            return f"manifests/{self.reference}"
        if self.kind is Kind.BLOB:
            return f"blobs/{self.reference}"
        if self.kind is Kind.REFERRERS:
            return f"referrers/{self.reference}"
        if self.kind is Kind.TAGS:
            return "tags/list"
        return ""


def is_valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX_LENGTH and NAME_RE.match(name) is not None


def is_digest(reference: str) -> bool:
    match = DIGEST_RE.match(reference)
    if match is None:
        return False
    algorithm, encoded = match.groups()
    expected = _DIGEST_HEX_LENGTH.get(algorithm)
    if expected is None:
        return True
    return len(encoded) == expected and _HEX_RE.match(encoded) is not None


def check_name(name: str) -> None:
    if len(name) > NAME_MAX_LENGTH:
        raise RegistryError(
            400,
            NAME_INVALID,
            f"repository name is {len(name)} characters long; the limit is {NAME_MAX_LENGTH}",
        )
    if NAME_RE.match(name) is None:
        raise RegistryError(
            400,
            NAME_INVALID,
            "invalid repository name: lowercase letters, digits and separators (. _ __ -) in components joined by /",
            detail={"name": name[:NAME_MAX_LENGTH]},
        )


def check_digest(digest: str) -> None:
    if not is_digest(digest):
        raise RegistryError(400, DIGEST_INVALID, "invalid digest", detail={"digest": digest[:200]})


def check_manifest_reference(reference: str) -> None:
    """A digest must be well formed (400 DIGEST_INVALID); a tag that the grammar rejects names no manifest.

    A malformed tag on GET or HEAD is answered as a registry does, 404 MANIFEST_UNKNOWN
    (distribution; the OCI conformance suite's "HEAD/GET request to nonexistent manifest
    should return 404" uses ``.INVALID_MANIFEST_NAME``), without asking the upstream.
    """
    if ":" in reference:
        check_digest(reference)
    elif TAG_RE.match(reference) is None:
        raise RegistryError(404, MANIFEST_UNKNOWN, "manifest unknown: not a valid tag", detail={"tag": reference[:200]})


_NOT_AN_ENDPOINT = "no such registry endpoint: this gateway serves manifests, blobs, tags and referrers"


def parse_api_path(path: str) -> ApiPath:
    """Parse the path of a ``/v2/`` request into its endpoint, name and reference.

    ``path`` is the decoded request path. Percent-encoding is refused before this
    is called (see ``check_raw_path``), so the path is exactly what was sent.
    Names are *not* checked here: routing first strips a registry prefix, which
    need not follow the name grammar (``localhost:5000``).
    """
    if path in ("/v2", "/v2/"):
        return ApiPath(Kind.PING)
    if not path.startswith("/v2/"):
        raise RegistryError(404, UNSUPPORTED, _NOT_AN_ENDPOINT)
    parts = path[4:].split("/")
    if parts == ["_catalog"]:
        raise RegistryError(404, UNSUPPORTED, "the catalog is not available through this gateway")

    # Writes: /blobs/uploads/ and /blobs/uploads/<uuid>. Recognised so that they get
    # 405 UNSUPPORTED, like every other write, instead of a confusing NAME_INVALID.
    if len(parts) >= 3 and parts[-2] == "blobs" and parts[-1] == "uploads":
        return ApiPath(Kind.UPLOAD, "/".join(parts[:-2]))
    if len(parts) >= 4 and parts[-3:-1] == ["blobs", "uploads"]:
        return ApiPath(Kind.UPLOAD, "/".join(parts[:-3]))

    if len(parts) < 3 or "" in parts:
        raise RegistryError(404, UNSUPPORTED, _NOT_AN_ENDPOINT)
    name = "/".join(parts[:-2])
    second_last, last = parts[-2], parts[-1]
    if second_last == "manifests":
        return ApiPath(Kind.MANIFEST, name, last)
    if second_last == "blobs":
        return ApiPath(Kind.BLOB, name, last)
    if second_last == "referrers":
        return ApiPath(Kind.REFERRERS, name, last)
    if (second_last, last) == ("tags", "list"):
        return ApiPath(Kind.TAGS, name)
    raise RegistryError(404, UNSUPPORTED, _NOT_AN_ENDPOINT)


def check_reference(api: ApiPath) -> None:
    """Check the tail of a parsed path against the grammar."""
    if api.kind is Kind.MANIFEST:
        check_manifest_reference(api.reference)
    elif api.kind in (Kind.BLOB, Kind.REFERRERS):
        check_digest(api.reference)


# The raw path of a valid request only ever holds these characters: names use
# [a-z0-9._-/], tags add A-Z, digests add : + =. Anything else (a percent-encoded
# "/" or ".", NUL, spaces) is refused before routing, so that an encoded slash can
# never smuggle an extra path component past the router to an upstream.
_RAW_PATH_RE = re.compile(rb"[A-Za-z0-9._/:+=-]*\Z")


def check_raw_path(raw_path: bytes) -> None:
    if _RAW_PATH_RE.match(raw_path) is None:
        raise RegistryError(
            400,
            NAME_INVALID,
            "invalid characters in the request path: percent-encoding is not allowed in repository paths",
        )
    if b"/../" in raw_path or raw_path.endswith(b"/..") or b"/./" in raw_path:
        raise RegistryError(400, NAME_INVALID, "'.' and '..' are not allowed as path components")
