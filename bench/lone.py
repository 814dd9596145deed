"""The lone pull (issue #22): one verified client at a time, and what each byte costs the server.

Side by side in one run, each path pulls the big blob alone, ``--repeat`` times, in a rotating order:

- ``nginx``: the run's nginx proxy (the baseline);
- ``gateway``: the gateway as shipped (sharing on, every blob verified);
- ``gateway-unverified``: the same with ``verify_blobs = false`` on the route;
- ``gateway-unshared``: verified, sharing off (``GATEWAY_SHARED_WINDOW_BYTES=0``);
- ``cache``: Debian's ``docker-registry`` (distribution) as a pull-through cache
  (``proxy: remoteurl:``) of the test registry, its storage emptied and the process restarted
  before each pull, so every pull is cold: it fetches, verifies, writes to disk and serves;
- ``nginx-tls`` and ``gateway-tls``: nginx and the gateway in front of a TLS upstream (an nginx with
  a test CA in front of the registry, following its redirect itself), the upstream verified;
- ``floor`` and ``floor-verified``: ``bench/floor_relay.py``, a bare relay on uvloop in front of the
  registry that does only what nginx does (plus, verified, sha256 in the pool as the gateway does it):
  the least a Python relay spends on this machine in this run, so the gateway's own cost above it, and
  whether a target is in reach of any relay in Python here, are read in the same run;
- ``sha256``: no server, ``hashlib.sha256`` over the blob's size in this process (its CPU only).

Per pull: MB/s (curl's) and the server's CPU seconds per GiB (utime+stime of its processes, which
the other work on a shared machine disturbs less than the wall clock). Then 16 concurrent pulls
through ``gateway-unshared`` with its peak RSS, against the aggregate figure's nginx. The targets
of the issue are judged from these (``targets``) and printed by ``print_lone``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import clients, procs
from bench.clients import Target
from bench.servers import LOOPBACK, ROOT, Gateway, NginxProxy, Server, ServerError
from bench.session import GIB, MB, PRIVATE_KEY, Session, rotated
from tests.testbed._util import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"
TLS_NAME = "registry.bench.test"


class PullThroughCache(Server):
    """distribution (``docker-registry``) with ``proxy: remoteurl:``, cold at every ``restart``."""

    name = "cache"

    def __init__(self, workdir: Path, remote_url: str) -> None:
        super().__init__(workdir)
        self.remote_url = remote_url
        self.storage = self.dir / "storage"
        self.conf_path = self.dir / "config.yml"

    def config(self) -> str:
        return f"""\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
http:
  addr: {LOOPBACK}:{self.port}
proxy:
  remoteurl: {self.remote_url}
