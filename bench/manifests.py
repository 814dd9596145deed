"""The manifest measurements: upstream token requests per N manifests, and manifest load and latency (wrk or
hey, chosen once for every path)."""

from __future__ import annotations

from typing import Any

from bench import clients
from bench.clients import Target
from bench.report import Figure
from bench.session import Session, rotated


def measure_tokens(session: Session, tb: Any) -> None:
    """Upstream token requests per N manifest GETs through the gateway: first from a fresh gateway, then warm."""
    o = session.options
    for figure, phase in ((session.figures.tokens_cold, "fresh"), (session.figures.tokens_warm, "warm")):

        def count(figure: Figure = figure, phase: str = phase) -> None:
            tb.tokens.reset()
            statuses = clients.count_requests(
                session.targets["gateway"], session.manifest_path, o.token_requests, concurrency=16
            )
            tokens = tb.tokens.count(service=tb.hub.service)
            session.extra.setdefault("token_phases", {})[phase] = {"statuses": statuses, "token_requests": tokens}
            if statuses != {"200": o.token_requests}:
                raise clients.ClientError(f"manifest answers {statuses}")
            figure.add("gateway", tokens * 1000 / o.token_requests)

        session.log(f"token requests per {o.token_requests} manifests via gateway ({phase})")
        session.attempt(f"token count ({phase})", "gateway", count, [figure])


def load(session: Session, target: Target, connections: int, seconds: float) -> clients.LoadRun:
    log = session.workdir / "load.log"
    if session.generator == "hey":
        return clients.hey(target, session.manifest_path, connections=connections, seconds=seconds, log=log)
    threads = session.options.wrk_threads if connections > 1 else 1
    return clients.wrk(
        target, session.manifest_path, connections=connections, seconds=seconds, threads=threads, log=log
    )


def choose_generator(session: Session) -> None:
    """auto: wrk, unless wrk's parser refuses some path's answers; then hey for every path (same tool for all)."""
    if session.generator != "auto":
        return
    session.generator = "wrk"
    refused = []
    for path in session.live_paths():

        def probe_path(target: Target = session.targets[path]) -> clients.LoadRun:
            return load(session, target, 1, 1)

        probe = session.attempt("wrk probe", path, probe_path)
        if probe is not None and probe.requests == 0 and probe.errors["read"] > 0:
            refused.append(path)
    if refused:
        clients.require_tools(["hey"])
        session.generator = "hey"
        session.warn(
            f"wrk could not parse the answers of {', '.join(refused)} (read errors, no complete response); "
            "manifest load runs use hey (Go net/http) for every path instead"
        )


def measure_manifests(session: Session) -> None:
    o = session.options
    f = session.figures
    choose_generator(session)
    session.extra["load_generator"] = session.generator
    for path in session.live_paths():
        session.log(f"manifest warm-up via {path} ({o.warmup:.0f}s, {session.generator})")

        def warm(target: Target = session.targets[path]) -> None:
            load(session, target, o.concurrency, o.warmup)

        session.attempt("manifest warm-up", path, warm)
    for n in range(o.repeat):
        for path in rotated(session.live_paths(), n):
            target = session.targets[path]

            def loaded(target: Target = target) -> None:
                run = load(session, target, o.concurrency, o.duration)
                if run.error_count:
                    raise clients.ClientError(
                        f"{session.generator} saw errors: {run.errors} in {run.requests} requests"
                    )
                f.rps.add(target.name, run.rps)
                f.load_p50.add(target.name, run.p50_ms)
                f.load_p99.add(target.name, run.p99_ms)
                session.log(
                    f"manifests via {target.name}, c={o.concurrency}: {run.rps:.0f} req/s, p99 {run.p99_ms:.1f} ms"
                )

            def idle(target: Target = target) -> None:
                run = load(session, target, 1, o.latency_duration)
                if run.error_count:
                    raise clients.ClientError(
                        f"{session.generator} saw errors: {run.errors} in {run.requests} requests"
                    )
                f.idle_p50.add(target.name, run.p50_ms)
                f.idle_p99.add(target.name, run.p99_ms)

            session.attempt(f"manifests c={o.concurrency}", path, loaded, [f.rps, f.load_p50, f.load_p99])
            session.attempt("manifests c=1", path, idle, [f.idle_p50, f.idle_p99])
