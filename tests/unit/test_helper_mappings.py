"""The LUKS mappings the idle helper finds in sysfs (cryptlockd/helper/mappings.py)."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.helper import mappings


def fake_dm(sys_block: Path, kname: str, name: str, uuid: str) -> None:
    (sys_block / kname / "dm").mkdir(parents=True)
    (sys_block / kname / "dm" / "name").write_text(name + "\n")
    (sys_block / kname / "dm" / "uuid").write_text(uuid + "\n")


def test_luks_mappings_from_sysfs(tmp_path: Path) -> None:
    fake_dm(tmp_path, "dm-0", "root", "CRYPT-LUKS2-aaaa-root")
    fake_dm(tmp_path, "dm-1", "vg-home", "LVM-xyz")
    fake_dm(tmp_path, "dm-2", "plain", "CRYPT-PLAIN-plain")
    fake_dm(tmp_path, "dm-3", "old", "CRYPT-LUKS1-bbbb-old")
    (tmp_path / "vda").mkdir()
    (tmp_path / "dm-4").mkdir()  # no dm/ directory: skipped
    assert mappings.luks_mappings(str(tmp_path)) == {
        "root": "CRYPT-LUKS2-aaaa-root",
        "old": "CRYPT-LUKS1-bbbb-old",
    }
    assert mappings.luks_mappings(str(tmp_path / "absent")) == {}
