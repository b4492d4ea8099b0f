"""What the resume prompt shows on the helper's VT, and how a typed line is read. Pure.

The screen is cleared first: what the VT showed before (the kernel's suspend and resume
messages, "locking the disks") means nothing to the person at the keyboard. It names the
machine and each locked disk the way that person knows it (where it is mounted, and its
dm/crypttab name), then the keys. A line ends with Enter, or at once with one of the keys
below, which vt.read_secret makes line ends (VEOL, VEOL2): neither can be part of a
passphrase typed at a VT, so neither is ever tried as one.
"""

from __future__ import annotations

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from cryptlockd.helper.secret import SecretBuffer

# Puts the machine back to sleep, the disks still locked. Esc alone: the arrow and
# function keys, which start with Esc too, do the same, which is harmless.
SLEEP_KEY = 0x1B
# Skips the devices left once the essential ones are back (issue 11): Ctrl+S. Its usual
# job, XOFF, is switched off while the prompt reads (IXON).
SKIP_KEY = 0x13
SKIP_KEY_NAME = "Ctrl+S"

# What a line read at the prompt is (line_kind).
PASSPHRASE = "passphrase"
SLEEP = "sleep"
SKIP = "skip"

CLEAR = "\033[H\033[2J"


def line_kind(secret: SecretBuffer) -> str:
    """SLEEP or SKIP when the line ended with that key (whatever came before it is
    dropped), else PASSPHRASE. Reads the last byte as an int: no bytes object is made."""
    if secret.length == 0:
        return PASSPHRASE
    with secret.view() as view:
        last = view[secret.length - 1]
    if last == SLEEP_KEY:
        return SLEEP
    if last == SKIP_KEY:
        return SKIP
    return PASSPHRASE


class PromptInfo:
    """One prompt, as the resume loop sees it (resume.Resumer.round)."""

    __slots__ = ("asking", "failures", "skippable", "sleep_again", "vanishing", "waiting")

    def __init__(
        self,
        asking: list[str],
        *,
        waiting: list[str] | None = None,
        failures: int = 0,
        skippable: bool = False,
        vanishing: list[str] | None = None,
        sleep_again: bool = True,
    ) -> None:
        self.asking = list(asking)  # the devices the passphrase is for now
        # Locked too, back without a passphrase once what they need is (a keyfile on
        # root, a layer above): shown so that every locked disk is on the screen.
        self.waiting = list(waiting or [])
        self.failures = failures  # wrong passphrases in a row
        self.skippable = skippable  # no essential device is left: SKIP_KEY is offered
        self.vanishing = list(vanishing or [])  # may be unplugged: redraw without them
        # Esc, the lid and an unanswered wake put the machine back to sleep; False where
        # there is no sleep to go back to (a lock without sleep).
        self.sleep_again = sleep_again


def _disk_line(name: str, mounts: list[str], note: str) -> str:
    where = ", ".join(mounts) if mounts else "(not mounted)"
    return f"  {where:<28} {name:<16} {note}".rstrip() + "\n"


def render(
    info: PromptInfo, hostname: str, mounts: dict[str, list[str]], word: str = "Passphrase"
) -> str:
    """The whole screen, from a cleared VT to the prompt line. `mounts`: dm name -> its
    mount points (the daemon's plan); `word`: what the line asks for (token.prompt_word:
    the PIN too where a TPM2+PIN token can open a disk asked for)."""
    out = [
        CLEAR,
        f"{hostname or 'This machine'} is locked: its disks were locked for the sleep.\n\n",
    ]
    out.append(f"  {'Mounted on':<28} {'Disk':<16}\n")
    for name in info.asking:
        out.append(_disk_line(name, mounts.get(name, []), "needs the passphrase"))
    for name in info.waiting:
        out.append(_disk_line(name, mounts.get(name, []), "opens after the others"))
    out.append("\n")
    if info.failures:
        s = "" if info.failures == 1 else "s"
        out.append(f"  {info.failures} failed attempt{s}. The passphrase is case-sensitive.\n\n")
    out.append(f"  Enter    unlock with the {word.lower()} typed\n")
    if info.sleep_again:
        out.append("  Esc      put the machine back to sleep; the disks stay locked\n")
    if info.skippable:
        out.append(
            f"  {SKIP_KEY_NAME:<8} skip {', '.join(info.asking)}: closed now (what was written "
            "before the sleep stays on the disk), open later\n"
        )
    out.append(f"\n{word} for {', '.join(info.asking)}: ")
    return "".join(out)
