"""pytest fixtures for the test bed.

Import them into ``tests/conftest.py``::

    from tests.testbed.fixtures import testbed, token_stats  # noqa: F401

The session-scoped ``testbed`` is shared process-wide: if the fixture function is imported into several
modules (which makes pytest register it several times), every registration yields the same running bed,
and it is stopped when the last user is torn down.

Environment knobs: ``TESTBED_BIG_BLOB_MIB`` (default 256) and ``TESTBED_TOKEN_TTL`` (default 300).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

import pytest

from .bed import Testbed
from .tokens import TokenServer


class _Shared:
    lock = threading.Lock()
    context: AbstractContextManager[Testbed] | None = None
    bed: Testbed | None = None
    users = 0


@contextlib.contextmanager
def shared_testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """Start the bed on first use (in a fresh ``tmp_path_factory`` directory) and share it."""
    with _Shared.lock:
        if _Shared.bed is None:
            workdir = tmp_path_factory.mktemp("testbed", numbered=True)
            context = Testbed.start(
                workdir,
                big_blob_mib=int(os.environ.get("TESTBED_BIG_BLOB_MIB", "256")),
                token_ttl=int(os.environ.get("TESTBED_TOKEN_TTL", "300")),
            )
            _Shared.bed = context.__enter__()
            _Shared.context = context
        _Shared.users += 1
        bed = _Shared.bed
    try:
        yield bed
    finally:
        with _Shared.lock:
            _Shared.users -= 1
            if _Shared.users == 0 and _Shared.context is not None:
                running = _Shared.context
                _Shared.context = None
                _Shared.bed = None
                running.__exit__(None, None, None)


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """The running test bed (session scope)."""
    with shared_testbed(tmp_path_factory) as bed:
        yield bed


@pytest.fixture
def token_stats(testbed: Testbed) -> TokenServer:
    """The token server with its request statistics reset for this test."""
    testbed.tokens.reset()
    return testbed.tokens
