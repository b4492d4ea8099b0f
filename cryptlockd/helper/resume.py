"""After the wake: the prompt and the resume, in the order of the daemon's dependency graph
(daemon/device_graph.py, as each plan entry's `after`).

A device is resumed only once everything it needs is back: the devices below it, the one
that holds its keyfile, the one that holds its detached header. Its header is read again
just before its own resume, never earlier: reading an upper device's header through a
lower device that is still suspended waits in D state for good. Keyfile devices are resumed
as soon as they can be, passphrase devices whenever a prompt is answered; one passphrase
is tried on every device it may serve, including those it has just made ready (LUKS on
LVM on LUKS with one passphrase: one prompt).

Once every essential device is back, the prompt offers to skip the rest
(prompt_screen.SKIP_KEY, Ctrl+S). A skipped device, and a device that vanished while
asleep (a USB disk unplugged), is closed (dm_ioctl.py): its table becomes dm's error
target, so whatever touches it gets EIO at once instead of hanging for good, and what the
cycle synced before the sleep is what stays on the disk; it is removed once nothing holds
it. The record names them.

The prompt may also stop without a passphrase (issue 14): Esc, the lid closed again or a
wake nobody answers put the machine back to sleep from here, the devices still suspended
and everything else still frozen (the helper is the one process that runs), and the next
wake prompts again; nobody unlocking in time after a wake powers it off (wake_watch.py).
"""

from __future__ import annotations

from cryptlockd.helper import prompt_screen, token, wake_watch
from cryptlockd.helper.kdf import attempt_all, reraise
from cryptlockd.helper.prompt_screen import PromptInfo
from cryptlockd.helper.secret import SecretBuffer

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Iterator

    from cryptlockd.helper.cycle import DevicePlan, Ops
    from cryptlockd.helper.kdf import ChildAttempt
    from cryptlockd.helper.record import CycleRecord

# The record keeps at most this many problems from the prompt loop: a VT that keeps
# failing must not grow it without bound while the user takes their time.
MAX_LOOP_PROBLEMS = 20

# What Ops.prompt returns besides wake_watch's reasons: a line was typed, or nothing
# was (draw the prompt again).
LINE = "line"
REDRAW = "redraw"


def _note(record: CycleRecord, problem: str, counted: list[int]) -> None:
    """A problem of the prompt loop, into the record, without repeats and within bounds."""
    if record.problems and record.problems[-1] == problem:
        return
    if counted[0] < MAX_LOOP_PROBLEMS:
        counted[0] += 1
        record.problems.append(problem)


def _recover_terminal(ops: Ops, record: CycleRecord, counted: list[int]) -> None:
    """After an error at the prompt: open the VT again (a hung-up VT answers EIO or end of
    file for good on the old file), then wait a little. Neither may end the loop."""
    try:
        ops.reopen_terminal()
    except Exception as e:
        _note(record, f"reopening the VT: {e or type(e).__name__}", counted)
    try:
        ops.backoff(1)
    except Exception as e:
        _note(record, f"back-off: {e or type(e).__name__}", counted)


