"""Unit tests are quick: one that hangs (a read that never gets its line, say) fails after a
bound instead of eating the CI's time."""

from __future__ import annotations

import pytest

UNIT_TEST_TIMEOUT = 120


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/unit/" in item.nodeid and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TEST_TIMEOUT))