"""

    def start(self, timeout: float = 20.0) -> PullThroughCache:
        shutil.rmtree(self.storage, ignore_errors=True)
        self.storage.mkdir(parents=True)
        self.port = free_port()
        self.conf_path.write_text(self.config())
        self._spawn([REGISTRY_BIN, "serve", str(self.conf_path)])
        self._wait_ready("/v2/", timeout)
        return self

    def restart(self) -> None:
        self.stop()
        self.start()


class FloorRelay(Server):
    """``bench/floor_relay.py`` in front of the registry, verifying or not."""

    def __init__(self, workdir: Path, registry_url: str, *, verify: bool) -> None:
        self.name = "floor-verified" if verify else "floor"
        super().__init__(workdir)
        self.registry_url = registry_url
        self.verify_blobs = verify

    def start(self, timeout: float = 20.0) -> FloorRelay:
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.floor_relay", "--port", str(self.port), "--upstream", self.registry_url]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._spawn([*argv, "--verify"] if self.verify_blobs else argv, env=env)
        self._wait_ready("/v2/", timeout)
        return self


def _hash_cpu(size: int) -> float:
    """CPU seconds ``hashlib.sha256`` takes over ``size`` bytes fed 1 MiB at a time."""
    block = bytes(1 << 20)
    hasher = hashlib.sha256()
    started = time.process_time()
    left = size
    while left > 0:
        hasher.update(block if left >= len(block) else block[:left])
        left -= len(block)
    return time.process_time() - started


def measure_lone(session: Session, tb: Any) -> None:
    o = session.options
    if session.nginx is None or "nginx" in session.failed:
        session.warn("lone pull: nginx is not running; skipped")
        return
    work = session.workdir / "lone"
    servers: dict[str, Server] = {}
    out: dict[str, Any] = {"runs": {}, "errors": {}}
    session.extra["lone"] = out
    route = {PRIVATE_KEY: "true", **o.route_options}
    registry = tb.hub.registry_url

    def gateway(name: str, upstream: str, env: dict[str, str], options: dict[str, str]) -> None:
        try:
            servers[name] = Gateway(
                work / name,
                upstream,
                workers=o.gateway_workers,
                env={**o.gateway_env, **env},
                command=o.gateway_cmd,
                route_options={**route, **options},
            ).start()
        except (ServerError, OSError) as exc:
            out["errors"][name] = f"did not start: {exc}"

    try:
        gateway("gateway-unverified", registry, {}, {"verify_blobs": "false"})
        gateway("gateway-unshared", registry, {"GATEWAY_SHARED_WINDOW_BYTES": "0"}, {})
        try:
            servers["cache"] = PullThroughCache(work / "cache", registry).start()
        except (ServerError, OSError) as exc:
            out["errors"]["cache"] = f"did not start: {exc}"
        try:
            from tests.nginx_front import make_pki

            pki = make_pki(work / "pki", [TLS_NAME], [LOOPBACK])
            front = NginxProxy(
                work / "tls-upstream", registry, tls=(pki.cert, pki.key), upstream_ca=pki.ca_cert, realm=tb.hub.realm
            )
            servers["tls-upstream"] = front.start()
            servers["nginx-tls"] = NginxProxy(
                work / "nginx-tls", front.url, upstream_ca=pki.ca_cert, upstream_name=TLS_NAME
            ).start()
            gateway("gateway-tls", front.url, {"SSL_CERT_FILE": str(pki.ca_cert)}, {})
        except (ServerError, OSError) as exc:
            out["errors"]["tls"] = f"did not start: {exc}"
        for verify in (False, True):
            try:
                floor = FloorRelay(work / f"floor-{verify}", registry, verify=verify)
                servers[floor.name] = floor.start()
            except (ServerError, OSError) as exc:
                out["errors"][floor.name] = f"did not start: {exc}"
        _pulls(session, servers, out)
        _unshared_streams(session, servers, out)
    finally:
        for server in servers.values():
            server.stop()
    out["sha256_cpu_s_per_gib"] = [_hash_cpu(session.big_size) / (session.big_size / GIB) for _ in range(o.repeat)]
    out["targets"] = targets(session, out)


def _pids(session: Session, servers: dict[str, Server], path: str) -> list[int]:
    if path in ("nginx", "gateway"):
        return session.server_pids(path)
    server = servers[path]
    if isinstance(server, NginxProxy):
        return server.worker_pids()
    return server.pids()


def _pulls(session: Session, servers: dict[str, Server], out: dict[str, Any]) -> None:
    paths = ["nginx", "gateway", *(p for p in servers if p != "tls-upstream")]
    if "gateway" in session.failed:
        paths.remove("gateway")
    for n in range(session.options.repeat):
        for path in rotated(paths, n):
            if path == "cache":
                cache = servers["cache"]
                assert isinstance(cache, PullThroughCache)
                cache.restart()  # cold: nothing stored, nothing in memory
            url = session.targets[path].base_url if path in session.targets else servers[path].url
            # nginx and the floor relay pass the client's token on, as a registry client's proxy does
            auth = session.targets["nginx"].auth if path.startswith(("nginx", "floor")) else None
            target = Target(path, url, auth, follow_redirects=False)
            pids = _pids(session, servers, path)
            before = procs.total_cpu(pids)
            machine = procs.machine_cpu()
            try:
                transfer = clients.download(target, session.big_path, session.big_size)
            except clients.ClientError as exc:
                out["errors"][path] = str(exc)
                session.log(f"ERROR lone pull via {path}: {exc}")
                continue
            cpu = procs.cpu_delta(before, procs.total_cpu(_pids(session, servers, path)))
            busy = procs.machine_cpu()["busy"] - machine["busy"]
            gib = transfer.size / GIB
            # machine: every process's CPU meanwhile (client, servers, registry, CDN, other work):
            # with all of them on these cores, cores / machine CPU per GiB bounds the pull's speed.
            run = {"MBps": transfer.bytes_per_second / MB, "cpu_s_per_gib": cpu / gib, "machine_s_per_gib": busy / gib}
            out["runs"].setdefault(path, []).append(run)
            session.log(f"lone pull via {path}: {run['MBps']:.0f} MB/s, {run['cpu_s_per_gib']:.2f} CPU s/GiB")


def _unshared_streams(session: Session, servers: dict[str, Server], out: dict[str, Any]) -> None:
    server = servers.get("gateway-unshared")
    if server is None:
        return
    streams = session.options.streams
    target = Target("gateway-unshared", server.url, None, follow_redirects=False)
    sampler = procs.RssSampler(server.pids).start()
    before = procs.total_cpu(server.pids())
    try:
        run = clients.parallel_downloads(target, session.big_path, session.big_size, streams)
    except clients.ClientError as exc:
        out["errors"]["unshared-streams"] = str(exc)
        return
    finally:
        peaks = sampler.stop()
    cpu = procs.cpu_delta(before, procs.total_cpu(server.pids()))
    out["unshared_streams"] = {
        "streams": streams,
        "MBps": run.total_bytes / run.wall_seconds / MB,
        "cpu_s_per_gib": cpu / (run.total_bytes / GIB),
        "rss_peak_mib": peaks.max_process_kib / 1024,
    }
    session.log(f"{streams} unshared verified streams: {out['unshared_streams']}")


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def medians(out: dict[str, Any], key: str) -> dict[str, float | None]:
    return {path: _median([r[key] for r in runs]) for path, runs in out.get("runs", {}).items()}


def targets(session: Session, out: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value (None: not measured)."""
    speed, cpu = medians(out, "MBps"), medians(out, "cpu_s_per_gib")
    sha = _median(out.get("sha256_cpu_s_per_gib", []))
    f = session.figures

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def by_speed(a: str, b: str) -> float | None:
        return ratio(speed.get(a), speed.get(b))

    floor = None if cpu.get("nginx") is None or sha is None else cpu["nginx"] + sha  # type: ignore[operator]
    unshared = out.get("unshared_streams") or {}
    rows = [
        ("verified lone pull CPU / (nginx CPU + sha256 CPU)", ratio(cpu.get("gateway"), floor), "<=", 1.15),
        ("verified lone pull MB/s vs nginx", by_speed("gateway", "nginx"), ">=", 0.85),
        ("verified lone pull MB/s vs cold pull-through cache", by_speed("gateway", "cache"), ">=", 1.15),
        ("unverified lone pull MB/s vs nginx", by_speed("gateway-unverified", "nginx"), ">=", 1.1),
        (
            f"{unshared.get('streams', 16)} streams, sharing off, verified, vs nginx aggregate",
            ratio(unshared.get("MBps"), f.aggregate.median("nginx")),
            ">=",
            0.6,
        ),
        ("  its peak RSS, MiB", unshared.get("rss_peak_mib"), "<", 100.0),
        ("N pulls of one blob vs nginx aggregate", f.aggregate.ratio("gateway", "nginx"), ">=", 2.0),
        ("  its peak RSS, MiB", f.rss_max.median("gateway"), "<", 200.0),
        ("manifest req/s vs nginx", f.rps.ratio("gateway", "nginx"), ">=", 0.9),
        ("floor: bare relay MB/s vs nginx", by_speed("floor", "nginx"), ">=", None),
        ("floor: bare verifying relay MB/s vs nginx", by_speed("floor-verified", "nginx"), ">=", None),
        ("  bare verifying relay CPU / (nginx CPU + sha256 CPU)", ratio(cpu.get("floor-verified"), floor), "<=", None),
        ("gateway unverified vs bare relay, MB/s", by_speed("gateway-unverified", "floor"), ">=", None),
        ("gateway verified vs bare verifying relay, MB/s", by_speed("gateway", "floor-verified"), ">=", None),
        ("TLS upstream: verified lone pull MB/s vs nginx", by_speed("gateway-tls", "nginx-tls"), ">=", None),
    ]
    result = []
    for name, value, op, limit in rows:
        met = (
            None
            if value is None or limit is None
            else (value <= limit if op == "<=" else value < limit if op == "<" else value >= limit)
        )
        result.append({"target": name, "value": value, "op": op, "limit": limit, "met": met})
    return result


