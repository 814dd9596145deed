"""The resume scenario: the big blob through a gateway whose upstream resets every R MiB, against the same
path clean."""

from __future__ import annotations

from typing import Any

from bench import clients
from bench.clients import Target
from bench.report import Figure
from bench.servers import Gateway, ServerError
from bench.session import MB, PRIVATE_KEY, Session


def measure_resumes(session: Session, tb: Any) -> None:
    """The big blob through a second gateway whose upstream resets every R MiB (RST at the CDN hop),
    against the same path without faults: what resuming costs (GATEWAY_BLOB_RESUMES is raised)."""
    from tests.testbed.faults import FaultFront

    o = session.options
    if o.resume_every_mib <= 0 or "gateway" in session.failed:
        return
    every = o.resume_every_mib << 20
    resumes = session.big_size // every + 2
    with (
        FaultFront(tb.cdn_url) as cdn,
        FaultFront(tb.hub.registry_url, rewrite_location=(tb.cdn_url, cdn.url)) as hub,
    ):
        gateway = Gateway(
            session.workdir / "gateway-resume",
            hub.url,
            env={**o.gateway_env, "GATEWAY_BLOB_RESUMES": str(resumes)},
            command=o.gateway_cmd,
            route_options={PRIVATE_KEY: "true", **o.route_options},
        )
        try:
            gateway.start()
            target = Target("gateway", gateway.url, None, follow_redirects=False)
            for _ in range(o.repeat):
                for figure, broken in ((session.figures.resume_clean, False), (session.figures.resume_broken, True)):
                    cdn.clear()
                    if broken:
                        cdn.fault(session.big_digest, "reset", at=every, times=None)

                    def one(figure: Figure = figure, broken: bool = broken) -> None:
                        transfer = clients.download(target, session.big_path, session.big_size)
                        figure.add("gateway", transfer.bytes_per_second / MB)
                        kind = f"reset every {o.resume_every_mib} MiB" if broken else "clean"
                        session.log(f"1 stream via fault fronts, {kind}: {transfer.bytes_per_second / MB:.0f} MB/s")

                    session.attempt("resume scenario", "gateway", one, [figure])
            session.extra["resume_scenario"] = {"every_bytes": every, "blob_resumes": resumes}
        except (ServerError, OSError) as exc:
            session.warn(f"the resume scenario could not run: {exc}")
        finally:
            gateway.stop()
