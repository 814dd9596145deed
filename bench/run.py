"""One benchmark run: start the test bed, nginx and the gateway, measure the three paths, collect figures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench import clients, procs
from bench.clients import ClientAuth, Target
from bench.report import PATHS, Figure
from bench.servers import ROOT, Gateway, NginxProxy, ServerError, tail

T = TypeVar("T")
MB = 1e6
GIB = float(1 << 30)
MIB = float(1 << 20)
BIG_REPO = "library/bigimage"
#: response headers that must not appear twice (RFC 9110 5.3: only list-valued fields may repeat)
SINGLE_HEADERS = frozenset({"content-length", "content-type", "docker-content-digest", "etag", "date", "location"})
SMALL_REPO = "library/alpine"
PRIVATE_KEY = "allow_private_addresses"


@dataclass(frozen=True)
class Options:
    blob_mib: int
    repeat: int
    streams: int
    concurrency: int
    duration: float
    latency_duration: float
    warmup: float
    ttfb_samples: int
    token_requests: int
    wrk_threads: int
    gateway_workers: int | None
    gateway_env: dict[str, str]
    gateway_cmd: str | None
    route_options: dict[str, str]
    load_generator: str
    quick: bool
    resume_every_mib: int = 0
    rollout_clients: int = 0
    #: the herd scenario: herds of these sizes (empty: skipped), over a link of this many bytes/s
    herd_clients: tuple[int, ...] = ()
    herd_link_rate: float = 100e6
    herd_paths: tuple[str, ...] = PATHS
    #: one more herd (the largest) started evenly over this many seconds, via these paths (0: none)
    herd_spread: float = 0.0
    herd_spread_paths: tuple[str, ...] = ("gateway",)
    herd_client_nice: int = 10
    #: run only these measurements (empty: all of them; see MEASUREMENTS)
    only: tuple[str, ...] = ()


@dataclass
class Figures:
    single: Figure = field(default_factory=lambda: Figure("single_stream", "1 stream, blob", "MB/s", "higher"))
    aggregate: Figure = field(default_factory=lambda: Figure("aggregate", "N streams, aggregate", "MB/s", "higher"))
    cpu: Figure = field(default_factory=lambda: Figure("server_cpu", "server CPU, N streams", "s/GiB", "lower"))
    rss_max: Figure = field(default_factory=lambda: Figure("rss_max", "peak RSS, max process", "MiB", "lower"))
    rss_sum: Figure = field(default_factory=lambda: Figure("rss_sum", "peak RSS, all processes", "MiB", "lower"))
    rps: Figure = field(default_factory=lambda: Figure("manifest_rps", "manifest GET, c=C", "req/s", "higher"))
    load_p50: Figure = field(default_factory=lambda: Figure("manifest_p50", "  latency p50, c=C", "ms", "lower"))
    load_p99: Figure = field(default_factory=lambda: Figure("manifest_p99", "  latency p99, c=C", "ms", "lower"))
    idle_p50: Figure = field(
        default_factory=lambda: Figure("manifest_c1_p50", "manifest latency p50, c=1", "ms", "lower")
    )
    idle_p99: Figure = field(
        default_factory=lambda: Figure("manifest_c1_p99", "manifest latency p99, c=1", "ms", "lower")
    )
    tokens_cold: Figure = field(
        default_factory=lambda: Figure("tokens_cold", "token requests / 1000 manifests, fresh", "count", "lower")
    )
    tokens_warm: Figure = field(
        default_factory=lambda: Figure("tokens_warm", "token requests / 1000 manifests, warm", "count", "lower")
    )
    ttfb_small: Figure = field(default_factory=lambda: Figure("ttfb_small", "TTFB, small blob", "ms", "lower"))
    ttfb_big: Figure = field(default_factory=lambda: Figure("ttfb_big", "TTFB, big blob (1 stream)", "ms", "lower"))
    upstream_cpu: Figure = field(
        default_factory=lambda: Figure("upstream_cpu", "registry+CDN CPU, N streams", "s/GiB", "lower")
    )
    client_cpu: Figure = field(default_factory=lambda: Figure("client_cpu", "curl CPU, N streams", "s/GiB", "lower"))
    resume_clean: Figure = field(
        default_factory=lambda: Figure(
            "resume_clean", "1 stream via fault fronts, clean", "MB/s", "higher", optional=True
        )
    )
    resume_broken: Figure = field(
        default_factory=lambda: Figure(
            "resume_broken", "1 stream via fault fronts, reset every R MiB", "MB/s", "higher", optional=True
        )
    )
    rollout_gets: Figure = field(
        default_factory=lambda: Figure(
            "rollout_gets", "rollout to N clients: counted GETs at the hub", "count", "lower", optional=True
        )
    )
    rollout_seconds: Figure = field(
        default_factory=lambda: Figure(
            "rollout_seconds", "rollout to N clients: wall time", "s", "lower", optional=True
        )
    )
    #: the herd scenario's figures (their keys depend on the herd sizes), in the order they were made
    herd: dict[str, Figure] = field(default_factory=dict)

    def ordered(self) -> list[Figure]:
        return [
            self.single,
            self.aggregate,
            self.cpu,
            self.rss_max,
            self.rss_sum,
            self.rps,
            self.load_p50,
            self.load_p99,
            self.idle_p50,
            self.idle_p99,
            self.tokens_cold,
            self.tokens_warm,
            self.ttfb_small,
            self.ttfb_big,
            self.upstream_cpu,
            self.client_cpu,
            self.resume_clean,
            self.resume_broken,
            self.rollout_gets,
            self.rollout_seconds,
            *self.herd.values(),
        ]


#: runs of one client alone per path: the herd's baseline (short, and noisier than the herds)
HERD_ALONE_REPEATS = 3
#: what ``--only`` may name, in the order a run measures them
MEASUREMENTS = ("tokens", "verify", "ttfb", "single", "aggregate", "manifests", "resume", "rollout", "herd")


def rotated(paths: list[str], n: int) -> list[str]:
    """The paths in a different order each repeat, so no path always runs first (or right after another)."""
    if not paths:
        return paths
    k = n % len(paths)
    return paths[k:] + paths[:k]


@dataclass
class HerdBed:
    """What the herd scenario's runs share: the capped link, the registry's front, nginx, counts."""

    link: Any
    hub: Any
    nginx: NginxProxy | None
    #: every herd's details (``details.herd_scenario.runs`` of the result)
    runs: list[dict[str, Any]]
    #: the time one client alone took, per path (the median of its runs)
    alone: dict[str, float] = field(default_factory=dict)
    gateways: int = 0


class Run:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.figures = Figures()
        self.rename_figures()
        self.errors: list[dict[str, str]] = []
        self.warnings: list[str] = []
        self.generator = options.load_generator
        self.failed: dict[str, str] = {}
        self.targets: dict[str, Target] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.nginx: NginxProxy | None = None
        self.gateway: Gateway | None = None
        self.upstream_pids: list[int] = []
        self.progress_started = time.monotonic()

    def rename_figures(self) -> None:
        o = self.options
        f = self.figures
        f.single.label = f"1 stream, {o.blob_mib} MiB blob"
        f.aggregate.label = f"{o.streams} streams, aggregate"
        f.cpu.label = f"server CPU, {o.streams} streams"
        f.upstream_cpu.label = f"registry+CDN CPU, {o.streams} streams"
        f.client_cpu.label = f"curl CPU, {o.streams} streams"
        f.rss_max.label = f"peak RSS, {o.streams} streams, max/process"
        f.rss_sum.label = f"peak RSS, {o.streams} streams, all processes"
        f.rps.label = f"manifest GET, c={o.concurrency}"
        f.load_p50.label = f"  latency p50, c={o.concurrency}"
        f.load_p99.label = f"  latency p99, c={o.concurrency}"
        f.tokens_cold.label = f"token req / {o.token_requests} manifests, fresh"
        f.tokens_warm.label = f"token req / {o.token_requests} manifests, warm"
        for figure in (f.cpu, f.rss_max, f.rss_sum):
            figure.missing["direct"] = "n/a"
        for figure in (f.tokens_cold, f.tokens_warm):
            figure.missing["direct"] = figure.missing["nginx"] = "n/a"
        f.upstream_cpu.optional = f.client_cpu.optional = True
        f.resume_broken.label = f"1 stream via fault fronts, reset every {o.resume_every_mib} MiB"
        f.rollout_gets.label = f"rollout to {o.rollout_clients} clients: counted GETs at the hub"
        f.rollout_seconds.label = f"rollout to {o.rollout_clients} clients: wall time"
        for figure in (f.resume_clean, f.resume_broken, f.rollout_gets, f.rollout_seconds):
            figure.missing["direct"] = figure.missing["nginx"] = "n/a"
        if o.only:  # --only: the table shows what was measured
            for figure in f.ordered():
                figure.optional = True

    # ------------------------------------------------------------------ bookkeeping
    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.progress_started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def live_paths(self) -> list[str]:
        return [p for p in PATHS if p in self.targets and p not in self.failed]

    def attempt(self, what: str, path: str, action: Callable[[], T], figures: list[Figure] | None = None) -> T | None:
        """Run one measurement; a failure is recorded (and a dead server marks its path failed), never raised."""
        if path in self.failed:
            return None
        try:
            return action()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self.errors.append({"measurement": what, "path": path, "error": message})
            self.log(f"ERROR {what} via {path}: {message}")
            server = {"gateway": self.gateway, "nginx": self.nginx}.get(path)
            if server is not None and not server.alive():
                reason = f"{path} process exited with {server.returncode()} during {what}:\n{tail(server.log_path)}"
                self.fail_path(path, reason)
            for figure in figures or []:
                figure.missing.setdefault(path, message)
            if not isinstance(exc, (clients.ClientError, ServerError)):
                self.extra.setdefault("tracebacks", []).append(traceback.format_exc())
            return None

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log(f"WARNING {message}")

    def fail_path(self, path: str, reason: str) -> None:
        if path not in self.failed:
            self.failed[path] = reason
            self.log(f"{path.upper()} FAILED: {reason}")
        for figure in self.figures.ordered():
            if path not in figure.samples:
                figure.missing.setdefault(path, reason.splitlines()[0])

    # ------------------------------------------------------------------ the run
    def execute(self) -> None:
        from tests.testbed.bed import Testbed

        o = self.options
        self.log(f"starting the test bed ({o.blob_mib} MiB blob) in {self.workdir}")
        with Testbed.start(self.workdir / "testbed", big_blob_mib=o.blob_mib) as tb, self.servers(tb) as _:
            self.extra["testbed_start_seconds"] = round(tb.start_seconds, 1)
            big = tb.images["bigimage"]
            self.big_digest, self.big_size = max(big.blobs.items(), key=lambda item: item[1])
            alpine = tb.images["alpine"]
            self.small_digest = alpine.layers["linux/amd64"][0]
            self.small_size = alpine.blobs[self.small_digest]
            self.manifest_digest = alpine.digest
            self.big_path = f"/v2/{BIG_REPO}/blobs/{self.big_digest}"
            self.small_path = f"/v2/{SMALL_REPO}/blobs/{self.small_digest}"
            self.manifest_path = f"/v2/{SMALL_REPO}/manifests/{alpine.tag}"
            self.extra["blob"] = {"digest": self.big_digest, "bytes": self.big_size}
            self.extra["small_blob"] = {"digest": self.small_digest, "bytes": self.small_size}
            self.extra["manifest"] = {"path": self.manifest_path, "digest": self.manifest_digest}
            self.upstream_pids = procs.pids_matching(str(tb.workdir) + "/")

            steps: dict[str, Callable[[], None]] = {
                "tokens": lambda: self.measure_tokens(tb),
                "verify": self.verify,
                "ttfb": self.measure_ttfb,
                "single": self.measure_single_stream,
                "aggregate": self.measure_aggregate,
                "manifests": self.measure_manifests,
                "resume": lambda: self.measure_resumes(tb),
                "rollout": lambda: self.measure_rollout(tb),
                "herd": lambda: self.measure_herd(tb),
            }
            for name in MEASUREMENTS:
                if not o.only or name in o.only:
                    steps[name]()
            direct_auth = self.targets["direct"].auth
            self.extra["client_token_requests"] = direct_auth.fetched if direct_auth is not None else 0
            for name, server in (("nginx", self.nginx), ("gateway", self.gateway)):
                if server is not None and name not in self.failed and not server.alive():
                    self.fail_path(name, f"{name} exited with {server.returncode()}:\n{tail(server.log_path)}")
        self.log("test bed stopped")

    @contextlib.contextmanager
    def servers(self, tb: Any) -> Iterator[None]:
        o = self.options
        auth = ClientAuth(
            tb.hub.realm, tb.hub.service, [f"repository:{BIG_REPO}:pull", f"repository:{SMALL_REPO}:pull"]
        )
        self.targets["direct"] = Target("direct", tb.hub.registry_url, auth, follow_redirects=True)
        try:
            self.nginx = NginxProxy(self.workdir / "nginx", tb.hub.registry_url).start()
            self.targets["nginx"] = Target("nginx", self.nginx.url, auth, follow_redirects=False)
            self.log(f"nginx proxy on {self.nginx.url} (workers {self.nginx.worker_pids()})")
        except (ServerError, OSError) as exc:
            self.targets["nginx"] = Target("nginx", "http://127.0.0.1:9", auth, follow_redirects=False)
            self.fail_path("nginx", f"nginx did not start: {exc}")
        # The test bed (registry, token server, CDN) lives on 127.0.0.1: a gateway that refuses private
        # addresses by default needs the route to allow them. A gateway that does not know the key gets
        # a route without it.
        route_options = {PRIVATE_KEY: "true", **o.route_options}
        try:
            try:
                self.start_gateway(tb, route_options)
            except ServerError as exc:
                if PRIVATE_KEY in o.route_options or PRIVATE_KEY not in str(exc):
                    raise
                self.log(f"the gateway does not know {PRIVATE_KEY}; starting it without")
                del route_options[PRIVATE_KEY]
                self.start_gateway(tb, route_options)
        except (ServerError, OSError) as exc:
            self.targets["gateway"] = Target("gateway", "http://127.0.0.1:9", None, follow_redirects=False)
            self.fail_path("gateway", f"gateway did not start: {exc}")
        if self.gateway is not None:
            self.extra["gateway_argv"] = self.gateway.argv
            self.extra["gateway_routes"] = self.gateway.routes()
            self.extra["gateway_source"] = self.gateway.source
        try:
            yield
        finally:
            for server in (self.gateway, self.nginx):
                if server is not None:
                    server.stop()

    def start_gateway(self, tb: Any, route_options: dict[str, str]) -> Gateway:
        o = self.options
        gateway = Gateway(
            self.workdir / "gateway",
            tb.hub.registry_url,
            workers=o.gateway_workers,
            env=o.gateway_env,
            command=o.gateway_cmd,
            route_options=route_options,
        )
        self.gateway = gateway
        gateway.start()
        self.targets["gateway"] = Target("gateway", gateway.url, None, follow_redirects=False)
        self.log(f"gateway on {gateway.url} (pids {gateway.pids()})")
        return gateway

    # ------------------------------------------------------------------ measurements
    def measure_tokens(self, tb: Any) -> None:
        """Upstream token requests per N manifest GETs through the gateway: first from a fresh gateway, then warm."""
        o = self.options
        for figure, phase in ((self.figures.tokens_cold, "fresh"), (self.figures.tokens_warm, "warm")):

            def count(figure: Figure = figure, phase: str = phase) -> None:
                tb.tokens.reset()
                statuses = clients.count_requests(
                    self.targets["gateway"], self.manifest_path, o.token_requests, concurrency=16
                )
                tokens = tb.tokens.count(service=tb.hub.service)
                self.extra.setdefault("token_phases", {})[phase] = {"statuses": statuses, "token_requests": tokens}
                if statuses != {"200": o.token_requests}:
                    raise clients.ClientError(f"manifest answers {statuses}")
                figure.add("gateway", tokens * 1000 / o.token_requests)

            self.log(f"token requests per {o.token_requests} manifests via gateway ({phase})")
            self.attempt(f"token count ({phase})", "gateway", count, [figure])

    def verify(self) -> None:
        """Correctness: the manifest's digest, and sha256 of one whole big blob download, per path."""
        for path in self.live_paths():
            target = self.targets[path]
            self.log(f"verify {path}: manifest digest and sha256 of the {self.options.blob_mib} MiB blob")

            def check(target: Target = target) -> dict[str, Any]:
                response = clients.manifest_get(target, self.manifest_path)
                body_digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
                manifest_ok = (
                    response.status_code == 200
                    and body_digest == self.manifest_digest
                    and response.headers.get("docker-content-digest") == self.manifest_digest
                )
                if not manifest_ok:
                    raise clients.ClientError(
                        f"manifest: HTTP {response.status_code}, body {body_digest}, "
                        f"header {response.headers.get('docker-content-digest')}, want {self.manifest_digest}"
                    )
                started = time.perf_counter()
                digest, size = clients.blob_sha256(target, self.big_path)
                seconds = time.perf_counter() - started
                if digest != self.big_digest or size != self.big_size:
                    raise clients.ClientError(f"blob: got {digest} ({size} bytes), want {self.big_digest}")
                counts = clients.response_header_counts(target, self.manifest_path)
                repeated = {name: n for name, n in counts.items() if n > 1 and name in SINGLE_HEADERS}
                if repeated:
                    listed = ", ".join(f"{name} x{n}" for name, n in repeated.items())
                    self.warn(
                        f"{target.name}: a manifest answer repeats {listed}; strict HTTP parsers "
                        "(wrk's, Node's llhttp) reject it as a protocol error, Go and curl accept it"
                    )
                return {
                    "manifest_digest": body_digest,
                    "blob_sha256": digest,
                    "blob_bytes": size,
                    "seconds": seconds,
                    "repeated_headers": repeated,
                }

            result = self.attempt("verify", path, check, [])
            self.checks[path] = {"ok": result is not None, **(result or {})}
            if result is None:
                self.fail_path(path, f"{path} returned wrong or no data: {self.errors[-1]['error']}")

    def measure_ttfb(self) -> None:
        o = self.options
        self.log(f"time to first byte: {o.ttfb_samples} requests of a {self.small_size}-byte blob per path")
        for n in range(o.ttfb_samples):
            for path in rotated(self.live_paths(), n):
                target = self.targets[path]

                def one(target: Target = target) -> None:
                    transfer = clients.download(target, self.small_path, self.small_size)
                    self.figures.ttfb_small.add(target.name, transfer.ttfb * 1000)

                self.attempt("ttfb", path, one, [self.figures.ttfb_small])

    def measure_single_stream(self) -> None:
        o = self.options
        for n in range(o.repeat):
            for path in rotated(self.live_paths(), n):
                target = self.targets[path]

                def one(target: Target = target) -> None:
                    transfer = clients.download(target, self.big_path, self.big_size)
                    self.figures.single.add(target.name, transfer.bytes_per_second / MB)
                    self.figures.ttfb_big.add(target.name, transfer.ttfb * 1000)
                    self.log(f"1 stream via {target.name}: {transfer.bytes_per_second / MB:.0f} MB/s")

                self.attempt("single stream", path, one, [self.figures.single, self.figures.ttfb_big])

    def measure_resumes(self, tb: Any) -> None:
        """The big blob through a second gateway whose upstream resets every R MiB (RST at the CDN hop),
        against the same path without faults: what resuming costs (GATEWAY_BLOB_RESUMES is raised)."""
        from tests.testbed.faults import FaultFront

        o = self.options
        if o.resume_every_mib <= 0 or "gateway" in self.failed:
            return
        every = o.resume_every_mib << 20
        resumes = self.big_size // every + 2
        with (
            FaultFront(tb.cdn_url) as cdn,
            FaultFront(tb.hub.registry_url, rewrite_location=(tb.cdn_url, cdn.url)) as hub,
        ):
            gateway = Gateway(
                self.workdir / "gateway-resume",
                hub.url,
                env={**o.gateway_env, "GATEWAY_BLOB_RESUMES": str(resumes)},
                command=o.gateway_cmd,
                route_options={PRIVATE_KEY: "true", **o.route_options},
            )
            try:
                gateway.start()
                target = Target("gateway", gateway.url, None, follow_redirects=False)
                for _ in range(o.repeat):
                    for figure, broken in ((self.figures.resume_clean, False), (self.figures.resume_broken, True)):
                        cdn.clear()
                        if broken:
                            cdn.fault(self.big_digest, "reset", at=every, times=None)

                        def one(figure: Figure = figure, broken: bool = broken) -> None:
                            transfer = clients.download(target, self.big_path, self.big_size)
                            figure.add("gateway", transfer.bytes_per_second / MB)
                            kind = f"reset every {o.resume_every_mib} MiB" if broken else "clean"
                            self.log(f"1 stream via fault fronts, {kind}: {transfer.bytes_per_second / MB:.0f} MB/s")

                        self.attempt("resume scenario", "gateway", one, [figure])
                self.extra["resume_scenario"] = {"every_bytes": every, "blob_resumes": resumes}
            except (ServerError, OSError) as exc:
                self.warn(f"the resume scenario could not run: {exc}")
            finally:
                gateway.stop()

    def measure_rollout(self, tb: Any) -> None:
        """Issue 12's rollout: N containerd-style clients pull one tag at once (HEAD the tag, GET the index
        by digest, GET the platform manifest by digest) through a gateway whose upstream is a hub front
        counting like Docker Hub (``tests/testbed/hubfront.py``). The figures: manifest GETs the hub counted
        as pulls (the target is at most 2 per tag per tag lifetime) and the wall time. Each repeat starts
        a fresh gateway (one worker: the manifest cache is per process) with an empty cache."""
        from tests.testbed.hubfront import HubFront

        o = self.options
        if o.rollout_clients <= 0 or "gateway" in self.failed:
            return
        alpine = tb.images["alpine"]
        platform = alpine.platform_digest("linux/amd64")
        f = self.figures
        runs: list[dict[str, Any]] = []
        with HubFront(tb.hub.registry_url, limit=1 << 30) as front:
            for n in range(o.repeat):
                front.reset()
                gateway = Gateway(
                    self.workdir / f"gateway-rollout-{n}",
                    front.url,
                    env=o.gateway_env,
                    command=o.gateway_cmd,
                    route_options={PRIVATE_KEY: "true", **o.route_options},
                )
                try:
                    gateway.start()

                    def one(gateway: Gateway = gateway) -> None:
                        started = time.perf_counter()
                        ended = asyncio.run(rollout(gateway.url, alpine.repo, alpine.tag, o.rollout_clients))
                        seconds = time.perf_counter() - started
                        if ended != {platform}:
                            raise clients.ClientError(f"the clients ended with {sorted(ended)}, want {platform}")
                        counted = [r for r in front.requests if r.counted]
                        run = {
                            "clients": o.rollout_clients,
                            "counted_gets": len(counted),
                            "counted_references": [r.reference for r in counted],
                            "heads": len(front.manifest_requests("HEAD")),
                            "refused": len([r for r in front.requests if r.status == 429]),
                            "wall_seconds": seconds,
                        }
                        runs.append(run)
                        f.rollout_gets.add("gateway", len(counted))
                        f.rollout_seconds.add("gateway", seconds)
                        self.log(
                            f"rollout of {alpine.repo}:{alpine.tag} to {o.rollout_clients} clients: "
                            f"{len(counted)} counted GETs and {run['heads']} HEADs at the hub, {seconds:.2f} s"
                        )
                        if len(counted) > 2:
                            self.warn(f"the rollout cost {len(counted)} counted GETs at the hub (target: at most 2)")

                    self.attempt("rollout scenario", "gateway", one, [f.rollout_gets, f.rollout_seconds])
                except (ServerError, OSError) as exc:
                    self.warn(f"the rollout scenario could not run: {exc}")
                    break
                finally:
                    gateway.stop()
        self.extra["rollout_scenario"] = {"repository": alpine.repo, "tag": alpine.tag, "runs": runs}

    # ------------------------------------------------------------------ the herd scenario
    def herd_figure(self, key: str, label: str, unit: str, better: str) -> Figure:
        """One of the herd scenario's figures, made on first use (their keys depend on the herd sizes)."""
        figure = self.figures.herd.get(key)
        if figure is None:
            figure = self.figures.herd[key] = Figure(key, label, unit, better, optional=True)
            for path in PATHS:
                if path not in self.options.herd_paths:
                    figure.missing[path] = "n/a"
            if unit == "MiB":
                figure.missing["direct"] = "n/a"
        return figure

    def measure_herd(self, tb: Any) -> None:
        """Issue 9's herd: N clients GET the same big blob at once over one capped link (a token-bucket
        front in front of the CDN, ``tests/testbed/linkfront.py``, and a fault front in front of the
        registry that points its redirects at the link), via direct, nginx and a fresh gateway per run.
        Per herd: the time until every client is done, the bytes that crossed the link (as a multiple of
        the blob), the proxy's peak RSS, and every client's sha256. Also one client alone (the baseline)
        and one herd whose starts are spread over ``herd_spread`` seconds."""
        from tests.testbed.faults import FaultFront
        from tests.testbed.linkfront import LinkFront

        o = self.options
        sizes = sorted({n for n in o.herd_clients if n > 0})
        if not sizes:
            return
        paths = [p for p in PATHS if p in o.herd_paths]
        scenario: dict[str, Any] = {
            "link_bytes_per_second": o.herd_link_rate,
            "blob_bytes": self.big_size,
            "link_seconds_per_blob": self.big_size / o.herd_link_rate,
            "clients": sizes,
            "paths": paths,
            "spread_seconds": o.herd_spread,
            "spread_paths": [p for p in o.herd_spread_paths if p in paths],
            "client": f"curl | {' '.join(clients.hasher_argv())}",
            "client_nice": o.herd_client_nice,
            "gateway_workers": o.gateway_workers,
            "runs": [],
        }
        self.extra["herd_scenario"] = scenario
        self.log(
            f"herd scenario: {', '.join(map(str, sizes))} clients, {o.blob_mib} MiB blob over a "
            f"{o.herd_link_rate / MB:.0f} MB/s link via {', '.join(paths)}"
        )
        with (
            LinkFront(tb.cdn_url, rate=o.herd_link_rate) as link,
            FaultFront(tb.hub.registry_url, rewrite_location=(tb.cdn_url, link.url)) as hub,
        ):
            nginx: NginxProxy | None = None
            if "nginx" in paths:
                try:
                    nginx = NginxProxy(self.workdir / "nginx-herd", hub.url).start()
                except (ServerError, OSError) as exc:
                    self.warn(f"the herd scenario's nginx did not start: {exc}")
                    paths.remove("nginx")
            herd = HerdBed(link, hub, nginx, scenario["runs"])
            try:
                for n in range(HERD_ALONE_REPEATS):
                    for path in rotated(paths, n):
                        self.herd_run(herd, path, 1)
                for n, size in enumerate(sizes):
                    for path in rotated(paths, n):
                        self.herd_run(herd, path, size)
                if o.herd_spread > 0:
                    for path in [p for p in o.herd_spread_paths if p in paths]:
                        self.herd_run(herd, path, sizes[-1], spread=o.herd_spread)
            finally:
                if nginx is not None:
                    nginx.stop()
        scenario["targets"] = self.herd_targets(sizes[-1])

    def herd_run(self, herd: HerdBed, path: str, count: int, *, spread: float = 0.0) -> None:
        """One herd of ``count`` clients via ``path`` (the gateway: a fresh one, upstream the registry's front)."""
        o = self.options
        auth = self.targets["direct"].auth
        gateway: Gateway | None = None
        if path == "gateway":
            herd.gateways += 1
            gateway = Gateway(
                self.workdir / f"gateway-herd-{herd.gateways}",
                herd.hub.url,
                workers=o.gateway_workers,
                env=o.gateway_env,
                command=o.gateway_cmd,
                route_options={PRIVATE_KEY: "true", **o.route_options},
            )
        kind, what, figures = self.herd_kind(count, spread)

        def pids() -> list[int]:
            if gateway is not None:
                return gateway.pids()
            return herd.nginx.worker_pids() if path == "nginx" and herd.nginx is not None else []

        def one() -> None:
            if gateway is not None:
                target = Target("gateway", gateway.start().url, None, follow_redirects=False)
            elif path == "nginx":
                if herd.nginx is None:
                    raise ServerError("the herd scenario's nginx is not running")
                target = Target("nginx", herd.nginx.url, auth, follow_redirects=False)
            else:
                target = Target("direct", herd.hub.url, auth, follow_redirects=True)
            herd.link.reset()
            herd.hub.clear()
            server_before = procs.total_cpu(pids())
            link_before = herd.link.cpu_seconds()
            sampler = procs.RssSampler(pids).start() if path != "direct" else None
            try:
                run = clients.herd(
                    target,
                    self.big_path,
                    self.big_size,
                    count,
                    spread=spread,
                    nice=o.herd_client_nice,
                    # a herd that shares nothing needs count x the link time; far beyond that it is stuck
                    max_seconds=120 + 3 * count * self.big_size / o.herd_link_rate,
                )
            finally:
                peaks = sampler.stop() if sampler is not None else None
            detail = self.herd_detail(herd, path, kind, spread, run, peaks)
            server = procs.cpu_delta(server_before, procs.total_cpu(pids())) if pids() else None
            self.herd_cpu(detail, server, link_before, herd.link.cpu_seconds())
            if gateway is not None:  # the tree may change during a long run: which code served this herd
                detail["gateway_source"] = gateway.source
            failures = run.failures(self.big_digest)
            if failures:
                first = failures[0]
                reason = first.error or f"sha256 {first.digest}, want {self.big_digest}"
                self.log(f"!!!!!!!! {what} via {path}: {len(failures)} of {count} clients FAILED: {reason}")
                raise clients.ClientError(
                    f"{len(failures)} of {count} herd clients got no or WRONG bytes (first: {reason})"
                )
            if not spread and run.start_spread > 1.0:
                self.warn(f"{what} via {path}: the clients started over {run.start_spread:.1f} s, not within 1 s")
            self.herd_record(herd, path, kind, figures, detail)
            self.log(self.herd_message(f"{what} via {path}", detail))

        try:
            self.attempt(what, path, one, figures)
        finally:
            if gateway is not None:
                gateway.stop()

    def herd_kind(self, count: int, spread: float) -> tuple[str, str, list[Figure]]:
        """A herd's kind (alone, spread, simultaneous), its name and its figures."""
        if count == 1:
            label = f"herd: 1 client alone over the {self.options.herd_link_rate / MB:g} MB/s link"
            return "alone", "1 client alone", [self.herd_figure("herd_alone_seconds", label, "s", "lower")]
        if spread > 0:
            what = f"herd of {count} spread over {spread:g} s"
            return (
                "spread",
                what,
                [
                    self.herd_figure(f"herd_spread_{count}_seconds", f"{what}: all done", "s", "lower"),
                    self.herd_figure(f"herd_spread_{count}_upstream", f"{what}: upstream / blob", "x", "lower"),
                    self.herd_figure(f"herd_spread_{count}_rss", f"{what}: peak RSS", "MiB", "lower"),
                ],
            )
        what = f"herd of {count}"
        return (
            "simultaneous",
            what,
            [
                self.herd_figure(f"herd_{count}_seconds", f"{what}: time until all done", "s", "lower"),
                self.herd_figure(f"herd_{count}_vs_alone", f"{what}: all done / 1 client alone", "x", "lower"),
                self.herd_figure(f"herd_{count}_upstream", f"{what}: upstream bytes / blob", "x", "lower"),
                self.herd_figure(f"herd_{count}_rss", f"{what}: peak RSS, proxy", "MiB", "lower"),
                # the least the all-done figure could be here: the herd's CPU seconds over the cores
                self.herd_figure(f"herd_{count}_floor_vs_alone", f"{what}: CPU floor / 1 client alone", "x", "lower"),
            ],
        )

    def herd_detail(
        self, herd: HerdBed, path: str, kind: str, spread: float, run: clients.HerdRun, peaks: procs.RssPeaks | None
    ) -> dict[str, Any]:
        """What the JSON keeps of one herd (appended to ``details.herd_scenario.runs`` at once)."""
        settled = herd.link.wait_idle(10)  # the link's counts are final once no answer is on its way
        upstream = herd.link.body_bytes_for(self.big_digest)
        hex_digest = self.big_digest.partition(":")[2]
        failures = run.failures(self.big_digest)
        detail: dict[str, Any] = {
            "path": path,
            "kind": kind,
            "clients": len(run.clients),
            "spread_seconds": spread,
            "all_done_seconds": run.wall_seconds,
            "start_spread_seconds": run.start_spread,
            "upstream_bytes": upstream,
            "upstream_blob_multiple": upstream / self.big_size,
            "upstream_gets": herd.link.gets_for(self.big_digest),
            "registry_blob_gets": len([r for r in herd.hub.requests if r.method == "GET" and hex_digest in r.target]),
            "link_idle_after": settled,
            "peak_connections_at_link": herd.link.peak_connections,
            "client_cpu_seconds": run.client_cpu_seconds,
            "rss_peak_kib": peaks.sum_of_peaks_kib if peaks is not None else None,
            "rss_peak_kib_per_pid": peaks.per_process_kib if peaks is not None else None,
            "failed_clients": len(failures),
            "per_client": [
                {
                    "started": round(c.started, 4),
                    "done": round(c.done, 4),
                    "MBps": round(c.transfer.bytes_per_second / MB, 1) if c.transfer is not None else None,
                    "sha256_ok": c.ok(self.big_digest),
                    **({"error": c.error} if c.error else {}),
                    **({"digest": c.digest} if c.digest != self.big_digest else {}),
                }
                for c in run.clients
            ],
        }
        herd.runs.append(detail)
        return detail

    @staticmethod
    def herd_cpu(
        detail: dict[str, Any], server: float | None, link_before: float | None, link_after: float | None
    ) -> None:
        """The herd's CPU seconds, and the least time they need on this machine: the clients, the proxy and
        the link front share its cores, so a herd can finish no sooner than their CPU spread over all of
        them (the clients' hashing is most of it)."""
        detail["server_cpu_seconds"] = server
        if link_before is not None and link_after is not None:
            detail["link_front_cpu_seconds"] = link_after - link_before
        busy = [detail["client_cpu_seconds"], server, detail.get("link_front_cpu_seconds")]
        detail["cpu_floor_seconds"] = sum(v for v in busy if v is not None) / (os.cpu_count() or 1)

    @staticmethod
    def herd_message(what: str, detail: dict[str, Any]) -> str:
        message = (
            f"{what}: all done in {detail['all_done_seconds']:.2f} s, {detail['upstream_blob_multiple']:.2f}x "
            f"the blob over the link ({detail['upstream_gets']} GETs)"
        )
        if detail["rss_peak_kib"] is not None:
            message += f", peak RSS {detail['rss_peak_kib'] / 1024:.0f} MiB"
        if detail["clients"] > 1:
            message += (
                f"; its CPU needs {detail['cpu_floor_seconds']:.1f} s of the {os.cpu_count()} cores "
                f"(clients {detail['client_cpu_seconds']:.1f} CPU-s)"
            )
        return message

    @staticmethod
    def herd_record(herd: HerdBed, path: str, kind: str, figures: list[Figure], detail: dict[str, Any]) -> None:
        seconds = detail["all_done_seconds"]
        figures[0].add(path, seconds)
        if kind == "alone":
            herd.alone[path] = figures[0].median(path) or seconds
            return
        if kind == "spread":
            figures[1].add(path, detail["upstream_blob_multiple"])
            if detail["rss_peak_kib"] is not None:
                figures[2].add(path, detail["rss_peak_kib"] / 1024)
            return
        if path in herd.alone:
            figures[1].add(path, seconds / herd.alone[path])
            figures[4].add(path, detail["cpu_floor_seconds"] / herd.alone[path])
        else:
            figures[1].missing.setdefault(path, "no single-client time")
        figures[2].add(path, detail["upstream_blob_multiple"])
        if detail["rss_peak_kib"] is not None:
            figures[3].add(path, detail["rss_peak_kib"] / 1024)

    def herd_targets(self, largest: int) -> list[dict[str, Any]]:
        """Issue 9's targets for the gateway, checked against this run; a warning for each one missed."""
        o = self.options
        herd = self.figures.herd
        note = "" if largest >= 32 else f" (a target set for 32 clients; this run's largest herd is {largest})"

        def median(key: str) -> float | None:
            figure = herd.get(key)
            return figure.median("gateway") if figure is not None else None

        # (what, the gateway's figure, limit, operator, whether the target names 32 clients)
        checks: list[tuple[str, float | None, float, str, bool]] = [
            (f"herd of {largest}: all done / 1 client alone", median(f"herd_{largest}_vs_alone"), 1.5, "<=", True)
        ]
        for size in sorted({n for n in o.herd_clients if n > 0}):
            checks.append(
                (f"herd of {size}: upstream bytes / blob", median(f"herd_{size}_upstream"), 1.25, "<=", False)
            )
        if o.herd_spread > 0:
            what = f"herd of {largest} spread over {o.herd_spread:g} s: upstream bytes / blob"
            checks.append((what, median(f"herd_spread_{largest}_upstream"), 3.0, "<", False))
        if (o.gateway_workers or 1) == 1:
            what = f"herd of {largest}: peak RSS, MiB (1 worker)"
            checks.append((what, median(f"herd_{largest}_rss"), 200.0, "<", True))
        out = []
        for what, value, limit, op, for_32 in checks:
            met = None if value is None else (value <= limit if op == "<=" else value < limit)
            out.append({"target": what, "gateway": value, "limit": limit, "op": op, "met": met})
            if met is False:
                self.warn(f"gateway {what}: {value:.2f}, target {op} {limit:g}{note if for_32 else ''}")
        return out

    def server_pids(self, path: str) -> list[int]:
        if path == "gateway" and self.gateway is not None:
            return self.gateway.pids()
        if path == "nginx" and self.nginx is not None:
            return self.nginx.worker_pids()
        return []

    def measure_aggregate(self) -> None:
        o = self.options
        f = self.figures
        for path in ("nginx", "gateway"):
            pids = self.server_pids(path)
            if pids:
                self.extra.setdefault("rss_idle_kib", {})[path] = {
                    pid: procs.memory_kib(pid).get("VmRSS") for pid in pids
                }
        for n in range(o.repeat):
            for path in rotated(self.live_paths(), n):
                target = self.targets[path]

                def one(target: Target = target, path: str = path) -> None:
                    machine_before = procs.machine_cpu()
                    server_before = procs.total_cpu(self.server_pids(path))
                    upstream_before = procs.total_cpu(self.upstream_pids)
                    sampler = procs.RssSampler(lambda: self.server_pids(path)).start() if path != "direct" else None
                    try:
                        run = clients.parallel_downloads(target, self.big_path, self.big_size, o.streams)
                    finally:
                        peaks = sampler.stop() if sampler is not None else None
                    server_cpu = procs.cpu_delta(server_before, procs.total_cpu(self.server_pids(path)))
                    upstream_cpu = procs.cpu_delta(upstream_before, procs.total_cpu(self.upstream_pids))
                    machine_after = procs.machine_cpu()
                    machine_busy = machine_after["busy"] - machine_before["busy"]
                    gib = run.total_bytes / GIB
                    mbps = run.total_bytes / run.wall_seconds / MB
                    f.aggregate.add(path, mbps)
                    f.upstream_cpu.add(path, upstream_cpu / gib)
                    f.client_cpu.add(path, run.client_cpu_seconds / gib)
                    speeds = [t.bytes_per_second / MB for t in run.transfers]
                    detail: dict[str, Any] = {
                        "wall_seconds": run.wall_seconds,
                        "bytes": run.total_bytes,
                        "stream_MBps_min": min(speeds),
                        "stream_MBps_max": max(speeds),
                        "server_cpu_seconds": server_cpu,
                        "upstream_cpu_seconds": upstream_cpu,
                        "client_cpu_seconds": run.client_cpu_seconds,
                        # everything else that ran meanwhile (this process, the kernel, other work on the machine)
                        "machine_busy_seconds": machine_busy,
                        "other_cpu_seconds": machine_busy - server_cpu - upstream_cpu - run.client_cpu_seconds,
                        "machine_steal_seconds": machine_after["steal"] - machine_before["steal"],
                    }
                    message = f"{o.streams} streams via {path}: {mbps:.0f} MB/s"
                    if peaks is not None:
                        f.cpu.add(path, server_cpu / gib)
                        f.rss_max.add(path, peaks.max_process_kib / 1024)
                        f.rss_sum.add(path, peaks.sum_of_peaks_kib / 1024)
                        detail["rss_peak_kib_per_pid"] = peaks.per_process_kib
                        detail["rss_peak_total_kib"] = peaks.peak_total_kib
                        detail["rss_samples"] = peaks.samples
                        detail["vm_hwm_kib_per_pid"] = {
                            pid: procs.memory_kib(pid).get("VmHWM") for pid in self.server_pids(path)
                        }
                        message += (
                            f", {server_cpu / gib:.2f} CPU s/GiB, peak RSS {peaks.max_process_kib / 1024:.0f} MiB"
                        )
                    self.extra.setdefault("aggregate_runs", {}).setdefault(path, []).append(detail)
                    self.log(message)

                self.attempt(
                    f"{o.streams} streams", path, one, [f.aggregate, f.cpu, f.rss_max, f.rss_sum, f.upstream_cpu]
                )

    def load(self, target: Target, connections: int, seconds: float) -> clients.LoadRun:
        log = self.workdir / "load.log"
        if self.generator == "hey":
            return clients.hey(target, self.manifest_path, connections=connections, seconds=seconds, log=log)
        threads = self.options.wrk_threads if connections > 1 else 1
        return clients.wrk(
            target, self.manifest_path, connections=connections, seconds=seconds, threads=threads, log=log
        )

    def choose_generator(self) -> None:
        """auto: wrk, unless wrk's parser refuses some path's answers; then hey for every path (same tool for all)."""
        if self.generator != "auto":
            return
        self.generator = "wrk"
        refused = []
        for path in self.live_paths():

            def probe_path(target: Target = self.targets[path]) -> clients.LoadRun:
                return self.load(target, 1, 1)

            probe = self.attempt("wrk probe", path, probe_path)
            if probe is not None and probe.requests == 0 and probe.errors["read"] > 0:
                refused.append(path)
        if refused:
            clients.require_tools(["hey"])
            self.generator = "hey"
            self.warn(
                f"wrk could not parse the answers of {', '.join(refused)} (read errors, no complete response); "
                "manifest load runs use hey (Go net/http) for every path instead"
            )

    def measure_manifests(self) -> None:
        o = self.options
        f = self.figures
        self.choose_generator()
        self.extra["load_generator"] = self.generator
        for path in self.live_paths():
            self.log(f"manifest warm-up via {path} ({o.warmup:.0f}s, {self.generator})")

            def warm(target: Target = self.targets[path]) -> None:
                self.load(target, o.concurrency, o.warmup)

            self.attempt("manifest warm-up", path, warm)
        for n in range(o.repeat):
            for path in rotated(self.live_paths(), n):
                target = self.targets[path]

                def loaded(target: Target = target) -> None:
                    run = self.load(target, o.concurrency, o.duration)
                    if run.error_count:
                        raise clients.ClientError(
                            f"{self.generator} saw errors: {run.errors} in {run.requests} requests"
                        )
                    f.rps.add(target.name, run.rps)
                    f.load_p50.add(target.name, run.p50_ms)
                    f.load_p99.add(target.name, run.p99_ms)
                    self.log(
                        f"manifests via {target.name}, c={o.concurrency}: {run.rps:.0f} req/s, p99 {run.p99_ms:.1f} ms"
                    )

                def idle(target: Target = target) -> None:
                    run = self.load(target, 1, o.latency_duration)
                    if run.error_count:
                        raise clients.ClientError(
                            f"{self.generator} saw errors: {run.errors} in {run.requests} requests"
                        )
                    f.idle_p50.add(target.name, run.p50_ms)
                    f.idle_p99.add(target.name, run.p99_ms)

                self.attempt(f"manifests c={o.concurrency}", path, loaded, [f.rps, f.load_p50, f.load_p99])
                self.attempt("manifests c=1", path, idle, [f.idle_p50, f.idle_p99])

    # ------------------------------------------------------------------ result
    def added_latency(self) -> dict[str, float | None]:
        """How much later the gateway answers a manifest GET than the baselines (medians of percentiles, c=1)."""
        out: dict[str, float | None] = {}
        for base in ("direct", "nginx"):
            for pct, figure in (("p50", self.figures.idle_p50), ("p99", self.figures.idle_p99)):
                gw, other = figure.median("gateway"), figure.median(base)
                out[f"{pct}_ms_vs_{base}"] = None if gw is None or other is None else gw - other
        return out


