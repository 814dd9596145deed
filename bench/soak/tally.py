"""The soak's counts: from the clients' pulls, the gateway's JSON log and the fronts' request logs.

"Every upstream failed" is judged per gateway request: each upstream of the route (A and B for
ghcr.io, H for docker.io; a mirror is extra, never required) had, for that blob (or, for any other
path, for anything) in that request's time window, an answer that was a fault, a 5xx, a 429 or no
answer at all; or the token server was down then (every upstream shares its realm). A transfer
the gateway cut, or a 502/503/504 it answered, without that is of its own making. A 5xx whose
access line says ``error = "upstream"`` is the upstream's own registry error (status and JSON
body) relayed: the gateway's making only if that upstream had no such fault then.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.soak.pulls import Pull
from bench.soak.stage import CDN, MULTI, Stage
from tests.testbed.faults import FrontRequest

UPSTREAMS = {MULTI: ("A", "B"), CDN: ("H",)}
SLACK = 0.5  # seconds around a request's window (clocks of the gateway and of the fronts' threads)
BROKE = ("upstream_broke", "digest_mismatch")
BREAKER_SLACK = 5.0  # seconds before a breaker's cooldown in which the failures that opened it came


def access_lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "access":
            end = datetime.fromisoformat(entry["time"]).timestamp()
            entry["_start"], entry["_end"] = end - entry.get("duration_ms", 0) / 1000, end
            out.append(entry)
    return out


def blob_digest(path: str) -> str | None:
    head, sep, digest = path.rpartition("/blobs/")
    return digest if sep and digest.startswith("sha256:") else None


def _failed(request: FrontRequest) -> bool:
    return request.fault is not None or request.status == 0 or request.status == 429 or request.status >= 500


@dataclass
class Tally:
    stage: Stage

    def __post_init__(self) -> None:
        self.requests = {name: front.requests for name, front in self.stage.fronts.items()}
        self.access = access_lines(self.stage.gateway.log)

    def every_upstream_failed(self, entry: dict[str, Any]) -> bool:
        start, end = entry["_start"] - SLACK, entry["_end"] + SLACK
        breaker = "upstream" not in entry
        if breaker:
            # Answered without asking anyone: every upstream's breaker was open, which only
            # failures in a row (of any request to it, not only this blob's) before can have done.
            start -= self.stage.breaker_cooldown + BREAKER_SLACK
        if any(down_start <= end and start <= down_end for down_start, down_end in self.stage.token_outages):
            return True
        digest = blob_digest(entry["path"])
        needle = digest.partition(":")[2] if digest and not breaker else ""
        for name in UPSTREAMS.get(entry.get("route", ""), ()):
            asked = [r for r in self.requests[name] if start <= r.time <= end and needle in r.target]
            if not any(_failed(r) for r in asked):
                return False  # this upstream was healthy (or not even asked) while the request lasted
        return True

    def relayed(self, entry: dict[str, Any]) -> bool:
        """A 5xx that the upstream named in the access line answered itself (a fault front's status)."""
        if entry.get("error") != "upstream" or entry.get("status", 0) < 500:
            return False
        names = [name for name, front in self.stage.fronts.items() if front.url == entry.get("upstream")]
        start, end = entry["_start"] - SLACK, entry["_end"] + SLACK
        return any(
            start <= r.time <= end and r.status == entry["status"] for name in names for r in self.requests[name]
        )

    def own_5xx(self, entry: dict[str, Any]) -> bool:
        if entry.get("status", 0) < 500 or self.relayed(entry):
            return False
        return entry["status"] not in (502, 503, 504) or not self.every_upstream_failed(entry)

    def figures(self, pulls: list[Pull]) -> dict[str, Any]:
        blob_gets = [a for a in self.access if a["method"] == "GET" and blob_digest(a["path"])]
        cut = [
            a
            for a in blob_gets
            if a.get("status") in (200, 206) and (a.get("error") in BROKE or a.get("verified") == "mismatch")
        ]
        cut_healthy = [a for a in cut if not self.every_upstream_failed(a)]
        own_5xx = [a for a in self.access if self.own_5xx(a)]
        outcomes = Counter(p.outcome for p in pulls)
        by_client: dict[str, Counter[str]] = defaultdict(Counter)
        for pull in pulls:
            by_client[pull.client][pull.outcome] += 1
        return {
            "pulls": len(pulls),
            "intact": outcomes["intact"],
            "failed": outcomes["failed"],
            "aborted_on_purpose": outcomes["aborted_on_purpose"],
            "wrong_bytes_ended_cleanly": outcomes["wrong_clean"],
            "by_client": {client: dict(counts) for client, counts in sorted(by_client.items())},
            "gateway_requests": len(self.access),
            "gateway_statuses": dict(sorted(Counter(str(a.get("status")) for a in self.access).items())),
            "blob_gets": len(blob_gets),
            "aborted_by_gateway": len(cut),
            "aborted_with_a_healthy_upstream": len(cut_healthy),
            "aborted_by_reason": dict(Counter(a.get("error") or a.get("verified") for a in cut)),
            "gateway_5xx": sum(1 for a in self.access if a.get("status", 0) >= 500),
            "gateway_5xx_relayed_from_an_upstream": sum(1 for a in self.access if self.relayed(a)),
            "gateway_5xx_of_its_own": len(own_5xx),
            "own_5xx_samples": [_brief(a) for a in own_5xx[:10]],
            "aborted_with_a_healthy_upstream_samples": [_brief(a) for a in cut_healthy[:10]],
            "upstream_gets_per_blob": self.upstream_gets(blob_gets),
            "front_faults_fired": {
                name: dict(Counter(r.fault for r in requests if r.fault)) for name, requests in self.requests.items()
            },
            "edge_requests": len(self.stage.edge.requests),
            "edge_cut_by_expiry": sum(1 for r in self.stage.edge.requests if r.cut),
            "edge_refused_expired": sum(1 for r in self.stage.edge.requests if r.status == 403),
            "resumes": sum(a.get("resumes", 0) or 0 for a in blob_gets),
        }

    def upstream_gets(self, blob_gets: list[dict[str, Any]]) -> dict[str, Any]:
        """Per blob: the clients' GETs through the gateway and the GETs that reached a registry or the CDN."""
        per: dict[str, dict[str, int]] = defaultdict(lambda: {"client_gets": 0, "upstream_gets": 0})
        for entry in blob_gets:
            per[blob_digest(entry["path"]) or ""]["client_gets"] += 1
        sources = [self.requests[name] for name in ("A", "B", "M", "C")]
        for digest, counts in per.items():
            hexa = digest.partition(":")[2]
            counts["upstream_gets"] = sum(
                1 for requests in sources for r in requests if hexa in r.target and r.status in (200, 206)
            )
        client = sum(c["client_gets"] for c in per.values())
        upstream = sum(c["upstream_gets"] for c in per.values())
        return {
            "total_client_gets": client,
            "total_upstream_gets": upstream,
            "upstream_per_client_get": round(upstream / client, 3) if client else 0,
            "blobs": {digest[:19]: counts for digest, counts in sorted(per.items())},
        }


def _brief(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("time", "route", "path", "status", "error", "verified", "resumes", "bytes", "upstream", "duration_ms")
    return {key: entry[key] for key in keys if key in entry}
