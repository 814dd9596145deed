"""The figures one run fills: which there are, in the table's order, and their labels for the run's options."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.options import Options
from bench.report import Figure


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

    def rename(self, o: Options) -> None:
        """Labels that name the run's sizes (streams, connections, ...), and which paths a figure does not apply to."""
        f = self
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