class Resumer:
    """The state of one resume: what is pending, back, dropped; which headers were read."""

    def __init__(
        self,
        ops: Ops,
        devices: list[DevicePlan],
        suspended: list[str],
        record: CycleRecord,
        *,
        sleep_again: bool = True,
    ) -> None:
        self.ops = ops
        # Whether Esc, the lid and an unanswered wake may put the machine back to sleep:
        # False where there is no sleep to go back to (a lock without sleep).
        self.sleep_again = sleep_again
        self.record = record
        # In resume order: the plan comes in suspend order, which the graph made.
        self.pending = [d for d in reversed(devices) if d.name in suspended]
        self.suspended = set(suspended)
        self.dropped: list[DevicePlan] = []
        self.refreshed: set[str] = set()
        self.keyfile_failed: set[str] = set()
        self.failures = 0
        self.locking_on_fault = False

    # -- the graph ------------------------------------------------------------------------

    def ready(self) -> list[DevicePlan]:
        """Pending devices whose dependencies are back (or were never suspended). Should
        the plan hold a cycle (it cannot from a real layout), everything counts as ready
        rather than nothing ever."""
        waiting = {d.name for d in self.pending}
        ready = [d for d in self.pending if not any(a in waiting for a in d.after)]
        return ready or list(self.pending)

    def essential_left(self) -> bool:
        return any(d.essential for d in self.pending)

    def _resumed(self, dev: DevicePlan, at: float | None = None) -> None:
        self.pending.remove(dev)
        self.record.resumed.append(dev.name)
        self.record.step(f"resumed:{dev.name}", at)

    def drop(self, dev: DevicePlan, why: str) -> None:
        """Leave `dev` out, and everything that needs it: they cannot come back now."""
        if dev not in self.pending:
            return
        self.pending.remove(dev)
        self.dropped.append(dev)
        self.record.skipped.append(dev.name)
        self.record.problems.append(f"{dev.name} {why}")
        for other in list(self.pending):
            if dev.name in other.after:
                self.drop(other, f"skipped: it needs {dev.name}")

    def drop_vanished(self) -> None:
        # An essential device is never dropped: without it nothing may thaw anyway, and
        # the prompt is where a user sees that something is wrong.
        for dev in list(self.pending):
            if dev in self.pending and not dev.essential and not self.ops.present(dev.name):
                self.drop(dev, "disappeared while the machine slept: not prompted for")

    def close_dropped(self) -> None:
        """Upper layers first (the plan's suspend order)."""
        for dev in reversed(self.dropped):
            try:
                self.ops.deactivate(dev.name)
            except Exception as e:
                self.record.problems.append(f"closing {dev.name}: {e}; it stays suspended")
            else:
                self.record.step(f"closed:{dev.name}")

    # -- one device -----------------------------------------------------------------------

    def refresh(self, dev: DevicePlan) -> None:
        """The header, read again after the wake, before the device's first prompt or
        resume (it was read before the sleep, maybe long before: a keyslot changed since
        must count now). Only once ready: everything below it and its detached header are
        back."""
        if dev.name in self.refreshed:
            return
        self.refreshed.add(dev.name)
        try:
            self.ops.refresh_header(dev.name)
        except Exception as e:
            self.record.problems.append(f"re-reading the header of {dev.name}: {e}")
        else:
            self.record.step(f"header_read:{dev.name}")

    def resume_keyfiles(self) -> None:
        """Every ready keyfile device, until none is left that can go: a chain of them
        comes back link by link without a prompt."""
        progress = True
        while progress:
            progress = False
            for dev in self.ready():
                keyfile = dev.keyfile
                if keyfile is None or dev.name in self.keyfile_failed:
                    continue
                self.refresh(dev)
                try:
                    self.ops.resume_keyfile(dev.name, keyfile, dev.keyfile_size, dev.keyfile_offset)
                except Exception as e:
                    self.record.problems.append(f"keyfile for {dev.name}: {e}")
                    self.keyfile_failed.add(dev.name)
                    continue
                self._resumed(dev)
                progress = True

    def asking(self) -> list[DevicePlan]:
        return [d for d in self.ready() if d.keyfile is None or d.name in self.keyfile_failed]

    def batches(self) -> Iterator[list[DevicePlan]]:
        """For one line typed: the devices that ask now, then those that the ones before
        made ready, each device once, each header read again first (refresh; those that
        asked at the prompt were read before it)."""
        tried: set[str] = set()
        while fresh := [d for d in self.asking() if d.name not in tried]:
            for dev in fresh:
                tried.add(dev.name)
                self.refresh(dev)
            yield fresh

    def lock_on_fault(self) -> None:
        """Before the first KDFs that run at once. Under MCL_FUTURE each would fault its
        whole memory in inside mmap(), holding the process's mmap lock, and the others'
        mmap() would wait for it: they took turns (issue 12). One KDF alone keeps
        MCL_FUTURE, which faults its memory in faster than page by page. Should the switch
        fail, the KDFs only take turns again."""
        self.locking_on_fault = True
        try:
            self.ops.lock_on_fault()
        except Exception as e:
            self.record.problems.append(f"locking memory on fault: {e or type(e).__name__}")

    def passphrase_children(
        self, names: list[str], secret: SecretBuffer
    ) -> dict[str, ChildAttempt]:
        if len(names) < 2:
            return {}
        try:
            return self.ops.passphrase_children(names, secret)
        except Exception as e:  # threads then, as before
            self.record.problems.append(f"children for the KDFs: {e or type(e).__name__}")
            return {}

    def try_passphrase(self, secret: SecretBuffer) -> bool:
        """The passphrase on every ready device that asks, and again on those its
        successes make ready. True when it opened at least one."""
        took = False
        for fresh in self.batches():
            names = [d.name for d in fresh]
            children = self.passphrase_children(names, secret)
            # Threads of this process that derive at once, not the children.
            if len(names) - len(children) > 1 and not self.locking_on_fault:
                self.lock_on_fault()
            # At once, so devices that share the passphrase cost one KDF, not the sum (kdf.py).
            outcomes = attempt_all(
                names, lambda name: self.ops.resume_passphrase(name, secret), children
            )
            for dev, out in zip(fresh, outcomes, strict=True):
                if out.error is not None:
                    if isinstance(out.error, Exception):
                        self.record.problems.append(f"resuming {dev.name}: {out.error}")
                elif out.ok:
                    took = True
                    self._resumed(dev, out.at)
            reraise(outcomes)
            self.resume_keyfiles()
        return took

    # -- a round --------------------------------------------------------------------------

    def round(self, secret: SecretBuffer, poweroff_after: int) -> None:
        """Keyfile devices that can go, then one prompt for those that ask."""
        self.drop_vanished()
        self.resume_keyfiles()
        asking = self.asking()
        if not asking:
            return
        # Their headers now, before the prompt, so that none is read between Enter and the
        # resume, which is the wait a user sees.
        for dev in asking:
            self.refresh(dev)
        skippable = not self.essential_left()
        self.record.step("prompt")
        names = [d.name for d in asking]
        info = PromptInfo(
            names,
            waiting=[d.name for d in self.pending if d.name not in names],
            failures=self.failures,
            skippable=skippable,
            vanishing=[d.name for d in asking if not d.essential],
            sleep_again=self.sleep_again,
        )
        outcome = self.ops.prompt(secret, info)
        kind = prompt_screen.line_kind(secret) if outcome == LINE else ""
        if outcome != LINE or kind != prompt_screen.PASSPHRASE:
            secret.wipe()
        if kind == prompt_screen.SLEEP:
            outcome = wake_watch.ESC
        if outcome == wake_watch.GIVE_UP:
            self.ops.power_off("Nobody unlocked the disks in time after the wake: powering off.")
            return
        if outcome in wake_watch.SLEEP_REASONS:
            if self.sleep_again:
                self.sleep_once_more(outcome)
            return
        if outcome != LINE or (kind == prompt_screen.SKIP and not skippable):
            return  # nothing typed, or the skip key where nothing may be skipped
        if kind == prompt_screen.SKIP:
            self.record.step("skipped")
            for dev in list(self.pending):
                self.drop(dev, "skipped at the prompt")
            return
        self.record.step("passphrase_entered")
        try:
            # As a TPM2 PIN first, then as a passphrase: token.py says why in that order.
            took = token.try_pin(self, secret)
            took = self.try_passphrase(secret) or took
        finally:
            secret.wipe()
        if took:
            self.failures = 0
            return
        self.failures += 1
        self.record.wrong_passphrases += 1
        if poweroff_after and self.failures >= poweroff_after:
            self.ops.power_off("Too many wrong passphrases: powering off.")
        self.ops.backoff(self.failures)

    def sleep_once_more(self, why: str) -> None:
        """The same sleep again, from the prompt: the devices stay suspended, everything
        else stays frozen, and the next wake prompts again. A refused sleep write leaves
        the machine awake at the prompt, as it was."""
        self.record.step(f"sleep_again:{why}")
        self.record.slept_again.append(why)
        try:
            self.ops.enter_sleep()
        except Exception as e:  # cycle.SleepFailed, mostly
            self.record.problems.append(f"sleeping again ({why}): {e or type(e).__name__}")
            return
        self.record.step("woke")


def resume_all(
    ops: Ops,
    devices: list[DevicePlan],
    suspended: list[str],
    record: CycleRecord,
    poweroff_after: int = 0,
    *,
    sleep_again: bool = True,
) -> None:
    """Returns only when every device is back, skipped or gone: any Exception in a round
    (the VT, the back-off, libcryptsetup) goes into the record, the VT is opened again, and
    the next round prompts again."""
    resumer = Resumer(ops, devices, suspended, record, sleep_again=sleep_again)
    counted = [0]
    try:
        ops.release_reserve()
    except Exception as e:
        record.problems.append(f"releasing the KDF reserve: {e}")
    with SecretBuffer() as secret:
        while resumer.pending:
            try:
                resumer.round(secret, poweroff_after)
            except Exception as e:
                secret.wipe()
                _note(record, f"prompt: {e or type(e).__name__}", counted)
                _recover_terminal(ops, record, counted)
    resumer.close_dropped()
