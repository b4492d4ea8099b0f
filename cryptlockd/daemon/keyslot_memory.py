"""The keyslot that took each device's passphrase last time, kept across restarts and
reboots in the state directory (/var/lib/cryptlockd/keyslots.json).

The helper tries that keyslot first (SPEC 5.2): each keyslot tried costs a whole KDF run,
seconds with Argon2id. Kept only in memory, the first resume after every boot or daemon
restart went through the keyslots in order, a keyfile's slot or a recovery passphrase's
in front included (issue 12).

By the LUKS header's UUID, not the mapping's name: a name can come back on another disk.
Which keyslot opens a disk is no secret (`cryptsetup luksDump` shows the active ones, and
the cycle record says it), but the file is root's only. A file that cannot be read is
only a hint lost: the keyslots are tried in order, as for a disk never seen."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptlockd.daemon.devices import LuksDevice

log = logging.getLogger(__name__)

DEFAULT_STATE_DIRECTORY = "/var/lib/cryptlockd"
FILE_NAME = "keyslots.json"
# LUKS2 has 32 keyslots (LUKS1: 8).
MAX_KEYSLOTS = 32


def state_directory(environ: Mapping[str, str] = os.environ) -> Path:
    """systemd's StateDirectory= (it sets $STATE_DIRECTORY; several are colon-separated),
    else the conventional place."""
    given = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(given or DEFAULT_STATE_DIRECTORY)


def _slot(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_KEYSLOTS:
        return value
    return None


def parse(text: str) -> dict[str, int]:
    """UUID -> keyslot from the file's text; entries that are not a keyslot are left out.
    Raises ValueError for a file that is not ours."""
    data = json.loads(text)
    slots = data.get("keyslots") if isinstance(data, dict) else None
    if not isinstance(slots, dict):
        raise ValueError("no keyslots object")
    return {str(uuid): s for uuid, value in slots.items() if (s := _slot(value)) is not None}


def render(slots: Mapping[str, int]) -> str:
    return json.dumps({"keyslots": dict(sorted(slots.items()))}, indent=1) + "\n"


def hints(slots: Mapping[str, int], devices: Sequence[LuksDevice]) -> dict[str, int]:
    """The arm message's `keyslots`: by dm name, for the devices of this arm."""
    return {d.name: slots[d.uuid] for d in devices if d.uuid in slots}


def learned(
    slots: Mapping[str, int], uuids: Mapping[str, str], record_slots: object
) -> dict[str, int]:
    """`slots` with what a cycle record's `keyslots` (by dm name) says; `uuids`: dm name ->
    LUKS UUID of the devices that were armed."""
    out = dict(slots)
    if isinstance(record_slots, Mapping):
        for name, value in record_slots.items():
            uuid, slot = uuids.get(str(name)), _slot(value)
            if uuid and slot is not None:
                out[uuid] = slot
    return out


class KeyslotMemory:
    """The remembered keyslots and their file. `directory` None: memory only."""

    def __init__(self, directory: Path | None) -> None:
        self.path = directory / FILE_NAME if directory is not None else None
        self.slots: dict[str, int] = {}
        # Saves run in threads (the file is on a disk that may stall); one at a time.
        self._write_lock = threading.Lock()

    def load(self) -> None:
        if self.path is None:
            return
        try:
            self.slots = parse(self.path.read_text())
        except FileNotFoundError:
            self.slots = {}
        except (OSError, ValueError) as e:
            log.warning(
                "%s: %s; the keyslots are tried in order until a cycle succeeds", self.path, e
            )
            self.slots = {}

    def save(self, slots: Mapping[str, int]) -> None:
        """Writes `slots` whole, through a new file renamed over the old one: a crash
        leaves the old file or the new one. Logs what fails; raises nothing."""
        if self.path is None:
            return
        with self._write_lock:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(render(slots))
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            except OSError as e:
                log.warning("cannot save the keyslots to %s: %s", self.path, e)
