"""A hostile HTTP/1.1 upstream: the ways a registry, its token endpoint or a CDN can misbehave, by name.

The behaviour is chosen by the request path:

- ``/v2/<behaviour>/...``: the repository name is the behaviour (``/v2/blob-reset/blobs/<digest>``);
- ``/token/<kind>``: a token endpoint; the realms of the challenges point here;
- ``/hops/<n>/<tag>``: a redirect chain ``n`` hops long that ends in a small blob.

Everything is written raw on the socket, so lengths, encodings, resets and timings are exactly
what each behaviour says. The server listens on 127.0.0.1 and on 127.0.0.2 (same port): a test
can prove the gateway never connected to the second address. It records every request and counts
connections per local address; anything unexpected in a handler lands in ``errors``.

Every answer carries ``connection: close``, so no case leaves state in the gateway's pool for
the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import socket
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

from tests.support import free_port

SECOND_ADDRESS = "127.0.0.2"
GOOD_TOKEN = "good-token"
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []},
    separators=(",", ":"),
).encode()
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
BLOB = bytes(range(256)) * 16  # 4 KiB
THIRTY_GB = 30 << 30
FILL = b"x" * (64 << 10)

MiB = 1 << 20

Header = tuple[str, str | bytes]


# --- compression bombs ------------------------------------------------------------------
#
# Built without compressing gigabytes: a deflate block sequence for 1 MiB of zeros, ended by a
# full flush, is byte-aligned and independent of what came before, so it can be repeated.
# The trailers are correct (CRC-32 by zlib's crc32_combine, Adler-32 of zeros in closed form),
# so a client that did inflate the whole thing would get a valid stream.

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, mtime 0, unix
_ZLIB_HEADER = b"\x78\xda"
_EMPTY_FINAL_BLOCK = b"\x03\x00"  # BFINAL, fixed Huffman, end of block


@functools.cache
def _zero_segment() -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return comp.compress(bytes(MiB)) + comp.flush(zlib.Z_FULL_FLUSH)


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    index = 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B): zlib's crc32_combine, in Python."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def crc32_of_zeros(length: int) -> int:
    count, rest = divmod(length, MiB)
    result = zlib.crc32(bytes(rest))
    block, block_length = zlib.crc32(bytes(MiB)), MiB
    while count:
        if count & 1:
            result = crc32_combine(result, block, block_length)
        block = crc32_combine(block, block, block_length)
        block_length *= 2
        count >>= 1
    return result


@functools.cache
def gzip_bomb(expanded: int) -> bytes:
    """A gzip member of about expanded/1000 bytes that inflates to ``expanded`` zero bytes."""
    assert expanded % MiB == 0
    trailer = struct.pack("<II", crc32_of_zeros(expanded), expanded & 0xFFFFFFFF)
    return _GZIP_HEADER + _zero_segment() * (expanded // MiB) + _EMPTY_FINAL_BLOCK + trailer


@functools.cache
def deflate_bomb(expanded: int) -> bytes:
    """``Content-Encoding: deflate`` (a zlib stream) inflating to ``expanded`` zero bytes."""
    assert expanded % MiB == 0
    adler = ((expanded % 65521) << 16) | 1  # Adler-32 of zeros: a stays 1, b counts the bytes
    return _ZLIB_HEADER + _zero_segment() * (expanded // MiB) + _EMPTY_FINAL_BLOCK + struct.pack(">I", adler)


@functools.cache
def nested_gzip_bomb(expanded: int) -> bytes:
    """``Content-Encoding: gzip, gzip``: about 10 KB on the wire for 4 GiB."""
    return gzip.compress(gzip_bomb(expanded), 9, mtime=0)


# --- one exchange --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it arrived."""

    local: str  # the address the connection was made to
    method: str
    target: str
    headers: Mapping[str, str]


class PeerGone(ConnectionError):
    """The gateway closed the connection while a handler was still writing."""


