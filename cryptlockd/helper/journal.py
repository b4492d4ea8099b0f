"""Lines for the journal, each with its syslog priority.

systemd connects the helper's stderr and the sleep entry's stdout to the journal, where a
"<N>" at the start of a line sets that line's priority (sd-daemon(3)). The helper and the
sleep entry share this; it is in the helper's closure, so no `logging` here.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from typing import TextIO

# syslog(3) priorities, as the journal reads them.
CRIT = 2
ERR = 3
WARNING = 4
NOTICE = 5
INFO = 6
DEBUG = 7


def log(priority: int, text: str, stream: TextIO | None = None, tag: str = "") -> None:
    """Writes every line of `text` with the priority and the tag to `stream` (stderr unless
    given). The helper never logs while the system is frozen: a full pipe to a frozen
    journald would block it."""
    out = sys.stderr if stream is None else stream
    for line in text.splitlines() or [""]:
        out.write(f"<{priority}>{tag}{line}\n")
    out.flush()
