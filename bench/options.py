"""What one benchmark run is asked to do: its options, and the measurements ``--only`` may name."""

from __future__ import annotations

from dataclasses import dataclass

from bench.report import PATHS


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
    #: the workers scenario: a gateway with each of these worker counts (empty: skipped), herds of these sizes,
    #: the windows' budget sized for a pod memory limit of this many MiB
    workers_compare: tuple[int, ...] = ()
    workers_clients: tuple[int, ...] = (8, 16)
    workers_limit_mib: int = 512
    #: run only these measurements (empty: all of them; see MEASUREMENTS)
    only: tuple[str, ...] = ()


#: what ``--only`` may name, in the order a run measures them
MEASUREMENTS = (
    "tokens",
    "verify",
    "ttfb",
    "single",
    "aggregate",
    "manifests",
    "lone",
    "resume",
    "rollout",
    "herd",
    "workers",
)
