"""The soak's stage: the test bed, the fronts before it, the expiring CDN edge and the gateway."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Route

from tests.e2e.test_cdn_expiry import ExpiringEdge
from tests.support import Gateway, run_gateway
from tests.testbed._util import LOOPBACK, ThreadedUvicorn
from tests.testbed.bed import Testbed
from tests.testbed.faults import FaultFront
from tests.testbed.tokens import TokenServer

#: the two routes and what each pulls
MULTI = "ghcr.io"  # upstreams A and B, mirror M
CDN = "docker.io"  # one upstream (H), blobs by redirect to CDN URLs that expire
IMAGES = {MULTI: ("app",), CDN: ("bigimage", "alpine")}
BREAKER_COOLDOWN = 3.0


class QuietEdge(ExpiringEdge):
    """The expiring edge, which here also meets resets from the CDN front and gateways that hang up:
    a connection that breaks just ends (the edge's own thread would print a traceback)."""

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            super()._serve(conn)


@dataclass
class Stage:
    workdir: Path
    bed: Testbed
    #: "A", "B" (the route's upstreams), "M" (its mirror), "H" (before hub), "C" (before the CDN,
    #: paced, behind the expiring edge): name -> front
    fronts: dict[str, FaultFront]
    edge: ExpiringEdge
    gateway: Gateway
    ttl: float
    #: GATEWAY_BREAKER_COOLDOWN: how long an upstream that failed in a row is skipped
    breaker_cooldown: float
    #: (start, end) wall-clock windows in which the token server was down
    token_outages: list[tuple[float, float]] = field(default_factory=list)

    def route_fronts(self, route: str) -> list[str]:
        """The fronts a route's blob may come from (for ghcr.io: mirror first, then A, then B)."""
        return ["M", "A", "B"] if route == MULTI else ["H"]

    def restart_token_server(self, down: float) -> None:
        """Stop the token server, wait ``down`` seconds, and serve again on the same port (the realm
        in every registry's challenge names that port). The bed's TokenServer keeps its keys,
        users and counts; only its HTTP server is new. The bed has no restart of its own, so this
        reaches into the TokenServer's and ThreadedUvicorn's private parts (test bed code, ours)."""
        tokens: TokenServer = self.bed.tokens
        old = tokens._server
        assert old is not None
        port = old.port
        started = time.time()
        tokens.stop()
        time.sleep(down)
        routes = [Route(path, tokens._handle, methods=["GET", "POST"]) for path in tokens._endpoints]
        new = ThreadedUvicorn(Starlette(routes=routes), name="token-server")
        new._sock.close()  # rebind on the old port instead of a fresh one
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(50):
            try:
                sock.bind((LOOPBACK, port))
                break
            except OSError:
                time.sleep(0.1)
        sock.listen(512)
        new._sock, new.port, new.url = sock, port, f"http://{LOOPBACK}:{port}"
        tokens._server = new
        new.start()
        self.token_outages.append((started, time.time()))


def routes_toml(fronts: dict[str, FaultFront]) -> str:
    return f"""
[[route]]
name = "{MULTI}"
upstream = ["{fronts["A"].url}", "{fronts["B"].url}"]
mirrors = ["{fronts["M"].url}"]
allow_private_addresses = true

[[route]]
name = "{CDN}"
upstream = "{fronts["H"].url}"
allow_private_addresses = true
default = true
library = true
"""


@contextlib.contextmanager
def stage(
    workdir: Path, *, big_mib: int, ttl: float, cdn_rate: float, token_ttl: int, idle_timeout: float
) -> Iterator[Stage]:
    """Everything up, the images pushed; everything stopped on exit.

    The CDN's answers are paced (``cdn_rate`` bytes per second, front "C") so that the big blob
    takes longer to come than a URL is good for (``ttl``): its first URL expires mid-body, every time.
    """
    ids = itertools.count(1)
    with contextlib.ExitStack() as stack:
        bed = stack.enter_context(Testbed.start(workdir / "bed", big_blob_mib=big_mib, token_ttl=token_ttl))
        cdn = stack.enter_context(FaultFront(bed.cdn_url, rate=cdn_rate))
        edge = stack.enter_context(QuietEdge(cdn.url))
        ghcr = bed.ghcr.registry_url
        fronts = {name: stack.enter_context(FaultFront(ghcr)) for name in ("A", "B", "M")}
        fronts["H"] = stack.enter_context(
            FaultFront(
                bed.hub.registry_url,
                rewrite_location=(bed.cdn_url, edge.url),
                # each redirect names a URL of its own, good for ``ttl`` seconds (a signed URL)
                location_query=lambda: f"x-expires={time.time() + ttl:.3f}&x-id={next(ids)}",
            )
        )
        fronts["C"] = cdn
        # A short idle timeout turns a stall into a break soon; a short breaker cooldown keeps a
        # single-upstream route from resting 30 s (the default) after each burst of 5xx faults.
        env = {"GATEWAY_BLOB_IDLE_TIMEOUT": str(idle_timeout), "GATEWAY_BREAKER_COOLDOWN": str(BREAKER_COOLDOWN)}
        gateway = stack.enter_context(run_gateway(routes_toml(fronts), workdir / "gateway", env=env))
        yield Stage(workdir, bed, fronts, edge, gateway, ttl, BREAKER_COOLDOWN)
