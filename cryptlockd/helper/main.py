"""The helper process: armed by the daemon, driven by the sleep entry, in the RAM filesystem.

Conversation (protocol.py): the daemon connects and sends `arm`; the helper locks itself
in memory, opens the devices and its VT, reserves the KDF memory and answers `armed`.
The sleep entry (systemd-suspend.service) connects and sends `begin` (VT switch), `sleep`
(the cycle, once its pre hooks ran) and `finish` (after its post hooks). The record goes to
the daemon's connection and to the journal (stderr), and the helper exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import select
import signal
import socket
import sys
import time

from cryptlockd.helper import cgroups, mappings, power, protocol, verify
from cryptlockd.helper.cycle import DevicePlan, run_cycle
from cryptlockd.helper.libcryptsetup import Device, Library
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.vt import Terminal

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from cryptlockd.helper.protocol import Message

MCL_CURRENT, MCL_FUTURE = 1, 2
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
# Where the daemon finds what a crashed cycle left frozen (repair at start).
FROZEN_STATE = "/state/frozen"
SYNC_STATE = "/state/sync_on_suspend"
# Never hold more than this for the KDF, nor more than half the RAM.
RESERVE_CAP_KIB = 1 << 20
# Armed but no sleep came: stand down (the daemon re-arms on the next PrepareForSleep).
ARMED_IDLE_TIMEOUT = 120.0
_libc = ctypes.CDLL(None, use_errno=True)


def log(priority: int, text: str) -> None:
    # stderr goes to the journal; "<N>" sets the priority there. Never called while the
    # system is frozen: a full pipe to a frozen journald would block us.
    for line in text.splitlines() or [""]:
        sys.stderr.write(f"<{priority}>{line}\n")
    sys.stderr.flush()


def notice_console(text: str) -> None:
    # A line on the system console (often a serial port on servers) pointing at the VT.
    # Non-blocking: a stalled serial line must not hold up the prompt.
    try:
        fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.write(fd, f"\r\n{text}\r\n".encode())
    os.close(fd)


def harden() -> None:
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise OSError(ctypes.get_errno(), "mlockall")
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


def hardening_status() -> dict[str, str]:
    """What the helper looks like from /proc right after arming (for the record)."""
    out = {"dumpable": str(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmLck", "VmRSS"):
                out[key] = value.strip()
    with open("/proc/self/oom_score_adj") as f:
        out["oom_score_adj"] = f.read().strip()
    return out


def mem_total_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


class Reserve:
    """Memory for the Argon2 KDF at resume: taken (and, under mlockall, faulted in) while
    the system is healthy, handed back just before the first resume attempt, when dirty
    pages of the suspended disks could not be written out to make room."""

    def __init__(self, kib: int) -> None:
        self.kib = kib
        self.area: mmap.mmap | None = None
        if kib > 0:
            self.area = mmap.mmap(-1, kib * 1024, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for off in range(0, kib * 1024, mmap.PAGESIZE):
                self.area[off] = 1

    def release(self) -> None:
        if self.area is not None:
            self.area.close()
            self.area = None


class SystemOps:
    """The kernel-facing steps of cycle.run_cycle."""

    def __init__(self, helper: Helper) -> None:
        self.h = helper

    def freeze(self, frozen: list[str]) -> None:
        with open("/proc/self/cgroup") as f:
            own = cgroups.own_cgroup(f.read())
        plan = cgroups.plan_freeze(cgroups.CGROUP_ROOT, own)
        # Written before freezing, so a crash mid-cycle leaves the daemon a list to thaw.
        with open(FROZEN_STATE, "w") as f:
            f.write("\n".join(plan) + "\n")
        cgroups.freeze(cgroups.CGROUP_ROOT, plan, self.h.freeze_timeout, frozen)

    def thaw(self, frozen: list[str]) -> list[str]:
        errors = cgroups.thaw(cgroups.CGROUP_ROOT, frozen)
        if not errors:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(FROZEN_STATE)
        return errors

    def sync(self) -> list[str]:
        return power.sync_all()

    def get_sync_on_suspend(self) -> str | None:
        value = power.get_sync_on_suspend()
        if value is not None:
            # For the daemon's repair, should we die before restoring it.
            with open(SYNC_STATE, "w") as f:
                f.write(value + "\n")
        return value

    def set_sync_on_suspend(self, value: str) -> None:
        power.set_sync_on_suspend(value)
        if value != "0":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SYNC_STATE)

    def suspend(self, device: str) -> None:
        self.h.devices[device].suspend()

    def verify(self, device: str) -> dict[str, str]:
        return verify.verify_device(device)

    def enter_sleep(self) -> None:
        self.h.record.step("sleep_write")
        power.enter_sleep(self.h.sleep_state, self.h.mem_sleep)

    def release_reserve(self) -> None:
        self.h.reserve.release()

    def refresh_headers(self, devices: list[str]) -> list[str]:
        problems = []
        for name in devices:
            try:
                self.h.devices[name].reload()
            except Exception as e:
                problems.append(f"re-reading the header of {name}: {e}")
        return problems

    def prompt(self, secret: SecretBuffer, devices: list[str], failures: int) -> bool:
        t = self.h.terminal
        notice_console(
            f"cryptlockd: disks locked; passphrase prompt on VT {t.number} (attempt {failures + 1})"
        )
        if failures:
            t.write("Sorry, that passphrase did not unlock the disks.\n")
        t.write(
            f"\ncryptlockd: the disks were locked while the machine slept.\n"
            f"Passphrase for {', '.join(devices)}: "
        )
        ok = t.read_secret(secret)
        if ok:
            t.write("Unlocking...\n")
        else:
            time.sleep(0.2)  # end of file on the VT: do not spin
        return ok

    def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool:
        return self.h.devices[device].resume_by_passphrase(
            ctypes.addressof(secret.buf), secret.length
        )

    def resume_keyfile(self, device: str, keyfile: str, size: int, offset: int) -> None:
        # The keyfile lives on the real root, which is PID 1's root; it is back by now.
        self.h.devices[device].resume_by_keyfile(power.HOST_ROOT + keyfile, size, offset)

    def backoff(self, failures: int) -> None:
        delay = min(self.h.backoff_initial * 2 ** (failures - 1), self.h.backoff_max)
        time.sleep(delay)
        self.h.terminal.flush_input()

    def power_off(self) -> None:
        self.h.terminal.write("Too many wrong passphrases: powering off.\n")
        power.power_off()


class Helper:
    def __init__(self) -> None:
        self.library: Library | None = None
        self.devices: dict[str, Device] = {}
        # Loaded while idle (preload), by dm name, with the dm UUID they were loaded under.
        self.preloaded: dict[str, tuple[str, Device]] = {}
        self.plan: list[DevicePlan] = []
        self._terminal: Terminal | None = None
        self.reserve = Reserve(0)
        self.sleep_state = "mem"
        self.mem_sleep: str | None = None
        self.freeze_timeout = 10.0
        self.backoff_initial = 1.0
        self.backoff_max = 30.0
        self.poweroff_after = 0
        self.record = CycleRecord([])
        self.daemon: socket.socket | None = None
        self.in_cycle = False

    def preload(self) -> None:
        """Opens every LUKS mapping while idle: reading headers at arm time queues behind
        a busy writer's I/O, and logind waits for the arm. The headers are read again
        after the sleep (SystemOps.refresh_headers), before any resume."""
        assert self.library is not None
        for name, uuid in mappings.luks_mappings().items():
            try:
                self.preloaded[name] = (uuid, Device(self.library, name))
            except Exception as e:
                log(4, f"preloading {name}: {e} (it is opened when armed instead)")

    def _take_devices(self, names: list[str]) -> dict[str, Device]:
        """The plan's devices: preloaded ones if the mapping is still the same (by dm UUID,
        from sysfs), freshly opened otherwise. Raises if one cannot be opened."""
        assert self.library is not None
        current = mappings.luks_mappings()
        for stale in self.devices.values():  # from an earlier arm: never reused
            stale.free()
        old, self.preloaded, self.devices = self.preloaded, {}, {}
        taken: dict[str, Device] = {}
        try:
            for name in names:
                uuid, dev = old.pop(name, ("", None))
                if dev is not None and uuid and uuid == current.get(name):
                    taken[name] = dev
                else:
                    if dev is not None:
                        dev.free()
                    taken[name] = Device(self.library, name)
        except BaseException:
            for dev in taken.values():
                dev.free()
            raise
        finally:
            for _, dev in old.values():
                dev.free()
        return taken

    @property
    def terminal(self) -> Terminal:
        if self._terminal is None:
            raise RuntimeError("not armed: no VT")
        return self._terminal

    # -- arming -------------------------------------------------------------------------

    def arm(self, msg: Message) -> Message:
        self.record = CycleRecord([d["name"] for d in msg["devices"]])
        self.record.step("helper_arm")
        harden()
        self.record.step("helper_hardened")
        # Fail now, while the sleep can still go ahead unprotected and say so, rather
        # than mid-cycle.
        with open("/proc/self/cgroup") as f:
            cgroups.plan_freeze(cgroups.CGROUP_ROOT, cgroups.own_cgroup(f.read()))
        if self.library is None:
            self.library = Library()
        self.plan = [
            DevicePlan(
                d["name"],
                d["key_source"],
                int(d.get("keyfile_size", 0)),
                int(d.get("keyfile_offset", 0)),
            )
            for d in msg["devices"]
        ]
        self.devices = self._take_devices([p.name for p in self.plan])
        hints = msg.get("keyslots") or {}
        for p in self.plan:
            if isinstance(hints.get(p.name), int):
                self.devices[p.name].last_keyslot = hints[p.name]
        self.record.step("helper_devices_loaded")
        self.sleep_state = str(msg["sleep_state"])
        self.mem_sleep = msg.get("mem_sleep") or None
        self.record.sleep_state = self.sleep_state
        self.freeze_timeout = float(msg.get("freeze_timeout", 10.0))
        self.backoff_initial = float(msg.get("backoff_initial", 1.0))
        self.backoff_max = float(msg.get("backoff_max", 30.0))
        self.poweroff_after = int(msg.get("poweroff_after", 0))
        want = max((d.pbkdf_memory_kib() for d in self.devices.values()), default=0)
        kib = min(want, RESERVE_CAP_KIB, mem_total_kib() // 2)
        if kib != self.reserve.kib:
            self.reserve.release()
            self.reserve = Reserve(kib)
        self.record.step("helper_kdf_reserved")
        if self._terminal is None:
            self._terminal = Terminal(int(msg.get("vt", 0)))
        self.record.step("helper_armed")
        self.record.hardening = hardening_status()
        return {
            "op": protocol.OP_ARMED,
            "vt": self.terminal.number,
            "reserve_kib": kib,
            "kdf_memory_kib": want,
            "pid": os.getpid(),
        }

    # -- the cycle ------------------------------------------------------------------------

    def begin(self) -> Message:
        self.record.step("begin")
        try:
            self.terminal.switch_to()
        except Exception as e:
            self.record.problems.append(f"VT switch: {e}")
        self.terminal.write("\033[H\033[2Jcryptlockd: locking the disks and going to sleep.\n")
        self.record.step("vt_switched")
        return {"op": protocol.OP_READY}

    def sleep(self, msg: Message) -> Message:
        for name, t in (msg.get("times") or {}).items():
            self.record.step(str(name), float(t))
        self.in_cycle = True
        run_cycle(SystemOps(self), self.plan, self.record, self.poweroff_after)
        return {
            "op": protocol.OP_RESUMED,
            "slept": self.record.slept,
            "reason": self.record.reason,
        }

    def finish(self, msg: Message) -> Message:
        for name, t in (msg.get("times") or {}).items():
            self.record.step(str(name), float(t))
        try:
            self.terminal.switch_back()
            self.record.step("vt_switched_back")
        except Exception as e:
            self.record.problems.append(f"VT switch back: {e}")
        self.record.keyslots = {
            name: dev.last_keyslot for name, dev in self.devices.items() if dev.last_keyslot >= 0
        }
        self.record.finish()
        return {"op": protocol.OP_DONE, "success": self.record.success}

    def report(self) -> None:
        rec = self.record.as_dict()
        log(6 if rec["success"] else 4, "cycle record: " + json.dumps(rec, sort_keys=True))
        for line in (self.library.messages if self.library else [])[-10:]:
            log(6, f"libcryptsetup: {line}")
        if self.daemon is not None:
            try:
                send(
                    self.daemon,
                    {"op": protocol.OP_RECORD, "success": rec["success"], "record": rec},
                )
            except OSError as e:
                log(4, f"could not hand the cycle record to the daemon: {e}")


def send(sock: socket.socket, msg: Message) -> None:
    sock.sendall(protocol.encode(msg))


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = protocol.LineBuffer()
        self.pending: list[Message] = []

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message; None at end of stream or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            data = self.sock.recv(65536)
            if not data:
                return None
            self.pending.extend(self.buffer.feed(data))
        return self.pending.pop(0)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(helper: Helper, listener: socket.socket) -> int:
    daemon: Connection | None = None
    armed_at: float | None = None
    while True:
        watch: list[socket.socket] = [listener] + ([daemon.sock] if daemon else [])
        timeout = (
            None if armed_at is None else max(0.0, armed_at + ARMED_IDLE_TIMEOUT - time.monotonic())
        )
        ready, _, _ = select.select(watch, [], [], timeout)
        if not ready:
            log(4, "armed, but no sleep came: standing down")
            return 0
        if daemon is not None and daemon.sock in ready:
            msg = daemon.receive(0)
            if msg is None:
                # The daemon went away (restart): stay armed for the sleep it may have
                # let through; the record then only reaches the journal.
                log(4, "the daemon closed its connection; staying armed")
                helper.daemon = None
                daemon = None
            elif msg["op"] == protocol.OP_DISARM:
                log(6, "disarmed")
                return 0
            continue
        sock, _ = listener.accept()
        conn = Connection(sock)
        msg = conn.receive(5.0)
        if msg is None:
            sock.close()
            continue
        if msg["op"] == protocol.OP_ARM:
            try:
                reply = helper.arm(msg)
            except Exception as e:
                log(3, f"arming failed: {e}")
                send(sock, {"op": protocol.OP_ERROR, "reason": f"arming failed: {e}"})
                sock.close()
                continue
            send(sock, reply)
            log(
                6,
                f"armed: devices {', '.join(helper.devices)}, VT {reply['vt']}, "
                f"KDF reserve {reply['reserve_kib']} KiB",
            )
            daemon, helper.daemon, armed_at = conn, sock, time.monotonic()
        elif msg["op"] == protocol.OP_DISARM:
            log(6, "told to stand down")
            return 0
        elif msg["op"] == protocol.OP_BEGIN:
            if armed_at is None:
                send(sock, {"op": protocol.OP_ERROR, "reason": "not armed"})
                sock.close()
                continue
            return drive_cycle(helper, conn)
        else:
            send(sock, {"op": protocol.OP_ERROR, "reason": f"unexpected {msg['op']!r}"})
            sock.close()


def drive_cycle(helper: Helper, entry: Connection) -> int:
    # From here on the devices may be suspended: nothing may stop us half-way.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    send(entry.sock, helper.begin())
    msg = entry.receive()
    if msg is not None and msg["op"] == protocol.OP_SLEEP:
        reply = helper.sleep(msg)
        with contextlib.suppress(OSError):
            send(entry.sock, reply)
        msg = entry.receive()
    else:
        helper.record.fail("the sleep entry went away before the sleep")
    helper.finish(msg if msg is not None and msg["op"] == protocol.OP_FINISH else {"op": ""})
    helper.report()
    with contextlib.suppress(OSError):
        send(entry.sock, {"op": protocol.OP_DONE, "success": helper.record.success})
    return 0


def self_test() -> int:
    """Imports everything and loads libcryptsetup: run in a chroot of the fresh ramfs."""
    lib = Library()
    missing = [
        s
        for s in (
            "crypt_init_by_name",
            "crypt_suspend",
            "crypt_resume_by_passphrase",
            "crypt_resume_by_keyfile_device_offset",
            "crypt_free",
        )
        if not lib.has(s)
    ]
    with SecretBuffer(64) as secret:
        secret.view()[:4] = b"test"
    result = {
        "ok": not missing and secret.is_zero(),
        "missing_symbols": missing,
        "libcryptsetup": lib.version(),
        "python": sys.version.split()[0],
        "modules": sorted(m for m in sys.modules if m.startswith("cryptlockd")),
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def main(argv: list[str]) -> int:
    if "--self-test" in argv:
        return self_test()
    signal.signal(signal.SIGTERM, _stop)
    os.makedirs(os.path.dirname(protocol.SOCKET_IN_RAMFS), exist_ok=True)
    os.makedirs(os.path.dirname(FROZEN_STATE), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(protocol.SOCKET_IN_RAMFS)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(protocol.SOCKET_IN_RAMFS)
    finally:
        os.umask(old)
    listener.listen(4)
    helper = Helper()
    # Loaded now, while idle: arming then has no library to load and no header to read.
    helper.library = Library()
    helper.preload()
    try:
        return serve(helper, listener)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(protocol.SOCKET_IN_RAMFS)
