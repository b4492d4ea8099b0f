"""A user's logind seat session on a VT of the guest, made as login(1) or a display manager
makes one: a unit with PAMName=login on /dev/ttyN (pam_systemd registers the session with
logind and starts the user's systemd manager, user@UID.service), made the active session
with chvt. Its leader is the test's script, `session.sh` in the session's run directory;
the script writes `ready` there first, then does the test's work."""

from __future__ import annotations

from collections.abc import Mapping

from tests.vm.guest import Guest

__all__ = ["start_vt_session"]


async def start_vt_session(
    g: Guest, user: str, vt: int, run: str, script: str, files: Mapping[str, str] | None = None
) -> None:
    """Creates `user`, writes `script` (and `files`, by name) to `run`, starts the session
    on tty`vt` and returns once it is the user's active session."""
    await g.run(f"useradd -m {user} && install -d -o {user} -m 0755 {run}")
    await g.write_file(f"{run}/session.sh", script.encode(), 0o644)
    for name, text in (files or {}).items():
        await g.write_file(f"{run}/{name}", text.encode(), 0o644)
    await g.run(
        f"systemd-run --unit={user}-session -p PAMName=login -p TTYPath=/dev/tty{vt} "
        f"-p StandardInput=tty -p StandardOutput=journal -p StandardError=journal "
        f"-p User={user} /bin/sh {run}/session.sh"
    )
    await g.wait_for_command(f"test -e {run}/ready", 60, "the session's leader runs")
    await g.run(f"chvt {vt}")
    await g.wait_for_command(
        f"loginctl show-user {user} -p State",
        60,
        f"{user}'s session active on tty{vt}",
        ok=lambda o: o.strip() == "State=active",
    )
