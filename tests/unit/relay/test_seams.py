"""The relay's collaborators call down only: the jobs never reach back into the dispatcher, nor
into each other, and the steps they share never reach back into a job.

Read from the source with ``ast`` (an import anywhere in a module counts), so a callback into
the dispatcher cannot come back without this test failing first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parents[3] / "gateway" / "relay"

JOBS = {"manifests", "blobs", "listings"}
# Steps every job uses; they are below the jobs.
SHARED = {"opening", "budget_watch", "answers", "streaming", "join_permits", "integrity", "exchange", "manifest_cache"}
# Beside the dispatcher, for app.py: reads what the relay's collaborators know (breakers, budgets,
# the board) and imports no relay module.
BESIDE = {"status"}


def relay_imports(module: str) -> set[str]:
    """The ``gateway.relay`` modules that ``gateway/relay/<module>.py`` imports."""
    tree = ast.parse((RELAY / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "gateway.relay":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("gateway.relay."):
                found.add(node.module.removeprefix("gateway.relay."))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("gateway.relay.") for a in node.names if a.name.startswith("gateway.relay.")
            )
    return found


def test_every_relay_module_is_classified() -> None:
    modules = {p.stem for p in RELAY.glob("*.py")} - {"__init__"}
    assert modules == JOBS | SHARED | BESIDE | {"dispatch"}


@pytest.mark.parametrize("module", sorted(BESIDE))
def test_modules_beside_the_dispatcher_import_no_relay_module(module: str) -> None:
    assert relay_imports(module) == set()


@pytest.mark.parametrize("module", sorted(JOBS | SHARED))
def test_nothing_below_the_dispatcher_imports_it(module: str) -> None:
    assert "dispatch" not in relay_imports(module)


@pytest.mark.parametrize("module", sorted(JOBS))
def test_jobs_do_not_call_each_other(module: str) -> None:
    assert not relay_imports(module) & (JOBS - {module})


@pytest.mark.parametrize("module", sorted(SHARED))
def test_shared_steps_do_not_call_back_into_a_job(module: str) -> None:
    assert not relay_imports(module) & JOBS
