"""The protected sleep cycle in the guest (issue 4): systemctl suspend, wake, passphrase at
the VT, devices back, record complete, nothing left frozen.

Nothing in the guest answers while the cycle runs (it is frozen on purpose), so facts from
mid-cycle come from the host (QMP events, the serial console, screendump) or from the
cycle record the helper fills in before it writes the sleep state.
"""

from __future__ import annotations

import json

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    LID_TRIGGER,
    MANAGER,
    PROMPT_NOTICE,
    armed_ready,
    assert_complete,
    boottime,
    devices_key_source,
    last_cycle,
    run_cycle,
    start_lid,
    start_writer,
    suspend,
    unlock,
    wake,
)

pytestmark = [pytest.mark.vm, pytest.mark.asyncio, pytest.mark.timeout(900)]


async def knobs(guest: Guest) -> tuple[str, str, str]:
    """What a cycle changes and must put back: sync_on_suspend, the active VT, and
    rcu_expedited (on for the suspends only)."""
    out = await guest.run(
        "cat /sys/power/sync_on_suspend /sys/class/tty/tty0/active /sys/kernel/rcu_expedited"
    )
    sync, vt, rcu = out.stdout.split()
    return sync, vt, rcu


async def assert_restored(guest: Guest, before: tuple[str, str, str]) -> None:
    frozen = await guest.run(
        "grep -l '^1' $(find /sys/fs/cgroup -name cgroup.freeze) 2>/dev/null || true"
    )
    assert frozen.stdout.strip() == "", f"cgroups left frozen: {frozen.stdout}"
    assert await knobs(guest) == before, (
        "sync_on_suspend, the active VT or rcu_expedited not restored"
    )
    ramfs = await guest.run("findmnt -n -o FSTYPE /run/cryptlockd/ramfs")
    assert ramfs.stdout.strip() == "ramfs"
    for dm in (layout.ROOT_DM_NAME, layout.DATA_DM_NAME):
        info = await guest.run(f"dmsetup info -c --noheadings -o suspended {dm}")
        assert info.stdout.strip() == "Active", f"{dm} still suspended"


async def data_before(g: Guest) -> None:
    await g.run(
        "dd if=/dev/urandom of=/data/before bs=64k count=32 status=none && "
        "dd if=/dev/urandom of=/root/before bs=64k count=32 status=none && sync && "
        "sha256sum /data/before /root/before > /run/sums"
    )


async def usable_after(g: Guest) -> None:
    await g.run("sha256sum -c /run/sums")
    # Page cache would answer reads even from a suspended disk: prove it with direct I/O.
    for path in ("/data/after", "/root/after"):
        await g.run(
            f"dd if=/dev/urandom of={path} bs=4k count=64 oflag=direct status=none && "
            f"dd if={path} of=/dev/null bs=4k iflag=direct status=none"
        )


async def idle_helper_locked(g: Guest) -> None:
    """Until the idle helper has locked itself in RAM: it listens first, then loads
    libcryptsetup, opens the mappings and locks."""
    await g.wait_for_command(
        "grep VmLck /proc/$(systemctl show -p MainPID --value cryptlockd-helper.service)/status",
        60,
        "the idle helper locked in RAM",
        ok=lambda o: len(o.split()) > 1 and o.split()[1] != "0",
    )


