"""A desktop session for cryptlockd-notify's tests: a private session bus, an X server
(Xvfb) and a REAL notification server (dunst) on them. dunst runs a script for every
notification it shows; the script's log is the server's own record of what it displayed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryptlockd.defs import NOTIFICATIONS_BUS_NAME
from tests.integration.conftest import (
    START_TIMEOUT,
    VENV_PYTHON,
    LoggedProcess,
    Reporter,
    SystemBus,
    start_bus,
)
from tests.wait import GiveUp, wait_until

XVFB = shutil.which("Xvfb")
DUNST = shutil.which("dunst")
needs_desktop = pytest.mark.skipif(
    XVFB is None or DUNST is None,
    reason="needs Xvfb and dunst (HOST_DEBS: xvfb dunst; `make deps`)",
)

# dunst runs this for each notification it shows, with appname, summary, body, icon and
# urgency as arguments: one line each in the log, fields split by a tab.
SHOWN_SCRIPT = """#!/bin/sh
printf '%s\\t%s\\t%s\\t%s\\t%s\\n' "$1" "$2" "$3" "$4" "$5" | tr -d '\\n' >> "{log}"
printf '\\n' >> "{log}"
"""
DUNSTRC = """[global]
    font = Monospace 8
    # Each notification counts: a repeated one must reach the script too.
    stack_duplicates = false
[log_everything]
    summary = "*"
    script = {script}
"""


@dataclass(frozen=True)
class Shown:
    appname: str
    summary: str
    body: str
    icon: str
    urgency: str


class Desktop:
    """Xvfb, a session bus and (once started) dunst, all torn down by the fixture."""

    def __init__(self, directory: Path, reporter: Reporter) -> None:
        self.directory = directory
        directory.mkdir()
        self.reporter = reporter
        self.processes: list[LoggedProcess] = []
        self.shown_log = directory / "dunst-shown.log"
        self.display = self._start_xvfb()
        session_dir = directory / "session"
        session_dir.mkdir()
        self.session: SystemBus = start_bus(session_dir, reporter)
        self.dunst: LoggedProcess | None = None

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], **popen: object
    ) -> LoggedProcess:
        proc = LoggedProcess(name, argv, env, self.directory / f"{name}.log", **popen)
        self.reporter.processes.append(proc)
        self.processes.append(proc)
        return proc

    def _start_xvfb(self) -> str:
        assert XVFB is not None
        r, w = os.pipe()
        try:
            # -displayfd: Xvfb picks a free display and writes its number once it listens.
            xvfb = self._spawn(
                "Xvfb",
                [XVFB, "-displayfd", str(w), "-nolisten", "tcp", "-screen", "0", "640x480x24"],
                dict(os.environ),
                pass_fds=(w,),
            )
            os.close(w)
            w = -1
            os.set_blocking(r, False)
            got = bytearray()

            def number() -> str | None:
                if not xvfb.alive():
                    raise GiveUp(f"Xvfb exited: {xvfb.log()}")
                try:
                    got.extend(os.read(r, 64))
                except BlockingIOError:
                    return None
                return got.decode().strip() if got.endswith(b"\n") else None

            return ":" + wait_until(number, START_TIMEOUT, message="Xvfb listening")
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def env(self, system: SystemBus | None = None) -> dict[str, str]:
        env = system.env() if system is not None else dict(os.environ)
        env["DBUS_SESSION_BUS_ADDRESS"] = self.session.address
        env["DISPLAY"] = self.display
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_dunst(self) -> None:
        assert DUNST is not None
        script = self.directory / "shown.sh"
        script.write_text(SHOWN_SCRIPT.format(log=self.shown_log))
        script.chmod(0o755)
        rc = self.directory / "dunstrc"
        rc.write_text(DUNSTRC.format(script=script))
        dunst = self._spawn("dunst", [DUNST, "-config", str(rc)], self.env())
        self.dunst = dunst

        def up() -> bool:
            if not dunst.alive():
                raise GiveUp(f"dunst exited: {dunst.log()}")
            return self.session.name_has_owner(NOTIFICATIONS_BUS_NAME)

        wait_until(up, START_TIMEOUT, message="dunst owns org.freedesktop.Notifications")

    def shown(self) -> list[Shown]:
        """What dunst has shown so far, in order."""
        try:
            text = self.shown_log.read_text()
        except FileNotFoundError:
            return []
        return [Shown(*line.split("\t")) for line in text.splitlines() if line.count("\t") == 4]

    def start_agent(self, system: SystemBus) -> LoggedProcess:
        """cryptlockd-notify against the private system bus and this session."""
        return self._spawn(
            "cryptlockd-notify",
            [str(VENV_PYTHON), "-m", "cryptlockd.desktop", "--debug"],
            self.env(system),
        )

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.session.close()
