"""Disk layouts laptops really have (issue 11), built at test time on loop files on the
encrypted root, all in one guest and one protected sleep:

- `lower` (LUKS2) -> a real lvm2 volume group `vgl` with one logical volume `mid`
  (dm name `vgl-mid`) -> `upper` (LUKS2), both on the one passphrase (acceptance 1);
- `klow` (LUKS2, a keyfile on root, crypttab) -> LVM `vgk/lvk` -> `kup` (LUKS2, the
  passphrase), and a keyfile chain: `kchain1` opened by a keyfile on root, `kchain2` by a
  keyfile on kchain1's file system (acceptance 2);
- every one of them on a loop device whose backing file lives on the encrypted root, so
  each must be suspended before root and resumed after it (acceptance 3);
- `det`, LUKS2 with a detached header (crypttab header=) on root, and `det2`, whose header
  file is gone by the sleep: unprotected, said before the sleep (acceptance 4);
- `old1`, LUKS1, and `integ`, LUKS2 with --integrity hmac-sha256 (acceptance 5);
- a disk the desktop opened (luks-<uuid>, no crypttab line) with a passphrase the test does
  not type: skipped with Ctrl+S once the rest is back (acceptance 6);
- `late`, opened by a system-sleep hook, after arming and before the freeze: suspended
  too (acceptance 7), and closed with the skipped disk, which it might sit on.

lvm2 runs as on a laptop: its udev rules (pvscan, autoactivation), lvm2-monitor and
dmeventd are there, and frozen with everything else during the cycle.

Both releases: what is under test is the kernel's (device-mapper stacking and its sysfs
holders and slaves, loop devices, dm-integrity, LUKS1 and detached headers in each
release's libcryptsetup, virtio-blk hot-unplug while asleep) and udev's and lvm2's
(the vg-lv nodes and what their rules do around a suspended PV), and each release has its
own. PBKDF2 with 1000 iterations keeps the extra devices cheap; root still takes its
Argon2 passphrase.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    MANAGER,
    PROMPT_NOTICE,
    armed_ready,
    boottime,
    last_cycle,
    suspend,
)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(1200),
]

# Every passphrase device but the skipped one takes the test passphrase: one prompt.
SETUP = r"""
set -eu
P="$1"
mkdir -p /etc/systemd/system-sleep /root/img /etc/hdr
mkdir -p /mnt/upper /mnt/k1 /mnt/k2 /mnt/old1 /mnt/det /mnt/usb
CHEAP="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
fmt() { printf %s "$P" | cryptsetup luksFormat -q $CHEAP --key-file=- "$@"; }
opn() { printf %s "$P" | cryptsetup open --key-file=- "$@"; }
img() { truncate -s "$2" /root/img/$1.img; losetup -f --show /root/img/$1.img; }
fs() { mkfs.ext4 -q "/dev/mapper/$1"; mount "/dev/mapper/$1" "$2"; }
# A volume group on one LUKS device, one logical volume filling it: /dev/VG/LV.
lv() { pvcreate -qq "/dev/mapper/$1"; vgcreate -qq "$2" "/dev/mapper/$1"
       lvcreate -qq -y -n "$3" -l 100%FREE "$2"; }

L=$(img stack 96M); fmt --type luks2 "$L"; opn "$L" lower
lv lower vgl mid
fmt --type luks2 /dev/vgl/mid; opn /dev/vgl/mid upper; fs upper /mnt/upper

head -c 64 /dev/urandom > /etc/keys/klow.key
KL=$(img klow 96M)
cryptsetup luksFormat -q --type luks2 $CHEAP "$KL" /etc/keys/klow.key
cryptsetup open --key-file /etc/keys/klow.key "$KL" klow
lv klow vgk lvk
fmt --type luks2 /dev/vgk/lvk; opn /dev/vgk/lvk kup; mkdir -p /mnt/kup; fs kup /mnt/kup

head -c 64 /dev/urandom > /etc/keys/k1.key
K1=$(img k1 40M)
cryptsetup luksFormat -q --type luks2 $CHEAP "$K1" /etc/keys/k1.key
cryptsetup open --key-file /etc/keys/k1.key "$K1" kchain1; fs kchain1 /mnt/k1
head -c 64 /dev/urandom > /mnt/k1/k2.key
K2=$(img k2 40M)
cryptsetup luksFormat -q --type luks2 $CHEAP "$K2" /mnt/k1/k2.key
cryptsetup open --key-file /mnt/k1/k2.key "$K2" kchain2; fs kchain2 /mnt/k2

O=$(img old1 24M); fmt --type luks1 "$O"; opn "$O" old1; fs old1 /mnt/old1

