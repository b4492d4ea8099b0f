"""cryptlockctl's D-Bus client: how a failed call reads, and timeouts that nest with the
daemon's, or the caller sees a bare timeout instead of the daemon's answer."""

from __future__ import annotations

import pytest

from cryptlockd.cli import client
from cryptlockd.daemon import polkit
from cryptlockd.defs import (
    ERR_DISCONNECTED,
    ERR_NAME_HAS_NO_OWNER,
    ERR_SERVICE_UNKNOWN,
    ERR_SPAWN_PREFIX,
    ERR_TIMEOUT,
)
from cryptlockd.errors import RemoteError

# sd-bus and busctl give up on a method call after 25 s unless told otherwise.
SD_BUS_DEFAULT_CALL_TIMEOUT = 25.0


def test_polkit_wait_leaves_time_for_a_password_and_fits_inside_cryptlockctl() -> None:
    # A password typed into a polkit agent, or polkitd bus-activated on a slow machine
    # (a TCG guest needed 5.1 s), must not count as "denied".
    assert polkit.DEFAULT_TIMEOUT >= SD_BUS_DEFAULT_CALL_TIMEOUT
    # cryptlockctl must still get NotAuthorized from the daemon, not a timeout of its own.
    assert polkit.DEFAULT_TIMEOUT + 5 <= client.PRIVILEGED_TIMEOUT


@pytest.mark.parametrize(
    ("error_name", "text", "line"),
    [
        (ERR_SERVICE_UNKNOWN, "x", client.NOT_RUNNING),
        (ERR_NAME_HAS_NO_OWNER, "x", client.NOT_RUNNING),
        (
            ERR_SPAWN_PREFIX + "ChildExited",
            "exit 1",
            "cryptlockd is not running and could not be started: exit 1 "
            f"({ERR_SPAWN_PREFIX}ChildExited)",
        ),
        (ERR_TIMEOUT, "no reply within 2.5 s", "Check: no answer from cryptlockd within 2.5 s"),
        (ERR_DISCONNECTED, "EOF", "Check: lost the connection to the system bus: EOF"),
        (
            "org.cryptlockd1.Error.Busy",
            "a cycle\n  runs",
            "Check failed: org.cryptlockd1.Error.Busy: a cycle runs",
        ),
    ],
)
def test_a_failed_call_is_one_line(error_name: str, text: str, line: str) -> None:
    err = client.ctl_error("Check", RemoteError("org.cryptlockd1 Check", error_name, text), 2.5)
    assert str(err) == line
