"""Sync with deadlines (issue 10, defect 4 and acceptance 4; SPEC 2.4.3-2.4.5, 2.8), in the guest.

The helper used to freeze everything first and then call sync(), with no deadline. A user's
FUSE file system in writeback-cache mode whose server was frozen, or an NFS hard mount to a
server that has gone, then kept sync() waiting for good: the machine frozen, awake, the keys
in RAM. Now sync() runs before the freeze, while a FUSE server can still answer, with a
deadline; after the freeze only block-backed file systems are synced, each with a deadline;
past any deadline the cycle is abandoned (nothing suspended, everything thawed, no sleep) and
reported.

Both cases are bookworm only: what they prove is the helper's order and its deadlines (our
code around sync(2), a FUSE server and the kernel's NFS client, which work alike on 6.1 and
6.12); the freezer, the sleep and the resume around them are proven on both releases by the
cycle tests. The packages (fuse3, python3-pyfuse3, nfs-kernel-server) are in bookworm's image
only (tests/vm/image.py).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    armed_ready,
    assert_complete,
    boottime,
    last_cycle,
    run_cycle,
)
from tests.vm.test_cycle import assert_restored, data_before, knobs, usable_after
from tests.vm.test_recovery import watch_signals

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(900),
    pytest.mark.vm_suites("bookworm"),
]

USER = "fuser"
SYNCFS_TIMEOUT = 5.0
# Dirty pages stay dirty until something syncs them: the kernel's flusher would otherwise
# write them out after 30 s (dirty_expire), and a slow TCG guest could get there first.
KEEP_DIRTY = "sysctl -q -w vm.dirty_expire_centisecs=360000"

# A passthrough file system to a backing directory, in writeback-cache mode: the kernel keeps
# written pages dirty and sends them to this server only at writeback (sync, fsync, close).
FUSE_SERVER = """
import errno, os, sys
import pyfuse3, trio

