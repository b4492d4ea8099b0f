from __future__ import annotations

from pathlib import Path

import pytest

from cryptlockd.daemon import sleepconf

KERNEL = "freeze mem disk\n"
MEM = "s2idle [deep]\n"


def test_defaults_pick_mem_and_keep_kernel_mode() -> None:
    assert sleepconf.choose([], KERNEL, MEM) == ("mem", None)
    assert sleepconf.kernel_default(MEM) == "deep"


def test_suspend_state_and_modes_append_and_reset() -> None:
    texts = ["[Sleep]\nSuspendState=standby\n", "[Sleep]\nSuspendState=\nSuspendState=freeze mem\n"]
    assert sleepconf.parse(texts)[0] == ["freeze", "mem"]
    assert sleepconf.choose(texts, KERNEL, MEM) == ("freeze", None)
    texts = ["[Sleep]\n#SuspendState=freeze\nMemorySleepMode=s2idle deep\n"]
    assert sleepconf.choose(texts, KERNEL, MEM) == ("mem", "s2idle")
    # systemd < 256 spells it SuspendMode=; other sections are ignored.
    texts = ["[Other]\nSuspendState=freeze\n[Sleep]\nSuspendMode=deep\n"]
    assert sleepconf.choose(texts, KERNEL, MEM) == ("mem", "deep")


def test_nothing_offered_is_an_error() -> None:
    with pytest.raises(sleepconf.NoSleepState):
        sleepconf.choose(["[Sleep]\nSuspendState=standby\n"], KERNEL, MEM)
    with pytest.raises(sleepconf.NoSleepState):
        sleepconf.choose(["[Sleep]\nMemorySleepMode=shallow\n"], KERNEL, MEM)


def test_config_files_order_and_masking(tmp_path: Path) -> None:
    (tmp_path / "etc/systemd/sleep.conf.d").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/sleep.conf.d").mkdir(parents=True)
    (tmp_path / "etc/systemd/sleep.conf").write_text("")
    (tmp_path / "usr/lib/systemd/sleep.conf").write_text("")
    (tmp_path / "etc/systemd/sleep.conf.d/b.conf").write_text("")
    (tmp_path / "usr/lib/systemd/sleep.conf.d/b.conf").write_text("")
    (tmp_path / "usr/lib/systemd/sleep.conf.d/a.conf").write_text("")
    files = [str(Path(f).relative_to(tmp_path)) for f in sleepconf.config_files(str(tmp_path))]
    assert files == [
        "etc/systemd/sleep.conf",
        "usr/lib/systemd/sleep.conf.d/a.conf",
        "etc/systemd/sleep.conf.d/b.conf",
    ]