#: what containerd's resolver sends (core/remotes/docker/resolver.go)
CONTAINERD_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
)


async def rollout_client(base: str, repo: str, tag: str, architecture: str = "amd64") -> str:
    """One containerd-style client: HEAD the tag, GET the index by digest, GET the platform manifest by digest
    (without containerd's ``?ns=docker.io``: the benchmark's route is the default one, named hub.test).
    Returns the platform manifest's digest; raises ClientError on any answer but a 200."""
    headers = {"accept": CONTAINERD_ACCEPT}
    async with httpx.AsyncClient(base_url=base, timeout=120, trust_env=False) as client:
        head = await client.head(f"/v2/{repo}/manifests/{tag}", headers=headers)
        if head.status_code != 200 or "docker-content-digest" not in head.headers:
            raise clients.ClientError(f"HEAD {repo}:{tag}: HTTP {head.status_code}")
        index = await client.get(f"/v2/{repo}/manifests/{head.headers['docker-content-digest']}", headers=headers)
        if index.status_code != 200:
            raise clients.ClientError(f"GET the index of {repo}:{tag}: HTTP {index.status_code}")
        [platform] = [m["digest"] for m in index.json()["manifests"] if m["platform"]["architecture"] == architecture]
        manifest = await client.get(f"/v2/{repo}/manifests/{platform}", headers=headers)
        if manifest.status_code != 200:
            raise clients.ClientError(f"GET {repo}@{platform}: HTTP {manifest.status_code}")
        return str(platform)


async def rollout(base: str, repo: str, tag: str, count: int) -> set[str]:
    """``count`` clients at once; the set of platform manifest digests they ended with."""
    return set(await asyncio.gather(*(rollout_client(base, repo, tag) for _ in range(count))))


def machine_info() -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        except OSError:
            return "missing"
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "loadavg": os.getloadavg(),
        "python": sys.version.split()[0],
        "nginx": first_line(["nginx", "-v"]),
        "curl": first_line(["curl", "--version"]),
        "wrk": first_line(["wrk", "--version"]),
        "registry": first_line(["docker-registry", "--version"]),
        "max_rss_bench_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args], capture_output=True, text=True, cwd=ROOT, check=False
        )
        return done.stdout

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": [line[3:] for line in status.splitlines() if line]}
