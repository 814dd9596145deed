"""The lean HTTP/1.1 transport against a scripted server: framing, reuse, errors, back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore
import httpx
import pytest

from gateway.net import transport as transport_module
from gateway.net.connections import HIGH_WATER
from gateway.net.netguard import AddressGuard, GuardedBackend
from gateway.net.transport import LeanTransport
from gateway.settings import PoolLimits

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """Each connection is served by the next handler in the list (the last one repeats)."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = self.handlers[min(self.connections, len(self.handlers) - 1)]
        self.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


def pool_limits(max_connections: int = 100, max_keepalive_connections: int = 10) -> PoolLimits:
    return PoolLimits(max_connections, max_keepalive_connections, keepalive_expiry=5.0)


def client(**limits: int) -> httpx.AsyncClient:
    transport = LeanTransport(limits=pool_limits(**limits))
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(2.0))


async def collect(resp: httpx.Response) -> bytes:
    return b"".join([part async for part in resp.aiter_raw()])


def answering(*responses: bytes) -> Callable[[Server], Handler]:
    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for response in responses:
                await server.read_request(reader)
                writer.write(response)
                await writer.drain()
            await reader.read()  # keep the connection until the client closes it

        return handler

    return make


async def test_content_length_body_and_keep_alive_reuse():
    server = Server()
    server.handlers = [
        answering(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye",
        )(server)
    ]
    async with server as url, client() as c:
        async with c.stream("GET", url + "/a") as r:
            assert r.status_code == 200
            assert r.headers["x-a"] == "1"
            assert await collect(r) == b"hello"
        async with c.stream("GET", url + "/b") as r:
            assert await collect(r) == b"bye"
    assert server.connections == 1  # the second request reused the first connection
    assert server.requests[0].startswith(b"GET /a HTTP/1.1\r\n")
    assert b"host: 127.0.0.1:" in server.requests[0].lower()


async def test_chunked_body_with_extensions_and_trailers():
    body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"
    server = Server()
    server.handlers = [
        answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, b"HTTP/1.1 204 No Content\r\n\r\n")(
            server
        )
    ]
    async with server as url, client() as c:
        async with c.stream("GET", url) as r:
            assert await collect(r) == b"Wikipedia in\r\n\r\nchunks."
        assert (await c.get(url)).status_code == 204
    assert server.connections == 1


async def test_body_until_close():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()

    async with Server(handler) as url, client() as c, c.stream("GET", url) as r:
        assert await collect(r) == b"all of it"


async def test_head_has_no_body_and_keeps_the_connection():
    server = Server()
    server.handlers = [
        answering(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )(server)
    ]
    async with server as url, client() as c:
        r = await c.head(url)
        assert r.headers["content-length"] == "1000"
        assert r.content == b""
        assert (await c.get(url)).content == b"ok"
    assert server.connections == 1


async def test_interim_100_continue_is_skipped():
    server = Server()
    server.handlers = [
        answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(server)
    ]
    async with server as url, client() as c:
        assert (await c.get(url)).content == b"ok"


async def test_short_body_is_an_error_not_a_clean_end():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async with Server(handler) as url, client() as c, c.stream("GET", url) as r:
        with pytest.raises(httpx.RemoteProtocolError):
            await collect(r)


@pytest.mark.parametrize(
    "response",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n",
    ],
    ids=["not-http", "status", "no-colon", "folded", "two-lengths", "negative-length", "gzip-te", "huge"],
)
async def test_malformed_heads_are_protocol_errors(response):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(0.2)

    async with Server(handler) as url, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(url)


@pytest.mark.parametrize("chunked", [b"zz\r\n", b"5\r\nabcdeXX", b"A" * 5000], ids=["size", "crlf", "long-line"])
async def test_malformed_chunks_are_protocol_errors(chunked):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        await writer.drain()
        await asyncio.sleep(0.2)

    async with Server(handler) as url, client() as c, c.stream("GET", url) as r:
        with pytest.raises(httpx.RemoteProtocolError):
            await collect(r)


