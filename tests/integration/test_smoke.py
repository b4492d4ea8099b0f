"""The fixtures themselves: a private bus with the logind and polkitd mocks on it."""

from __future__ import annotations

import pytest
from dbus_fast.aio import MessageBus

from cryptlockd.defs import LOGIND_BUS_NAME, POLKIT_BUS_NAME
from tests.integration.conftest import LogindMock, PolkitMock, SystemBus


@pytest.mark.asyncio
async def test_private_bus_with_mocks(
    system_bus: SystemBus, logind: LogindMock, polkit: PolkitMock, client: MessageBus
) -> None:
    assert system_bus.name_has_owner(LOGIND_BUS_NAME)
    assert system_bus.name_has_owner(POLKIT_BUS_NAME)
    assert client.unique_name and client.unique_name.startswith(":")
    assert logind.list_inhibitors() == []
    assert polkit.have_hanging_calls() is False