def response_head(status: int, headers: Iterable[Header], reason: str | None = None) -> bytes:
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Hostile"
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    for name, value in [*headers, ("connection", "close")]:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("latin-1")))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Exchange:
    """One request on one connection, and the primitives handlers answer with."""

    def __init__(
        self,
        server: HostileServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seen: Seen,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.method = seen.method
        self.path, _, self.query = seen.target.partition("?")
        self.headers = seen.headers

    @property
    def head_only(self) -> bool:
        return self.method == "HEAD"

    async def send(self, data: bytes) -> None:
        if self.reader.at_eof() or self.writer.is_closing():
            raise PeerGone
        self.writer.write(data)
        await self.writer.drain()

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[Header] = (),
        *,
        length: int | None = None,
    ) -> None:
        """A whole answer; ``length`` overrides the Content-Length that ``body`` would give."""
        declared = len(body) if length is None else length
        await self.send(response_head(status, [*headers, ("content-length", str(declared))]))
        if not self.head_only:
            await self.send(body)

    async def json(self, status: int, doc: object, headers: Iterable[Header] = ()) -> None:
        await self.respond(status, json.dumps(doc).encode(), [("content-type", "application/json"), *headers])

    async def registry_error(self, status: int, code: str, message: str, headers: Iterable[Header] = ()) -> None:
        await self.json(status, {"errors": [{"code": code, "message": message, "detail": None}]}, headers)

    async def fill(self, total: int, *, chunked: bool = False) -> None:
        """``total`` filler bytes, in 64 KiB writes, until done or the peer leaves."""
        sent = 0
        while sent < total:
            piece = FILL[: total - sent]
            await self.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked:
            await self.send(b"0\r\n\r\n")

    async def trickle(self, data: bytes, interval: float) -> None:
        """``data`` one byte at a time, ``interval`` seconds apart (slow-loris)."""
        for index in range(len(data)):
            if index:
                await asyncio.sleep(interval)
            await self.send(data[index : index + 1])

    async def stall(self, limit: float = 120.0) -> None:
        """Send nothing more; return when the peer closes (or after ``limit`` seconds)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while await self.reader.read(65536):
                    pass

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Exchange], Awaitable[None]]


# --- the catalogue -----------------------------------------------------------------------
#
# Templates take {origin} (http://127.0.0.1:<port>), {port}, {second} (127.0.0.2),
# {hostname} (this machine's name, which resolves to a loopback address) and {path}.
# Realms and targets the gateway must refuse carry "refused" in their path: the tests check
# that no such request ever arrives.

CHALLENGES: dict[str, str] = {
    # Malformed challenges: nothing usable, the upstream's 401 is passed on.
    "ch-garbage": '=,=,"" ;;; !!! ==== Bearer',
    "ch-unterminated": 'Bearer service="hostile",realm="{origin}/token/refused-unterminated',
    "ch-no-realm": 'Bearer service="hostile",scope="repository:ch-no-realm:pull"',
    "ch-empty-realm": 'Bearer realm="",service="hostile"',
    "ch-token68": "Bearer YWxhZGRpbjpvcGVuc2VzYW1l==",
    "ch-basic": 'Basic realm="hostile"',
    # Realms the gateway must refuse, whatever the route allows.
    "ch-obs-text-realm": 'Bearer realm="\xe9\xff\xfe",service="hostile"',
    "ch-file-realm": 'Bearer realm="file:///etc/passwd",service="hostile"',
    "ch-ftp-realm": 'Bearer realm="ftp://127.0.0.1:{port}/token/refused-ftp",service="hostile"',
    "ch-relative-realm": 'Bearer realm="/token/refused-relative",service="hostile"',
    # Realms on addresses a route without allow_private_addresses must refuse.
    "ch-second-address-realm": 'Bearer realm="http://{second}:{port}/token/refused-second",service="hostile"',
    "ch-metadata-realm": 'Bearer realm="http://169.254.169.254/latest/api/token",service="hostile"',
    "ch-localhost-realm": 'Bearer realm="http://localhost:{port}/token/refused-localhost",service="hostile"',
    "ch-userinfo-realm": 'Bearer realm="http://127.0.0.1:{port}@{second}:{port}/token/refused-userinfo"',
    "ch-mapped-realm": 'Bearer realm="http://[::ffff:{second}]:{port}/token/refused-mapped"',
    "ch-decimal-realm": 'Bearer realm="http://2130706434:{port}/token/refused-decimal"',
    "ch-hostname-realm": 'Bearer realm="http://{hostname}:{port}/token/refused-hostname"',
    # The same address, on a route that allows private addresses: fetched.
    "ch-second-address-allowed": 'Bearer realm="http://{second}:{port}/token/ok",service="hostile"',
    # URLs that do not parse.
    "ch-bad-ipv6-realm": 'Bearer realm="http://[::1/token/refused-ipv6",service="hostile"',
    "ch-bad-idna-realm": 'Bearer realm="http://xn--zz/token",service="hostile"',
}

# Repositories named tok-<kind> challenge with a realm at /token/<kind>.
TOKEN_KINDS = (
    "ok",
    "huge-cl",
    "huge-close",
    "huge-chunked",
    "bad-json",
    "no-token",
    "number-token",
    "array",
    "trickle",
    "slow-headers",
    "stall",
    "status-500",
    "status-401",
    "status-429",
    "gzip-bomb",
    "redirect",
    "reset",
    "empty-close",
)

REDIRECTS: dict[str, str | None] = {
    "redir-self": "{path}",
    "redir-ping": "/v2/redir-pong/blobs/sha256:" + "0" * 64,
    "redir-pong": "/v2/redir-ping/blobs/sha256:" + "0" * 64,
    "redir-chain-5": "/hops/4/chain",
    "redir-chain-6": "/hops/5/chain",
    "redir-no-location": None,
    "redir-bad-port": "http://127.0.0.1:99999/refused-port",
    "redir-file": "file:///etc/passwd",
    "redir-metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "redir-second-address": "http://{second}:{port}/hops/0/refused-second",
    "redir-scheme-relative": "//{second}:{port}/hops/0/refused-scheme-relative",
    "redir-userinfo": "http://127.0.0.1:{port}@{second}:{port}/hops/0/refused-userinfo",
    "redir-mapped": "http://[::ffff:{second}]:{port}/hops/0/refused-mapped",
    "redir-decimal": "http://2130706434:{port}/hops/0/refused-decimal",
    "redir-hex": "http://0x7f000002:{port}/hops/0/refused-hex",
    "redir-hostname": "http://{hostname}:{port}/hops/0/refused-hostname",
    "redir-bad-ipv6": "http://[::1/refused-ipv6",
    "redir-bad-idna": "http://xn--zz/refused-idna",
}

_REPOSITORIES: dict[str, Handler] = {}
_TOKENS: dict[str, Handler] = {}


def repository(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _REPOSITORIES[name] = handler
        return handler

    return register


def token_endpoint(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _TOKENS[name] = handler
        return handler

    return register


def behaviours() -> set[str]:
    """Every repository name the server knows."""
    return {*CHALLENGES, *(f"tok-{k}" for k in TOKEN_KINDS), *REDIRECTS, *_REPOSITORIES}


def _manifest_headers() -> list[Header]:
    return [("content-type", MANIFEST_TYPE)]


# Manifests.


@repository("manifest-ok")
async def _manifest_ok(ex: Exchange) -> None:
    await ex.respond(200, MANIFEST, _manifest_headers())


@repository("manifest-5mib")
async def _manifest_5mib(ex: Exchange) -> None:
    await ex.send(response_head(200, [*_manifest_headers(), ("content-length", str(5 * MiB))]))
    await ex.fill(5 * MiB)


@repository("manifest-5mib-chunked")
async def _manifest_5mib_chunked(ex: Exchange) -> None:
    await ex.send(response_head(200, [*_manifest_headers(), ("transfer-encoding", "chunked")]))
    await ex.fill(5 * MiB, chunked=True)


@repository("manifest-trickle")
async def _manifest_trickle(ex: Exchange) -> None:
    await ex.send(response_head(200, [*_manifest_headers(), ("content-length", str(len(MANIFEST)))]))
    await ex.trickle(MANIFEST, 1.0)


@repository("manifest-short-close")
async def _manifest_short_close(ex: Exchange) -> None:
    await ex.send(response_head(200, [*_manifest_headers(), ("content-length", "1000")]))
    await ex.send(MANIFEST[:50])


@repository("manifest-short-stall")
async def _manifest_short_stall(ex: Exchange) -> None:
    await ex.send(response_head(200, [*_manifest_headers(), ("content-length", "1000")]))
    await ex.send(MANIFEST[:50])
    await ex.stall()


@repository("manifest-long-body")
async def _manifest_long_body(ex: Exchange) -> None:
    # Content-Length says 20; the whole manifest follows anyway.
    await ex.send(response_head(200, [*_manifest_headers(), ("content-length", "20")]) + MANIFEST)


@repository("manifest-headers-trickle")
async def _manifest_headers_trickle(ex: Exchange) -> None:
    await ex.trickle(response_head(200, [("content-length", str(len(MANIFEST)))]) + MANIFEST, 1.0)


@repository("manifest-two-phase")
async def _manifest_two_phase(ex: Exchange) -> None:
    # Headers complete just inside the deadline, then the body trickles.
    head = response_head(200, [*_manifest_headers(), ("content-length", str(len(MANIFEST)))])
    await ex.trickle(head[:6], 0.5)
    await ex.send(head[6:])
    await ex.trickle(MANIFEST, 0.5)


@repository("manifest-gzip-bomb")
async def _manifest_gzip_bomb(ex: Exchange) -> None:
    await ex.respond(200, gzip_bomb(1 << 30), [*_manifest_headers(), ("content-encoding", "gzip")])


@repository("headers-huge")
async def _headers_huge(ex: Exchange) -> None:
    await ex.respond(200, MANIFEST, [*_manifest_headers(), ("x-padding", "a" * MiB)])


@repository("status-garbage")
async def _status_garbage(ex: Exchange) -> None:
    await ex.send(b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\n{}")


@repository("not-http")
async def _not_http(ex: Exchange) -> None:
    await ex.send(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")


@repository("empty-close")
async def _empty_close(ex: Exchange) -> None:
    return


@repository("reset-before-answer")
async def _reset_before_answer(ex: Exchange) -> None:
    ex.reset()


# Tag lists.


@repository("tags-trickle")
async def _tags_trickle(ex: Exchange) -> None:
    body = json.dumps({"name": "tags-trickle", "tags": [f"v{i}" for i in range(20)]}).encode()
    await ex.send(response_head(200, [("content-type", "application/json"), ("content-length", str(len(body)))]))
    await ex.trickle(body, 0.5)


@repository("tags-bad-link")
async def _tags_bad_link(ex: Exchange) -> None:
    body = json.dumps({"name": "tags-bad-link", "tags": ["v1"]}).encode()
    await ex.respond(
        200, body, [("content-type", "application/json"), ("link", '<http://[::1/v2/x/tags/list?n=1>; rel="next"')]
    )


# Error answers.


@repository("err-html-404")
async def _err_html_404(ex: Exchange) -> None:
    await ex.respond(404, b"<html><body><h1>404 Not Found</h1></body></html>", [("content-type", "text/html")])


@repository("err-bad-json-500")
async def _err_bad_json_500(ex: Exchange) -> None:
    await ex.respond(500, b'{"errors": [{"code": "UNKNOWN", "message": ', [("content-type", "application/json")])


@repository("err-registry-404")
async def _err_registry_404(ex: Exchange) -> None:
    await ex.registry_error(404, "MANIFEST_UNKNOWN", "hostile: no such manifest")


@repository("err-gzip-bomb-404")
async def _err_gzip_bomb_404(ex: Exchange) -> None:
    await ex.respond(404, gzip_bomb(1 << 30), [("content-type", "application/json"), ("content-encoding", "gzip")])


@repository("err-gzip-nested-500")
async def _err_gzip_nested_500(ex: Exchange) -> None:
    headers = [("content-type", "application/json"), ("content-encoding", "gzip, gzip")]
    await ex.respond(500, nested_gzip_bomb(4 << 30), headers)


@repository("err-deflate-bomb-404")
async def _err_deflate_bomb_404(ex: Exchange) -> None:
    await ex.respond(
        404, deflate_bomb(1 << 30), [("content-type", "application/json"), ("content-encoding", "deflate")]
    )


@repository("err-huge-404")
async def _err_huge_404(ex: Exchange) -> None:
    await ex.send(response_head(404, [("content-type", "text/plain"), ("content-length", str(100 * MiB))]))
    await ex.fill(100 * MiB)


@repository("err-huge-close-500")
async def _err_huge_close_500(ex: Exchange) -> None:
    await ex.send(response_head(500, [("content-type", "text/plain")]))  # ends when the connection does
    await ex.fill(100 * MiB)


@repository("err-stall-404")
async def _err_stall_404(ex: Exchange) -> None:
    await ex.send(response_head(404, [("content-type", "application/json"), ("content-length", "1000")]))
    await ex.send(b'{"errors": [')
    await ex.stall()


@repository("err-trickle-404")
async def _err_trickle_404(ex: Exchange) -> None:
    await ex.send(response_head(404, [("content-type", "application/json"), ("content-length", "1000")]))
    await ex.trickle(b'{"errors": [' + b" " * 988, 0.5)


# Blobs.


@repository("blob-ok")
async def _blob_ok(ex: Exchange) -> None:
    await ex.respond(200, BLOB, [("content-type", "application/octet-stream")])


@repository("blob-30g-stall")
async def _blob_30g_stall(ex: Exchange) -> None:
    await ex.send(
        response_head(200, [("content-type", "application/octet-stream"), ("content-length", str(THIRTY_GB))])
    )
    await ex.send(BLOB[:1024])
    await ex.stall()


@repository("blob-30g-close")
async def _blob_30g_close(ex: Exchange) -> None:
    await ex.send(
        response_head(200, [("content-type", "application/octet-stream"), ("content-length", str(THIRTY_GB))])
    )
    await ex.send(BLOB[:1024])


@repository("blob-reset")
async def _blob_reset(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-type", "application/octet-stream"), ("content-length", str(8 * MiB))]))
    await ex.fill(256 << 10)
    await asyncio.sleep(0.1)
    ex.reset()


@repository("blob-chunked-close")
async def _blob_chunked_close(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked")]))
    await ex.send(b"400\r\n" + BLOB[:1024] + b"\r\n")  # and never the last chunk


@repository("blob-bad-length")
async def _blob_bad_length(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-length", "banana")]) + BLOB)


@repository("blob-two-lengths")
async def _blob_two_lengths(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-length", "10"), ("content-length", "20")]) + BLOB[:20])


# A registry whose token service moves: the old realm is gone, the challenge names the new one.


@repository("realm-move")
async def _realm_move(ex: Exchange) -> None:
    if ex.headers.get("authorization") == f"Bearer {GOOD_TOKEN}":
        await ex.respond(200, MANIFEST, _manifest_headers())
        return
    kind = "move-new" if ex.server.realm_moved else "move-old"
    challenge = f'Bearer realm="{ex.server.origin}/token/{kind}",service="hostile"'
    await ex.registry_error(401, "UNAUTHORIZED", "token required", [("www-authenticate", challenge)])


# Token endpoints.


@token_endpoint("ok")
async def _token_ok(ex: Exchange) -> None:
    await ex.json(200, {"token": GOOD_TOKEN, "expires_in": 300})


@token_endpoint("move-old")
async def _token_move_old(ex: Exchange) -> None:
    if ex.server.realm_moved:
        await ex.respond(404, b"gone", [("content-type", "text/plain")])
    else:
        await ex.json(200, {"token": GOOD_TOKEN, "expires_in": 300})


@token_endpoint("move-new")
async def _token_move_new(ex: Exchange) -> None:
    await ex.json(200, {"token": GOOD_TOKEN, "expires_in": 300})


@token_endpoint("huge-cl")
async def _token_huge_cl(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-type", "application/json"), ("content-length", str(50 * MiB))]))
    await ex.fill(50 * MiB)


@token_endpoint("huge-close")
async def _token_huge_close(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-type", "application/json")]))
    await ex.fill(50 * MiB)


@token_endpoint("huge-chunked")
async def _token_huge_chunked(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-type", "application/json"), ("transfer-encoding", "chunked")]))
    await ex.fill(50 * MiB, chunked=True)


@token_endpoint("bad-json")
async def _token_bad_json(ex: Exchange) -> None:
    await ex.respond(200, b'{"token": "good-token", "expires_in": ', [("content-type", "application/json")])


@token_endpoint("no-token")
async def _token_no_token(ex: Exchange) -> None:
    await ex.json(200, {"expires_in": 300, "issued_at": "2024-01-01T00:00:00Z"})


@token_endpoint("number-token")
async def _token_number(ex: Exchange) -> None:
    await ex.json(200, {"token": 12345, "access_token": ["x"]})


@token_endpoint("array")
async def _token_array(ex: Exchange) -> None:
    await ex.json(200, [{"token": GOOD_TOKEN}])


@token_endpoint("trickle")
async def _token_trickle(ex: Exchange) -> None:
    body = json.dumps({"token": GOOD_TOKEN}).encode()
    await ex.send(response_head(200, [("content-type", "application/json"), ("content-length", str(len(body)))]))
    await ex.trickle(body, 1.0)


@token_endpoint("slow-headers")
async def _token_slow_headers(ex: Exchange) -> None:
    body = json.dumps({"token": GOOD_TOKEN}).encode()
    await ex.trickle(response_head(200, [("content-length", str(len(body)))]) + body, 1.0)


@token_endpoint("stall")
async def _token_stall(ex: Exchange) -> None:
    await ex.send(response_head(200, [("content-type", "application/json"), ("content-length", "100")]))
    await ex.stall()


@token_endpoint("status-500")
async def _token_500(ex: Exchange) -> None:
    await ex.respond(500, b"<html>Internal Server Error</html>", [("content-type", "text/html")])


@token_endpoint("status-401")
async def _token_401(ex: Exchange) -> None:
    await ex.json(401, {"details": "anonymous pulls are not allowed"})


@token_endpoint("status-429")
async def _token_429(ex: Exchange) -> None:
    await ex.json(429, {"details": "slow down"}, [("retry-after", "120")])


@token_endpoint("gzip-bomb")
async def _token_gzip_bomb(ex: Exchange) -> None:
    await ex.respond(200, gzip_bomb(1 << 30), [("content-type", "application/json"), ("content-encoding", "gzip")])


@token_endpoint("redirect")
async def _token_redirect(ex: Exchange) -> None:
    await ex.respond(307, headers=[("location", "http://169.254.169.254/latest/api/token")])


@token_endpoint("reset")
async def _token_reset(ex: Exchange) -> None:
    ex.reset()


@token_endpoint("empty-close")
async def _token_empty_close(ex: Exchange) -> None:
    return


# --- the server ------------------------------------------------------------------------------


class HostileServer:
    """The catalogue above on 127.0.0.1:<port> and 127.0.0.2:<port>, in a thread of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.hostname = socket.gethostname()
        self.seen: list[Seen] = []
        self.connections: Counter[str] = Counter()
        self.open_connections = 0
        self.errors: list[str] = []  # unexpected exceptions in handlers: bugs in this server
        self.realm_moved = False
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-upstream", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    def template(self, text: str, path: str = "") -> str:
        return text.format(origin=self.origin, port=self.port, second=SECOND_ADDRESS, hostname=self.hostname, path=path)

    def requests_to(self, prefix: str) -> list[Seen]:
        return [s for s in self.seen if s.target.startswith(prefix)]

    # The event loop thread.

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, ["127.0.0.1", SECOND_ADDRESS], self.port)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        local = str(writer.get_extra_info("sockname")[0])
        self.connections[local] += 1
        self.open_connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen = self._parse(local, head)
            self.seen.append(seen)
            await self._dispatch(Exchange(self, reader, writer, seen))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass  # the gateway went away: that is what most cases are about
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in this server, reported by the tests
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    def _parse(local: str, head: bytes) -> Seen:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return Seen(local=local, method=method, target=target, headers=headers)

    async def _dispatch(self, ex: Exchange) -> None:
        path = ex.path
        if path == "/v2/":
            await ex.json(200, {})
        elif path.startswith("/token/"):
            handler = _TOKENS.get(path.removeprefix("/token/"))
            if handler is None:
                await ex.respond(404, b"no such token endpoint")
            else:
                await handler(ex)
        elif path.startswith("/hops/"):
            await self._hop(ex)
        elif path.startswith("/v2/"):
            await self._repository(ex, path[4:].split("/", 1)[0])
        else:
            await ex.respond(404, b"not found")

    async def _repository(self, ex: Exchange, name: str) -> None:
        if name in CHALLENGES:
            await self._challenge(ex, self.template(CHALLENGES[name]))
        elif name.startswith("tok-"):
            await self._challenge(ex, f'Bearer realm="{self.origin}/token/{name[4:]}",service="hostile"')
        elif name in REDIRECTS:
            location = REDIRECTS[name]
            headers = [] if location is None else [("location", self.template(location, ex.path))]
            await ex.respond(307, headers=headers)
        elif name in _REPOSITORIES:
            await _REPOSITORIES[name](ex)
        else:
            await ex.registry_error(404, "NAME_UNKNOWN", f"no behaviour named {name!r}")

    async def _challenge(self, ex: Exchange, challenge: str) -> None:
        if ex.headers.get("authorization") == f"Bearer {GOOD_TOKEN}":
            await ex.respond(200, MANIFEST, _manifest_headers())
        else:
            await ex.registry_error(
                401, "UNAUTHORIZED", "hostile upstream wants a token", [("www-authenticate", challenge)]
            )

    async def _hop(self, ex: Exchange) -> None:
        _, _, count, tag = ex.path.split("/", 3)
        remaining = int(count)
        if remaining > 0:
            await ex.respond(307, headers=[("location", f"/hops/{remaining - 1}/{tag}")])
        else:
            await ex.respond(200, BLOB, [("content-type", "application/octet-stream")])

    # Lifecycle.

    def __enter__(self) -> HostileServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the hostile upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
