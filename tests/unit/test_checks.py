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


# --- issue 5: kernel / libcryptsetup risk lines and the last cycle's verification ---


def _risks(
    release: str,
    lib: str | None = "2.6.1",
    link: bool = False,
    keyrings: bool = True,
    linked: tuple[str, ...] = (),
) -> dict[str, checks.CheckResult]:
    facts = checks.CryptoFacts(release, keyrings, lib, link, linked)
    return {r.name: r for r in checks.check_key_risks(facts)}


def test_kernel_version_parse() -> None:
    assert checks.kernel_version("6.12.48+deb13-amd64") == (6, 12)
    assert checks.kernel_version("6.1.0-25-amd64") == (6, 1)
    assert checks.kernel_version("weird") == (0, 0)


def test_risk_lines_per_kernel_and_cryptsetup() -> None:
    new = _risks("6.12.48+deb13-amd64", "2.7.5", link=True)
    assert "6.9 or later" in new["risk-kernel-keyring"].detail
    assert "invalidates" in new["risk-kernel-keyring"].detail
    assert "--link-vk-to-keyring" in new["risk-libcryptsetup"].detail
    old = _risks("6.1.0-25-amd64", "2.5 or 2.6 (by its symbols)")
    assert "6.9" not in old["risk-kernel-keyring"].detail
    assert "cryptsetup drops its copy" in old["risk-kernel-keyring"].detail
    assert "--link-vk-to-keyring" not in old["risk-libcryptsetup"].detail
    assert "no key retention" in _risks("6.12", keyrings=False)["risk-kernel-keyring"].detail
    assert "predates" in _risks("4.9.0")["risk-kernel-keyring"].detail
    assert _risks("6.9.0")["risk-kernel-keyring"].detail.count("6.9 or later") == 1
    for r in [*new.values(), *old.values()]:
        assert r.ok and not r.blocking


def test_risk_lines_that_are_problems() -> None:
    missing = _risks("6.1.0", lib=None)["risk-libcryptsetup"]
    assert not missing.ok and "cannot be loaded" in missing.detail
    linked = _risks("6.12.0", "2.7.5", link=True, linked=("data",))["risk-linked-volume-key"]
    assert not linked.ok and "data" in linked.detail
    assert "risk-linked-volume-key" not in _risks("6.12.0")
    _, problems = checks.evaluate([linked])
    assert problems[0].startswith("risk-linked-volume-key: crypttab links")


def test_crypto_facts_reads_crypttab_links(tmp_path: Path) -> None:
    tab = tmp_path / "crypttab"
    tab.write_text("# c\nroot UUID=1 none luks\ndata UUID=2 /k luks,link-volume-key=@u::%logon:x\n")
    facts = checks.crypto_facts(tab, proc_keys=tmp_path / "nokeys")
    assert facts.linked_in_crypttab == ("data",)
    assert facts.kernel_keyrings is False
    assert facts.kernel_release


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
    ours = ["/opt/venv/bin/python", "-I", "-m", "cryptlockd.sleep_entry"]
    assert checks.check_sleep_dropin(tmp_path, [ours]).ok
    assert "not asked" in checks.check_sleep_dropin(tmp_path, None).detail
    # A later drop-in reset ExecStart= to the stock one: the file alone would lie.
    stock = ["/usr/lib/systemd/systemd-sleep", "suspend"]
    r = checks.check_sleep_dropin(tmp_path, [stock])
    assert not r.ok and "runs /usr/lib/systemd/systemd-sleep suspend" in r.detail
    # Added to instead of replaced: the stock sleep would run after ours, a second sleep.
    assert not checks.check_sleep_dropin(tmp_path, [ours, stock]).ok
    assert "runs nothing" in checks.check_sleep_dropin(tmp_path, []).detail
