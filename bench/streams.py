"""The blob measurements: correctness (manifest digest, sha256 of a whole blob), time to first byte, 1 stream
and N streams at once (with the servers' CPU and peak RSS)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from bench import clients, procs
from bench.clients import Target
from bench.session import GIB, MB, Session, rotated

#: response headers that must not appear twice (RFC 9110 5.3: only list-valued fields may repeat)
SINGLE_HEADERS = frozenset({"content-length", "content-type", "docker-content-digest", "etag", "date", "location"})


def verify(session: Session) -> None:
    """Correctness: the manifest's digest, and sha256 of one whole big blob download, per path."""
    for path in session.live_paths():
        target = session.targets[path]
        session.log(f"verify {path}: manifest digest and sha256 of the {session.options.blob_mib} MiB blob")

        def check(target: Target = target) -> dict[str, Any]:
            response = clients.manifest_get(target, session.manifest_path)
            body_digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
            manifest_ok = (
                response.status_code == 200
                and body_digest == session.manifest_digest
                and response.headers.get("docker-content-digest") == session.manifest_digest
            )
            if not manifest_ok:
                raise clients.ClientError(
                    f"manifest: HTTP {response.status_code}, body {body_digest}, "
                    f"header {response.headers.get('docker-content-digest')}, want {session.manifest_digest}"
                )
            started = time.perf_counter()
            digest, size = clients.blob_sha256(target, session.big_path)
            seconds = time.perf_counter() - started
            if digest != session.big_digest or size != session.big_size:
                raise clients.ClientError(f"blob: got {digest} ({size} bytes), want {session.big_digest}")
            counts = clients.response_header_counts(target, session.manifest_path)
            repeated = {name: n for name, n in counts.items() if n > 1 and name in SINGLE_HEADERS}
            if repeated:
                listed = ", ".join(f"{name} x{n}" for name, n in repeated.items())
                session.warn(
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

        result = session.attempt("verify", path, check, [])
        session.checks[path] = {"ok": result is not None, **(result or {})}
        if result is None:
            session.fail_path(path, f"{path} returned wrong or no data: {session.errors[-1]['error']}")


def measure_ttfb(session: Session) -> None:
    o = session.options
    session.log(f"time to first byte: {o.ttfb_samples} requests of a {session.small_size}-byte blob per path")
    for n in range(o.ttfb_samples):
        for path in rotated(session.live_paths(), n):
            target = session.targets[path]

            def one(target: Target = target) -> None:
                transfer = clients.download(target, session.small_path, session.small_size)
                session.figures.ttfb_small.add(target.name, transfer.ttfb * 1000)

            session.attempt("ttfb", path, one, [session.figures.ttfb_small])


def measure_single_stream(session: Session) -> None:
    o = session.options
    for n in range(o.repeat):
        for path in rotated(session.live_paths(), n):
            target = session.targets[path]

            def one(target: Target = target) -> None:
                transfer = clients.download(target, session.big_path, session.big_size)
                session.figures.single.add(target.name, transfer.bytes_per_second / MB)
                session.figures.ttfb_big.add(target.name, transfer.ttfb * 1000)
                session.log(f"1 stream via {target.name}: {transfer.bytes_per_second / MB:.0f} MB/s")

            session.attempt("single stream", path, one, [session.figures.single, session.figures.ttfb_big])


def measure_aggregate(session: Session) -> None:
    o = session.options
    f = session.figures
    for path in ("nginx", "gateway"):
        pids = session.server_pids(path)
        if pids:
            session.extra.setdefault("rss_idle_kib", {})[path] = {
                pid: procs.memory_kib(pid).get("VmRSS") for pid in pids
            }
    for n in range(o.repeat):
        for path in rotated(session.live_paths(), n):
            target = session.targets[path]

            def one(target: Target = target, path: str = path) -> None:
                machine_before = procs.machine_cpu()
                server_before = procs.total_cpu(session.server_pids(path))
                upstream_before = procs.total_cpu(session.upstream_pids)
                sampler = procs.RssSampler(lambda: session.server_pids(path)).start() if path != "direct" else None
                try:
                    run = clients.parallel_downloads(target, session.big_path, session.big_size, o.streams)
                finally:
                    peaks = sampler.stop() if sampler is not None else None
                server_cpu = procs.cpu_delta(server_before, procs.total_cpu(session.server_pids(path)))
                upstream_cpu = procs.cpu_delta(upstream_before, procs.total_cpu(session.upstream_pids))
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
                        pid: procs.memory_kib(pid).get("VmHWM") for pid in session.server_pids(path)
                    }
                    message += f", {server_cpu / gib:.2f} CPU s/GiB, peak RSS {peaks.max_process_kib / 1024:.0f} MiB"
                session.extra.setdefault("aggregate_runs", {}).setdefault(path, []).append(detail)
                session.log(message)

            session.attempt(
                f"{o.streams} streams", path, one, [f.aggregate, f.cpu, f.rss_max, f.rss_sum, f.upstream_cpu]
            )
