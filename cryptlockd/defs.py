"""Names shared by the daemon, the CLI and the tests: one place, no stray literals."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

BUS_NAME = "org.cryptlockd1"
OBJECT_PATH = "/org/cryptlockd1"
MANAGER_INTERFACE = "org.cryptlockd1.Manager"
ERROR_PREFIX = "org.cryptlockd1.Error"

POLKIT_ACTION_SUSPEND = "org.cryptlockd1.suspend"
POLKIT_ACTION_CONFIGURE = "org.cryptlockd1.configure"

LOGIND_BUS_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER_INTERFACE = "org.freedesktop.login1.Manager"

POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"

# The introspection XML ships in dbus/ and is installed next to the package.
INTROSPECTION_XML = Path(__file__).with_name("org.cryptlockd1.Manager.xml")

CONFIG_FILE = "/etc/cryptlockd/cryptlockd.conf"
CONFIG_DROPIN_DIRS = (
    "/usr/lib/cryptlockd/cryptlockd.conf.d",
    "/run/cryptlockd/cryptlockd.conf.d",
    "/etc/cryptlockd/cryptlockd.conf.d",
)
RUNTIME_DIR = "/run/cryptlockd"

# Default timeout for every D-Bus call we make, in seconds.
DBUS_CALL_TIMEOUT = 5.0


class State(StrEnum):
    IDLE = "idle"
    ARMING = "arming"
    ARMED = "armed"
    RESUMING = "resuming"
