"""The root disk's keyslots rearranged for the Argon2id cases (issue 12, acceptance 3): a
decoy argon2id keyslot (another passphrase) in front of the passphrase's, both at the
image's cost (layout.ARGON2_*). The helper tries the remembered keyslot first, then every
active one in slot order (cryptlockd/helper/kdf.py keyslot_order): with nothing remembered
the passphrase costs the keyfile's cheap PBKDF2 slot, the decoy's KDF and its own; once
remembered, its own only.

Done in the running cryptlockd guest with the boot keyfile (slot 0, left as it is) as the
key; the data disk is not touched. Nothing reboots in the bench, so the initramfs does not
matter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.vm import layout
from tests.vm.guest import Guest

DECOY = "Decoy-In_Front!07"  # never typed: only there to cost a KDF
KEYFILE_SLOT = layout.KEYFILE_SLOT
DECOY_SLOT = layout.PASSPHRASE_SLOT  # where the passphrase was: slot 1
PASSPHRASE_SLOT = 2
KDF = (
    f"--pbkdf argon2id --pbkdf-memory {layout.ARGON2_MEMORY_KIB} "
    f"--pbkdf-force-iterations {layout.ARGON2_ITERATIONS} "
    f"--pbkdf-parallel {layout.ARGON2_PARALLEL}"
)

# Reads the passphrase and the decoy from stdin (one a line) into files of a private
# directory removed on exit: cryptsetup takes a new key as a file, read whole.
REARRANGE = f"""set -e
umask 077
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
IFS= read -r p; IFS= read -r q
printf '%s' "$p" > "$d/pass"; printf '%s' "$q" > "$d/decoy"
k="--batch-mode --key-file {layout.ROOT_KEYFILE}"
cryptsetup luksAddKey $k {KDF} --key-slot {PASSPHRASE_SLOT} {layout.ROOT_DISK} "$d/pass"
cryptsetup luksKillSlot $k {layout.ROOT_DISK} {DECOY_SLOT}
cryptsetup luksAddKey $k {KDF} --key-slot {DECOY_SLOT} {layout.ROOT_DISK} "$d/decoy"
"""

# One KDF of the passphrase's keyslot, timed in the guest (awake, nothing frozen).
ONE_KDF = f"""set -e
umask 077
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
cat > "$d/pass"
s=$(date +%s.%N)
cryptsetup open --test-passphrase --key-file "$d/pass" --key-slot {PASSPHRASE_SLOT} \\
    {layout.ROOT_DISK}
awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN {{ printf "%.3f", b - a }}'
"""


# The guest's own cost of two KDFs at once, without cryptlockd: the same `cryptsetup
# open --test-passphrase` on root's passphrase keyslot and data's (same cost), started
# together, then each alone. Prints "<root> <data>" together, then root and data alone.
TWO_KDFS = f"""set -e
umask 077
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
cat > "$d/pass"
t() {{
    s=$(date +%s.%N)
    cryptsetup open --test-passphrase --key-file "$d/pass" --key-slot "$2" "$1"
    awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN {{ printf "%.3f", b - a }}' > "$3"
}}
t {layout.ROOT_DISK} {PASSPHRASE_SLOT} "$d/a" & p=$!
t {layout.DATA_DISK} {layout.PASSPHRASE_SLOT} "$d/b" & q=$!
wait $p; wait $q
echo "$(cat "$d/a") $(cat "$d/b")"
t {layout.ROOT_DISK} {PASSPHRASE_SLOT} "$d/a"
t {layout.DATA_DISK} {layout.PASSPHRASE_SLOT} "$d/b"
echo "$(cat "$d/a") $(cat "$d/b")"
"""


def slot_kdfs(meta: Mapping[str, Any]) -> dict[int, str]:
    """Keyslot -> its KDF as "argon2id 32768KiB x4 p1" or "pbkdf2 1000", from
    `luksDump --dump-json-metadata`."""
    out = {}
    for slot, ks in meta.get("keyslots", {}).items():
        kdf = ks.get("kdf", {})
        kind = str(kdf.get("type", "?"))
        if kind.startswith("argon2"):
            out[int(slot)] = f"{kind} {kdf.get('memory')}KiB x{kdf.get('time')} p{kdf.get('cpus')}"
        else:
            out[int(slot)] = f"{kind} {kdf.get('iterations')}"
    return dict(sorted(out.items()))


def layout_problem(kdfs: Mapping[int, str]) -> str | None:
    """Why the slots are not keyfile, decoy, passphrase with the two argon2id ones at the
    same cost; None when they are."""
    want = (
        f"argon2id {layout.ARGON2_MEMORY_KIB}KiB x{layout.ARGON2_ITERATIONS} "
        f"p{layout.ARGON2_PARALLEL}"
    )
    if sorted(kdfs) != [KEYFILE_SLOT, DECOY_SLOT, PASSPHRASE_SLOT]:
        return f"keyslots {sorted(kdfs)}, expected {[KEYFILE_SLOT, DECOY_SLOT, PASSPHRASE_SLOT]}"
    if not kdfs[KEYFILE_SLOT].startswith("pbkdf2"):
        return f"keyfile slot {KEYFILE_SLOT} is {kdfs[KEYFILE_SLOT]}"
    for slot in (DECOY_SLOT, PASSPHRASE_SLOT):
        if kdfs[slot] != want:
            return f"slot {slot} is {kdfs[slot]}, expected {want}"
    return None


async def dump(g: Guest) -> dict[int, str]:
    result = await g.run(f"cryptsetup luksDump --dump-json-metadata {layout.ROOT_DISK}")
    return slot_kdfs(result.json())


async def rearrange(g: Guest) -> dict[int, str]:
    """Decoy in slot 1, the passphrase in slot 2 of the root disk; the keyslots after."""
    stdin = f"{layout.PASSPHRASE}\n{DECOY}\n".encode()
    await g.run(REARRANGE, input=stdin, timeout=600)
    kdfs = await dump(g)
    problem = layout_problem(kdfs)
    if problem:
        raise RuntimeError(f"root's keyslots after the rearrangement: {problem}")
    return kdfs


async def one_kdf_seconds(g: Guest, n: int = 3) -> list[float]:
    """n timings of `cryptsetup open --test-passphrase` on the passphrase's keyslot."""
    out = []
    for _ in range(n):
        r = await g.run(ONE_KDF, input=layout.PASSPHRASE.encode(), timeout=300)
        out.append(float(r.stdout.strip().splitlines()[-1]))
    return out


async def two_kdfs_ratios(g: Guest, n: int = 3) -> list[float]:
    """n times: the later of two KDFs run at once (TWO_KDFS) over the mean of the two
    run alone right after; the guest's parallel cost, to read the shared case against."""
    out = []
    for _ in range(n):
        r = await g.run(TWO_KDFS, input=layout.PASSPHRASE.encode(), timeout=600)
        together, alone = ([float(x) for x in line.split()] for line in r.stdout.splitlines()[-2:])
        out.append(max(together) / (sum(alone) / len(alone)))
    return out


def describe(kdfs: Mapping[int, str]) -> str:
    names = {KEYFILE_SLOT: "boot keyfile", DECOY_SLOT: "decoy", PASSPHRASE_SLOT: "passphrase"}
    return "; ".join(f"slot {s} {names.get(s, '?')}: {k}" for s, k in kdfs.items())
