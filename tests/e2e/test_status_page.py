"""``/status`` in a real browser: Playwright (PyPI) drives Debian's Chromium against a real gateway process.

While two slow curl pulls share one upstream fetch of a blob, the page loads with no console error,
shows the routes and that shared fetch with its two readers, reloads itself, and what it shows is
what ``Accept: application/json`` returns. The screenshot it takes is the one in docs/operations.md:
``STATUS_SCREENSHOT=docs/images/status.png pytest tests/e2e/test_status_page.py`` writes it there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_herd import MIB, Blob, Pull, push_blob
from tests.support import Gateway, run_gateway, wait_for
from tests.testbed.bed import Testbed
from tests.testbed.hubfront import HubFront

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def status_gateway(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # docker.io through a HubFront, for a pull budget to show (its source: the client address, hidden).
    front = HubFront(testbed.hub.registry_url, limit=1000)
    routes = f"""
[[route]]
name = "ghcr.io"
upstream = "{testbed.ghcr.url}"
allow_private_addresses = true
hosts = ["ghcr.*"]
default = true

[[route]]
name = "docker.io"
upstream = "{front.url}"
allow_private_addresses = true
hosts = ["docker.*"]
library = true
"""
    with front, run_gateway(routes, tmp_path_factory.mktemp("status-gateway")) as gw:
        yield gw


def status_json(gw: Gateway) -> dict[str, Any]:
    answer = httpx.get(f"{gw.url}/status", headers={"accept": "application/json"}, timeout=10, trust_env=False)
    assert answer.status_code == 200
    data: dict[str, Any] = answer.json()
    return data


def shared(gw: Gateway, blob: Blob) -> dict[str, Any] | None:
    return next((f for f in status_json(gw)["shared_fetches"] if f["digest"] == blob.digest), None)


def test_the_status_page_in_chromium(status_gateway: Gateway, testbed: Testbed, tmp_path: Path) -> None:
    if not (os.access(CHROMIUM, os.X_OK) and shutil.which("unshare")):
        pytest.skip("chromium is not installed (scripts/install installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    gw = status_gateway
    blob = push_blob(testbed, 48 * MIB, "ghcr", ("org/herd",))
    # A failing pull, for the recent errors.
    assert httpx.get(f"{gw.url}/v2/org/nothing/manifests/v1", timeout=10, trust_env=False).status_code == 404
    pulled = httpx.get(
        f"{gw.url}/v2/library/alpine/manifests/3.20",
        headers={"host": "docker.gw.test", "accept": "application/vnd.oci.image.index.v1+json"},
        timeout=10,
        trust_env=False,
    )
    assert pulled.status_code == 200
    url = f"{gw.url}/v2/org/herd/blobs/{blob.digest}"
    problems: list[str] = []
    pulls: list[Pull] = []
    with sync_api.sync_playwright() as playwright:
        # The browser first (slow to start on a busy machine), then the pulls: the shared fetch is
        # under way while the page is looked at. Loopback socket buffers take several MiB of each
        # reader at once, so the blob is large and the readers slow; they are stopped at the end.
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            pulls.extend(Pull(url, f"status-{i}", rate="512K") for i in range(2))
            assert wait_for(lambda: (shared(gw, blob) or {}).get("readers") == 2, timeout=30), shared(gw, blob)
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            answer = page.goto(f"{gw.url}/status?refresh=1")
            assert answer is not None
            assert answer.status == 200
            assert page.title() == "registry-gateway status"
            # Readers come and go between two answers: compare a page with the JSON answers taken
            # just before and after it when those two agree (a few tries).
            for _ in range(10):
                before = status_json(gw)
                page.reload()
                shown, data = read_page(page), status_json(gw)
                if comparable(before) == comparable(data):
                    break
            assert shown["routes"] == [
                (r["name"], u["url"], u["breaker"]) for r in data["routes"] for u in r["upstreams"]
            ]
            assert [name for name, _, _ in shown["routes"]] == ["ghcr.io", "docker.io"]
            assert blob.digest in [digest for digest, _ in shown["fetches"]]
            assert shown["fetches"] == [(f["digest"], str(f["readers"])) for f in data["shared_fetches"]]
            assert shown["errors"] == [(e["route"], str(e["status"])) for e in data["recent_errors"]]
            assert ("ghcr.io", "404") in shown["errors"]
            assert shown["budgets"] == [(b["route"], b["credential"], str(b["remaining"])) for b in data["budgets"]]
            assert [b[:2] for b in shown["budgets"]] == [("docker.io", "anonymous")]
            assert "source" not in data["budgets"][0]  # Docker Hub's count is the client address
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
            # It reloads itself: a new page, generated later, comes without anyone asking.
            generated = page.text_content("#generated")
            page.wait_for_function(
                "old => document.getElementById('generated')?.textContent !== old", arg=generated, timeout=15_000
            )
            assert page.text_content("#generated") != generated
        finally:
            for pull in pulls:
                pull.kill()
            context.close()
    assert problems == []
    target = os.environ.get("STATUS_SCREENSHOT")
    if target:
        shutil.copy(tmp_path / "status.png", target)


def comparable(data: dict[str, Any]) -> Any:
    """What the page shows of the JSON, except what changes all the time (times, bytes)."""
    return (
        [(u["url"], u["breaker"]) for r in data["routes"] for u in r["upstreams"]],
        [(f["digest"], f["readers"]) for f in data["shared_fetches"]],
        [(e["route"], e["status"]) for e in data["recent_errors"]],
        [(b["route"], b["credential"], b["remaining"]) for b in data["budgets"]],
    )


def read_page(page: Any) -> dict[str, list[tuple[str, ...]]]:
    """What the page shows, from its rows' attributes and cells."""
    routes = page.eval_on_selector_all(
        "tr.upstream",
        "rows => rows.map(r => [r.dataset.route, r.dataset.upstream, r.querySelector('td.breaker').textContent])",
    )
    fetches = page.eval_on_selector_all(
        "tr.fetch", "rows => rows.map(r => [r.dataset.digest, r.querySelector('td.readers').textContent])"
    )
    errors = page.eval_on_selector_all("tr.error", "rows => rows.map(r => [r.dataset.route, r.dataset.status])")
    budgets = page.eval_on_selector_all(
        "tr.budget", "rows => rows.map(r => [r.dataset.route, r.dataset.credential, r.cells[2].textContent])"
    )
    return {
        "routes": [tuple(r) for r in routes],
        "fetches": [tuple(f) for f in fetches],
        "errors": [tuple(e) for e in errors],
        "budgets": [tuple(b) for b in budgets],
    }
