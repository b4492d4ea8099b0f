"""cryptlockd installed in the guest by `make install` and `systemctl enable --now`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.vm import image as image_mod
from tests.vm import layout
from tests.vm.guest import Guest

pytestmark = [pytest.mark.vm, pytest.mark.asyncio, pytest.mark.timeout(1500)]

LIST_INHIBITORS = (
    "busctl --json=short call org.freedesktop.login1 /org/freedesktop/login1 "
    "org.freedesktop.login1.Manager ListInhibitors"
)


async def wait_devices(
    guest: Guest, predicate: Callable[[list[dict[str, Any]]], bool], what: str
) -> list[dict[str, Any]]:
    """Waits until `cryptlockctl devices --json` satisfies `predicate`; returns the list."""
    result = await guest.wait_for_command(
        "cryptlockctl devices --json", 30, what, ok=lambda o: predicate(json.loads(o))
    )
    found: list[dict[str, Any]] = result.json()
    return found


async def test_daemon_runs_with_delay_lock_and_lists_devices(installed_guest: Guest) -> None:
    g = installed_guest
    await g.wait_for_command("systemctl is-active cryptlockd.service", 60, "cryptlockd active")
    assert (await g.run("systemctl is-enabled cryptlockd.service")).stdout.strip() == "enabled"
    main_pid = int((await g.run("systemctl show -P MainPID cryptlockd.service")).stdout)
    assert main_pid > 0

    def inhibitors_of_daemon(out: str) -> list[list[Any]]:
        # a(ssssuu): what, who, why, mode, uid, pid
        return [i for i in json.loads(out)["data"][0] if i[5] == main_pid]

    reply = await g.wait_for_command(
        LIST_INHIBITORS, 30, f"an inhibitor of pid {main_pid}", ok=inhibitors_of_daemon
    )
    ours = inhibitors_of_daemon(reply.stdout)
    assert any("sleep" in i[0].split(":") and i[3] == "delay" for i in ours), ours

    found = await wait_devices(g, lambda d: len(d) >= 2, "both LUKS devices")
    by_name = {d["name"]: d for d in found}
    assert set(by_name) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}, found
    assert by_name[layout.ROOT_DM_NAME]["holds_root"] is True
    assert by_name[layout.DATA_DM_NAME]["holds_root"] is False
    assert by_name[layout.ROOT_DM_NAME]["backing_device"] == layout.ROOT_DISK
    assert by_name[layout.DATA_DM_NAME]["key_source"] == f"keyfile:{layout.DATA_KEYFILE}"
    assert all(d["luks_type"] == "LUKS2" and not d["suspended"] for d in found)
    text = (await g.run("cryptlockctl devices")).stdout
    assert layout.ROOT_DM_NAME in text and layout.DATA_DM_NAME in text


async def test_make_install_picks_the_sleep_entry_the_compiler_allows(
    installed_guest: Guest, vm_image: image_mod.TestbedImage
) -> None:
    """bookworm's guest has gcc: the C entry. trixie's has none: the Python one, after a
    warning (tests/vm/image.py). Either is what systemd-suspend.service runs."""
    g = installed_guest
    entry = "/usr/local/libexec/cryptlockd/cryptlockd-sleep"
    exec_start = (await g.run("systemctl show -P ExecStart systemd-suspend.service")).stdout
    assert f"path={entry} ;" in exec_start and "systemd-sleep" not in exec_start, exec_start
    head = (await g.run(f"head -c 4 {entry} | od -An -c")).stdout.split()
    has_gcc = (await g.run("command -v gcc", check=False)).rc == 0
    assert has_gcc == (vm_image.suite == "bookworm")
    assert head == (["177", "E", "L", "F"] if has_gcc else ["#", "!", "/", "u"]), head
    checks = (await g.run("cryptlockctl check", check=False)).stdout
    assert "sleep-drop-in" in checks and "installed and in effect" in checks, checks


async def test_hotplugged_luks_device_appears_and_goes(installed_guest: Guest) -> None:
    g = installed_guest
    await g.wait_for_command("systemctl is-active cryptlockd.service", 60, "cryptlockd active")
    await wait_devices(g, lambda d: len(d) == 2, "the two boot devices")
    await g.run(
        "truncate -s 64M /var/tmp/extra.img && head -c 64 /dev/urandom > /run/extra.key && "
        "cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 "
        "--pbkdf-force-iterations 1000 /var/tmp/extra.img /run/extra.key && "
        "cryptsetup open --key-file /run/extra.key /var/tmp/extra.img extra",
        timeout=120,
    )
    found = await wait_devices(
        g, lambda d: "extra" in {x["name"] for x in d}, "the hot-plugged device 'extra'"
    )
    extra = next(d for d in found if d["name"] == "extra")
    assert extra["backing_device"].startswith("/dev/loop"), extra
    assert extra["holds_root"] is False
    await g.run("cryptsetup close extra")
    await wait_devices(
        g, lambda d: "extra" not in {x["name"] for x in d}, "'extra' gone after close"
    )
