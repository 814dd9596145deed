"""The windows' memory budget from the container's limit (gateway/sizing.py): cgroup files, arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import sizing

MIB = 1 << 20


@pytest.mark.parametrize(
    ("text", "limit"),
    [("536870912\n", 512 * MIB), ("max\n", None), ("9223372036854771712\n", None), ("junk", None)],
)
def test_the_limit_is_read_from_cgroup_v2_or_v1(tmp_path: Path, text: str, limit: int | None) -> None:
    v1 = tmp_path / "memory.limit_in_bytes"
    v1.write_text(text)
    assert sizing.container_limit([str(tmp_path / "absent"), str(v1)]) == limit
    assert sizing.container_limit([str(tmp_path / "absent")]) is None


def test_the_budget_fits_the_workers_under_the_limit() -> None:
    # The shipped pod: 512 MiB; one worker gets 80% of it less its baseline.
    one = sizing.budget(None, 1, 512 * MIB)
    assert (one.per_worker, one.source) == (int(512 * MIB * sizing.HEADROOM) - sizing.BASELINE, "limit")
    two = sizing.budget(None, 2, 512 * MIB)
    assert 2 * (two.per_worker + sizing.BASELINE) <= 512 * MIB * sizing.HEADROOM
    assert sizing.budget(None, 8, 256 * MIB).per_worker == 0  # no room: every fetch relayed alone
    assert sizing.budget(None, 1, 64 << 30).per_worker == sizing.DEFAULT  # a big limit: no more than before
    assert sizing.budget(None, 2, None) == sizing.Budget(sizing.DEFAULT, None, "default")


def test_an_explicit_budget_wins_and_is_refused_when_it_cannot_fit() -> None:
    assert sizing.budget(100 * MIB, 2, 512 * MIB) == sizing.Budget(100 * MIB, 512 * MIB, "setting")
    assert sizing.budget(4 << 30, 4, None).per_worker == 4 << 30
    with pytest.raises(sizing.DoesNotFit, match="over the container's limit of 512 MiB"):
        sizing.budget(512 * MIB, 2, 512 * MIB)
