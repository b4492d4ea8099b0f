"""The daemon's exported object: one object path serving the interface its introspection
XML describes, and plain values (a cycle record) as variants.

The Manager object is driven by the introspection XML (the single source of truth): the
methods, their signatures and the properties come from it, so what we export cannot drift
from what we document. It is served through a low-level message handler rather than a
dbus-fast ServiceInterface, because privileged methods need the caller's unique name from
the message header (polkit's subject), which ServiceInterface methods never see.

Our own errors are mapped to D-Bus error replies here, and only here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Method, Node

from cryptlockd.defs import (
    ERR_INVALID_ARGS,
    ERR_LIMITS_EXCEEDED,
    ERR_PROPERTY_READ_ONLY,
    ERR_UNKNOWN_INTERFACE,
    ERR_UNKNOWN_METHOD,
    ERR_UNKNOWN_PROPERTY,
    INTROSPECTABLE_INTERFACE,
    PEER_INTERFACE,
    PROPERTIES_INTERFACE,
)
from cryptlockd.errors import CryptlockdError

__all__ = ["ExportedObject", "MethodImpl", "to_vardict", "to_variant"]

log = logging.getLogger(__name__)

# A method implementation gets the call (for its sender) and its arguments and returns
# the out arguments. It raises CryptlockdError for anything the caller should see.
MethodImpl = Callable[[Message, list[Any]], Awaitable[list[Any]]]


def to_variant(value: Any) -> Variant:
    """Plain Python values (a cycle record) as variants for a{sv}."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [to_variant(v) for v in value])
    if value is None:
        return Variant("s", "")
    return Variant("s", str(value))


def to_vardict(record: Mapping[str, Any]) -> dict[str, Variant]:
    return {str(k): to_variant(v) for k, v in record.items()}


def _error(msg: Message, name: str, text: str) -> Message:
    return Message.new_error(msg, name, text)


