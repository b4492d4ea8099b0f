"""Authorization of privileged methods through polkit.

Fails closed: a polkit error, an unexpected reply or a timeout all mean "denied".
"""

from __future__ import annotations

import logging

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from cryptlockd.bus import RemoteInterface, bus_daemon
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.defs import POLKIT_BUS_NAME, POLKIT_INTERFACE, POLKIT_PATH
from cryptlockd.errors import NotAuthorized, RemoteError

log = logging.getLogger(__name__)

ALLOW_USER_INTERACTION = 1

# Long enough for a person to type a password into a polkit agent, and for a bus-activated
# polkitd to start on a slow machine (5 s was not: a TCG guest took 5.1 s to start it).
# Shorter than cryptlockctl's 60 s, so the CLI reports the denial, not its own timeout.
DEFAULT_TIMEOUT = 50.0


async def is_authorized(
    bus: MessageBus, sender: str, action: str, timeout: float = DEFAULT_TIMEOUT
) -> bool:
    """Whether the bus client `sender` (a unique name, from the message header) may do
    `action`. The subject kind is system-bus-name: polkit resolves it to the caller's
    process and session itself, so nothing the caller says about itself is trusted."""
    subject = ["system-bus-name", {"name": Variant("s", sender)}]
    try:
        authority = RemoteInterface(bus, POLKIT_BUS_NAME, POLKIT_PATH, POLKIT_INTERFACE, timeout)
        reply = await authority.call(
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
            [subject, action, {}, ALLOW_USER_INTERACTION, ""],
        )
        is_auth, is_challenge, _details = reply.body[0]
        allowed = bool(is_auth) and reply.signature == "(bba{ss})"
        challenge = bool(is_challenge)
    except (RemoteError, ValueError, TypeError, IndexError) as e:
        log.warning(
            "polkit check of %s for %s failed, denying: %s",
            action,
            sender,
            e,
            extra=event(MessageId.AUTHORIZATION, ACTION=action, SENDER=sender, RESULT="error"),
        )
        return False
    log.info(
        "polkit: %s for %s: %s",
        action,
        sender,
        "allowed" if allowed else ("challenge" if challenge else "denied"),
        extra=event(
            MessageId.AUTHORIZATION,
            ACTION=action,
            SENDER=sender,
            RESULT="allowed" if allowed else "denied",
        ),
    )
    return allowed


async def require(
    bus: MessageBus, sender: str | None, action: str, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Raise NotAuthorized unless polkit says yes and the caller is still there.

    The second part matters when the check took a while (an authentication dialog, a slow
    polkitd): a caller that disconnected meanwhile has abandoned its request, and we do
    not act on it. Unique names are never reused, so the test is exact."""
    if not sender or not await is_authorized(bus, sender, action, timeout):
        raise NotAuthorized(f"not authorized for {action}")
    try:
        reply = await bus_daemon(bus, timeout).call("NameHasOwner", "s", [sender])
        present = bool(reply.body[0])
    except RemoteError as e:
        log.warning("cannot tell whether %s is still connected: %s", sender, e)
        present = False
    if not present:
        log.info("%s disconnected while waiting for polkit; %s dropped", sender, action)
        raise NotAuthorized(f"caller disconnected before {action} was authorized")
