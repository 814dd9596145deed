"""Where a result came from: the machine (CPUs, versions of the tools) and the state of the git tree."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.servers import ROOT

GIB = float(1 << 30)


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
