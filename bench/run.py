"""One benchmark run: start the test bed, nginx and the gateway, call the measurements in order, collect figures.

The measurements live by job: ``streams`` (correctness, time to first byte, 1 and N streams), ``manifests``
(token requests, manifest load and latency), ``resumes``, ``rollout``, ``herd`` and ``workers`` (the scenarios);
``session`` holds what they share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from bench import herd, lone, manifests, procs, resumes, rollout, streams, workers
from bench.clients import ClientAuth, Target
from bench.options import MEASUREMENTS
from bench.servers import Gateway, NginxProxy, ServerError, tail
from bench.session import PRIVATE_KEY, Session

BIG_REPO = "library/bigimage"
SMALL_REPO = "library/alpine"


class Run(Session):
    # ------------------------------------------------------------------ the run
    def execute(self) -> None:
        from tests.testbed.bed import Testbed

        o = self.options
        self.log(f"starting the test bed ({o.blob_mib} MiB blob) in {self.workdir}")
        with Testbed.start(self.workdir / "testbed", big_blob_mib=o.blob_mib) as tb, self.servers(tb) as _:
            self.extra["testbed_start_seconds"] = round(tb.start_seconds, 1)
            big = tb.images["bigimage"]
            self.big_digest, self.big_size = max(big.blobs.items(), key=lambda item: item[1])
            alpine = tb.images["alpine"]
            self.small_digest = alpine.layers["linux/amd64"][0]
            self.small_size = alpine.blobs[self.small_digest]
            self.manifest_digest = alpine.digest
            self.big_path = f"/v2/{BIG_REPO}/blobs/{self.big_digest}"
            self.small_path = f"/v2/{SMALL_REPO}/blobs/{self.small_digest}"
            self.manifest_path = f"/v2/{SMALL_REPO}/manifests/{alpine.tag}"
            self.extra["blob"] = {"digest": self.big_digest, "bytes": self.big_size}
            self.extra["small_blob"] = {"digest": self.small_digest, "bytes": self.small_size}
            self.extra["manifest"] = {"path": self.manifest_path, "digest": self.manifest_digest}
            self.upstream_pids = procs.pids_matching(str(tb.workdir) + "/")

            steps: dict[str, Callable[[], None]] = {
                "tokens": lambda: manifests.measure_tokens(self, tb),
                "verify": lambda: streams.verify(self),
                "ttfb": lambda: streams.measure_ttfb(self),
                "single": lambda: streams.measure_single_stream(self),
                "aggregate": lambda: streams.measure_aggregate(self),
                "manifests": lambda: manifests.measure_manifests(self),
                "lone": lambda: lone.measure_lone(self, tb),
                "resume": lambda: resumes.measure_resumes(self, tb),
                "rollout": lambda: rollout.measure_rollout(self, tb),
                "herd": lambda: herd.measure_herd(self, tb),
                "workers": lambda: workers.measure_workers(self, tb),
            }
            for name in MEASUREMENTS:
                if not o.only or name in o.only:
                    steps[name]()
            direct_auth = self.targets["direct"].auth
            self.extra["client_token_requests"] = direct_auth.fetched if direct_auth is not None else 0
            for name, server in (("nginx", self.nginx), ("gateway", self.gateway)):
                if server is not None and name not in self.failed and not server.alive():
                    self.fail_path(name, f"{name} exited with {server.returncode()}:\n{tail(server.log_path)}")
        self.log("test bed stopped")

    @contextlib.contextmanager
    def servers(self, tb: Any) -> Iterator[None]:
        o = self.options
        auth = ClientAuth(
            tb.hub.realm, tb.hub.service, [f"repository:{BIG_REPO}:pull", f"repository:{SMALL_REPO}:pull"]
        )
        self.targets["direct"] = Target("direct", tb.hub.registry_url, auth, follow_redirects=True)
        try:
            self.nginx = NginxProxy(self.workdir / "nginx", tb.hub.registry_url).start()
            self.targets["nginx"] = Target("nginx", self.nginx.url, auth, follow_redirects=False)
            self.log(f"nginx proxy on {self.nginx.url} (workers {self.nginx.worker_pids()})")
        except (ServerError, OSError) as exc:
            self.targets["nginx"] = Target("nginx", "http://127.0.0.1:9", auth, follow_redirects=False)
            self.fail_path("nginx", f"nginx did not start: {exc}")
        # The test bed (registry, token server, CDN) lives on 127.0.0.1: a gateway that refuses private
        # addresses by default needs the route to allow them. A gateway that does not know the key gets
        # a route without it.
        route_options = {PRIVATE_KEY: "true", **o.route_options}
        try:
            try:
                self.start_gateway(tb, route_options)
            except ServerError as exc:
                if PRIVATE_KEY in o.route_options or PRIVATE_KEY not in str(exc):
                    raise
                self.log(f"the gateway does not know {PRIVATE_KEY}; starting it without")
                del route_options[PRIVATE_KEY]
                self.start_gateway(tb, route_options)
        except (ServerError, OSError) as exc:
            self.targets["gateway"] = Target("gateway", "http://127.0.0.1:9", None, follow_redirects=False)
            self.fail_path("gateway", f"gateway did not start: {exc}")
        if self.gateway is not None:
            self.extra["gateway_argv"] = self.gateway.argv
            self.extra["gateway_routes"] = self.gateway.routes()
            self.extra["gateway_source"] = self.gateway.source
        try:
            yield
        finally:
            for server in (self.gateway, self.nginx):
                if server is not None:
                    server.stop()

    def start_gateway(self, tb: Any, route_options: dict[str, str]) -> Gateway:
        o = self.options
        gateway = Gateway(
            self.workdir / "gateway",
            tb.hub.registry_url,
            workers=o.gateway_workers,
            env=o.gateway_env,
            command=o.gateway_cmd,
            route_options=route_options,
        )
        self.gateway = gateway
        gateway.start()
        self.targets["gateway"] = Target("gateway", gateway.url, None, follow_redirects=False)
        self.log(f"gateway on {gateway.url} (pids {gateway.pids()})")
        return gateway

    # ------------------------------------------------------------------ result
    def added_latency(self) -> dict[str, float | None]:
        """How much later the gateway answers a manifest GET than the baselines (medians of percentiles, c=1)."""
        out: dict[str, float | None] = {}
        for base in ("direct", "nginx"):
            for pct, figure in (("p50", self.figures.idle_p50), ("p99", self.figures.idle_p99)):
                gw, other = figure.median("gateway"), figure.median(base)
                out[f"{pct}_ms_vs_{base}"] = None if gw is None or other is None else gw - other
        return out
