"""The verified wipe (issue 5), proven on the guest's RAM from the host.

The volume keys are read in the guest beforehand (`luksDump --dump-volume-key`, which
prints hex: libcryptsetup keeps the binary key in wiped memory). While the guest sleeps,
QMP dump-guest-memory gives its whole RAM, and we count:
- each whole 64-byte AES-XTS key, and each 32-byte half (the kernel keeps the halves, one
  per AES context, SPEC 6);
- the AES-256 key schedule of each half past its first 32 bytes (round keys 2..5), which
  only the kernel's cipher contexts can hold, so a hit there is a live dm-crypt key and not
  some stray copy of the raw bytes.
The control is the same scan of a stock sleep (daemon stopped): the scanner finds the keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.memscan import count_occurrences
from tests.vm.sleepcycle import (
    MANAGER,
    PROMPT_NOTICE,
    armed_ready,
    boottime,
    last_cycle,
    suspend,
    wake,
)

pytestmark = [pytest.mark.timeout(900)]


def vm(fn: Any) -> Any:
    return pytest.mark.vm(pytest.mark.asyncio(fn))


DEVICES = {
    layout.ROOT_DM_NAME: (layout.ROOT_DISK, layout.ROOT_KEYFILE),
    layout.DATA_DM_NAME: (layout.DATA_DISK, layout.DATA_KEYFILE),
}


# ---- AES-256 key expansion (FIPS-197 section 5.2), pure Python, for the scanner ----------


def _sbox() -> list[int]:
    box = [0] * 256
    p = q = 1
    while True:
        # p walks the multiplicative group by 3, q by its inverse (1/3).
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        rot = (
            q
            ^ ((q << 1 | q >> 7) & 0xFF)
            ^ ((q << 2 | q >> 6) & 0xFF)
            ^ ((q << 3 | q >> 5) & 0xFF)
            ^ ((q << 4 | q >> 4) & 0xFF)
        )
        box[p] = rot ^ 0x63
        if p == 1:
            break
    box[0] = 0x63
    return box


SBOX = _sbox()


def aes256_schedule(key: bytes) -> bytes:
    """The 240-byte expanded encryption key, in the byte order the kernel stores it."""
    assert len(key) == 32
    words = [list(key[i : i + 4]) for i in range(0, 32, 4)]
    rcon = 1
    for i in range(8, 60):
        t = list(words[i - 1])
        if i % 8 == 0:
            t = [SBOX[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = ((rcon << 1) ^ (0x1B if rcon & 0x80 else 0)) & 0xFF
        elif i % 8 == 4:
            t = [SBOX[b] for b in t]
        words.append([a ^ b for a, b in zip(words[i - 8], t, strict=True)])
    return bytes(b for w in words for b in w)


def test_aes256_schedule_known_answer() -> None:
    # FIPS-197 appendix A.3.
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    sched = aes256_schedule(key)
    assert len(sched) == 240
    assert sched[32:36].hex() == "9ba35411"
    assert sched[-4:].hex() == "706c631e"


def key_needles(vk: bytes) -> dict[str, bytes]:
    """Labelled byte strings to count for one AES-XTS volume key."""
    assert len(vk) == 64
    out = {"whole key": vk}
    for i, half in enumerate((vk[:32], vk[32:])):
        out[f"half {i + 1}"] = half
        out[f"schedule {i + 1}"] = aes256_schedule(half)[32:96]
    return out


def parse_volume_key(dump: str) -> bytes:
    """The hex bytes after 'MK dump:' (cryptsetup 2.6) / 'Volume key dump:'-like lines."""
    lines = dump.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.search(r"dump:", ln, re.I))
    hexes: list[str] = []
    first = lines[start].split(":", 1)[1]
    for ln in [first, *lines[start + 1 :]]:
        tokens = ln.split()
        if not tokens or not all(re.fullmatch(r"[0-9a-fA-F]{2}", t) for t in tokens):
            if hexes:
                break
            continue
        hexes.extend(tokens)
    return bytes.fromhex("".join(hexes))


async def volume_keys(g: Guest) -> dict[str, bytes]:
    keys = {}
    for dm, (disk, keyfile) in DEVICES.items():
        out = await g.run(
            f"cryptsetup luksDump --dump-volume-key --batch-mode --key-file {keyfile} {disk}",
            timeout=120,
        )
        keys[dm] = parse_volume_key(out.stdout)
        assert len(keys[dm]) == 64, out.stdout
    return keys


def scan(
    dump: Path, keys: dict[str, bytes], extra: dict[str, bytes] | None = None
) -> dict[str, int]:
    """Counts each key's needles (and `extra`) in a RAM dump, then deletes the dump: it is
    as large as the guest's RAM and holds its secrets."""
    labelled = {
        f"{dm} {label}": n for dm, vk in keys.items() for label, n in key_needles(vk).items()
    }
    labelled.update(extra or {})
    try:
        counts = count_occurrences(dump, labelled.values())
    finally:
        dump.unlink()
    return {label: counts[n] for label, n in labelled.items()}