ROOT = pyfuse3.ROOT_INODE


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, backing):
        super().__init__()
        self.backing = backing
        self.names = {}
        self.inodes = {}

    def _path(self, inode):
        return self.backing if inode == ROOT else os.path.join(self.backing, self.names[inode])

    def _inode(self, name):
        if name not in self.inodes:
            self.inodes[name] = ROOT + 1 + len(self.inodes)
            self.names[self.inodes[name]] = name
        return self.inodes[name]

    def _attr(self, inode):
        st = os.lstat(self._path(inode))
        a = pyfuse3.EntryAttributes()
        for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                    "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, key, getattr(st, key))
        a.st_ino, a.st_blksize, a.attr_timeout, a.entry_timeout = inode, 4096, 300, 300
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        name = os.fsdecode(name)
        if parent != ROOT or not os.path.lexists(os.path.join(self.backing, name)):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._inode(name))

    async def create(self, parent, name, mode, flags, ctx):
        name = os.fsdecode(name)
        fd = os.open(os.path.join(self.backing, name), flags | os.O_CREAT, mode)
        return pyfuse3.FileInfo(fh=fd), self._attr(self._inode(name))

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(self._path(inode), flags & ~os.O_CREAT))

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, attr.st_mode & 0o7777)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
            ))
        return self._attr(inode)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        os.fsync(fh)

    async def release(self, fh):
        os.close(fh)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for i, name in enumerate(sorted(os.listdir(self.backing))[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attr(self._inode(name)), i):
                return

    async def releasedir(self, fh):
        pass

    async def forget(self, inode_list):
        pass


backing, mountpoint = sys.argv[1:3]
options = set(pyfuse3.default_options)
options.add("fsname=wbfs")
options.add("allow_other")  # root sets up a loop device on a file in it
pyfuse3.init(Passthrough(backing), mountpoint, options)
trio.run(pyfuse3.main)
"""

# Writes 64 KiB (under the 32 pages after which the kernel would start balancing dirty
# pages) without fsync and keeps the file open (a close would write it back), prints the
# data's sha256, then waits for a line on its fifo.
HOLDER = """
import hashlib, os, sys
path, fifo = sys.argv[1:3]
data = os.urandom(64 * 1024)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
assert os.write(fd, data) == len(data)
print(hashlib.sha256(data).hexdigest(), flush=True)
with open(fifo) as f:
    f.readline()
os.close(fd)
"""


async def start_holder(g: Guest, path: str, user: str = "root") -> str:
    """HOLDER writing `path` as `user`; returns the sha256 of what it wrote, still dirty."""
    await g.write_file("/usr/local/lib/holder.py", HOLDER.encode())
    await g.run(
        "rm -f /run/holder.fifo && mkfifo -m 0666 /run/holder.fifo && rm -f /root/holder.out"
    )
    await g.spawn(
        f"runuser -u {user} -- python3 /usr/local/lib/holder.py {path} /run/holder.fifo",
        "/root/holder.out",
    )
    out = await g.wait_for_command(
        "cat /root/holder.out", 60, "the holder wrote its data", ok=lambda o: len(o.strip()) == 64
    )
    return out.stdout.strip()


async def test_fuse_writeback_cache_with_dirty_data_its_server_in_user_slice(
    installed_guest: Guest,
) -> None:
    """A user's FUSE mount in writeback-cache mode, its server in user.slice, dirty data
    written through it: the protected cycle completes (the sync before the freeze reaches the
    server while it still runs; a sync after the freeze waited for it for good), the data
    is in the server's backing file, the machine is usable. Then an ext4 on a loop device
    on a file of that mount: its syncfs after the freeze waits for the frozen server, and
    the cycle is abandoned at syncfs_timeout_sec: thawed, no sleep, reported."""
    g = installed_guest
    await armed_ready(g)
    await data_before(g)
    before = await knobs(g)
    await g.write_file("/usr/local/lib/wbfs.py", FUSE_SERVER.encode())
    await g.run(
        f"{KEEP_DIRTY} && useradd -m {USER} && install -d -o {USER} /srv/wbfs /mnt/wb && "
        "echo user_allow_other >> /etc/fuse.conf && "
        f"systemd-run --unit=wbfs --slice=user.slice --uid={USER} -p Type=exec "
        "python3 /usr/local/lib/wbfs.py /srv/wbfs /mnt/wb"
    )
    # Not findmnt: root may not stat a user's FUSE mount (no allow_other).
    await g.wait_for_command(
        "grep ' /mnt/wb ' /proc/self/mountinfo", 60, "the FUSE mount", ok=lambda o: "wbfs" in o
    )
    # FUSE gives its mounts a 1 % share of the dirty limit, strictly enforced: the first
    # balance of dirty pages (forced early by pages that earlier writers, such as
    # data_before's dd, left unaccounted) would write ours out at once. A larger share keeps
    # them dirty, as a busier FUSE file system's would be.
    await g.run(
        "bdi=/sys/class/bdi/$(awk '$5 == \"/mnt/wb\" {print $3}' /proc/self/mountinfo) && "
        "echo 100 > $bdi/max_ratio && echo 10 > $bdi/min_ratio"
    )
    cgroup = await g.run("systemctl show -p ControlGroup --value wbfs.service")
    assert cgroup.stdout.strip().startswith("/user.slice/"), cgroup.stdout
    digest = await start_holder(g, "/mnt/wb/dirty", USER)
    # Nothing reached the server yet: the data is dirty in the kernel's writeback cache
    # (write-through would have sent it with the write()).
    size = await g.run("stat -c %s /srv/wbfs/dirty")
    assert size.stdout.strip() == "0", f"not dirty: the backing file has {size.stdout} bytes"
    dirty = await g.run("grep -E '^(Dirty|Writeback):' /proc/meminfo")
    print(f"\nbefore the cycle: {' '.join(dirty.stdout.split())}")

    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    rec = await last_cycle(g, cycle.since)
    timeline = assert_complete(rec)
    print(f"LastCycle timeline {json.dumps(timeline)}")
    # The sync before the freeze wrote it to the server: nothing else has since (the
    # holder keeps the file open, the flusher waits an hour).
    backing = await g.run("sha256sum < /srv/wbfs/dirty")
    assert backing.stdout.split()[0] == digest, "the data written through FUSE is not intact"
    await assert_restored(g, before)
    await usable_after(g)
    state = await g.run("systemctl is-active wbfs.service")
    assert state.stdout.strip() == "active"
    through = await g.run(f"runuser -u {USER} -- sha256sum /mnt/wb/dirty")
    assert through.stdout.split()[0] == digest
    await g.run("echo done > /run/holder.fifo")

    # After the freeze: an ext4 on a loop device whose file lives on that FUSE mount is
    # block-backed, so it is synced again after the freeze, and its flush (the loop device
    # fsyncs its file) waits for the frozen server. Its syncfs deadline abandons the cycle.
    await g.run(
        "mkdir -p /etc/cryptlockd/cryptlockd.conf.d && printf '[cycle]\\nsyncfs_timeout_sec = "
        f"{SYNCFS_TIMEOUT:g}\\n' > /etc/cryptlockd/cryptlockd.conf.d/50-test.conf && "
        "cryptlockctl reload && truncate -s 16M /mnt/wb/disk.img && "
        "dev=$(losetup -f --show /mnt/wb/disk.img) && mkfs.ext4 -q -O ^has_journal $dev && "
        "mkdir -p /mnt/lo && mount $dev /mnt/lo && echo x > /mnt/lo/f",
        timeout=120,
    )
    await armed_ready(g)
    await watch_signals(g)
    since = await boottime(g)
    mark = g.event_mark()
    await g.spawn("systemctl suspend", "/root/trigger.log")
    rec = await last_cycle(g, since)
    print(f"after the freeze: LastCycle {json.dumps(rec)}")
    assert rec["success"] is False and rec["slept"] is False, rec
    assert rec["reason"] == (
        "abandoned before the sleep, staying awake: "
        f"syncfs(/mnt/lo) did not finish within {SYNCFS_TIMEOUT:g} s"
    ), rec
    t = rec["timeline_ms"]
    assert t["synced"] <= t["frozen"] <= t["abandoned"] <= t["thawed"], t
    assert "filesystems_synced" not in t and "sync_on_suspend_off" not in t, t
    assert SYNCFS_TIMEOUT * 1000 <= t["abandoned"] - t["frozen"] < SYNCFS_TIMEOUT * 1000 + 3000
    assert rec["suspended"] == [], rec
    assert "SUSPEND" not in [e.name for e in g.events[mark:]]
    signal = await g.wait_for_command(
        "cat /root/cycle-signal.log", 60, "CycleFinished", ok=lambda o: "CycleFinished" in o
    )
    assert '"data":[false' in signal.stdout.replace(" ", ""), signal.stdout[-2000:]
    await assert_restored(g, before)
    await usable_after(g)
    # Thawed, the server answers: the syncfs left behind ends, and only the new helper is
    # left in the helper unit's cgroup.
    await g.wait_for_command(
        "cat /sys/fs/cgroup/cryptlockd.slice/cryptlockd-helper.service/cgroup.procs",
        60,
        "the abandoned syncfs() ends once the FUSE server runs again",
        ok=lambda o: len(o.split()) == 1,
    )
    await g.run("cat /mnt/lo/f && umount /mnt/lo")


NFS_TIMEOUT = 5.0


async def test_nfs_hard_mount_to_a_server_that_is_gone_abandons_the_cycle(
    installed_guest: Guest,
) -> None:
    """An NFS hard mount to the guest's own kernel nfsd over loopback, dirty data, then the
    server stopped: sync() never returns. The cycle is abandoned once sync_timeout_sec has
    passed, before the freeze: no sleep, nothing frozen or suspended, the machine usable,
    LastCycle and CycleFinished(false) say why. The sync() is left behind in a child of the
    helper, stuck in D state, and a new helper arms beside it."""
    g = installed_guest
    await armed_ready(g)
    await data_before(g)
    before = await knobs(g)
    await g.run(
        f"{KEEP_DIRTY} && mkdir -p /srv/nfs /mnt/nfs && "
        "echo '/srv/nfs 127.0.0.1(rw,sync,no_subtree_check,no_root_squash,insecure)' "
        "> /etc/exports && systemctl start nfs-server.service && "
        "mount -t nfs -o vers=4.2,hard,proto=tcp 127.0.0.1:/srv/nfs /mnt/nfs",
        timeout=120,
    )
    await start_holder(g, "/mnt/nfs/dirty")
    size = await g.run("stat -c %s /srv/nfs/dirty")
    assert size.stdout.strip() == "0", f"not dirty: the exported file has {size.stdout} bytes"
    # The server goes away: the client retries for good (a hard mount).
    await g.run("systemctl stop nfs-server.service", timeout=120)
    await g.run(
        "mkdir -p /etc/cryptlockd/cryptlockd.conf.d && printf '[cycle]\\nsync_timeout_sec = "
        f"{NFS_TIMEOUT:g}\\n' > /etc/cryptlockd/cryptlockd.conf.d/50-test.conf && "
        "cryptlockctl reload"
    )
    await armed_ready(g)

    for n in (1, 2):
        await watch_signals(g)
        since = await boottime(g)
        mark = g.event_mark()
        start = time.monotonic()
        await g.spawn("systemctl suspend", "/root/trigger.log")
        rec = await last_cycle(g, since)
        took = time.monotonic() - start
        print(f"\nsleep {n}: reported {took:.1f} s after the trigger; LastCycle {json.dumps(rec)}")
        assert rec["success"] is False and rec["slept"] is False, rec
        assert rec["reason"] == (
            "abandoned before the sleep, staying awake: "
            f"sync() did not finish within {NFS_TIMEOUT:g} s"
        ), rec
        t = rec["timeline_ms"]
        assert "abandoned" in t and "freeze_start" not in t and "synced" not in t, t
        # No hang past the deadline (the record's own clock), and no sleep at all.
        assert NFS_TIMEOUT * 1000 <= t["abandoned"] - t["sync_start"] < NFS_TIMEOUT * 1000 + 3000
        assert rec["suspended"] == [] and rec["resumed"] == [], rec
        assert "SUSPEND" not in [e.name for e in g.events[mark:]]
        signal = await g.wait_for_command(
            "cat /root/cycle-signal.log", 60, "CycleFinished", ok=lambda o: "CycleFinished" in o
        )
        text = signal.stdout.replace(" ", "")
        assert '"data":[false' in text and "sync()didnotfinish" in text, signal.stdout[-2000:]
        await assert_restored(g, before)
        await usable_after(g)

        # The sync() it gave up on: a child of the dead helper, still in the helper unit's
        # cgroup, in D state, now PID 1's; a new helper runs beside it and arms.
        await armed_ready(g)
        procs = await g.run(
            "for p in $(cat /sys/fs/cgroup/cryptlockd.slice/cryptlockd-helper.service/"
            "cgroup.procs); do ps -o pid=,ppid=,stat=,wchan:32=,args= -p $p; done; "
            "systemctl show -p MainPID --value cryptlockd-helper.service"
        )
        print(f"helper unit's cgroup after sleep {n}:\n{procs.stdout}")
        *rows, main = procs.stdout.strip().splitlines()
        stuck = [r.split() for r in rows if r.split()[2].startswith("D")]
        assert len(stuck) == n, procs.stdout
        assert all(r[1] == "1" for r in stuck), procs.stdout
        assert int(main) > 0 and main.strip() not in [r[0] for r in stuck], procs.stdout
