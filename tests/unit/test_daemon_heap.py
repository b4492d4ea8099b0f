"""The daemon's heap once started (daemon/main.settle_heap)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from cryptlockd.daemon.main import settle_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_start_up_objects_are_out_of_the_cycle_collectors_way(unfrozen: None) -> None:
    before = gc.get_freeze_count()
    assert before == 0
    settle_heap()
    # Everything tracked then is frozen; a full collection no longer walks it.
    assert gc.get_freeze_count() > 1000
    assert sum(len(gc.get_objects(generation=g)) for g in range(3)) < gc.get_freeze_count()
