"""``python -m bench``: the gateway against direct registry access and an nginx proxy, on the real test bed.

Starts the test bed (distribution registry with token auth, 307 to an nginx CDN), an nginx reverse proxy that
follows the redirect itself, and the gateway; measures blob throughput (1 and N streams), server CPU per GiB,
the gateway's peak RSS, manifest requests per second and latency (wrk), upstream token requests, time to first
byte and correctness (sha256), and scenarios (resumes, a rollout's pulls, a herd of clients pulling one blob over
a capped link, 1 worker against 2); writes bench/results/<timestamp>.json and prints a table. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import clients, procs
from bench.lone import print_lone
from bench.options import MEASUREMENTS, Options
from bench.provenance import git_info, machine_info
from bench.report import PATHS, Figure, markdown_table, table
from bench.run import Run
from bench.servers import ROOT
from bench.workers import print_workers

RESULTS = ROOT / "bench" / "results"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return tuple(value for value in values if value > 0)


def _names(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {', '.join(choices)})")
        return names

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 MiB blob, 1 repeat, 3 s load, small herds (about a minute and a half)",
    )
    p.add_argument("--repeat", type=int, help="repeats of each measurement (default 3; --quick: 1)")
    p.add_argument("--blob-mib", type=int, help="size of the big blob in MiB (default 512; --quick: 64)")
    p.add_argument("--streams", type=int, default=16, help="concurrent pulls of the big blob (default 16)")
    p.add_argument("--concurrency", type=int, default=64, help="wrk connections for manifests (default 64)")
    p.add_argument("--duration", type=float, help="seconds of each manifest load run (default 10; --quick: 3)")
    p.add_argument("--latency-duration", type=float, help="seconds of each c=1 latency run (default 5; --quick: 2)")
    p.add_argument("--warmup", type=float, help="seconds of manifest warm-up per path (default 3; --quick: 1)")
    p.add_argument("--ttfb-samples", type=int, help="time-to-first-byte requests per path (default 15; --quick: 5)")
    p.add_argument("--token-requests", type=int, default=1000, help="manifest GETs for the token count")
    p.add_argument(
        "--resume-every-mib",
        type=int,
        help="the resume scenario: the big blob through fault fronts that reset every N MiB, against the same "
        "path clean (default 100; --quick: 16; 0 skips it)",
    )
    p.add_argument(
        "--rollout-clients",
        type=int,
        default=100,
        help="the rollout scenario: N containerd-style clients pull one tag at once through a gateway in front of "
        "a hub front that counts pulls like Docker Hub; counted manifest GETs at the hub and the wall time "
        "(default 100, --quick too: it takes seconds; 0 skips it)",
    )
    p.add_argument(
        "--herd-clients",
        type=_int_list,
        metavar="N,N",
        help="the herd scenario: herds of N clients pull the big blob at once over one capped link, via direct, "
        "nginx and the gateway (default 16,32; --quick: 4,8; 0 skips it). Paths that share nothing need "
        "N x blob / link each: 16,32 with 512 MiB at 100 MB/s adds about 10 minutes (--herd-paths shortens it)",
    )
    p.add_argument(
        "--herd-link-mbps",
        type=float,
        default=100.0,
        help="the herd scenario's link: all its connections together get this many MB/s (10^6 B/s; default 100)",
    )
    p.add_argument(
        "--herd-paths",
        type=_names(PATHS),
        default=PATHS,
        metavar="PATH,PATH",
        help="the herd scenario's paths (default direct,nginx,gateway)",
    )
    p.add_argument(
        "--herd-spread",
        type=float,
        help="one more herd (the largest) with its starts spread evenly over this many seconds "
        "(default 10; --quick: 1.25; 0 skips it)",
    )
    p.add_argument(
        "--herd-spread-paths",
        type=_names(PATHS),
        default=("gateway",),
        metavar="PATH,PATH",
        help="paths of the spread herd (default gateway: the others share nothing, spread or not)",
    )
    p.add_argument(
        "--herd-client-nice",
        type=int,
        default=10,
        help="niceness of the herd's clients (curl | openssl), so they yield the cores to the servers (default 10)",
    )
    p.add_argument(
        "--workers-compare",
        type=_int_list,
        metavar="W,W",
        help="the workers scenario: a fresh gateway with each of these worker counts (one process tree), herds of "
        "--workers-clients pull the big blob at once over the herd's link; upstream GETs, time, peak RSS of the "
        "tree (default: 1,2 with --only workers, else skipped; about 5 minutes)",
    )
    p.add_argument(
        "--workers-clients",
        type=_int_list,
        default=(8, 16),
        metavar="N,N",
        help="the workers scenario's herd sizes (default 8,16)",
    )
    p.add_argument(
        "--workers-limit-mib",
        type=int,
        default=512,
        help="the workers scenario sizes each gateway's windows as under this pod memory limit (default 512, "
        "the shipped pod's)",
    )
    p.add_argument(
        "--only",
        type=_names(MEASUREMENTS),
        default=(),
        metavar="NAME,NAME",
        help=f"run only these measurements ({', '.join(MEASUREMENTS)}); e.g. --only herd",
    )
    p.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "hey"],
        default="auto",
        help="manifest load: wrk; hey (Go) for every path when wrk cannot parse a path's answers (default auto)",
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: leave the cores to servers)")
    p.add_argument("--gateway-workers", type=int, help="gateway --workers (default: the gateway's own default)")
    p.add_argument(
        "--gateway-env",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="environment variable for the gateway (repeatable)",
    )
    p.add_argument(
        "--gateway-cmd",
        help="command instead of 'python -m gateway' (placeholders {routes} {host} {port} {workers} {python}; "
        "without {port} the usual --routes/--host/--port options are appended)",
    )
    p.add_argument(
        "--route-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=TOML",
        help="another key of the generated route, its value in TOML syntax (repeatable)",
    )
    p.add_argument("--workdir", type=Path, help="where the test bed and servers live (default: a temporary dir)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the workdir (logs, configs) after the run")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--show", type=Path, metavar="RESULT.json", help="print the summary of an earlier result and exit")
    return p


def options_from(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)

    def pick(value: Any, default: Any, quick_default: Any) -> Any:
        return value if value is not None else (quick_default if quick else default)

    return Options(
        blob_mib=pick(args.blob_mib, 512, 64),
        repeat=max(1, pick(args.repeat, 3, 1)),
        streams=args.streams,
        concurrency=args.concurrency,
        duration=pick(args.duration, 10.0, 3.0),
        latency_duration=pick(args.latency_duration, 5.0, 2.0),
        warmup=pick(args.warmup, 3.0, 1.0),
        ttfb_samples=max(1, pick(args.ttfb_samples, 15, 5)),
        token_requests=args.token_requests,
        wrk_threads=args.wrk_threads,
        gateway_workers=args.gateway_workers,
        gateway_env=dict(args.gateway_env),
        gateway_cmd=args.gateway_cmd,
        route_options=dict(args.route_option),
        load_generator=args.load_generator,
        quick=quick,
        resume_every_mib=max(0, pick(args.resume_every_mib, 100, 16)),
        rollout_clients=max(0, args.rollout_clients),
        herd_clients=pick(args.herd_clients, (16, 32), (4, 8)),
        herd_link_rate=args.herd_link_mbps * 1e6,
        herd_paths=args.herd_paths,
        herd_spread=max(0.0, pick(args.herd_spread, 10.0, 1.25)),
        herd_spread_paths=args.herd_spread_paths,
        herd_client_nice=args.herd_client_nice,
        # about 5 minutes: only when asked for (--only workers, or the worker counts)
        workers_compare=args.workers_compare
        if args.workers_compare is not None
        else (1, 2)
        if "workers" in args.only
        else (),
        workers_clients=args.workers_clients,
        workers_limit_mib=args.workers_limit_mib,
        only=args.only,
    )


def print_summary(result: dict[str, Any], keys: list[str] | None = None, *, markdown: bool = False) -> None:
    """The table and the notes below it, from a result document (a fresh one, or one read back with --show)."""
    figures = [Figure.from_json(key, doc) for key, doc in result["figures"].items()]
    if keys is not None:
        figures = sorted(figures, key=lambda figure: keys.index(figure.key) if figure.key in keys else len(keys))
    o = result["options"]
    started = dt.datetime.fromisoformat(result["started"])
    print()
    print(
        f"registry-gateway benchmark, {started:%Y-%m-%d %H:%M} UTC, {result['machine']['cpus']} CPUs, "
        f"{o['blob_mib']} MiB blob, {o['repeat']} repeat(s): median [min-max]"
    )
    details = result.get("details", {})
    gateway_desc = " ".join(details.get("gateway_argv", [])[1:]) or "-"
    if o.get("gateway_env"):
        gateway_desc = " ".join(f"{k}={v}" for k, v in o["gateway_env"].items()) + " " + gateway_desc
    source = details.get("gateway_source", {})
    commit = result.get("git", {}).get("commit", "")[:7]
    dirty = [f for f in result.get("git", {}).get("dirty", []) if f.startswith("gateway/")]
    state = f"commit {commit}" + (f" + uncommitted changes to {len(dirty)} gateway file(s)" if dirty else "")
    print(f"gateway: {gateway_desc}")
    print(f"gateway code: {state}; source sha256 {source.get('sha256', '?')}")
    print()
    print(markdown_table(figures) if markdown else table(figures))
    added = result["added_latency_c1"]
    if added["p50_ms_vs_direct"] is not None:
        line = (
            f"gateway adds to a manifest GET (c=1): p50 {added['p50_ms_vs_direct']:+.2f} ms, "
            f"p99 {added['p99_ms_vs_direct']:+.2f} ms over direct"
        )
        if added["p50_ms_vs_nginx"] is not None:
            line += f"; p50 {added['p50_ms_vs_nginx']:+.2f} ms, p99 {added['p99_ms_vs_nginx']:+.2f} ms over nginx"
        print("\n" + line)
    rollout = details.get("rollout_scenario")
    if rollout and rollout.get("runs"):
        first = rollout["runs"][0]
        print(
            f"rollout of {rollout['repository']}:{rollout['tag']} to {first['clients']} containerd-style clients, "
            f"at the hub per run: {', '.join(str(r['counted_gets']) for r in rollout['runs'])} counted GETs, "
            f"{', '.join(str(r['heads']) for r in rollout['runs'])} HEADs (target: at most 2 GETs per tag)"
        )
    print_herd(details.get("herd_scenario"))
    print_workers(details.get("workers_scenario"))
    print_lone(details.get("lone"))
    checks = result.get("checks", {})
    sha = ", ".join(f"{path} {'ok' if check.get('ok') else 'FAILED'}" for path, check in checks.items())
    print(f"sha256 of a whole blob download and manifest digest: {sha or '-'}")
    generator = details.get("load_generator")
    if generator and generator != "wrk":
        print(f"manifest load generator: {generator}")
    machine = result["machine"]
    if machine.get("busy_fraction") is not None:
        print(
            f"machine: load {machine['load_before'][0]:.1f} before, {machine['load_after'][0]:.1f} after; "
            f"CPU busy {machine['busy_fraction']:.0%} of the run, steal {machine['steal_fraction']:.0%}"
        )
    for warning in result.get("warnings", []):
        print(f"\nWARNING: {warning}")
    for path, reason in result.get("failed_paths", {}).items():
        print(f"\n{path.upper()} FAILED: {reason}")
    errors = result.get("errors", [])
    if errors:
        print(f"\n{len(errors)} measurement(s) failed:")
        for error in errors:
            print(f"  {error['measurement']} via {error['path']}: {error['error'].splitlines()[0]}")
    if result.get("fatal"):
        print(f"\nFATAL: {result['fatal']}")


def print_herd(herd: dict[str, Any] | None) -> None:
    """The herd scenario's notes: the link, every herd's check of its clients' sha256, the targets."""
    if not herd or not herd.get("runs"):
        return
    runs = herd["runs"]
    print(
        f"\nherd: {', '.join(map(str, herd['clients']))} clients pull the {herd['blob_bytes'] / (1 << 20):.0f} MiB "
        f"blob over one {herd['link_bytes_per_second'] / 1e6:g} MB/s link ({herd['client']}, nice "
        f"{herd['client_nice']}), {herd['blob_bytes'] / herd['link_bytes_per_second']:.2f} s per blob at the "
        "link's rate; upstream = body bytes the link sent, as a multiple of the blob"
    )
    bad = [run for run in runs if run.get("failed_clients")]
    checked = sum(run["clients"] for run in runs)
    if bad:
        for run in bad:
            print(
                f"!!! HERD FAILED: {run['failed_clients']} of {run['clients']} clients via {run['path']} "
                f"({run['kind']}) got no or WRONG bytes (sha256 != digest)"
            )
    else:
        print(f"sha256 of every herd client ({checked} downloads): ok")
    for target in herd.get("targets", []):
        value = target["gateway"]
        state = "not measured" if target["met"] is None else ("met" if target["met"] else "MISSED")
        shown = "-" if value is None else f"{value:.2f}"
        print(f"  target: gateway {target['target']} {shown} ({target['op']} {target['limit']:g}): {state}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.show is not None:
        print_summary(json.loads(args.show.read_text()), markdown=args.markdown)
        return 0
    options = options_from(args)
    clients.require_tools(["curl", "wrk", "nginx", "docker-registry", "skopeo"])
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run = Run(options, workdir)
    git = git_info()  # the state the gateway starts from (others may change the tree during the run)
    machine_before = procs.machine_cpu()
    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        run.warn(f"the machine is already busy (load average {load_before[0]:.1f}): expect noisy figures")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through the test bed and the servers, which stop what they started

    signal.signal(signal.SIGTERM, on_sigterm)
    fatal: str | None = None
    try:
        run.execute()
    except KeyboardInterrupt:
        fatal = "interrupted"
    except Exception as exc:  # the test bed itself failed: still write what we have
        fatal = f"{type(exc).__name__}: {exc}"
        run.log(f"FATAL: {fatal}")
    seconds = time.monotonic() - started
    machine_after = procs.machine_cpu()
    wall_cpu = machine_after["total"] - machine_before["total"]
    machine = {
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "busy_fraction": round((machine_after["busy"] - machine_before["busy"]) / wall_cpu, 3) if wall_cpu else None,
        "steal_fraction": round((machine_after["steal"] - machine_before["steal"]) / wall_cpu, 3) if wall_cpu else None,
    }

    figures = run.figures.ordered()
    result: dict[str, Any] = {
        "schema": 1,
        "started": started_at.isoformat(timespec="seconds"),
        "runtime_seconds": round(seconds, 1),
        "command": shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]),
        "options": {**options.__dict__},
        "machine": {**machine_info(), **machine},
        "git": git,
        "ok": fatal is None and not run.errors and not run.failed,
        "fatal": fatal,
        "failed_paths": run.failed,
        "errors": run.errors,
        "warnings": run.warnings,
        "checks": run.checks,
        "figures": {figure.key: figure.to_json() for figure in figures},
        "added_latency_c1": run.added_latency(),
        "details": run.extra,
        "workdir": str(workdir) if args.keep_workdir else None,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / (started_at.strftime("%Y%m%dT%H%M%SZ") + ".json")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)

    print_summary(result, [figure.key for figure in figures], markdown=args.markdown)
    print(f"\nresult: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({seconds:.0f} s)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