D=$(img det 24M); truncate -s 16M /etc/hdr/det.hdr
fmt --type luks2 --header /etc/hdr/det.hdr "$D"; opn --header /etc/hdr/det.hdr "$D" det
fs det /mnt/det

D2=$(img det2 24M); truncate -s 16M /etc/hdr/det2.hdr
fmt --type luks2 --header /etc/hdr/det2.hdr "$D2"; opn --header /etc/hdr/det2.hdr "$D2" det2
mv /etc/hdr/det2.hdr /root/det2.hdr.away

I=$(img integ 64M)
fmt --type luks2 --integrity hmac-sha256 --integrity-no-wipe "$I"; opn "$I" integ

U=$(img usb 40M)
printf %s not-typed-by-the-test | cryptsetup luksFormat -q --type luks2 $CHEAP --key-file=- "$U"
USB="luks-$(cryptsetup luksUUID "$U")"
printf %s not-typed-by-the-test | cryptsetup open --key-file=- "$U" "$USB"; fs "$USB" /mnt/usb

A=$(img late 24M); fmt --type luks2 "$A"
cat > /etc/systemd/system-sleep/zz-open-late <<EOF
#!/bin/sh
[ "\$1" = pre ] && printf %s '$P' | cryptsetup open --key-file=- $A late
exit 0
EOF
chmod 755 /etc/systemd/system-sleep/zz-open-late

cat >> /etc/crypttab <<EOF
klow $KL /etc/keys/klow.key luks
kchain1 $K1 /etc/keys/k1.key luks
kchain2 $K2 /mnt/k1/k2.key luks
det $D none luks,header=/etc/hdr/det.hdr
det2 $D2 none luks,header=/etc/hdr/det2.hdr
EOF

for m in upper kup k1 k2 old1 det usb; do
    head -c 1M /dev/urandom > /mnt/$m/before
