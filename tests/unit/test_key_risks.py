"""The key-risk lines of the self-checks (cryptlockd/daemon/key_risks.py, issue 5): what
this kernel and libcryptsetup risk for the volume keys, from facts passed in."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.daemon import checks, key_risks
from cryptlockd.daemon.checks import CheckResult


def _risks(
    release: str,
    lib: str | None = "2.6.1",
    link: bool = False,
    keyrings: bool = True,
    linked: tuple[str, ...] = (),
) -> dict[str, CheckResult]:
    facts = key_risks.CryptoFacts(release, keyrings, lib, link, linked)
    return {r.name: r for r in key_risks.check_key_risks(facts)}


def test_kernel_version_parse() -> None:
    assert key_risks.kernel_version("6.12.48+deb13-amd64") == (6, 12)
    assert key_risks.kernel_version("6.1.0-25-amd64") == (6, 1)
    assert key_risks.kernel_version("weird") == (0, 0)


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
    facts = key_risks.crypto_facts(tab, proc_keys=tmp_path / "nokeys")
    assert facts.linked_in_crypttab == ("data",)
    assert facts.kernel_keyrings is False
    assert facts.kernel_release
