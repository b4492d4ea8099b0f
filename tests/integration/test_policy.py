"""dbus/org.cryptlockd1.conf, enforced by a real dbus-daemon with the system bus's default
deny policy: root owns the name; an unprivileged uid cannot, and the bus refuses it what
the file does not allow, while Check and property reads work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock, SystemBus

pytestmark = [
    pytest.mark.system_bus_policy,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root to run the daemon as root and a client as another uid"
    ),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing"),
]

NOBODY = 65534
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

# Runs as the unprivileged uid under the system interpreter (dbus-python from Debian).
CLIENT = r"""
import json, sys
import dbus
op = json.loads(sys.argv[1])
bus = dbus.bus.BusConnection(sys.argv[2])
try:
    if op["kind"] == "own":
        result = int(bus.request_name(op["name"], dbus.bus.NAME_FLAG_DO_NOT_QUEUE))
    else:
        obj = bus.get_object("org.cryptlockd1", "/org/cryptlockd1", introspect=False)
        args = [dbus.Boolean(a) if isinstance(a, bool) else a for a in op["args"]]
        if op.get("variant") is not None:
            args.append(dbus.Boolean(op["variant"], variant_level=1))
        result = getattr(obj, op["member"])(*args, dbus_interface=op["iface"], timeout=20)
    print(json.dumps({"ok": True, "result": json.loads(json.dumps(result, default=str))}))
except dbus.DBusException as e:
    print(json.dumps({"ok": False, "error": e.get_dbus_name(), "text": str(e)}))
"""


def as_nobody(bus: SystemBus, op: dict[str, object]) -> dict[str, object]:
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            CLIENT,
            json.dumps(op),
            bus.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def method(iface: str, member: str, *args: object, variant: object = None) -> dict[str, object]:
    return {
        "kind": "call",
        "iface": iface,
        "member": member,
        "args": list(args),
        "variant": variant,
    }


MANAGER = "org.cryptlockd1.Manager"
PROPS = "org.freedesktop.DBus.Properties"


def test_root_daemon_owns_the_name_nobody_cannot(
    system_bus: SystemBus, logind: LogindMock, start_daemon: DaemonFactory
) -> None:
    start_daemon()  # as root, and it got the name (start_daemon waits for that)
    assert system_bus.name_has_owner("org.cryptlockd1")
    r = as_nobody(system_bus, {"kind": "own", "name": "org.cryptlockd1"})
    assert r == {"ok": False, "error": ACCESS_DENIED, "text": r.get("text")}


def test_daemon_as_nobody_cannot_take_the_name(
    system_bus: SystemBus, logind: LogindMock, start_daemon: DaemonFactory
) -> None:
    # The real daemon, unprivileged: the bus refuses it the name and it exits saying so.
    # It cannot even read its (0700) test root: that must not stop it from trying.
    d = start_daemon(wait=False, preexec_fn=_drop_to_nobody)
    assert d.proc.wait(60) == 1
    assert "cannot own org.cryptlockd1" in d.log() and ACCESS_DENIED in d.log()
    assert not system_bus.name_has_owner("org.cryptlockd1")


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_unprivileged_caller(
    system_bus: SystemBus, logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory
) -> None:
    start_daemon()
    # Allowed by the policy file, answered by the daemon.
    r = as_nobody(system_bus, method(MANAGER, "Check"))
    assert r["ok"], r
    assert any(row[0] == "luks-devices" for row in r["result"])  # type: ignore[union-attr]
    r = as_nobody(system_bus, method(PROPS, "Get", MANAGER, "State"))
    assert r == {"ok": True, "result": "idle"}
    r = as_nobody(system_bus, method(PROPS, "GetAll", MANAGER))
    assert r["ok"] and "Protected" in r["result"]  # type: ignore[operator]
    r = as_nobody(system_bus, method("org.freedesktop.DBus.Introspectable", "Introspect"))
    assert r["ok"] and MANAGER in r["result"]  # type: ignore[operator]
    r = as_nobody(system_bus, method("org.freedesktop.DBus.Peer", "Ping"))
    assert r["ok"], r
    r = as_nobody(system_bus, method(MANAGER, "GetDevice", "nope"))
    assert r["error"] == "org.cryptlockd1.Error.NoSuchDevice"

    # Allowed by the bus, refused by polkit (the mock denies everything by default).
    r = as_nobody(system_bus, method(MANAGER, "SetEnabled", False))
    assert r["error"] == "org.cryptlockd1.Error.NotAuthorized", r

    # Refused by the bus itself: the daemon would answer PropertyReadOnly/UnknownMethod,
    # so AccessDenied proves the policy file did it.
    r = as_nobody(system_bus, method(PROPS, "Set", MANAGER, "Enabled", variant=False))
    assert r["error"] == ACCESS_DENIED, r
    r = as_nobody(system_bus, method(MANAGER, "NoSuchMethod"))
    assert r["error"] == ACCESS_DENIED, r
    r = as_nobody(system_bus, method("org.freedesktop.DBus.Mock", "AddMethod"))
    assert r["error"] == ACCESS_DENIED, r
