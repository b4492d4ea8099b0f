"""cli/signals.py: the daemon's signals count only from its current owner."""

from __future__ import annotations

from dbus_fast import Message, MessageType, Variant

from cryptlockd.cli.signals import (
    CycleFinished,
    OwnerChanged,
    PropertiesChanged,
    daemon_signal,
    owner_change,
)
from cryptlockd.defs import (
    BUS_NAME,
    DBUS_NAME,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)

OWNER = ":1.7"


def signal(sender: str, interface: str, member: str, signature: str, body: list[object]) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        sender=sender,
        path=OBJECT_PATH if interface != DBUS_NAME else "/org/freedesktop/DBus",
        interface=interface,
        member=member,
        signature=signature,
        body=body,
    )


def cycle_from(sender: str) -> Message:
    record = {"result": Variant("s", "success"), "devices": Variant("as", ["root"])}
    return signal(sender, MANAGER_INTERFACE, "CycleFinished", "ba{sv}", [True, record])


def test_the_owners_signals() -> None:
    changed = signal(
        OWNER,
        PROPERTIES_INTERFACE,
        "PropertiesChanged",
        "sa{sv}as",
        [MANAGER_INTERFACE, {"Protected": Variant("b", False)}, ["Devices"]],
    )
    assert daemon_signal(changed, OWNER) == PropertiesChanged({"Protected": False}, ["Devices"])
    assert daemon_signal(cycle_from(OWNER), OWNER) == CycleFinished(
        True, {"result": "success", "devices": ["root"]}
    )


def test_a_forged_signal_counts_for_nothing() -> None:
    assert daemon_signal(cycle_from(":1.66"), OWNER) is None
    assert daemon_signal(cycle_from(OWNER), "") is None  # no daemon: nobody's signal counts


def test_the_owner_changes_only_by_the_bus_word() -> None:
    args = [BUS_NAME, OWNER, ":1.8"]
    from_bus = signal(DBUS_NAME, DBUS_NAME, "NameOwnerChanged", "sss", args)
    assert daemon_signal(from_bus, OWNER) == OwnerChanged(":1.8")
    assert owner_change(from_bus, "org.freedesktop.Notifications") is None
    forged = signal(":1.66", DBUS_NAME, "NameOwnerChanged", "sss", args)
    assert daemon_signal(forged, OWNER) is None
    gone = signal(DBUS_NAME, DBUS_NAME, "NameOwnerChanged", "sss", [BUS_NAME, OWNER, ""])
    assert daemon_signal(gone, OWNER) == OwnerChanged("")