def print_lone(lone: dict[str, Any] | None) -> None:
    if not lone:
        return
    speed, cpu = medians(lone, "MBps"), medians(lone, "cpu_s_per_gib")
    machine = {p: _median([r.get("machine_s_per_gib", 0.0) for r in runs]) for p, runs in lone["runs"].items()}
    nginx = speed.get("nginx")
    print("\nlone pull of the big blob (median of repeats; CPU of the server's processes; machine: all CPU)")
    print(f"  {'path':<20} {'MB/s':>8} {'vs nginx':>9} {'CPU s/GiB':>10} {'machine s/GiB':>14}")
    for path in speed:
        mbps = speed[path]
        vs = f"{mbps / nginx:.2f}x" if mbps is not None and nginx else "-"
        print(f"  {path:<20} {mbps or 0:>8.0f} {vs:>9} {cpu[path] or 0:>10.2f} {machine.get(path) or 0:>14.2f}")
    sha = _median(lone.get("sha256_cpu_s_per_gib", []))
    if sha is not None:
        print(f"  {'sha256 (hashlib)':<20} {'':>8} {'':>9} {sha:>10.2f}")
    for path, error in lone.get("errors", {}).items():
        print(f"  {path}: FAILED {error.splitlines()[0]}")
    print("\nissue #22 targets")
    for t in lone.get("targets", []):
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        limit = "(reported)" if t["limit"] is None else f"{t['op']} {t['limit']:g}"
        state = {True: "met", False: "NOT MET", None: "-"}[t["met"]]
        print(f"  {t['target']:<62} {value:>7} {limit:>11}  {state}")
