"""The error hierarchy. Each error that can reach a D-Bus caller carries its name."""

from __future__ import annotations

from cryptlockd.defs import ERROR_PREFIX


class CryptlockdError(Exception):
    """Base of every error this project raises on purpose."""

    dbus_name = f"{ERROR_PREFIX}.Failed"


class NotAuthorized(CryptlockdError):
    dbus_name = f"{ERROR_PREFIX}.NotAuthorized"


class ConfigError(CryptlockdError):
    """A config file is unreadable or invalid. The message names the file and the key."""

    dbus_name = f"{ERROR_PREFIX}.ConfigInvalid"


class NoSuchDevice(CryptlockdError):
    dbus_name = f"{ERROR_PREFIX}.NoSuchDevice"


class Busy(CryptlockdError):
    dbus_name = f"{ERROR_PREFIX}.Busy"


class NotProtected(CryptlockdError):
    dbus_name = f"{ERROR_PREFIX}.NotProtected"


class LogindError(CryptlockdError):
    dbus_name = f"{ERROR_PREFIX}.LogindUnavailable"


class CommandError(CryptlockdError):
    """A subprocess failed; carries the command line and the exit status."""

    def __init__(self, argv: list[str], returncode: int, stderr: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        detail = f": {stderr.strip().splitlines()[-1]}" if stderr.strip() else ""
        super().__init__(f"{' '.join(argv)} exited with status {returncode}{detail}")


class RemoteError(CryptlockdError):
    """A D-Bus call we made failed: an error reply, a timeout, or a lost connection."""

    def __init__(self, what: str, error_name: str, text: str) -> None:
        self.what = what
        self.error_name = error_name
        self.text = text
        super().__init__(f"{what}: {error_name}: {text}")
