"""The one subprocess wrapper. Nothing else in the daemon calls subprocess directly."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence

from cryptlockd.errors import CommandError

log = logging.getLogger(__name__)

# Variables that belong to this process's service manager and must not leak to children:
# a child that inherits NOTIFY_SOCKET could report READY/STOPPING on our behalf.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in argv]
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(env),
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(cmd, 127, str(e)) from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(cmd, -1, f"timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stderr)
    return proc
