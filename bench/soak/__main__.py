"""``python -m bench.soak --minutes N`` (or ``--seconds N``): run the soak, print and write its figures.

Exit status 1 when an invariant fails: a pull that ended cleanly with wrong bytes, a 5xx of the
gateway's own making, RSS at the end above 1.1 x after warm-up, fds not back to their baseline
after the quiet period, more asyncio tasks than at the start (or a stream or shared fetch still
counted in flight), the gateway gone.
``--strict`` adds: a transfer the gateway cut while an upstream was healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.provenance import git_info
from bench.servers import ROOT
from bench.soak import watch
from bench.soak.chaos import Chaos
from bench.soak.pulls import Clients, _repo_path
from bench.soak.stage import IMAGES, Stage, stage
from bench.soak.tally import Tally
from tests.e2e.clients import Containerd, Skopeo, start_containerd, write_hosts_file

RESULTS = ROOT / "bench" / "results"
RSS_GROWTH = 1.1
FD_SLACK = 2  # fds beyond the baseline tolerated at the end (a log handle reopened, say)
TASKS = "registry_gateway_asyncio_tasks"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the clients pull (default: 1)")
    length.add_argument("--seconds", type=float, help="the same, in seconds")
    parser.add_argument("--warmup", type=float, help="seconds before 'RSS after warm-up' (default: a quarter, <= 60)")
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds of no load before the end figures")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--big-mib", type=int, default=64, help="the big layer (docker.io/library/bigimage)")
    parser.add_argument("--ttl", type=float, default=1.5, help="seconds a CDN URL is good for")
    parser.add_argument("--cdn-mib-s", type=float, default=32.0, help="the CDN's pace, MiB per second")
    parser.add_argument("--token-ttl", type=int, default=15, help="seconds a registry token is good for")
    parser.add_argument("--token-every", type=float, default=60.0, help="seconds between token server restarts")
    parser.add_argument("--period", type=float, default=0.5, help="seconds between two faults")
    parser.add_argument("--curls", type=int, default=2, help="curl clients")
    parser.add_argument("--no-skopeo", action="store_true")
    parser.add_argument("--no-ctr", action="store_true")
    parser.add_argument("--strict", action="store_true", help="also fail on a cut with a healthy upstream")
    parser.add_argument("--out", type=Path, help="the JSON file (default: bench/results/soak-<time>.json)")
    parser.add_argument("--workdir", type=Path, help="keep the bed, logs and client dirs here")
    args = parser.parse_args(argv)
    args.duration = args.seconds if args.seconds is not None else 60 * (args.minutes or 1.0)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    return args


def prime(st: Stage) -> None:
    """Every blob once, no faults: pools and caches as a running gateway has them, for the baseline."""
    with httpx.Client(timeout=120, trust_env=False, follow_redirects=True) as client:
        for route, names in IMAGES.items():
            for name in names:
                image = st.bed.images[name]
                for digest in image.blobs:
                    client.get(f"{st.gateway.url}/v2/{_repo_path(route, image)}/blobs/{digest}").raise_for_status()


def invariants(fig: dict[str, Any], strict: bool) -> list[str]:
    failed = []
    if fig["wrong_bytes_ended_cleanly"]:
        failed.append(f"{fig['wrong_bytes_ended_cleanly']} pulls ended cleanly with wrong bytes")
    if fig["gateway_5xx_of_its_own"]:
        failed.append(f"{fig['gateway_5xx_of_its_own']} 5xx of the gateway's own making")
    rss = fig["rss_kib"]
    if rss["end"] > RSS_GROWTH * rss["after_warmup"]:
        failed.append(f"RSS at the end {rss['end']} KiB > {RSS_GROWTH} x after warm-up {rss['after_warmup']} KiB")
    start, end = fig["process"]["start"], fig["process"]["end"]
    if end["other_fds"] > start["other_fds"] + FD_SLACK or end["client_sockets"] > start["client_sockets"]:
        failed.append(f"fds not back to the baseline: {start} at the start, {end} at the end")
    if fig["gauges_end"][TASKS] > fig["gauges_start"][TASKS]:
        tasks = fig["gauges_start"][TASKS], fig["gauges_end"][TASKS]
        failed.append(f"asyncio tasks {tasks[0]:.0f} at the start, {tasks[1]:.0f} at the end")
    if any(value for name, value in fig["gauges_end"].items() if name.endswith("in_flight")):
        failed.append(f"still in flight at the end: {fig['gauges_end']}")
    if not fig["gateway_alive"]:
        failed.append("the gateway process is gone")
    if fig["pulls"] == 0 or fig["intact"] == 0:
        failed.append("no pull was intact: the harness did not work")
    if strict and fig["aborted_with_a_healthy_upstream"]:
        failed.append(f"{fig['aborted_with_a_healthy_upstream']} transfers cut while an upstream was healthy")
    return failed


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        st = stack.enter_context(
            stage(
                workdir,
                big_mib=args.big_mib,
                ttl=args.ttl,
                cdn_rate=args.cdn_mib_s * (1 << 20),
                token_ttl=args.token_ttl,
                idle_timeout=3.0,
            )
        )
        containerd: Containerd | None = None
        skopeo: Skopeo | None = None
        if not args.no_ctr and shutil.which("ctr") and shutil.which("containerd"):
            containerd = stack.enter_context(start_containerd(workdir / "containerd"))
        if not args.no_skopeo and shutil.which("skopeo"):
            (workdir / "skopeo").mkdir(parents=True, exist_ok=True)
            skopeo = Skopeo(workdir / "skopeo", write_hosts_file(workdir / "hosts"))
        pid, port = st.gateway.proc.pid, st.gateway.port
        prime(st)
        time.sleep(2)
        start = watch.snapshot(pid, port)
        gauges_start = watch.gauges(st.gateway.url)
        watcher = watch.Watcher(pid).start()
        chaos = Chaos(st, args.seed, period=args.period, token_every=args.token_every).start()
        clients = Clients(st, args.seed, skopeo, containerd, curls=args.curls).start()
        began = time.monotonic()
        time.sleep(args.warmup)
        warm = watch.snapshot(pid, port)
        time.sleep(max(0.0, args.duration - (time.monotonic() - began)))
        chaos.stop()
        clients.stop()
        loaded = time.monotonic() - began
        time.sleep(args.quiet)
        end = watch.snapshot(pid, port)
        gauges_end = watch.gauges(st.gateway.url)
        watcher.stop()
        alive = st.gateway.proc.poll() is None
        fig = Tally(st).figures(clients.pulls)
        fig |= {
            "seconds_loaded": round(loaded, 1),
            "rss_kib": {
                "start": start["rss_kib"],
                "after_warmup": warm["rss_kib"],
                "peak": max(watcher.peak_rss_kib, warm["rss_kib"], end["rss_kib"]),
                "end": end["rss_kib"],
            },
            "process": {"start": start, "after_warmup": warm, "end": end},
            "gauges_start": gauges_start,
            "gauges_end": gauges_end,
            "gateway_alive": alive,
            "faults_armed": dict(sorted(chaos.armed.items())),
            "token_outages": len(st.token_outages),
            "clients": {"skopeo": skopeo is not None, "ctr": containerd is not None, "curl": args.curls},
            "failed_samples": [p.to_json() for p in clients.pulls if p.outcome in ("failed", "wrong_clean")][:15],
        }
        (workdir / "pulls.json").write_text(json.dumps([p.to_json() for p in clients.pulls], indent=1))
        return fig


def summary(fig: dict[str, Any]) -> str:
    rss = fig["rss_kib"]
    start, end = fig["process"]["start"], fig["process"]["end"]
    gets = fig["upstream_gets_per_blob"]
    rows = [
        ("pulls", fig["pulls"]),
        ("intact", fig["intact"]),
        ("failed (client saw an error)", fig["failed"]),
        ("aborted on purpose (curl hung up)", fig["aborted_on_purpose"]),
        ("aborted by the gateway", fig["aborted_by_gateway"]),
        ("  of which with a healthy upstream", fig["aborted_with_a_healthy_upstream"]),
        ("wrong bytes ended cleanly (must be 0)", fig["wrong_bytes_ended_cleanly"]),
        (
            "gateway 5xx / relayed from an upstream / of its own making (must be 0)",
            f"{fig['gateway_5xx']} / {fig['gateway_5xx_relayed_from_an_upstream']} / {fig['gateway_5xx_of_its_own']}",
        ),
        (
            "RSS MiB after warm-up / peak / end",
            " / ".join(f"{rss[k] / 1024:.1f}" for k in ("after_warmup", "peak", "end")),
        ),
        (
            "fds start / end (other, client, upstream pool)",
            f"{start['fds']} ({start['other_fds']}, {start['client_sockets']}, {start['upstream_sockets']}) / "
            f"{end['fds']} ({end['other_fds']}, {end['client_sockets']}, {end['upstream_sockets']})",
        ),
        ("threads start / end", f"{start['threads']} / {end['threads']}"),
        ("asyncio tasks start / end", f"{fig['gauges_start'][TASKS]:.0f} / {fig['gauges_end'][TASKS]:.0f}"),
        (
            "streams / shared fetches in flight at the end",
            f"{fig['gauges_end']['registry_gateway_streams_in_flight']:.0f} / "
            f"{fig['gauges_end']['registry_gateway_shared_fetches_in_flight']:.0f}",
        ),
        ("upstream GETs per client blob GET", f"{gets['total_upstream_gets']} / {gets['total_client_gets']}"),
        ("faults armed / token server restarts", f"{sum(fig['faults_armed'].values())} / {fig['token_outages']}"),
        (
            "CDN URLs expired mid-body / refused as expired",
            f"{fig['edge_cut_by_expiry']} / {fig['edge_refused_expired']}",
        ),
        ("resumes", fig["resumes"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        fig = run(args, workdir)
    failed = invariants(fig, args.strict)
    result = {
        "kind": "soak",
        "time": stamp,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "git": git_info(),
        "figures": fig,
        "invariants_failed": failed,
    }
    out = args.out or RESULTS / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(summary(fig))
    print(f"written: {out}")
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
