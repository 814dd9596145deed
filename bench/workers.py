"""The workers scenario (issue 21): one gateway process tree with 1 or with 2 workers, a herd of N clients
pulling the big blob at once over one capped link; what each costs upstream, in time and in memory.

Shared fetches are per worker process (``gateway/blobs/herd.py``), and the kernel hands a pod's
connections to its workers as they accept them: with 2 workers a herd splits, and each half opens its
own upstream fetch. ``deploy/`` runs one worker per pod and scales with replicas (``docs/deploy.md``);
this scenario measures that choice against 2 workers per pod, each gateway sized as it would size
itself under the pod's memory limit (``gateway.sizing``: the limit shared by the workers).
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench import clients, procs
from bench.clients import Target
from bench.herd import herd_figure
from bench.servers import Gateway
from bench.session import MB, PRIVATE_KEY, Session, rotated


def measure_workers(session: Session, tb: Any) -> None:
    """For each herd size and worker count: a fresh gateway (``--workers W``, the windows' budget sized for
    the pod limit as ``gateway.sizing`` sizes it), the herd over the same link front as the herd scenario
    (``tests/testbed/linkfront.py``). Per run: upstream GETs of the blob (at the link), upstream bytes /
    blob, the time until every client is done, the peak RSS of the whole process tree (the sum over its
    processes at one instant), how the clients spread over the workers, and every client's sha256."""
    from gateway import sizing
    from tests.testbed.faults import FaultFront
    from tests.testbed.linkfront import LinkFront

    o = session.options
    counts = sorted(set(o.workers_compare))
    sizes = sorted(set(o.workers_clients))
    if not counts or not sizes:
        return
    limit = o.workers_limit_mib << 20
    scenario: dict[str, Any] = {
        "workers": counts,
        "clients": sizes,
        "limit_bytes": limit,
        "budget_per_worker": {w: sizing.budget(None, w, limit).per_worker for w in counts},
        "link_bytes_per_second": o.herd_link_rate,
        "blob_bytes": session.big_size,
        "runs": [],
    }
    session.extra["workers_scenario"] = scenario
    session.log(
        f"workers scenario: {', '.join(map(str, counts))} worker(s), herds of {', '.join(map(str, sizes))}, "
        f"{o.blob_mib} MiB blob over a {o.herd_link_rate / MB:.0f} MB/s link, "
        f"sized for a {o.workers_limit_mib} MiB limit"
    )
    with (
        LinkFront(tb.cdn_url, rate=o.herd_link_rate) as link,
        FaultFront(tb.hub.registry_url, rewrite_location=(tb.cdn_url, link.url)) as hub,
    ):
        runs = 0
        for repeat in range(o.repeat):
            for size in sizes:
                for workers in rotated(counts, repeat + size):
                    runs += 1
                    budget = scenario["budget_per_worker"][workers]
                    gateway = Gateway(
                        session.workdir / f"gateway-workers-{runs}",
                        hub.url,
                        workers=workers,
                        env={"GATEWAY_SHARED_MEMORY_BYTES": str(budget), **o.gateway_env},
                        command=o.gateway_cmd,
                        route_options={PRIVATE_KEY: "true", **o.route_options},
                    )
                    try:
                        session.attempt(
                            f"{size} clients, {workers} worker(s)",
                            "gateway",
                            lambda g=gateway, s=size, w=workers: workers_run(session, link, hub, g, s, w, scenario),
                            list(workers_figures(session, size, workers)),
                        )
                    finally:
                        gateway.stop()


def workers_figures(session: Session, size: int, workers: int) -> tuple[Any, Any, Any]:
    what = f"{size} clients, {workers} worker(s)"
    return (
        herd_figure(session, f"workers_{workers}_herd_{size}_gets", f"{what}: upstream GETs", "count", "lower"),
        herd_figure(session, f"workers_{workers}_herd_{size}_seconds", f"{what}: all done", "s", "lower"),
        herd_figure(session, f"workers_{workers}_herd_{size}_rss", f"{what}: peak RSS, tree", "MiB", "lower"),
    )


