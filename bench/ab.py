"""Lone pulls through several gateway builds or settings, side by side in one run (issue #22).

``python -m bench.ab CONFIGS.json``: CONFIGS maps a name to ``{"cmd": ..., "env": {...}, "route": {...}}``
(``cmd`` as ``--gateway-cmd``, e.g. ``env PYTHONPATH=/tmp/before {python} -m gateway``). It starts the
test bed once and every gateway, pulls the big blob through each in a rotating order (``REPEAT``
times, env), and prints per pull and as medians: curl's MB/s, the gateway's CPU seconds per GiB and
its minor page faults per GiB (``/proc/<pid>/stat``). ``STREAMS=16`` adds N concurrent pulls per
gateway with their peak RSS; ``MIB`` sets the blob's size (default 512).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bench import clients, procs
from bench.clients import Target
from bench.servers import Gateway
from bench.session import PRIVATE_KEY

GIB = 1 << 30


def minor_faults(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[7])  # minflt, field 10 of proc(5)
    return total


def main(configs: dict[str, dict[str, object]]) -> None:
    from tests.testbed.bed import Testbed

    mib, repeat, streams = (int(os.environ.get(k, d)) for k, d in (("MIB", "512"), ("REPEAT", "3"), ("STREAMS", "0")))
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    with Testbed.start(work / "tb", big_blob_mib=mib) as tb:
        digest, size = max(tb.images["bigimage"].blobs.items(), key=lambda item: item[1])
        path = f"/v2/library/bigimage/blobs/{digest}"
        servers = {
            name: Gateway(
                work / name,
                tb.hub.registry_url,
                env=dict(c.get("env", {})),  # type: ignore[call-overload]
                command=c.get("cmd"),  # type: ignore[arg-type]
                route_options={PRIVATE_KEY: "true", **c.get("route", {})},  # type: ignore[dict-item]
            ).start()
            for name, c in configs.items()
        }
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs}
        names = list(configs)
        try:
            for n in range(repeat):
                for name in names[n % len(names) :] + names[: n % len(names)]:
                    server = servers[name]
                    cpu, faults = procs.total_cpu(server.pids()), minor_faults(server.pids())
                    got = clients.download(Target(name, server.url, None, follow_redirects=False), path, size)
                    gib = got.size / GIB
                    spent = procs.cpu_delta(cpu, procs.total_cpu(server.pids())) / gib
                    run = (got.bytes_per_second / 1e6, spent, (minor_faults(server.pids()) - faults) / gib)
                    runs[name].append(run)
                    print(f"{name:28s} {run[0]:7.0f} MB/s {run[1]:5.2f} CPU s/GiB {run[2]:8.0f} faults/GiB", flush=True)
            for name in names if streams else []:
                server = servers[name]
                sampler = procs.RssSampler(server.pids).start()
                cpu = procs.total_cpu(server.pids())
                target = Target(name, server.url, None, follow_redirects=False)
                together = clients.parallel_downloads(target, path, size, streams)
                peak = sampler.stop().max_process_kib / 1024
                spent = procs.cpu_delta(cpu, procs.total_cpu(server.pids())) / (together.total_bytes / GIB)
                speed = together.total_bytes / together.wall_seconds / 1e6
                print(f"{name:28s} {streams} streams {speed:7.0f} MB/s {spent:5.2f} CPU s/GiB peak {peak:.0f} MiB")
        finally:
            for server in servers.values():
                server.stop()
    print("medians:")
    for name, got_runs in runs.items():
        mid = [sorted(r[i] for r in got_runs)[len(got_runs) // 2] for i in range(3)] if got_runs else [0.0] * 3
        print(f"  {name:28s} {mid[0]:7.0f} MB/s {mid[1]:5.2f} CPU s/GiB {mid[2]:8.0f} faults/GiB")


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