async def test_systemctl_suspend_then_busctl_with_wrong_passphrases(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    await data_before(g)
    before = await knobs(g)
    assert before[2] == "0", "rcu_expedited on before the cycle: nothing to show"
    # The idle helper locks itself in RAM: the arm has no mlockall to wait for.
    await idle_helper_locked(g)
    # Installed, never cycled: no keyslot remembered yet.
    state = await g.run(f"test -e {layout.KEYSLOTS_FILE}", check=False)
    assert state.rc != 0, f"{layout.KEYSLOTS_FILE} before any cycle"

    # 1. systemctl suspend, the right passphrase at once.
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    await usable_after(g)
    await assert_restored(g, before)
    rec = await last_cycle(g, cycle.since)
    timeline = assert_complete(rec)
    assert rec["arm_seconds"] < 5.0
    helper = rec["helper"]
    assert helper["dumpable"] == "0" and helper["oom_score_adj"] == "-1000"
    assert int(helper["VmLck"].split()[0]) > 0, helper
    # The KDF reserve, faulted in by its own thread, was all in RAM before the first
    # suspend (the cycle waits for it there, and notes the helper's VmRSS then).
    assert int(helper["VmRSS"].split()[0]) >= rec["kdf_reserve_kib"], helper
    first = f"suspended:{layout.DATA_DM_NAME}"
    assert timeline["helper_kdf_reserved"] <= timeline["kdf_reserve_ready"] <= timeline[first]
    # The Argon2 memory that resume needs was reserved: the passphrase keyslot's cost.
    assert rec["kdf_reserve_kib"] == layout.ARGON2_MEMORY_KIB, rec["kdf_reserve_kib"]
    # Nothing remembered: the keyslots in order, the boot keyfile's in front (data opens
    # by its keyfile: no passphrase tried).
    root = layout.ROOT_DM_NAME
    assert rec["keyslots_tried"] == {root: [layout.KEYFILE_SLOT, layout.PASSPHRASE_SLOT]}
    assert rec["keyslots"][root] == layout.PASSPHRASE_SLOT
    signal = await g.wait_for_command(
        "cat /root/cycle-signal.log", 60, "CycleFinished signal", ok=lambda o: "CycleFinished" in o
    )
    assert '"data":[true' in signal.stdout.replace(" ", ""), signal.stdout[-2000:]
    unit = await g.run("systemctl show -p LimitCORE -p OOMScoreAdjust cryptlockd-helper.service")
    assert "LimitCORE=0" in unit.stdout and "OOMScoreAdjust=-1000" in unit.stdout
    # Arming must not queue behind busy writers: both processes run at nice -10.
    # (The helper is started again, idle, after each cycle: wait for it.)
    nice = await g.wait_for_command(
        "ps -o ni= -p $(systemctl show -p MainPID --value cryptlockd.service) "
        "-p $(systemctl show -p MainPID --value cryptlockd-helper.service)",
        60,
        "daemon and idle helper running",
        ok=lambda o: len(o.split()) == 2,
    )
    assert nice.stdout.split() == ["-10", "-10"], nice.stdout
    await idle_helper_locked(g)  # the one started after the cycle too
    print(
        f"\ncycle 1 (systemctl suspend): trigger->SUSPEND {cycle.to_suspend:.2f} s, "
        f"arm {rec['arm_seconds']} s, timeline_ms {json.dumps(timeline)}"
    )

    # The keyslot is remembered across a restart of the daemon (and a reboot): saved by
    # the root's LUKS UUID, root's only.
    uuid = (await g.run(f"cryptsetup luksUUID {layout.ROOT_DISK}")).stdout.strip()
    saved = await g.wait_for_command(
        f"stat -c %a {layout.KEYSLOTS_FILE} && cat {layout.KEYSLOTS_FILE}",
        30,
        "the keyslot saved",
        ok=lambda o: uuid in o,
    )
    mode, text = saved.stdout.split("\n", 1)
    assert mode == "600" and json.loads(text)["keyslots"] == {uuid: layout.PASSPHRASE_SLOT}
    await g.run("systemctl restart cryptlockd.service")

    # 2. busctl Suspend, three wrong passphrases first: the devices stay suspended.
    # (Suspend refuses unless Protected, which the daemon says again once it holds its
    # new delay lock.)
    await armed_ready(g)
    wrong = ["wrong-one", "Wrong-Two", "nope3"]
    cycle = await run_cycle(g, [*wrong, layout.PASSPHRASE], f"busctl call {MANAGER} Suspend")
    await usable_after(g)
    await assert_restored(g, before)
    rec = await last_cycle(g, cycle.since)
    timeline = assert_complete(rec)
    assert rec["wrong_passphrases"] == 3
    # The restarted daemon's hint: the remembered keyslot first in every round, so the
    # right passphrase cost one KDF.
    slots = [layout.PASSPHRASE_SLOT, layout.KEYFILE_SLOT]
    assert rec["keyslots_tried"] == {root: [*slots * 3, layout.PASSPHRASE_SLOT]}
    assert all(
        timeline[f"prompt#{n}"] < timeline[f"resumed:{layout.ROOT_DM_NAME}"] for n in (2, 3, 4)
    )
    print(
        f"cycle 2 (busctl Suspend, 3 wrong): trigger->SUSPEND {cycle.to_suspend:.2f} s, "
        f"timeline_ms {json.dumps(timeline)}"
    )


async def test_failed_sleep_write_then_unprotected_stock_sleep(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    before = await knobs(g)

    # 1. The kernel refuses the state: straight to the prompt, no SUSPEND event.
    await g.run("echo bogus > /run/cryptlockd/debug-sleep-state")
    mark = g.event_mark()
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await g.spawn("systemctl suspend", "/root/trigger.log")
    await unlock(g, [layout.PASSPHRASE], notices)
    await g.wait_agent(240, "agent after the failed sleep")
    assert "SUSPEND" not in [e.name for e in g.events[mark:]]
    await g.run("rm /run/cryptlockd/debug-sleep-state")
    await assert_restored(g, before)
    last = await last_cycle(g, since)
    assert last["success"] is False and "/sys/power/state" in last["reason"], last
    assert "sleep_failed" in json.dumps(last), last
    assert set(last["resumed"]) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}
    await g.run("dd if=/dev/urandom of=/root/after bs=4k count=16 oflag=direct status=none")

    # 2. Daemon stopped: the stock sleep still sleeps, and the journal says unprotected.
    await g.run("systemctl stop cryptlockd.service")
    mark = g.event_mark()
    to_suspend = await suspend(g, "systemctl suspend")
    print(f"\nstock sleep (daemon stopped): trigger->SUSPEND {to_suspend:.2f} s")
    await wake(g, what="the stock sleep")
    journal = await g.run("journalctl -b -u systemd-suspend.service --no-pager")
    assert "UNPROTECTED" in journal.stdout, journal.stdout[-3000:]
    assert [e.name for e in g.events[mark:]].count("SUSPEND") == 1

    # 3. Daemon back, then restarted while its helper waits: the next cycle is protected.
    await g.run("systemctl start cryptlockd.service")
    await armed_ready(g)
    await g.run("systemctl restart cryptlockd.service")
    await armed_ready(g)
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    await assert_restored(g, before)
    rec = await last_cycle(g, cycle.since)
    assert_complete(rec)
    print(
        f"protected sleep, same guest: trigger->SUSPEND {cycle.to_suspend:.2f} s, "
        f"arm {rec['arm_seconds']} s"
    )


# The writer is still running: a buffered read can end inside the record being appended (the
# file grows a page at a time, so a record across a page boundary shows its first part
# alone). Such a last line without its newline must be the start of the record it will be,
# and is not counted; any other short or wrong record fails.
CHECK_WRITER = """
import hashlib
n = 0
for n, line in enumerate(open("/root/busy.log", "rb")):
    payload = b"%010d" % n * 100
    record = payload + hashlib.sha256(payload).hexdigest().encode() + b"\\n"
    if not line.endswith(b"\\n"):
        assert record.startswith(line), f"record {n} (being written) is not record {n}"
        break
    assert line == record, f"record {n} is not record {n}"
    n += 1
print(n)
"""


async def count_writer(g: Guest) -> int:
    await g.write_file("/root/check_writer.py", CHECK_WRITER.encode())
    return int((await g.run("python3 /root/check_writer.py", timeout=120)).stdout.strip())


async def test_lid_close_with_busy_fsync_writer(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    await start_lid(g)
    await start_writer(g)
    await data_before(g)
    before_knobs = await knobs(g)

    before = await count_writer(g)
    cycle = await run_cycle(g, [layout.PASSPHRASE], LID_TRIGGER)
    after = await count_writer(g)
    await usable_after(g)
    await assert_restored(g, before_knobs)
    rec = await last_cycle(g, cycle.since)
    timeline = assert_complete(rec)
    # The writer was frozen, not stuck in D state on a suspended disk, and carries on.
    kernel = await g.run("journalctl -b -k --no-pager")
    assert "Freezing of tasks failed" not in kernel.stdout
    assert "refusing to freeze" not in kernel.stdout
    assert after > before
    lid = await g.run("cat /root/lid.out")
    assert lid.stdout.split() == ["created", "closed", "opened"], lid.stdout
    await g.wait_for_command(
        "wc -l < /root/busy.log",
        60,
        "the writer goes on after resume",
        ok=lambda o: int(o.strip()) > after + 20,
    )
    assert await count_writer(g) > after
    print(
        f"\ncycle (lid, busy writer): trigger->SUSPEND {cycle.to_suspend:.2f} s, "
        f"{after - before} fsynced records around the cycle, timeline_ms {json.dumps(timeline)}"
    )


async def test_shared_passphrase_one_prompt(installed_guest: Guest) -> None:
    """Both disks on the passphrase (crypttab says none for data): one prompt opens both,
    their KDFs run at once (helper/kdf.py), the data is intact and both keys are back."""
    g = installed_guest
    await armed_ready(g)
    await data_before(g)
    await g.run(
        "sed -i 's|^data\\s\\+\\(\\S\\+\\)\\s\\+\\S\\+|data \\1 none|' /etc/crypttab && "
        "grep '^data' /etc/crypttab && "
        f"busctl call {MANAGER} Reload"
    )
    await devices_key_source(g, "data", "passphrase", "data takes the passphrase now")
    notices = g.console_count(PROMPT_NOTICE)
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    rec = await last_cycle(g, cycle.since)
    assert_complete(rec, shared=True)
    assert g.console_count(PROMPT_NOTICE) == notices + 1, "more than one prompt"
    t = rec["timeline_ms"]
    assert t["resumed:data"] < t["thawed"]
    assert "prompt#2" not in t
    # One of the two derived and resumed in a child of the helper's (kdf.ChildAttempt).
    assert len(rec["kdf_children"]) == 1 and rec["kdf_children"][0] in (
        layout.ROOT_DM_NAME,
        layout.DATA_DM_NAME,
    ), rec
    # In parallel: both derivations (same cost, one vCPU each: ARGON2_PARALLEL=1) end
    # together; one after the other, the second would end a whole KDF later.
    first = min(t["resumed:root"], t["resumed:data"]) - t["passphrase_entered"]
    gap = abs(t["resumed:root"] - t["resumed:data"])
    print(f"\nshared passphrase: Enter -> first resumed {first:.0f} ms, then {gap:.0f} ms")
    assert gap < 0.5 * first, t
    # The record tells the header's read, the KDF and the resume apart, for each device;
    # both headers were read before the prompt, none between Enter and the resumes.
    for name in ("root", "data"):
        assert t[f"header_read:{name}"] <= t["prompt"] < t["passphrase_entered"], t
        assert t["passphrase_entered"] < t[f"derived:{name}"] <= t[f"resumed:{name}"], t
    await usable_after(g)
    for dm in (layout.ROOT_DM_NAME, layout.DATA_DM_NAME):
        table = (await g.run(f"dmsetup table --showkeys {dm}")).stdout.split()
        assert table[2] == "crypt" and table[4].strip("0") != "", f"{dm}: no key back"


async def test_keyfile_offset_and_size_from_crypttab(installed_guest: Guest) -> None:
    """data's key is 64 bytes at offset 4096 of a larger file, as crypttab's keyfile-offset=
    and keyfile-size= say: it comes back from that keyfile, with no second prompt."""
    g = installed_guest
    await armed_ready(g)
    key = "/etc/keys/data-embedded.key"
    disk = layout.DATA_DISK
    await g.run(
        f"head -c 4096 /dev/urandom > {key} && head -c 64 /dev/urandom >> {key} && "
        f"head -c 1000 /dev/urandom >> {key} && chmod 0400 {key} && "
        f"cryptsetup luksAddKey --batch-mode --key-file {layout.DATA_KEYFILE} "
        "--pbkdf pbkdf2 --pbkdf-force-iterations 1000 "
        f"--new-keyfile-offset 4096 --new-keyfile-size 64 {disk} {key}",
        timeout=120,
    )
    # Control: the key is the 64 bytes at 4096, and the whole file opens nothing.
    await g.run(
        f"cryptsetup open --test-passphrase --key-file {key} --keyfile-offset 4096 "
        f"--keyfile-size 64 {disk}",
        timeout=120,
    )
    whole = await g.run(
        f"cryptsetup open --test-passphrase --key-file {key} {disk}", check=False, timeout=120
    )
    assert whole.rc != 0, "the whole keyfile opened the disk: the test proves nothing"
    await g.run(
        f"sed -i 's|^data\\s\\+\\(\\S\\+\\)\\s.*|data \\1 {key} "
        "luks,keyfile-offset=4096,keyfile-size=64|' /etc/crypttab && "
        f"grep '^data.*keyfile-offset=4096' /etc/crypttab && busctl call {MANAGER} Reload"
    )
    await devices_key_source(g, "data", f"keyfile:{key}", "data takes the embedded keyfile now")
    await data_before(g)
    notices = g.console_count(PROMPT_NOTICE)
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    await usable_after(g)
    rec = await last_cycle(g, cycle.since)
    assert_complete(rec)
    assert not [p for p in rec["problems"] if "keyfile" in p], rec["problems"]
    assert "prompt#2" not in rec["timeline_ms"]
    assert g.console_count(PROMPT_NOTICE) == notices + 1, "more than one prompt"
