"""The herd scenario (issue 9): herds of clients GET one big blob at once over one capped link, via direct,
nginx and a fresh gateway per herd; their figures, details and the targets they are checked against."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from bench import clients, procs
from bench.clients import Target
from bench.report import PATHS, Figure
from bench.servers import Gateway, NginxProxy, ServerError
from bench.session import MB, PRIVATE_KEY, Session, rotated

#: runs of one client alone per path: the herd's baseline (short, and noisier than the herds)
HERD_ALONE_REPEATS = 3


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


def measure_herd(session: Session, tb: Any) -> None:
    """Issue 9's herd: N clients GET the same big blob at once over one capped link (a token-bucket
    front in front of the CDN, ``tests/testbed/linkfront.py``, and a fault front in front of the
    registry that points its redirects at the link), via direct, nginx and a fresh gateway per run.
    Per herd: the time until every client is done, the bytes that crossed the link (as a multiple of
    the blob), the proxy's peak RSS, and every client's sha256. Also one client alone (the baseline)
    and one herd whose starts are spread over ``herd_spread`` seconds."""
    from tests.testbed.faults import FaultFront
    from tests.testbed.linkfront import LinkFront

    o = session.options
    sizes = sorted({n for n in o.herd_clients if n > 0})
    if not sizes:
        return
    paths = [p for p in PATHS if p in o.herd_paths]
    scenario: dict[str, Any] = {
        "link_bytes_per_second": o.herd_link_rate,
        "blob_bytes": session.big_size,
        "link_seconds_per_blob": session.big_size / o.herd_link_rate,
        "clients": sizes,
        "paths": paths,
        "spread_seconds": o.herd_spread,
        "spread_paths": [p for p in o.herd_spread_paths if p in paths],
        "client": f"curl | {' '.join(clients.hasher_argv())}",
        "client_nice": o.herd_client_nice,
        "gateway_workers": o.gateway_workers,
        "runs": [],
    }
    session.extra["herd_scenario"] = scenario
    session.log(
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
                nginx = NginxProxy(session.workdir / "nginx-herd", hub.url).start()
            except (ServerError, OSError) as exc:
                session.warn(f"the herd scenario's nginx did not start: {exc}")
                paths.remove("nginx")
        herd = HerdBed(link, hub, nginx, scenario["runs"])
        try:
            for n in range(HERD_ALONE_REPEATS):
                for path in rotated(paths, n):
                    herd_run(session, herd, path, 1)
            for n, size in enumerate(sizes):
                for path in rotated(paths, n):
                    herd_run(session, herd, path, size)
            if o.herd_spread > 0:
                for path in [p for p in o.herd_spread_paths if p in paths]:
                    herd_run(session, herd, path, sizes[-1], spread=o.herd_spread)
        finally:
            if nginx is not None:
                nginx.stop()
    scenario["targets"] = herd_targets(session, sizes[-1])


def herd_run(session: Session, herd: HerdBed, path: str, count: int, *, spread: float = 0.0) -> None:
    """One herd of ``count`` clients via ``path`` (the gateway: a fresh one, upstream the registry's front)."""
    o = session.options
    auth = session.targets["direct"].auth
    gateway: Gateway | None = None
    if path == "gateway":
        herd.gateways += 1
        gateway = Gateway(
            session.workdir / f"gateway-herd-{herd.gateways}",
            herd.hub.url,
            workers=o.gateway_workers,
            env=o.gateway_env,
            command=o.gateway_cmd,
            route_options={PRIVATE_KEY: "true", **o.route_options},
        )
    kind, what, figures = herd_kind(session, count, spread)

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
                session.big_path,
                session.big_size,
                count,
                spread=spread,
                nice=o.herd_client_nice,
                # a herd that shares nothing needs count x the link time; far beyond that it is stuck
                max_seconds=120 + 3 * count * session.big_size / o.herd_link_rate,
            )
        finally:
            peaks = sampler.stop() if sampler is not None else None
        detail = herd_detail(session, herd, path, kind, spread, run, peaks)
        server = procs.cpu_delta(server_before, procs.total_cpu(pids())) if pids() else None
        herd_cpu(detail, server, link_before, herd.link.cpu_seconds())
        if gateway is not None:  # the tree may change during a long run: which code served this herd
            detail["gateway_source"] = gateway.source
        failures = run.failures(session.big_digest)
        if failures:
            first = failures[0]
            reason = first.error or f"sha256 {first.digest}, want {session.big_digest}"
            session.log(f"!!!!!!!! {what} via {path}: {len(failures)} of {count} clients FAILED: {reason}")
            raise clients.ClientError(
                f"{len(failures)} of {count} herd clients got no or WRONG bytes (first: {reason})"
            )
        if not spread and run.start_spread > 1.0:
            session.warn(f"{what} via {path}: the clients started over {run.start_spread:.1f} s, not within 1 s")
        herd_record(herd, path, kind, figures, detail)
        session.log(herd_message(f"{what} via {path}", detail))

    try:
        session.attempt(what, path, one, figures)
    finally:
        if gateway is not None:
            gateway.stop()