def workers_run(
    session: Session, link: Any, hub: Any, gateway: Gateway, size: int, workers: int, scenario: dict[str, Any]
) -> None:
    o = session.options
    target = Target("gateway", gateway.start().url, None, follow_redirects=False)
    link.reset()
    hub.clear()
    sampler = procs.RssSampler(gateway.pids).start()
    try:
        run = clients.herd(
            target,
            session.big_path,
            session.big_size,
            size,
            nice=o.herd_client_nice,
            max_seconds=120 + 3 * size * session.big_size / o.herd_link_rate,
        )
    finally:
        peaks = sampler.stop()
    link.wait_idle(10)
    failures = run.failures(session.big_digest)
    # The gateway logs a request's access line just after its answer: wait for all of them.
    deadline = time.monotonic() + 10
    while sum((shares := blob_shares(gateway, session.big_digest))["per_pid"]) < size and time.monotonic() < deadline:
        time.sleep(0.05)
    detail = {
        "workers": workers,
        "clients": size,
        "all_done_seconds": run.wall_seconds,
        "upstream_gets": link.gets_for(session.big_digest),
        "upstream_blob_multiple": link.body_bytes_for(session.big_digest) / session.big_size,
        "rss_peak_tree_kib": peaks.peak_total_kib,
        "rss_peak_kib_per_pid": peaks.per_process_kib,
        "shares": shares["shares"],
        "clients_per_worker": shares["per_pid"],
        "failed_clients": len(failures),
        "gateway_source": gateway.source,
    }
    scenario["runs"].append(detail)
    if failures:
        first = failures[0]
        reason = first.error or f"sha256 {first.digest}, want {session.big_digest}"
        raise clients.ClientError(f"{len(failures)} of {size} clients got no or WRONG bytes (first: {reason})")
    gets, seconds, rss = workers_figures(session, size, workers)
    gets.add("gateway", detail["upstream_gets"])
    seconds.add("gateway", run.wall_seconds)
    rss.add("gateway", peaks.peak_total_kib / 1024)
    session.log(workers_message(detail))


def blob_shares(gateway: Gateway, digest: str) -> dict[str, Any]:
    """From the gateway's access lines for the blob: how many led, joined, detached ..., and clients per worker pid."""
    shares: dict[str, int] = {}
    per_pid: dict[str, int] = {}
    for line in gateway.log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") != "access" or not str(entry.get("path", "")).endswith(f"/blobs/{digest}"):
            continue
        share = str(entry.get("share"))
        shares[share] = shares.get(share, 0) + 1
        per_pid[str(entry.get("pid"))] = per_pid.get(str(entry.get("pid")), 0) + 1
    return {"shares": shares, "per_pid": sorted(per_pid.values(), reverse=True)}


def workers_message(detail: dict[str, Any]) -> str:
    return (
        f"{detail['clients']} clients, {detail['workers']} worker(s): all done in {detail['all_done_seconds']:.2f} s, "
        f"{detail['upstream_gets']} upstream GET(s) ({detail['upstream_blob_multiple']:.2f}x the blob), peak RSS of "
        f"the tree {detail['rss_peak_tree_kib'] / 1024:.0f} MiB, clients per worker {detail['clients_per_worker']}, "
        f"shares {detail['shares']}"
    )


def print_workers(scenario: dict[str, Any] | None) -> None:
    """The workers scenario's runs, one line each (``--show`` prints them from the result file too)."""
    if not scenario or not scenario.get("runs"):
        return
    budgets = ", ".join(f"{w} worker(s) {b / (1 << 20):.0f} MiB" for w, b in scenario["budget_per_worker"].items())
    print(
        f"\nworkers: the {scenario['blob_bytes'] / (1 << 20):.0f} MiB blob over one "
        f"{scenario['link_bytes_per_second'] / 1e6:g} MB/s link; windows' budget per worker for a "
        f"{scenario['limit_bytes'] >> 20} MiB limit: {budgets}"
    )
    for run in scenario["runs"]:
        print("  " + workers_message(run) + (f"; {run['failed_clients']} FAILED" if run["failed_clients"] else ""))
