"""The rollout scenario (issue 12): N containerd-style clients pull one tag at once through a gateway in front
of a hub front that counts pulls like Docker Hub."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench import clients
from bench.servers import Gateway, ServerError
from bench.session import PRIVATE_KEY, Session

#: what containerd's resolver sends (core/remotes/docker/resolver.go)
CONTAINERD_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
)


async def rollout_client(base: str, repo: str, tag: str, architecture: str = "amd64") -> str:
    """One containerd-style client: HEAD the tag, GET the index by digest, GET the platform manifest by digest
    (without containerd's ``?ns=docker.io``: the benchmark's route is the default one, named hub.test).
    Returns the platform manifest's digest; raises ClientError on any answer but a 200."""
    headers = {"accept": CONTAINERD_ACCEPT}
    async with httpx.AsyncClient(base_url=base, timeout=120, trust_env=False) as client:
        head = await client.head(f"/v2/{repo}/manifests/{tag}", headers=headers)
        if head.status_code != 200 or "docker-content-digest" not in head.headers:
            raise clients.ClientError(f"HEAD {repo}:{tag}: HTTP {head.status_code}")
        index = await client.get(f"/v2/{repo}/manifests/{head.headers['docker-content-digest']}", headers=headers)
        if index.status_code != 200:
            raise clients.ClientError(f"GET the index of {repo}:{tag}: HTTP {index.status_code}")
        [platform] = [m["digest"] for m in index.json()["manifests"] if m["platform"]["architecture"] == architecture]
        manifest = await client.get(f"/v2/{repo}/manifests/{platform}", headers=headers)
        if manifest.status_code != 200:
            raise clients.ClientError(f"GET {repo}@{platform}: HTTP {manifest.status_code}")
        return str(platform)


async def rollout(base: str, repo: str, tag: str, count: int) -> set[str]:
    """``count`` clients at once; the set of platform manifest digests they ended with."""
    return set(await asyncio.gather(*(rollout_client(base, repo, tag) for _ in range(count))))


def measure_rollout(session: Session, tb: Any) -> None:
    """Issue 12's rollout: N containerd-style clients pull one tag at once (HEAD the tag, GET the index
    by digest, GET the platform manifest by digest) through a gateway whose upstream is a hub front
    counting like Docker Hub (``tests/testbed/hubfront.py``). The figures: manifest GETs the hub counted
    as pulls (the target is at most 2 per tag per tag lifetime) and the wall time. Each repeat starts
    a fresh gateway (one worker: the manifest cache is per process) with an empty cache."""
    from tests.testbed.hubfront import HubFront

    o = session.options
    if o.rollout_clients <= 0 or "gateway" in session.failed:
        return
    alpine = tb.images["alpine"]
    platform = alpine.platform_digest("linux/amd64")
    f = session.figures
    runs: list[dict[str, Any]] = []
    with HubFront(tb.hub.registry_url, limit=1 << 30) as front:
        for n in range(o.repeat):
            front.reset()
            gateway = Gateway(
                session.workdir / f"gateway-rollout-{n}",
                front.url,
                env=o.gateway_env,
                command=o.gateway_cmd,
                route_options={PRIVATE_KEY: "true", **o.route_options},
            )
            try:
                gateway.start()

                def one(gateway: Gateway = gateway) -> None:
                    started = time.perf_counter()
                    ended = asyncio.run(rollout(gateway.url, alpine.repo, alpine.tag, o.rollout_clients))
                    seconds = time.perf_counter() - started
                    if ended != {platform}:
                        raise clients.ClientError(f"the clients ended with {sorted(ended)}, want {platform}")
                    counted = [r for r in front.requests if r.counted]
                    run = {
                        "clients": o.rollout_clients,
                        "counted_gets": len(counted),
                        "counted_references": [r.reference for r in counted],
                        "heads": len(front.manifest_requests("HEAD")),
                        "refused": len([r for r in front.requests if r.status == 429]),
                        "wall_seconds": seconds,
                    }
                    runs.append(run)
                    f.rollout_gets.add("gateway", len(counted))
                    f.rollout_seconds.add("gateway", seconds)
                    session.log(
                        f"rollout of {alpine.repo}:{alpine.tag} to {o.rollout_clients} clients: "
                        f"{len(counted)} counted GETs and {run['heads']} HEADs at the hub, {seconds:.2f} s"
                    )
                    if len(counted) > 2:
                        session.warn(f"the rollout cost {len(counted)} counted GETs at the hub (target: at most 2)")

                session.attempt("rollout scenario", "gateway", one, [f.rollout_gets, f.rollout_seconds])
            except (ServerError, OSError) as exc:
                session.warn(f"the rollout scenario could not run: {exc}")
                break
            finally:
                gateway.stop()
    session.extra["rollout_scenario"] = {"repository": alpine.repo, "tag": alpine.tag, "runs": runs}
