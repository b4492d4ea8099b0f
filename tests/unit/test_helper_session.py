"""The helper's session (cryptlockd/helper/session.py).

The idle helper opens the LUKS mappings ahead of time; arming reuses a handle only while
its mapping is the same one (by dm UUID), and frees every handle it does not use."""

from __future__ import annotations

from typing import ClassVar

import pytest

from cryptlockd.helper import mappings, session


class FakeDevice:
    opened: ClassVar[list[str]] = []
    freed: ClassVar[list[str]] = []
    fail: ClassVar[set[str]] = set()

    def __init__(self, library: object, name: str) -> None:
        if name in self.fail:
            raise OSError(f"cannot open {name}")
        self.name = name
        self.opened.append(name)
        self.last_keyslot = -1

    def free(self) -> None:
        self.freed.append(self.name)


@pytest.fixture
def helper(monkeypatch: pytest.MonkeyPatch) -> session.Helper:
    FakeDevice.opened, FakeDevice.freed, FakeDevice.fail = [], [], set()
    monkeypatch.setattr(session, "Device", FakeDevice)
    h = session.Helper()
    h.library = object()  # type: ignore[assignment]
    return h


def test_arming_reuses_unchanged_preloaded_mappings(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        mappings,
        "luks_mappings",
        lambda: {
            "root": "CRYPT-LUKS2-aaaa-root",
            "data": "CRYPT-LUKS2-bbbb-data",
            "spare": "CRYPT-LUKS2-cccc-spare",
        },
    )
    helper.preload()
    assert FakeDevice.opened == ["root", "data", "spare"]
    # data was closed and opened again on another disk; spare is not in the plan.
    monkeypatch.setattr(
        mappings,
        "luks_mappings",
        lambda: {
            "root": "CRYPT-LUKS2-aaaa-root",
            "data": "CRYPT-LUKS2-dddd-data",
            "spare": "CRYPT-LUKS2-cccc-spare",
            "new": "CRYPT-LUKS2-eeee-new",
        },
    )
    taken = helper._take_devices(["root", "data", "new"])
    assert list(taken) == ["root", "data", "new"]
    assert FakeDevice.opened == ["root", "data", "spare", "data", "new"]
    assert sorted(FakeDevice.freed) == ["data", "spare"]
    assert helper.preloaded == {}


def test_a_device_that_cannot_be_opened_fails_the_arm_and_leaks_nothing(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {"root": "CRYPT-LUKS2-aaaa-root"})
    helper.preload()
    FakeDevice.fail = {"data"}
    with pytest.raises(OSError, match="cannot open data"):
        helper._take_devices(["root", "data"])
    assert FakeDevice.freed == ["root"]


def test_a_failed_preload_is_left_for_the_arm(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {"root": "CRYPT-LUKS2-aaaa-root"})
    FakeDevice.fail = {"root"}
    helper.preload()
    assert helper.preloaded == {} and "preloading root" in capsys.readouterr().err
    FakeDevice.fail = set()
    assert list(helper._take_devices(["root"])) == ["root"]
