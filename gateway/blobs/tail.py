"""A merged fetch's tail: readers that keep up but had not reached the older fetch's bytes at the merge.

They read on from the younger fetch's window (its upstream body is closed), and the older fetch keeps
its bytes from the merge offset for them (a pin: a reader with no client, paced like any other; one
that makes the herd wait too long is let go, and the tail's readers then go on alone). Found in #21:
a merge sent every such reader off on its own upstream request.
"""

from __future__ import annotations

from typing import Any

from gateway.blobs.terms import Resume


def keep(younger: Any, older: Any, position: int) -> None:
    """``younger`` merged into ``older`` at ``position`` with readers still short of it: pin ``older`` there."""
    younger.pinned = older._attach(position, older.total, pin=True)


def hop(younger: Any, reader: Any) -> None:
    """``reader`` read the merged ``younger``'s tail to its end: on in the older fetch from the same
    offset if the pin kept it, else alone from here."""
    pin = younger.pinned
    older = pin.fetch if pin is not None else None
    if (
        older is not None
        and pin.resume is None
        and older.error is None
        and not older.merged
        and older.base <= reader.position <= older.produced
    ):
        younger.readers.discard(reader)
        reader.fetch = older
        older.readers.add(reader)
        older.served += 1
    else:
        younger.detach(reader, "slow")
    if not younger.readers:
        younger._idle()  # the window goes, and the pin with it


def unpin(younger: Any) -> None:
    """The tail is gone: the older fetch no longer keeps bytes for it."""
    pin, younger.pinned = younger.pinned, None
    if pin is not None and pin.resume is None:
        pin.fetch._leave(pin)
        pin.fetch.pace.wake()


def let_go(older: Any, pin: Any, reason: str) -> None:
    """The older fetch could not keep its bytes for the tail any longer: its readers go on alone."""
    pin.resume = Resume(pin.position, reason)
    older.readers.discard(pin)
    older._wake()
