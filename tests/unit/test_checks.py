"""The self-checks behind Check(), Protected and Problems, on fake trees."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.daemon import checks
from cryptlockd.daemon.devices import LuksDevice

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


def test_devices_enabled_helper() -> None:
    assert checks.check_devices([DEV]).ok
    r = checks.check_devices([], ["cryptdata"])
    assert not r.ok and "1 excluded" in r.detail
    assert not checks.check_enabled(False).ok
    r = checks.check_helper("not running under systemd")
    assert not r.ok and r.detail == "not running under systemd: nothing would be wiped"
    assert checks.check_helper(None).ok


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


# --- issue 5: the last cycle's verification (the key-risk lines: test_key_risks.py) ---


def test_last_cycle_line() -> None:
    assert checks.check_last_cycle({}) == []
    good = checks.check_last_cycle(
        {
            "verification": {
                "root": {"dm_table_key": "zeroed", "keyring": "none", "protected": "yes"}
            }
        }
    )
    assert good[0].ok and "root" in good[0].detail
    bad = checks.check_last_cycle(
        {
            "verification": {
                "root": {"dm_table_key": "zeroed", "keyring": "none", "protected": "yes"},
                "data": {
                    "dm_table_key": "zeroed",
                    "keyring": "left: 1 (EACCES)",
                    "protected": "no",
                },
            }
        }
    )
    assert not bad[0].ok and not bad[0].blocking
    assert "NOT protect data" in bad[0].detail and "left: 1" in bad[0].detail
    legacy = checks.check_last_cycle({"verification": {"root": {"dm_table_key": "present"}}})
    assert not legacy[0].ok


def test_last_cycle_line_names_an_unprotected_sleep() -> None:
    [line] = checks.check_last_cycle({"result": "unprotected", "reason": "protection disabled"})
    assert not line.ok and not line.blocking
    assert line.detail == "the last sleep was NOT protected: protection disabled"


def test_sleep_dropin_must_be_in_effect(tmp_path: Path) -> None:
    f = tmp_path / "etc/systemd/system" / checks.SLEEP_DROPIN
    f.parent.mkdir(parents=True)
    f.write_text("[Service]\n")
    ours = ["/usr/local/libexec/cryptlockd/cryptlockd-sleep"]
    assert checks.check_sleep_dropin(tmp_path, [ours]).ok
    # The drop-in of an older install ran the module through python3 -I -S -c.
    bootstrap = "import sys; from cryptlockd.sleep_entry import main; sys.exit(main())"
    legacy = ["/opt/venv/bin/python", "-I", "-S", "-B", "-c", bootstrap]
    assert checks.check_sleep_dropin(tmp_path, [legacy]).ok
    assert not checks.check_sleep_dropin(tmp_path, [["/usr/bin/not-cryptlockd-sleep"]]).ok
    assert "not asked" in checks.check_sleep_dropin(tmp_path, None).detail
    # A later drop-in reset ExecStart= to the stock one: the file alone would lie.
    stock = ["/usr/lib/systemd/systemd-sleep", "suspend"]
    r = checks.check_sleep_dropin(tmp_path, [stock])
    assert not r.ok and "runs /usr/lib/systemd/systemd-sleep suspend" in r.detail
    # Added to instead of replaced: the stock sleep would run after ours, a second sleep.
    assert not checks.check_sleep_dropin(tmp_path, [ours, stock]).ok
    assert "runs nothing" in checks.check_sleep_dropin(tmp_path, []).detail
