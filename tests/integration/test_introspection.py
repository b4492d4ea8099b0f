"""What the daemon exports is exactly the interface in dbus/org.cryptlockd1.Manager.xml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Node

from cryptlockd.defs import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH
from tests.integration.conftest import DaemonFactory, LogindMock, SystemBus

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
    reply = await client.call(
        Message(
            destination=BUS_NAME,
            path=path,
            interface="org.freedesktop.DBus.Introspectable",
            member="Introspect",
        )
    )
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
    return Node.parse(reply.body[0])


@pytest.mark.asyncio
async def test_exported_interface_matches_xml(
    logind: LogindMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    start_daemon()
    node = await introspect(client)
    exported = {i.name: i for i in node.interfaces}
    assert MANAGER_INTERFACE in exported
    assert describe(exported[MANAGER_INTERFACE]) == describe(shipped_interface())
    # Only the standard interfaces besides ours.
    assert set(exported) - {MANAGER_INTERFACE} <= {
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Properties",
        "org.freedesktop.DBus.Peer",
    }
    # Parents list us, so `busctl tree` finds the object.
    assert [n.name for n in (await introspect(client, "/org")).nodes] == ["cryptlockd1"]


@pytest.mark.asyncio
async def test_getall_has_every_property_with_its_type(
    logind: LogindMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    start_daemon()
    reply = await client.call(
        Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface="org.freedesktop.DBus.Properties",
            member="GetAll",
            signature="s",
            body=[MANAGER_INTERFACE],
        )
    )
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
    values: dict[str, Variant] = reply.body[0]
    expected = {p.name: p.signature for p in shipped_interface().properties}
    assert {k: v.signature for k, v in values.items()} == expected
    assert values["State"].value == "idle"
    assert values["Version"].value


@pytest.mark.skipif(shutil.which("busctl") is None, reason="busctl (systemd) not installed")
def test_busctl_introspect_shows_it(
    system_bus: SystemBus, logind: LogindMock, start_daemon: DaemonFactory
) -> None:
    start_daemon()
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
