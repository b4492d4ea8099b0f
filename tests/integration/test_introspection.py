"""What the daemon exports is exactly the interface in dbus/org.cryptlockd1.Manager.xml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Node

from cryptlockd.defs import (
    BUS_NAME,
    INTROSPECTABLE_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PEER_INTERFACE,
    PROPERTIES_INTERFACE,
)
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, SystemBus
from tests.integration.support import call_ok, get_all, message

XML = Path(__file__).resolve().parents[2] / "dbus" / "org.cryptlockd1.Manager.xml"


def describe(iface: Interface) -> dict[str, object]:
    """Everything a client depends on, in a comparable form."""
    return {
        "methods": sorted(
            (
                m.name,
                tuple((a.name, a.signature, a.direction.value) for a in m.in_args + m.out_args),
            )
            for m in iface.methods
        ),
        "properties": sorted((p.name, p.signature, p.access.value) for p in iface.properties),
        "signals": sorted(
            (s.name, tuple((a.name, a.signature) for a in s.args)) for s in iface.signals
        ),
    }


def shipped_interface() -> Interface:
    [iface] = Node.parse(XML.read_text()).interfaces
    return iface


async def introspect(client: MessageBus, path: str = OBJECT_PATH) -> Node:
    [xml] = await call_ok(
        client, message("Introspect", interface=INTROSPECTABLE_INTERFACE, path=path)
    )
    return Node.parse(xml)


@pytest.fixture
def daemon(logind: LogindMock, start_daemon: DaemonFactory) -> Daemon:
    return start_daemon()


@pytest.mark.asyncio
async def test_exported_interface_matches_xml(daemon: Daemon, client: MessageBus) -> None:
    node = await introspect(client)
    exported = {i.name: i for i in node.interfaces}
    assert MANAGER_INTERFACE in exported
    assert describe(exported[MANAGER_INTERFACE]) == describe(shipped_interface())
    # Only the standard interfaces besides ours.
    assert set(exported) - {MANAGER_INTERFACE} <= {
        INTROSPECTABLE_INTERFACE,
        PROPERTIES_INTERFACE,
        PEER_INTERFACE,
    }
    # Parents list us, so `busctl tree` finds the object.
    assert [n.name for n in (await introspect(client, "/org")).nodes] == ["cryptlockd1"]


@pytest.mark.asyncio
async def test_getall_has_every_property_with_its_type(daemon: Daemon, client: MessageBus) -> None:
    values = await get_all(client)
    expected = {p.name: p.signature for p in shipped_interface().properties}
    assert {k: v.signature for k, v in values.items()} == expected
    assert values["State"].value == "idle"
    assert values["Version"].value


@pytest.mark.skipif(shutil.which("busctl") is None, reason="busctl (systemd) not installed")
def test_busctl_introspect_shows_it(system_bus: SystemBus, daemon: Daemon) -> None:
    out = subprocess.run(
        [
            "busctl",
            f"--address={system_bus.address}",
            "--no-pager",
            "introspect",
            BUS_NAME,
            OBJECT_PATH,
            MANAGER_INTERFACE,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    print(out)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line.strip()}
    iface = shipped_interface()
    for m in iface.methods:
        kind, sig, *_ = rows[f".{m.name}"]
        assert kind == "method"
        assert sig == (m.in_signature or "-")
    for p in iface.properties:
        kind, sig, *_ = rows[f".{p.name}"]
        assert (kind, sig) == ("property", p.signature)
    for s in iface.signals:
        kind, sig, *_ = rows[f".{s.name}"]
        assert (kind, sig) == ("signal", s.signature)
