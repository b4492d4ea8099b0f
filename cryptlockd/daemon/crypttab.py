"""/etc/crypttab (crypttab(5)): which key each device takes, a passphrase or a keyfile, and
the keyfile options the helper honours at resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CrypttabEntry", "parse_crypttab", "read_crypttab"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrypttabEntry:
    name: str
    device: str  # UUID=..., PARTUUID=..., LABEL=... or a path, as written
    keyfile: str | None  # None for "none", "-" or an absent field: ask for a passphrase
    options: tuple[str, ...] = ()

    @property
    def key_source(self) -> str:
        return f"keyfile:{self.keyfile}" if self.keyfile else "passphrase"

    @property
    def header(self) -> str | None:
        """header=: a detached LUKS header (a file or a device), or None."""
        for option in self.options:
            name, _, value = option.partition("=")
            if name == "header" and value:
                return value
        return None

    @property
    def keyfile_size(self) -> int:
        return self._bytes_option("keyfile-size")

    @property
    def keyfile_offset(self) -> int:
        return self._bytes_option("keyfile-offset")

    def _bytes_option(self, key: str) -> int:
        """A non-negative integer option; 0 when absent. An unreadable value is logged and
        read as 0 (the whole file), which at worst means a passphrase prompt at resume."""
        for option in self.options:
            name, _, value = option.partition("=")
            if name == key:
                if value.isdigit():
                    return int(value)
                log.warning("crypttab: %s: %s is not a number of bytes, ignored", self.name, option)
        return 0


def parse_crypttab(text: str) -> list[CrypttabEntry]:
    """crypttab(5): name, device, key file, options; '#' comments; fields split on blanks."""
    entries: list[CrypttabEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            log.warning("crypttab line %d has no device, ignored: %s", lineno, line)
            continue
        keyfile = fields[2] if len(fields) > 2 else None
        if keyfile in ("none", "-", ""):
            keyfile = None
        options = tuple(o for o in fields[3].split(",") if o) if len(fields) > 3 else ()
        entries.append(CrypttabEntry(fields[0], fields[1], keyfile, options))
    return entries


def read_crypttab(path: Path) -> list[CrypttabEntry]:
    try:
        return parse_crypttab(path.read_text(errors="replace"))
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
        return []
