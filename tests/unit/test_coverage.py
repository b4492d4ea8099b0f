"""Honest coverage (issue 11, acceptance 8): every dm-crypt key the next sleep would leave in
RAM shows in Problems, on fake sysfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptlockd.daemon import checks
from cryptlockd.daemon.coverage import check_coverage, check_coverage_of
from cryptlockd.daemon.devices import (
    apply_exclude,
    crypt_mappings,
    discover_devices,
    read_block_nodes,
)
from tests.fakesys import UUID_B, UUID_C, FakeSystem, two_disks_keyfile


@pytest.fixture
def fs(tmp_path: Path) -> FakeSystem:
    fs = FakeSystem(tmp_path)
    two_disks_keyfile(fs)
    return fs


def coverage(fs: FakeSystem, exclude: tuple[str, ...] = ()) -> checks.CheckResult:
    found = discover_devices(fs.paths)
    kept = apply_exclude(found, exclude)
    excluded = [d.name for d in found if d not in kept]
    return check_coverage_of(fs.sysfs, kept, excluded)


def test_all_luks_devices_covered(fs: FakeSystem) -> None:
    result = coverage(fs)
    assert result.ok and not result.blocking


def test_a_plain_dm_crypt_swap_is_a_problem(fs: FakeSystem) -> None:
    # Debian's cryptswap with a random key: CRYPT-PLAIN-<name>.
    fs.disk("vdc")
    fs.dm("dm-2", "cryptswap", "CRYPT-PLAIN-cryptswap", ["vdc"])
    result = coverage(fs)
    assert not result.ok
    assert "cryptswap (a PLAIN mapping, which luksSuspend cannot wipe)" in result.detail
    protected, problems = checks.evaluate([result])
    assert protected and problems == [f"coverage: {result.detail}"]


def test_an_excluded_device_is_a_problem(fs: FakeSystem) -> None:
    result = coverage(fs, exclude=(UUID_B,))
    assert not result.ok and "cryptdata (excluded by the config)" in result.detail


@pytest.mark.parametrize("kind", ["TCRYPT", "BITLK", "LOOPAES", "FVAULT2"])
def test_other_types_are_problems(fs: FakeSystem, kind: str) -> None:
    fs.disk("vdc")
    fs.dm("dm-2", "vc", f"CRYPT-{kind}-vc", ["vdc"])
    assert f"vc (a {kind} mapping" in coverage(fs).detail


def test_keyless_crypt_mappings_are_not_problems(fs: FakeSystem) -> None:
    # A LUKS2 --integrity subdevice under a covered device, and dm-verity.
    fs.disk("vdc")
    fs.dm("dm-2", "sec_dif", "CRYPT-SUBDEV-" + UUID_C.replace("-", "") + "-sec_dif", ["vdc"])
    fs.luks("dm-3", "sec", UUID_C, ["dm-2"])
    fs.disk("vdd")
    fs.dm("dm-4", "usr-verity", "CRYPT-VERITY-abc-usr-verity", ["vdd"])
    assert crypt_mappings(read_block_nodes(fs.sysfs)) == {
        "cryptdata": "LUKS2",
        "cryptroot": "LUKS2",
        "sec": "LUKS2",
    }
    assert coverage(fs).ok


def test_an_unreadable_detached_header_is_a_problem(fs: FakeSystem) -> None:
    fs.write_crypttab(
        f"cryptroot UUID=x none luks\ncryptdata UUID={UUID_B} none header={fs.root}/no/hdr\n"
    )
    result = coverage(fs)
    assert "cryptdata (its detached header (crypttab header=) cannot be read)" in result.detail
    (fs.root / "no").mkdir()
    (fs.root / "no" / "hdr").write_bytes(b"LUKS")
    assert coverage(fs).ok


def test_a_luks_mapping_not_among_the_devices_is_a_problem() -> None:
    result = check_coverage({"late": "LUKS2"}, [], [])
    assert "late (not known to cryptlockd yet)" in result.detail
