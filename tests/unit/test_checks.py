"""The self-checks behind Check(), Protected and Problems, on fake trees."""

from __future__ import annotations

from pathlib import Path

from cryptlockd import checks
from cryptlockd.devices import LuksDevice

DEV = LuksDevice("cryptroot", "u", "LUKS2", "/dev/vda2", True, False, "passphrase")


def test_cgroup2(tmp_path: Path) -> None:
    assert not checks.check_cgroup2(tmp_path).ok
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert checks.check_cgroup2(tmp_path).ok


def test_sync_on_suspend_and_mem(tmp_path: Path) -> None:
    assert not checks.check_sync_on_suspend(tmp_path).ok
    r = checks.check_suspend_to_ram(tmp_path)
    assert not r.ok and "cannot read" in r.detail
    (tmp_path / "power").mkdir()
    (tmp_path / "power" / "sync_on_suspend").write_text("1\n")
    (tmp_path / "power" / "state").write_text("freeze disk\n")
    assert checks.check_sync_on_suspend(tmp_path).ok
    assert not checks.check_suspend_to_ram(tmp_path).ok
    (tmp_path / "power" / "state").write_text("freeze mem disk\n")
    assert checks.check_suspend_to_ram(tmp_path).ok


def test_sleep_dropin_anywhere_in_the_unit_path(tmp_path: Path) -> None:
    assert not checks.check_sleep_dropin(tmp_path).ok
    for d in ("usr/lib/systemd/system", "usr/local/lib/systemd/system", "etc/systemd/system"):
        root = tmp_path / d.replace("/", "_")
        f = root / d / checks.SLEEP_DROPIN
        f.parent.mkdir(parents=True)
        f.write_text("[Service]\n")
        assert checks.check_sleep_dropin(root).ok
        assert checks.find_sleep_dropin(root) == f


def test_logind() -> None:
    assert not checks.check_logind(None, False, False).ok
    assert not checks.check_logind(":1.2", False, False).ok
    assert checks.check_logind(":1.2", True, False).ok
    # During a sleep the lock is released on purpose.
    assert checks.check_logind(":1.2", False, True).ok


def test_devices_enabled_armer() -> None:
    assert checks.check_devices([DEV]).ok
    r = checks.check_devices([], ["cryptdata"])
    assert not r.ok and "1 excluded" in r.detail
    assert not checks.check_enabled(False).ok
    assert not checks.check_armer("recording").ok
    assert checks.check_armer("helper").ok


def test_evaluate_blocking_and_informational() -> None:
    good = [checks.check_enabled(True), checks.check_devices([DEV])]
    assert checks.evaluate(good) == (True, [])
    # A bad config reload is reported but does not unprotect (the last good one runs).
    protected, problems = checks.evaluate([*good, checks.check_config("x.conf: y: bad")])
    assert protected
    assert problems == ["config: x.conf: y: bad (running with the last good settings)"]
    protected, problems = checks.evaluate([*good, checks.check_enabled(False)])
    assert not protected
    assert problems == ["enabled: protection disabled (config or SetEnabled)"]


def test_inhibit_delay_is_informational() -> None:
    assert checks.check_inhibit_delay(None, 3.0).ok
    assert checks.check_inhibit_delay(5_000_000, 3.0).ok
    r = checks.check_inhibit_delay(2_000_000, 3.0)
    assert not r.ok and not r.blocking and "InhibitDelayMaxSec=2s" in r.detail