class ExportedObject:
    """One object path serving the interfaces of an introspection XML document."""

    def __init__(
        self,
        bus: MessageBus,
        path: str,
        xml: str,
        get_property: Callable[[str], Any],
        methods: Mapping[str, MethodImpl],
        *,
        max_running: int = 16,
        max_pending: int = 1024,
    ) -> None:
        self._bus = bus
        self._path = path
        node = Node.parse(xml)
        if len(node.interfaces) != 1:
            raise ValueError("the introspection XML must describe exactly one interface")
        self.interface: Interface = node.interfaces[0]
        self._methods: dict[str, Method] = {m.name: m for m in self.interface.methods}
        self._property_types = {p.name: p.signature for p in self.interface.properties}
        missing = set(self._methods) - set(methods)
        if missing:
            raise ValueError(f"no implementation for {sorted(missing)}")
        self._impls = dict(methods)
        self._get_property = get_property
        # Bounded: a flood of calls queues here (up to max_pending) instead of spawning
        # unbounded work, and the excess gets LimitsExceeded.
        self._running = asyncio.Semaphore(max_running)
        self._max_pending = max_pending
        self._tasks: set[asyncio.Task[None]] = set()
        self._introspection = self._build_introspection()

    @staticmethod
    def _standard_node() -> Node:
        # dbus-fast's default node also lists ObjectManager, which this object is not.
        node = Node.default()
        node.interfaces = [
            i
            for i in node.interfaces
            if i.name in (INTROSPECTABLE_INTERFACE, PROPERTIES_INTERFACE, PEER_INTERFACE)
        ]
        return node

    def _build_introspection(self) -> str:
        node = self._standard_node()
        node.interfaces.append(self.interface)
        return str(node.tostring())

    def _ancestor_introspection(self, path: str) -> str | None:
        """Parents of our path list the next component, so `busctl tree` finds us."""
        prefix = path.rstrip("/") + "/"
        if not self._path.startswith(prefix):
            return None
        child = self._path[len(prefix) :].split("/")[0]
        node = self._standard_node()
        node.nodes.append(Node(child))
        return str(node.tostring())

    def start(self) -> None:
        self._bus.add_message_handler(self._handle)

    def stop(self) -> None:
        self._bus.remove_message_handler(self._handle)
        for t in self._tasks:
            t.cancel()

    # --- outgoing ------------------------------------------------------------------

    def emit_properties_changed(self, names: Sequence[str]) -> None:
        changed = {n: Variant(self._property_types[n], self._get_property(n)) for n in names}
        self._bus.send(
            Message.new_signal(
                self._path,
                PROPERTIES_INTERFACE,
                "PropertiesChanged",
                "sa{sv}as",
                [self.interface.name, changed, []],
            )
        )

    def emit_signal(self, member: str, body: list[Any]) -> None:
        sig = next(s for s in self.interface.signals if s.name == member)
        self._bus.send(
            Message.new_signal(self._path, self.interface.name, member, sig.signature, body)
        )

    # --- incoming ------------------------------------------------------------------

    def _handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        result = self._handle_call(msg)
        if isinstance(result, Message) and msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True  # handled; the caller asked for no reply, and a bus may refuse one
        return result

    def _handle_call(self, msg: Message) -> Message | bool | None:
        if msg.path != self._path:
            if msg.interface in (INTROSPECTABLE_INTERFACE, None) and msg.member == "Introspect":
                xml = self._ancestor_introspection(msg.path or "")
                if xml is not None:
                    return Message.new_method_return(msg, "s", [xml])
            return None
        iface = msg.interface
        if iface == PEER_INTERFACE:
            return None  # dbus-fast answers Ping and GetMachineId itself
        if iface == INTROSPECTABLE_INTERFACE or (iface is None and msg.member == "Introspect"):
            if msg.member != "Introspect" or msg.signature != "":
                return _error(msg, ERR_UNKNOWN_METHOD, f"no method {msg.member}")
            return Message.new_method_return(msg, "s", [self._introspection])
        if iface == PROPERTIES_INTERFACE:
            return self._properties(msg)
        if iface not in (self.interface.name, None):
            return _error(msg, ERR_UNKNOWN_INTERFACE, f"no interface {iface} at {self._path}")
        method = self._methods.get(msg.member or "")
        if method is None:
            return _error(msg, ERR_UNKNOWN_METHOD, f"no method {msg.member}")
        if msg.signature != method.in_signature:
            return _error(
                msg,
                ERR_INVALID_ARGS,
                f"{method.name} takes ({method.in_signature}), got ({msg.signature})",
            )
        if len(self._tasks) >= self._max_pending:
            return _error(msg, ERR_LIMITS_EXCEEDED, "too many calls in progress")
        task = asyncio.get_running_loop().create_task(self._dispatch(method, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _properties(self, msg: Message) -> Message:
        member, sig, body = msg.member, msg.signature, msg.body
        if member == "Get" and sig == "ss":
            if body[0] not in (self.interface.name, ""):
                return _error(msg, ERR_UNKNOWN_INTERFACE, f"no interface {body[0]}")
            ptype = self._property_types.get(body[1])
            if ptype is None:
                return _error(msg, ERR_UNKNOWN_PROPERTY, f"no property {body[1]}")
            value = Variant(ptype, self._get_property(body[1]))
            return Message.new_method_return(msg, "v", [value])
        if member == "GetAll" and sig == "s":
            if body[0] not in (self.interface.name, ""):
                return _error(msg, ERR_UNKNOWN_INTERFACE, f"no interface {body[0]}")
            values = {n: Variant(t, self._get_property(n)) for n, t in self._property_types.items()}
            return Message.new_method_return(msg, "a{sv}", [values])
        if member == "Set" and sig == "ssv":
            if body[0] != self.interface.name or body[1] not in self._property_types:
                return _error(msg, ERR_UNKNOWN_PROPERTY, f"no property {body[1]}")
            return _error(msg, ERR_PROPERTY_READ_ONLY, f"{body[1]} is read-only")
        return _error(
            msg,
            ERR_UNKNOWN_METHOD if member not in ("Get", "GetAll", "Set") else ERR_INVALID_ARGS,
            f"bad call {member}({sig})",
        )

    async def _dispatch(self, method: Method, msg: Message) -> None:
        async with self._running:
            try:
                out = await self._impls[method.name](msg, list(msg.body))
                reply = Message.new_method_return(msg, method.out_signature, out)
            except CryptlockdError as e:
                log.info("%s from %s: %s", method.name, msg.sender, e)
                reply = _error(msg, e.dbus_name, str(e))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s from %s failed", method.name, msg.sender)
                reply = _error(
                    msg, CryptlockdError.dbus_name, f"{method.name} failed; see the journal"
                )
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self._bus.send(reply)
        except Exception as e:  # the caller may be gone; that is its business
            log.debug("could not reply to %s: %s", msg.sender, e)
