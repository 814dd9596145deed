"""``GET /status``: is the mirror healthy, and what is it doing right now, without Prometheus.

One process's view (with several workers, the one that answered; ``pid`` says which): the routes
and their upstreams with the breaker's state, the last error and the p99 of the upstream's
response time (``observe/recent.py``), the upstream pull budgets, the shared fetches under way
with their readers and progress, the memory their windows hold, and the recent errors.

Server-rendered HTML that reloads itself (a meta refresh, ``?refresh=SECONDS``, 5 by default),
no script; ``Accept: application/json`` (or ``?format=json``) gets the same data as JSON, which
the page is built from. Nothing secret is shown: upstream URLs are scheme://host[:port] (the route
table keeps no userinfo), credentials appear by identity (``user:bob``) only, and client
addresses (of recent errors; the budget's ``docker-ratelimit-source``, which is an address for
anonymous pulls) only when the operator sets ``GATEWAY_STATUS_SHOW_CLIENTS``.
"""

from __future__ import annotations

import asyncio
import html
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from gateway import __version__
from gateway.blobs.board import Board
from gateway.observe.recent import Recent
from gateway.routing.budget import BudgetStore
from gateway.routing.routes import Route, RouteTable
from gateway.upstream.client import UpstreamClient

DEFAULT_REFRESH = 5
NO_STORE = {"cache-control": "no-store"}