async def test_a_stale_kept_alive_connection_is_retried_once():
    server = Server()

    async def answer_then_close(reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # The server forgets the connection right after answering (keep-alive race).

    server.handlers = [answer_then_close]
    async with server as url, client() as c:
        assert (await c.get(url)).content == b"ok"
        await asyncio.sleep(0.1)
        assert (await c.get(url)).content == b"ok"
    assert server.connections == 2


async def test_silence_is_a_read_timeout_and_refusal_a_connect_error():
    async def silent(reader, writer):
        await reader.read()

    async with Server(silent) as url:
        transport = LeanTransport(limits=pool_limits())
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.3)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(url)
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(url)  # the server is gone


async def test_the_address_guard():
    transport = LeanTransport(limits=pool_limits(), guard=AddressGuard([("127.0.0.1", 1)], allow_private=False))
    async with httpx.AsyncClient(transport=transport) as c:
        with pytest.raises(httpx.ConnectError, match="address policy"):
            await c.get("http://localhost:8/")


async def test_only_get_head_and_a_post_with_its_body_held_whole():
    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    async with client() as c:
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.put("http://127.0.0.1:1/", content=b"x")
        with pytest.raises(httpx.UnsupportedProtocol, match="streamed request body"):
            await c.post("http://127.0.0.1:1/", content=chunks())


def body_reading(server: Server, bodies: list[bytes]) -> Handler:
    """Answers each request on the connection, after reading its body (by its Content-Length)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await server.read_request(reader)
            except asyncio.IncompleteReadError:
                return
            lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            size = int(lengths[0].partition(b":")[2]) if lengths else 0
            bodies.append(await reader.readexactly(size))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return handler


async def test_post_sends_its_body_after_the_head_with_its_length_on_a_new_connection():
    server = Server()
    bodies: list[bytes] = []
    server.handlers = [body_reading(server, bodies)]
    form = b"grant_type=password&username=bob&password=pw"
    async with server as url, client() as c:
        assert (await c.get(url + "/v2/")).content == b"ok"
        resp = await c.post(url + "/token", content=form, headers={"content-type": "application/x-www-form-urlencoded"})
        assert resp.content == b"ok"
        assert (await c.post(url + "/token", content=b"")).content == b"ok"
        assert (await c.get(url + "/v2/")).content == b"ok"
    assert bodies == [b"", form, b"", b""]
    post = server.requests[1]
    assert post.startswith(b"POST /token HTTP/1.1\r\n")
    assert post.lower().count(b"content-length:") == 1
    assert b"Content-Length: " + str(len(form)).encode() + b"\r\n" in post
    assert b"Content-Length: 0\r\n" in server.requests[2]  # RFC 9110 8.6: a POST states even an empty length
    assert b"content-length" not in server.requests[0].lower()  # a GET is sent as before
    # Each POST opened its own connection (never a kept-alive one, which it could not retry on);
    # the connections were kept alive after it, and the last GET reused one.
    assert server.connections == 3


async def test_a_post_whose_connection_closes_unanswered_is_not_retried():
    server = Server()

    async def close_unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    server.handlers = [close_unanswered]
    async with server as url, client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="without answering"):
            await c.post(url, content=b"grant_type=refresh_token&refresh_token=r")
    assert server.connections == 1  # RFC 9112 9.3.1: it may have been applied; the caller decides


async def test_pool_limit_waits_then_times_out():
    release = asyncio.Event()

    async def slow(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with Server(slow) as url:
        transport = LeanTransport(limits=pool_limits(max_connections=1))
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=0.2)) as c:
            first = asyncio.ensure_future(c.get(url))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.PoolTimeout):
                await c.get(url)
            release.set()
            assert (await first).status_code == 200


async def test_back_pressure_pauses_reading_from_the_upstream():
    size = 64 << 20
    sent = 0

    async def big(reader, writer):
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * (1 << 20)
        while sent < size:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    async with Server(big) as url, client() as c, c.stream("GET", url) as r:
        stream = r.aiter_raw()
        await stream.__anext__()
        await asyncio.sleep(0.5)  # a client that does not read
        # The upstream stalls once the gateway holds HIGH_WATER bytes plus socket buffers.
        assert sent < HIGH_WATER + (24 << 20)
        total = 0
        async for part in stream:
            total += len(part)
    assert sent == size


# --- RFC 8305: the guard's addresses raced (real sockets on ::1 and 127.0.0.1 only) --------------


class FixedAddresses(AddressGuard):
    """A name that "resolves" to these addresses, in this order: nothing is looked up."""

    def __init__(self, *addresses: str) -> None:
        super().__init__((), allow_private=True)
        self.fixed = list(addresses)

    async def addresses(self, host: str, port: int) -> list[str]:
        return list(self.fixed)


def bind_ipv6_loopback(port: int) -> socket.socket | None:
    """A socket bound to [::1]:port; None when the port is taken there. Fails the test without IPv6."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.bind(("::1", port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        pytest.fail(f"this machine has no IPv6 on loopback (ip -6 addr show lo): binding [::1]: {exc}")
    return sock