done
head -c 1M /dev/urandom | dd of=/dev/mapper/integ bs=1M oflag=direct status=none
sync
sha256sum /mnt/*/before > /run/layout-sums
dd if=/dev/mapper/integ bs=1M count=1 iflag=direct status=none | sha256sum > /run/integ-sum
echo "$L $KL"
echo "$USB"
"""


async def lvm_between(g: Guest, stacks: dict[str, tuple[str, str, str]]) -> None:
    """Each `lower: (vg, lv, upper)` is real lvm2: the PV is the LUKS device `lower`, the
    LV's dm device (named vg-lv, uuid LVM-...) is held by `upper` and holds on `lower`."""
    for lower, (vg, lv, upper) in stacks.items():
        pvs = await g.run(f"pvs --noheadings -o pv_name,vg_name /dev/mapper/{lower}")
        assert pvs.stdout.split() == [f"/dev/mapper/{lower}", vg], pvs.stdout
        info = await g.run(f"dmsetup info -c --noheadings -o name,uuid,blkdevname {vg}-{lv}")
        name, uuid, kname = info.stdout.strip().split(":")
        assert name == f"{vg}-{lv}" and uuid.startswith("LVM-"), info.stdout
        holders = await g.run(
            f"cat /sys/block/{kname}/holders/*/dm/name /sys/block/{kname}/slaves/*/dm/name"
        )
        assert holders.stdout.split() == [upper, lower], (kname, holders.stdout)


STACKED = ["lower", "upper", "klow", "kup", "kchain1", "kchain2", "old1", "det", "det2", "integ"]


def order(timeline: dict[str, float], *steps: str) -> bool:
    return [timeline[s] for s in steps] == sorted(timeline[s] for s in steps)


async def test_many_layouts_one_sleep_one_prompt_and_a_skip(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    await g.write_file("/root/layouts.sh", SETUP.encode(), 0o755)
    out = (await g.run(["bash", "/root/layouts.sh", layout.PASSPHRASE], timeout=300)).stdout
    *_, loops, usb = out.splitlines()
    stack_loop, klow_loop = loops.split()
    await lvm_between(g, {"lower": ("vgl", "mid", "upper"), "klow": ("vgk", "lvk", "kup")})
    # The daemon reads crypttab again on Reload; hotplug told it about the mappings.
    await g.run(f"busctl call {MANAGER} Reload")
    expected = {layout.ROOT_DM_NAME, layout.DATA_DM_NAME, usb, *STACKED}
    await g.wait_for_command(
        "cryptlockctl --json devices",
        120,
        "the daemon knows every layout",
        ok=lambda o: {d["name"] for d in json.loads(o)} == expected,
    )
    await armed_ready(g)
    # Through LVM's vg-lv mapping down to the loop device: the daemon's walk of the holders.
    devices = {
        d["name"]: d for d in json.loads((await g.run("cryptlockctl --json devices")).stdout)
    }
    backing = {n: devices[n]["backing_device"] for n in ("lower", "upper", "klow", "kup")}
    assert backing == {"lower": stack_loop, "upper": stack_loop, "klow": klow_loop,
                       "kup": klow_loop}, backing  # fmt: skip
    status = json.loads((await g.run("cryptlockctl --json status")).stdout)
    coverage = [p for p in status.get("Problems", []) if p.startswith("coverage")]
    assert len(coverage) == 1 and "det2 (its detached header" in coverage[0], status
    assert "det (" not in coverage[0] and "upper" not in coverage[0], coverage

    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await suspend(g, "systemctl suspend")
    mark = g.event_mark()
    await g.wakeup()
    await g.wait_event("WAKEUP", 60, since=mark)
    # One prompt for everything on the test passphrase: root first (all the rest sits on
    # files on root), the others on the same passphrase once they can go.
    await g.wait_console(PROMPT_NOTICE, 240, after=notices)
    await g.type_text(layout.PASSPHRASE)
    # Then the disk the test cannot open, alone, with the skip offered.
    await g.wait_console(PROMPT_NOTICE, 240, after=notices + 1)
    last = [ln for ln in g.console_text().splitlines() if PROMPT_NOTICE in ln][-1]
    assert f"for {usb} " in last and "Ctrl+S skips" in last, last
    await g.screendump("skip-prompt")
    await g.send_keys("ctrl", "s")
    await g.wait_agent(240, "agent after the resume")

    rec = await last_cycle(g, since)
    print(f"\nlayouts cycle record: {json.dumps(rec, sort_keys=True)}")
    t = rec["timeline_ms"]
    # late may sit on anything (the helper only knows it was opened late): it comes after
    # every other device, so the skipped disk takes it along; closed, not left suspended.
    assert rec["skipped"] == [usb, "late"], rec
    assert f"late skipped: it needs {usb}" in rec["problems"]
    assert set(rec["resumed"]) == expected - {usb, "det2"}, rec["resumed"]
    # det2's header was gone: never suspended, and the record says its key stayed.
    assert "det2" not in rec["suspended"] and rec["verification"]["det2"]["protected"] == "no"
    assert any(p.startswith("det2: its detached header") for p in rec["problems"])
    assert rec["success"] is False
    assert rec["wrong_passphrases"] == 0 and "prompt#2" in t and "prompt#3" not in t
    assert "late was opened after arming: suspended too" in rec["problems"]
    for dm in rec["suspended"]:
        assert rec["verification"][dm]["dm_table_key"] == "zeroed", rec["verification"]
    root = layout.ROOT_DM_NAME
    # Suspend top down (loop files on root before root), resume bottom up.
    assert order(t, "suspended:late", "suspended:upper", "suspended:lower", f"suspended:{root}")
    assert rec["verification"]["late"]["dm_table_key"] == "zeroed"
    assert order(t, "suspended:kchain2", "suspended:kchain1", f"suspended:{root}")
    assert order(t, "suspended:det", f"suspended:{root}")
    assert order(t, f"resumed:{root}", "resumed:lower", "resumed:upper")
    # The passphrase device on LVM on a keyfile device: the keyfile device first.
    assert order(t, "suspended:kup", "suspended:klow", f"suspended:{root}")
    assert order(t, f"resumed:{root}", "resumed:klow", "resumed:kup")
    # The logical volumes are no LUKS devices: never suspended, never named as devices.
    assert not {"vgl-mid", "vgk-lvk"} & (set(rec["suspended"]) | set(rec["resumed"])), rec
    assert order(t, f"resumed:{root}", "resumed:kchain1", "resumed:kchain2")
    assert order(t, f"resumed:{root}", "resumed:det")
    assert order(t, "prompt#2", "skipped", "closed:late", f"closed:{usb}", "thawed")
    assert not [p for p in rec["problems"] if p.startswith("closing")], rec["problems"]
    # No header trouble but det2's (headers re-read after wake, each in its turn).
    assert not [p for p in rec["problems"] if "header" in p and not p.startswith("det2:")]

    # Data intact and the devices usable (direct I/O: the page cache would answer anyway).
    # Not the skipped disk's file: its device is closed, so a read the page cache does not
    # answer fails (EIO), as it should (seen on trixie once its page was evicted).
    await g.run("grep -v ' /mnt/usb/' /run/layout-sums | sha256sum -c -")
    await g.run(
        "dd if=/dev/mapper/integ bs=1M count=1 iflag=direct status=none | sha256sum "
        "| cmp - /run/integ-sum"
    )
    for m in ("upper", "kup", "k1", "k2", "old1", "det"):
        await g.run(
            f"dd if=/dev/urandom of=/mnt/{m}/after bs=4k count=16 oflag=direct status=none && "
            f"dd if=/mnt/{m}/after of=/dev/null bs=4k iflag=direct status=none"
        )
    # lvm2 after the cycle: its tools read the resumed PVs, the LVs are active, and none of
    # its units (lvm2-monitor, the udev rules' autoactivation, dmeventd) failed.
    lvs = await g.run("timeout 60 lvs --noheadings -o vg_name,lv_name,lv_active vgl vgk")
    assert sorted(lvs.stdout.split()) == sorted(["vgl", "mid", "vgk", "lvk", *["active"] * 2])
    await g.run("systemctl is-active lvm2-monitor.service")
    failed = await g.run("systemctl list-units --failed --plain --no-legend 'lvm*' 'dm-event*'")
    assert failed.stdout.strip() == "", failed.stdout
    # The skipped disks are closed: their I/O fails at once instead of hanging for good.
    for name in (usb, "late"):
        info = await g.run(f"dmsetup info -c --noheadings -o suspended {name}", check=False)
        assert "Suspended" not in info.stdout, info.stdout
    probe = await g.run(
        "timeout 30 dd if=/mnt/usb/before of=/dev/null bs=4k iflag=direct status=none; echo rc=$?",
        check=False,
    )
    rc = re.search(r"rc=(\d+)", probe.stdout)
    assert rc is not None and rc.group(1) not in ("0", "124"), probe.stdout + probe.stderr


UNPLUG_SETUP = r"""
set -eu
disk=/dev/$1
printf %s not-typed | cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 \
    --pbkdf-force-iterations 1000 --key-file=- "$disk"
name="luks-$(cryptsetup luksUUID "$disk")"
printf %s not-typed | cryptsetup open --key-file=- "$disk" "$name"
mkfs.ext4 -q "/dev/mapper/$name"; mkdir -p /mnt/stick; mount "/dev/mapper/$name" /mnt/stick
echo hello > /mnt/stick/f; sync
echo "$name"
"""


async def test_a_disk_unplugged_while_asleep_is_not_prompted_for(installed_guest: Guest) -> None:
    """Acceptance 6, second half: a LUKS disk the desktop opened is removed with QMP
    device_del while the guest sleeps. The guest ejects it after the wake; the helper
    notices, drops it from the prompt, and the record says so."""
    g = installed_guest
    await armed_ready(g)
    before = set((await g.run("ls /sys/block")).stdout.split())
    stick = g.workdir / "stick.raw"
    with stick.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    await g.qmp(
        "blockdev-add",
        {"driver": "raw", "node-name": "stick", "file": {"driver": "file", "filename": str(stick)}},
    )
    await g.qmp("device_add", {"driver": "virtio-blk-pci", "drive": "stick", "id": "stick"})
    added = await g.wait_for_command(
        "ls /sys/block", 60, "the hot-plugged disk", ok=lambda o: set(o.split()) - before
    )
    [disk] = set(added.stdout.split()) - before
    await g.write_file("/root/unplug.sh", UNPLUG_SETUP.encode())
    name = (await g.run(["bash", "/root/unplug.sh", disk], timeout=120)).stdout.split()[-1]
    await g.wait_for_command(
        "cryptlockctl --json devices", 120, "the daemon knows the stick", ok=lambda o: name in o
    )
    await armed_ready(g)

    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await suspend(g, "systemctl suspend")
    mark = g.event_mark()
    await g.qmp("device_del", {"id": "stick"})
    await g.wakeup()
    await g.wait_event("WAKEUP", 60, since=mark)
    # The guest ejects the disk once awake (QEMU says so when it is gone).
    await g.wait_event("DEVICE_DELETED", 120, since=mark)
    await g.wait_console(PROMPT_NOTICE, 240, after=notices)

    def shown() -> list[str]:
        return [ln for ln in g.console_text().splitlines() if PROMPT_NOTICE in ln][notices:]

    async def redrawn() -> bool:
        return name not in shown()[-1]

    # A prompt drawn before the eject gives up within a second or so and is drawn again.
    await g.until(redrawn, 60, "a prompt without the unplugged disk")
    await g.type_text(layout.PASSPHRASE)
    await g.wait_agent(240, "agent after the resume")
    rec = await last_cycle(g, since)
    print(f"\nunplug cycle record: {json.dumps(rec, sort_keys=True)}")
    assert rec["skipped"] == [name], rec
    assert f"{name} disappeared while the machine slept: not prompted for" in rec["problems"]
    assert rec["wrong_passphrases"] == 0
    assert set(rec["resumed"]) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}
    # Never a prompt for the stick alone.
    assert not [ln for ln in shown() if f"for {name} (" in ln], shown()