class StatusPage:
    """The data of ``/status`` and its two renderings."""

    def __init__(
        self,
        table: RouteTable,
        clients: Mapping[str, UpstreamClient],
        budgets: BudgetStore,
        board: Board,
        recent: Recent,
        *,
        show_clients: bool = False,
    ) -> None:
        self.table = table
        self.clients = clients
        self.budgets = budgets
        self.board = board
        self.recent = recent
        self.show_clients = show_clients
        self.started = time.time()

    def _upstreams(self, route: Route) -> list[dict[str, Any]]:
        client = self.clients.get(route.name)
        rows: list[dict[str, Any]] = []
        for role, upstreams in (("upstream", route.upstreams), ("mirror", route.mirrors)):
            for upstream in upstreams:
                state, failures = client.breaker.state(upstream.url) if client else ("closed", 0)
                seen = self.recent.upstream(route.name, upstream.url)
                p99 = seen.p99() if seen else None
                rows.append(
                    {
                        "url": upstream.url,
                        "role": role,
                        "breaker": state,
                        "failures": failures,
                        "requests": seen.requests if seen else 0,
                        "errors": seen.errors if seen else 0,
                        "p99_seconds": round(p99, 4) if p99 is not None else None,
                        "last_error": seen.last_error.as_json() if seen and seen.last_error else None,
                    }
                )
        return rows

    def _fetches(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        rows = []
        for fetch in self.board.fetches():
            route, repository, digest = fetch.key
            total = fetch.total or None
            positions = [reader.position for reader in fetch.readers]
            rows.append(
                {
                    "route": route,
                    "repository": repository,
                    "digest": digest,
                    "readers": len(fetch.readers),
                    "served": fetch.served,
                    "detached": fetch.detached,
                    "bytes": fetch.produced,
                    "total": total,
                    "progress": round(fetch.produced / total, 4) if total else None,
                    "slowest_reader_bytes": min(positions, default=None),
                    "fastest_reader_bytes": max(positions, default=None),
                    "age_seconds": round(now - fetch.created, 3),
                    "idle_seconds": round(now - fetch.progressed, 3),
                    "state": _fetch_state(fetch.ready.is_set(), fetch.running, fetch.done, fetch.lingering),
                }
            )
        return sorted(rows, key=lambda r: (r["route"], r["repository"], r["digest"]))

    def _budgets(self) -> list[dict[str, Any]]:
        rows = self.budgets.snapshot()
        if not self.show_clients:
            for row in rows:
                row.pop("source", None)  # for anonymous pulls Docker Hub's count is the client address
        return rows

    def data(self) -> dict[str, Any]:
        now = time.time()
        return {
            "gateway": {
                "version": __version__,
                "pid": os.getpid(),
                "generated": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                "uptime_seconds": round(now - self.started, 1),
            },
            "routes": [
                {"name": r.name, "hosts": list(r.hosts), "upstreams": self._upstreams(r)} for r in self.table.routes
            ],
            "budgets": self._budgets(),
            "shared_fetches": self._fetches(),
            "windows": {"held_bytes": self.board.held, "budget_bytes": self.board.memory},
            "recent_errors": self.recent.recent_errors(),
        }

    async def endpoint(self, request: Request) -> Response:
        data = self.data()
        accept = request.headers.get("accept", "")
        if request.query_params.get("format") == "json" or ("application/json" in accept and "text/html" not in accept):
            return JSONResponse(data, headers=NO_STORE)
        return HTMLResponse(render(data, _refresh(request.query_params.get("refresh"))), headers=NO_STORE)


def _fetch_state(ready: bool, running: bool, done: bool, lingering: bool) -> str:
    if not ready:
        return "opening"
    if running:
        return "streaming"
    if lingering:
        return "lingering"
    return "complete" if done else "ended"


def _refresh(text: str | None) -> int:
    if text is None or not text.isdigit():
        return DEFAULT_REFRESH
    return max(1, min(int(text), 3600))


def _cell(value: object) -> str:
    if value is None:
        return '<td class="none">–</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _table(title: str, anchor: str, head: list[str], rows: list[str], empty: str) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(rows) or f'<tr class="empty"><td colspan="{len(head)}">{html.escape(empty)}</td></tr>'
    table = f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{table}</section>'


def _attrs(**values: object) -> str:
    return "".join(f' data-{k.replace("_", "-")}="{html.escape(str(v), quote=True)}"' for k, v in values.items())


def render(data: dict[str, Any], refresh: int) -> str:
    """The page: every value escaped; rows carry ``data-*`` attributes naming what they show."""
    route_rows = []
    for route in data["routes"]:
        for up in route["upstreams"]:
            last = up["last_error"]
            last_text = f"{last['time']} {last['status']} {last['error'] or ''}".strip() if last else None
            p99 = f"{up['p99_seconds'] * 1000:.1f} ms" if up["p99_seconds"] is not None else None
            route_rows.append(
                f'<tr class="upstream breaker-{up["breaker"]}"{_attrs(route=route["name"], upstream=up["url"])}>'
                f"{_cell(route['name'])}{_cell(up['url'])}{_cell(up['role'])}"
                f'<td class="breaker">{html.escape(up["breaker"])}</td>{_cell(up["failures"])}'
                f"{_cell(up['requests'])}{_cell(up['errors'])}{_cell(p99)}{_cell(last_text)}</tr>"
            )
    budget_rows = [
        f'<tr class="budget"{_attrs(route=b["route"], credential=b["credential"])}>'
        f"{_cell(b['route'])}{_cell(b['credential'])}{_cell(b['remaining'])}{_cell(b['limit'])}"
        f"{_cell(b['window_seconds'])}{_cell(b['rate_limited'])}{_cell(b['updated'])}</tr>"
        for b in data["budgets"]
    ]
    fetch_rows = []
    for f in data["shared_fetches"]:
        progress = f"{f['progress'] * 100:.1f}%" if f["progress"] is not None else None
        fetch_rows.append(
            f'<tr class="fetch"{_attrs(route=f["route"], digest=f["digest"], readers=f["readers"])}>'
            f"{_cell(f['route'])}{_cell(f['repository'])}{_cell(f['digest'][:19] + '…')}{_cell(f['state'])}"
            f'<td class="readers">{f["readers"]}</td>{_cell(_size(f["bytes"]) + " / " + _size(f["total"]))}'
            f'<td class="progress"><progress max="1" value="{f["progress"] or 0}"></progress> {progress or "–"}</td>'
            f"{_cell(_size(f['slowest_reader_bytes']) + ' – ' + _size(f['fastest_reader_bytes']))}"
            f"{_cell(f['age_seconds'])}</tr>"
        )
    error_rows = [
        f'<tr class="error"{_attrs(route=e["route"], status=e["status"])}>'
        f"{_cell(e['time'])}{_cell(e['route'])}{_cell(e['upstream'])}{_cell(e['kind'])}{_cell(e['method'])}"
        f"{_cell(e['status'])}{_cell(e['error'])}{_cell(e['repository'])}"
        + (_cell(e["client"]) if "client" in e else "")
        + "</tr>"
        for e in data["recent_errors"]
    ]
    gw, windows = data["gateway"], data["windows"]
    sections = [
        _table(
            "Routes and upstreams",
            "routes",
            ["route", "upstream", "role", "breaker", "failures", "requests", "errors", "p99", "last error"],
            route_rows,
            "no routes",
        ),
        _table(
            "Upstream pull budget",
            "budgets",
            ["route", "credential", "remaining", "limit", "window s", "429s", "updated"],
            budget_rows,
            "no upstream has said its budget yet",
        ),
        _table(
            "Shared fetches in flight",
            "fetches",
            ["route", "repository", "digest", "state", "readers", "read upstream", "progress", "readers at", "age s"],
            fetch_rows,
            "none right now",
        ),
        _table(
            "Recent errors",
            "errors",
            ["time", "route", "upstream", "kind", "method", "status", "error", "repository"],
            error_rows,
            "none",
        ),
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>registry-gateway status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0 0 .2em; }} h2 {{ font-size: 1.1em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; white-space: nowrap; }}
th {{ background: #f3f3f3; }} td.none {{ color: #999; }} tr.empty td {{ color: #777; font-style: italic; }}
.breaker-closed td.breaker {{ color: #17692b; }} .breaker-open td.breaker {{ color: #b00020; font-weight: bold; }}
.breaker-half-open td.breaker {{ color: #a15c00; }} tr.error td {{ color: #7a1020; }}
.meta {{ color: #555; }}
</style></head>
<body>
<h1>registry-gateway status</h1>
<p class="meta">version {html.escape(gw["version"])} · pid <span id="pid">{gw["pid"]}</span> ·
up {gw["uptime_seconds"]} s · generated <time id="generated">{html.escape(gw["generated"])}</time> ·
reloads every {refresh} s · <a href="?format=json">JSON</a></p>
<p class="meta" id="windows" data-held="{windows["held_bytes"]}" data-budget="{windows["budget_bytes"]}">
shared fetch windows hold {_size(windows["held_bytes"])} of {_size(windows["budget_bytes"])}</p>
{"".join(sections)}
</body></html>
"""
