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
POLKIT_ACTION_LOCK = "org.cryptlockd1.lock"

LOGIND_BUS_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER_INTERFACE = "org.freedesktop.login1.Manager"
LOGIND_SESSION_INTERFACE = "org.freedesktop.login1.Session"
# logind's own polkit actions for a suspend, and the error it refuses one with because of a
# block inhibitor (systemd >= 258; older ones say AccessDenied "... active block inhibitor").
POLKIT_ACTION_LOGIN1_SUSPEND = "org.freedesktop.login1.suspend"
POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS = "org.freedesktop.login1.suspend-multiple-sessions"
POLKIT_ACTION_LOGIN1_SUSPEND_IGNORE_INHIBIT = "org.freedesktop.login1.suspend-ignore-inhibit"
LOGIND_ERROR_BLOCKED_BY_INHIBITOR = "org.freedesktop.login1.BlockedByInhibitorLock"
# SuspendWithFlags(): block inhibitors apply to a root caller too (sd-login's
# SD_LOGIND_ROOT_CHECK_INHIBITORS).
LOGIND_ROOT_CHECK_INHIBITORS = 1 << 0

SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
SYSTEMD_SERVICE_INTERFACE = "org.freedesktop.systemd1.Service"
# Where our drop-in puts the sleep entry (SPEC 2.3).
SLEEP_SERVICE = "systemd-suspend.service"
SYSTEMD_ERROR_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
SYSTEMD_ERROR_ALREADY_SUBSCRIBED = "org.freedesktop.systemd1.AlreadySubscribed"
# sd_booted(): systemd is PID 1 (and can run the helper's unit) when this directory exists.
SYSTEMD_BOOTED_DIR = "/run/systemd/system"

POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"

# The desktop notification server, on the session bus (cryptlockd-notify).
NOTIFICATIONS_BUS_NAME = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
NOTIFICATIONS_INTERFACE = "org.freedesktop.Notifications"
# cryptlockd-notify holds this name on the session bus: one agent per session, however it
# was started (user unit or XDG autostart).
NOTIFY_AGENT_BUS_NAME = "org.cryptlockd1.Notify"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_INTERFACE = "org.freedesktop.DBus.Introspectable"
PEER_INTERFACE = "org.freedesktop.DBus.Peer"

# The bus's own error names that we produce or act on.
ERR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
ERR_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
ERR_UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
ERR_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
ERR_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
ERR_PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
ERR_LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
ERR_TIMEOUT = "org.freedesktop.DBus.Error.Timeout"
ERR_DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"
ERR_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
ERR_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
ERR_NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
ERR_SPAWN_PREFIX = "org.freedesktop.DBus.Error.Spawn."

# What the Devices property carries of a device, in the XML's struct order (ssssbbsas).
DEVICE_FIELDS = (
    "name",
    "uuid",
    "luks_type",
    "backing_device",
    "holds_root",
    "suspended",
    "key_source",
    "holders",
)

# `cryptlockctl status --json` follows this JSON Schema, shipped in the package; its version
# changes only when a reader could break (see the schema's description).
STATUS_SCHEMA = Path(__file__).parent / "cli" / "status.schema.json"
STATUS_SCHEMA_VERSION = 1

# The introspection XML ships in dbus/ and is installed next to the package.
INTROSPECTION_XML = Path(__file__).with_name("org.cryptlockd1.Manager.xml")

CONFIG_FILE = "/etc/cryptlockd/cryptlockd.conf"
# Highest precedence first (searchpath.py).
CONFIG_DROPIN_DIRS = (
    "/etc/cryptlockd/cryptlockd.conf.d",
    "/run/cryptlockd/cryptlockd.conf.d",
    "/usr/lib/cryptlockd/cryptlockd.conf.d",
)
RUNTIME_DIR = "/run/cryptlockd"

# Default timeout for every D-Bus call we make, in seconds.
DBUS_CALL_TIMEOUT = 5.0


class State(StrEnum):
    IDLE = "idle"
    ARMING = "arming"
    ARMED = "armed"
    # Lock(): the cycle without the sleep, from the arm until its record (lock_cycle.py).
    LOCKED = "locked"