def herd_kind(session: Session, count: int, spread: float) -> tuple[str, str, list[Figure]]:
    """A herd's kind (alone, spread, simultaneous), its name and its figures."""
    if count == 1:
        label = f"herd: 1 client alone over the {session.options.herd_link_rate / MB:g} MB/s link"
        return "alone", "1 client alone", [herd_figure(session, "herd_alone_seconds", label, "s", "lower")]
    if spread > 0:
        what = f"herd of {count} spread over {spread:g} s"
        return (
            "spread",
            what,
            [
                herd_figure(session, f"herd_spread_{count}_seconds", f"{what}: all done", "s", "lower"),
                herd_figure(session, f"herd_spread_{count}_upstream", f"{what}: upstream / blob", "x", "lower"),
                herd_figure(session, f"herd_spread_{count}_rss", f"{what}: peak RSS", "MiB", "lower"),
            ],
        )
    what = f"herd of {count}"
    return (
        "simultaneous",
        what,
        [
            herd_figure(session, f"herd_{count}_seconds", f"{what}: time until all done", "s", "lower"),
            herd_figure(session, f"herd_{count}_vs_alone", f"{what}: all done / 1 client alone", "x", "lower"),
            herd_figure(session, f"herd_{count}_upstream", f"{what}: upstream bytes / blob", "x", "lower"),
            herd_figure(session, f"herd_{count}_rss", f"{what}: peak RSS, proxy", "MiB", "lower"),
            # the least the all-done figure could be here: the herd's CPU seconds over the cores
            herd_figure(session, f"herd_{count}_floor_vs_alone", f"{what}: CPU floor / 1 client alone", "x", "lower"),
        ],
    )


def herd_figure(session: Session, key: str, label: str, unit: str, better: str) -> Figure:
    """One of the herd scenario's figures, made on first use (their keys depend on the herd sizes)."""
    figure = session.figures.herd.get(key)
    if figure is None:
        figure = session.figures.herd[key] = Figure(key, label, unit, better, optional=True)
        for path in PATHS:
            if path not in session.options.herd_paths:
                figure.missing[path] = "n/a"
        if unit == "MiB":
            figure.missing["direct"] = "n/a"
    return figure


def herd_detail(
    session: Session,
    herd: HerdBed,
    path: str,
    kind: str,
    spread: float,
    run: clients.HerdRun,
    peaks: procs.RssPeaks | None,
) -> dict[str, Any]:
    """What the JSON keeps of one herd (appended to ``details.herd_scenario.runs`` at once)."""
    settled = herd.link.wait_idle(10)  # the link's counts are final once no answer is on its way
    upstream = herd.link.body_bytes_for(session.big_digest)
    hex_digest = session.big_digest.partition(":")[2]
    failures = run.failures(session.big_digest)
    detail: dict[str, Any] = {
        "path": path,
        "kind": kind,
        "clients": len(run.clients),
        "spread_seconds": spread,
        "all_done_seconds": run.wall_seconds,
        "start_spread_seconds": run.start_spread,
        "upstream_bytes": upstream,
        "upstream_blob_multiple": upstream / session.big_size,
        "upstream_gets": herd.link.gets_for(session.big_digest),
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
                "sha256_ok": c.ok(session.big_digest),
                **({"error": c.error} if c.error else {}),
                **({"digest": c.digest} if c.digest != session.big_digest else {}),
            }
            for c in run.clients
        ],
    }
    herd.runs.append(detail)
    return detail


def herd_cpu(detail: dict[str, Any], server: float | None, link_before: float | None, link_after: float | None) -> None:
    """The herd's CPU seconds, and the least time they need on this machine: the clients, the proxy and
    the link front share its cores, so a herd can finish no sooner than their CPU spread over all of
    them (the clients' hashing is most of it)."""
    detail["server_cpu_seconds"] = server
    if link_before is not None and link_after is not None:
        detail["link_front_cpu_seconds"] = link_after - link_before
    busy = [detail["client_cpu_seconds"], server, detail.get("link_front_cpu_seconds")]
    detail["cpu_floor_seconds"] = sum(v for v in busy if v is not None) / (os.cpu_count() or 1)


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


def herd_targets(session: Session, largest: int) -> list[dict[str, Any]]:
    """Issue 9's targets for the gateway, checked against this run; a warning for each one missed."""
    o = session.options
    herd = session.figures.herd
    note = "" if largest >= 32 else f" (a target set for 32 clients; this run's largest herd is {largest})"

    def median(key: str) -> float | None:
        figure = herd.get(key)
        return figure.median("gateway") if figure is not None else None

    # (what, the gateway's figure, limit, operator, whether the target names 32 clients)
    checks: list[tuple[str, float | None, float, str, bool]] = [
        (f"herd of {largest}: all done / 1 client alone", median(f"herd_{largest}_vs_alone"), 1.5, "<=", True)
    ]
    for size in sorted({n for n in o.herd_clients if n > 0}):
        checks.append((f"herd of {size}: upstream bytes / blob", median(f"herd_{size}_upstream"), 1.25, "<=", False))
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
            session.warn(f"gateway {what}: {value:.2f}, target {op} {limit:g}{note if for_32 else ''}")
    return out