# ---- driving the guest ------------------------------------------------------------------


async def sleep_and_dump(g: Guest, trigger: str, name: str) -> Path:
    """Triggers a suspend and dumps the RAM while the guest is in S3."""
    await suspend(g, trigger, 120)
    assert await g.status() == "suspended"
    t0 = time.monotonic()
    dump = await g.dump_memory(name)
    print(f"\n{name}: RAM dump of {dump.stat().st_size >> 20} MiB in {time.monotonic() - t0:.1f} s")
    assert await g.status() == "suspended", "the dump woke the guest"
    return dump


def passphrase_needles() -> dict[str, bytes]:
    p = layout.PASSPHRASE
    return {
        "passphrase ascii": p.encode(),
        "passphrase utf-16le": p.encode("utf-16-le"),
        "passphrase utf-32le": p.encode("utf-32-le"),
    }


# ---- the tests ----------------------------------------------------------------------------


@vm
async def test_no_key_in_ram_while_asleep_and_no_passphrase_after(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    keys = await volume_keys(g)
    check = json.loads((await g.run("cryptlockctl check --json", check=False)).stdout)
    risks = {r["name"]: r for r in check if r["name"].startswith("risk-")}
    kernel = (await g.run("uname -r")).stdout.strip()
    assert kernel in risks["risk-kernel-keyring"]["detail"], risks
    # The guest's own libcryptsetup decides the line: 2.7 (trixie) can link keys anywhere.
    has_link = (
        await g.run(
            "grep -c crypt_set_keyring_to_link "
            "$(readlink -f /lib/x86_64-linux-gnu/libcryptsetup.so.12)",
            check=False,
        )
    ).stdout.strip() not in ("", "0")
    lcs = risks["risk-libcryptsetup"]["detail"]
    assert ("2.7 or later" in lcs and "can link" in lcs) == has_link, lcs
    print(
        "\nCheck() risk lines in the guest:\n"
        + "\n".join(f"  {n}: {r['detail']}" for n, r in risks.items())
    )

    # 1. A cryptlockd cycle: while asleep, no key, no half, no schedule.
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    asleep = scan(await sleep_and_dump(g, "systemctl suspend", "asleep-cryptlockd"), keys)
    print(f"asleep with cryptlockd: {json.dumps(asleep)}")
    await wake(g, [layout.PASSPHRASE], notices=notices)
    rec = await last_cycle(g, since)
    assert rec["success"] is True, rec
    for dm in DEVICES:
        v = rec["verification"][dm]
        assert v["dm_table_key"] == "zeroed" and v["protected"] == "yes", rec["verification"]
        assert v["keyring"].startswith(("none", "invalidated")), rec["verification"]
    print(f"verification: {json.dumps(rec['verification'])}")
    assert all(n == 0 for n in asleep.values()), asleep

    # 2. After resume: the passphrase is nowhere in RAM.
    after = scan(await g.dump_memory("after-resume"), {}, passphrase_needles())
    print(f"after resume: {json.dumps(after)}")
    assert all(n == 0 for n in after.values()), after

    # 3. Control: the daemon stopped, a stock sleep: the same scan finds the keys.
    await g.run("systemctl stop cryptlockd.service")
    stock = scan(await sleep_and_dump(g, "systemctl suspend", "asleep-stock"), keys)
    print(f"asleep without cryptlockd (control): {json.dumps(stock)}")
    await wake(g, what="the stock sleep")
    for dm in DEVICES:
        assert stock[f"{dm} schedule 1"] > 0 and stock[f"{dm} schedule 2"] > 0, stock
        assert stock[f"{dm} half 1"] > 0 and stock[f"{dm} half 2"] > 0, stock


# A key planted the way a leftover would sit: a logon key named like cryptsetup's, linked
# into a keyring that outlives the process that made it. The payload goes from hex straight
# into a ctypes buffer that is wiped, so the planting process leaves no binary copy behind
# (add_key's own kernel buffer is freed with kvfree_sensitive).
PLANT = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
KEYCTL_SETPERM, KEYCTL_LINK, KEYCTL_UNLINK = 5, 8, 9
SESSION, USER = -3, -4
desc, hexkey, perm = sys.argv[1], sys.argv[2], int(sys.argv[3], 16)

def keyctl(*args):
    if libc.syscall(ctypes.c_long(SYS_KEYCTL), *(ctypes.c_long(a) for a in args)) < 0:
        sys.exit(f"keyctl{args}: errno {ctypes.get_errno()}")

buf = ctypes.create_string_buffer(len(hexkey) // 2)
for i in range(len(buf)):
    buf[i] = int(hexkey[2 * i:2 * i + 2], 16)
# Made in our session keyring, where we possess it (so we may set its permissions), then
# moved to the user keyring, which outlives this process.
serial = libc.syscall(ctypes.c_long(SYS_ADD_KEY), b"logon", desc.encode(), buf,
                      ctypes.c_size_t(len(buf)), ctypes.c_long(SESSION))
ctypes.memset(buf, 0, len(buf))
if serial < 0:
    sys.exit(f"add_key: errno {ctypes.get_errno()}")
keyctl(KEYCTL_SETPERM, serial, perm)
keyctl(KEYCTL_LINK, serial, USER)
keyctl(KEYCTL_UNLINK, serial, SESSION)
print("%08x" % serial)
"""
# Possessor: all; owner (user): view only, as cryptsetup's keys; other: view for the
# nobody-owned key, so that root sees it in /proc/keys but may not invalidate it.
PERM_ROOT_KEY = "3f010000"
PERM_NOBODY_KEY = "3f010001"


async def luks_uuid(g: Guest, disk: str) -> str:
    return (await g.run(f"cryptsetup luksUUID {disk}")).stdout.strip()


async def proc_keys(g: Guest, description: str) -> list[str]:
    out = await g.run(f"grep -F -- '{description}' /proc/keys || true")
    return out.stdout.splitlines()


@vm
async def test_planted_keyring_copy_is_invalidated_or_reported(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    keys = await volume_keys(g)
    data_desc = f"cryptsetup:{await luks_uuid(g, layout.DATA_DISK)}-d0"
    root_desc = f"cryptsetup:{await luks_uuid(g, layout.ROOT_DISK)}-d0"
    await g.write_file("/run/plant.py", PLANT.encode(), 0o755)  # nobody runs it too
    # 1. data's real volume key, in root's user keyring: the helper can take it out.
    data_serial = (
        await g.run(
            ["python3", "/run/plant.py", data_desc, keys[layout.DATA_DM_NAME].hex(), PERM_ROOT_KEY]
        )
    ).stdout.strip()
    # 2. A marker under root's name, owned by nobody: root sees it but may not remove it.
    marker = hashlib.sha512(b"cryptlockd: planted, cannot be removed").digest()
    nobody = await g.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "python3",
            "/run/plant.py",
            root_desc,
            marker.hex(),
            PERM_NOBODY_KEY,
        ]
    )
    root_serial = nobody.stdout.strip()
    assert [ln for ln in await proc_keys(g, data_desc) if ln.startswith(data_serial)]
    assert [ln for ln in await proc_keys(g, root_desc) if ln.startswith(root_serial)]

    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    dump = await sleep_and_dump(g, "systemctl suspend", "asleep-planted")
    asleep = scan(dump, keys, {"nobody's marker": marker})
    print(f"asleep with planted keyring copies: {json.dumps(asleep)}")
    await wake(g, [layout.PASSPHRASE], notices=notices)
    rec = await last_cycle(g, since)
    print(f"verification: {json.dumps(rec['verification'])}")

    data = rec["verification"][layout.DATA_DM_NAME]
    assert data["keyring"] == f"invalidated: {data_serial}", data
    assert data["protected"] == "yes"
    assert await proc_keys(g, data_desc) == []
    assert all(
        asleep[f"{layout.DATA_DM_NAME} {label}"] == 0
        for label in key_needles(keys[layout.DATA_DM_NAME])
    ), asleep

    root = rec["verification"][layout.ROOT_DM_NAME]
    assert root["dm_table_key"] == "zeroed"
    assert root["keyring"].startswith(f"left: {root_serial}"), root
    assert root["protected"] == "no"
    assert rec["success"] is False and "could not be verified" in rec["reason"], rec
    assert any(p.startswith(f"{layout.ROOT_DM_NAME} was NOT protected") for p in rec["problems"])
    # The scanner sees a keyring payload that stayed: the dump is a fair witness.
    assert asleep["nobody's marker"] >= 1, asleep
    problems = await g.wait_for_command(
        f"busctl --json=short get-property {MANAGER} Problems",
        60,
        "Problems names the last cycle",
        ok=lambda o: "last-cycle" in o,
    )
    assert f"NOT protect {layout.ROOT_DM_NAME}" in problems.stdout
    journal = await g.run("journalctl -b -p warning --no-pager -o cat")
    assert f"{layout.ROOT_DM_NAME} was NOT protected" in journal.stdout
