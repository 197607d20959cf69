"""Garbage collection in a control process that holds millions of long-lived objects.

An environment of 150,000 tasks is about two million objects (its plan, its task records
and their indexes) that live as long as it does. CPython's cyclic collector walks every
object it tracks at each full collection, and creating or deploying such an environment
sets off several, each a walk over all of them. So the control plane moves what exists
once an environment is created out of the collector's sight (``gc.freeze``), after a
cheap collection of the young generations so that little garbage goes with it, and gives
it all back when an environment ends (``gc.unfreeze``), so that the next full collection
frees the cycles of the one that ended. And it collects the youngest generation every
20,000 new objects rather than 700: a step makes objects in batches (an order, an
outcome, a change per task), and with the default most of a batch outlived a young
collection, was promoted, and set off full ones (measured with ``gc.callbacks`` in
``bench/agents_150k.py``, with environments already frozen: 18 full collections, 0.7 s
of a 5.1 s create -> RUNNING of 150,000 tasks; none with 20,000). While it builds one
(expands a plan, creates or takes over an environment: synchronous work, no await
inside), it does not collect at all: each collection would walk the growing heap again.
Reference counting frees everything else as usual, frozen or not.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG = 20_000  # new objects between two collections of the youngest generation


def tune() -> None:
    """The control process's collector settings (see the module doc)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG, older, oldest)


def settle() -> None:
    """What is alive now lives long: leave it out of later collections."""
    gc.collect(1)
    gc.freeze()


def release() -> None:
    """An environment ended: let the collector see everything again."""
    gc.unfreeze()


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Build long-lived objects in bulk: no cyclic collection meanwhile; what was built
    is settled at the end. Nests."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
            settle()
