"""The daemon's signals as its clients (cryptlockctl monitor, cryptlockd-notify) read them.

Only signals from the current owner of org.cryptlockd1 count: match rules keep forged
broadcasts away, but anyone may send a signal straight to a client's unique name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageType

from cryptlockd.cli.output import plain
from cryptlockd.defs import (
    BUS_NAME,
    DBUS_NAME,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)

__all__ = ["CycleFinished", "OwnerChanged", "PropertiesChanged", "daemon_signal", "owner_change"]


@dataclass(frozen=True)
class OwnerChanged:
    owner: str  # "" when the daemon left the bus


@dataclass(frozen=True)
class PropertiesChanged:
    changed: dict[str, Any]  # plain values (cli.output.plain)
    invalidated: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CycleFinished:
    success: bool
    record: dict[str, Any]


def owner_change(msg: Message, name: str) -> str | None:
    """The new owner of `name` ("" for none) when `msg` is the bus's NameOwnerChanged for it."""
    if (
        msg.message_type == MessageType.SIGNAL
        and msg.member == "NameOwnerChanged"
        and msg.sender == DBUS_NAME
        and msg.interface == DBUS_NAME
        and msg.signature == "sss"
        and msg.body[0] == name
    ):
        return str(msg.body[2])
    return None


def daemon_signal(
    msg: Message, owner: str
) -> OwnerChanged | PropertiesChanged | CycleFinished | None:
    """What `msg` says, if it is one of the daemon's signals and `owner` (the daemon's
    current unique name) sent it, or the bus's word that the owner changed. Pure."""
    new_owner = owner_change(msg, BUS_NAME)
    if new_owner is not None:
        return OwnerChanged(new_owner)
    if (
        msg.message_type != MessageType.SIGNAL
        or not owner
        or msg.sender != owner
        or msg.path != OBJECT_PATH
    ):
        return None
    if (
        msg.member == "PropertiesChanged"
        and msg.interface == PROPERTIES_INTERFACE
        and msg.signature == "sa{sv}as"
        and msg.body[0] == MANAGER_INTERFACE
    ):
        return PropertiesChanged(plain(msg.body[1]), [str(x) for x in msg.body[2]])
    if (
        msg.member == "CycleFinished"
        and msg.interface == MANAGER_INTERFACE
        and msg.signature == "ba{sv}"
    ):
        return CycleFinished(bool(msg.body[0]), plain(msg.body[1]))
    return None