def ok_server() -> Server:
    server = Server()
    server.handlers = [answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(server)]
    return server


@contextlib.asynccontextmanager
async def v6_then_v4(v6: str) -> AsyncIterator[tuple[int, Server]]:
    """An HTTP server on 127.0.0.1:P, and on [::1]:P one that ``stalls`` (a full accept queue:
    the SYN goes unanswered, as from a broken AAAA) or ``refuses`` (nothing listening)."""
    server = ok_server()
    for _ in range(20):
        url = await server.__aenter__()
        port = int(url.rsplit(":", 1)[1])
        holder = bind_ipv6_loopback(port)
        if holder is not None:
            break
        await server.__aexit__()
    else:
        pytest.fail("no port free on both 127.0.0.1 and ::1")
    fillers: list[socket.socket] = []
    try:
        if v6 == "stalls":
            holder.listen(0)
            for _ in range(4):
                filler = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                filler.setblocking(False)
                filler.connect_ex(("::1", port))
                fillers.append(filler)
            await asyncio.sleep(0.2)
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            probe.settimeout(0.5)
            try:
                probe.connect(("::1", port))
                pytest.skip("this kernel completes connections beyond the accept queue")
            except TimeoutError:
                pass
            finally:
                probe.close()
        else:
            holder.close()  # the port is free on ::1 again: connecting is refused
        yield port, server
    finally:
        for filler in fillers:
            filler.close()
        holder.close()
        await server.__aexit__()


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, socket.socket]]:
    """Every TCP attempt the lean transport makes: its address and its socket."""
    made: list[tuple[str, socket.socket]] = []

    async def recording(address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # as netguard.tcp_socket
        made.append((address, sock))
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    monkeypatch.setattr(transport_module, "tcp_socket", recording)
    return made


@pytest.mark.parametrize("v6", ["stalls", "refuses"])
async def test_an_ipv6_address_that_stalls_or_refuses_is_overtaken_by_ipv4(v6, connects):
    # A connect timeout of a minute: trying the addresses one after another would fail this test
    # with a ConnectTimeout; racing them (250 ms apart) answers.
    async with v6_then_v4(v6) as (port, server):
        transport = LeanTransport(limits=pool_limits(), guard=FixedAddresses("::1", "127.0.0.1"))
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, connect=60.0)) as c:
            resp = await c.get(f"http://dual.test:{port}/")
            assert (resp.status_code, resp.content) == (200, b"ok")
            assert [address for address, _ in connects] == ["::1", "127.0.0.1"]  # IPv6 first, as resolved
            v6_socket = connects[0][1]
            assert v6_socket.fileno() == -1  # the loser is closed by the time the request is sent
            assert server.connections == 1


async def test_the_httpx_transport_races_too():
    async with v6_then_v4("stalls") as (port, server):
        pool = httpcore.AsyncConnectionPool(network_backend=GuardedBackend(FixedAddresses("::1", "127.0.0.1")))
        async with pool:
            resp = await pool.request("GET", f"http://dual.test:{port}/", extensions={"timeout": {"connect": 60.0}})
        assert (resp.status, resp.content) == (200, b"ok")
        assert server.connections == 1


async def test_connections_keep_tcp_nodelay():
    # The connected socket is handed to create_connection: Nagle must still be off on it.
    async with ok_server() as url:
        port = int(url.rsplit(":", 1)[1])
        transport = LeanTransport(limits=pool_limits(), guard=FixedAddresses("127.0.0.1"))
        async with httpx.AsyncClient(transport=transport) as c:
            assert (await c.get(f"http://one.test:{port}/")).content == b"ok"
            conn = transport._pool.take_idle(("http", "one.test", port))
            assert conn is not None
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            conn.close()
