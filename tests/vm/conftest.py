"""pytest fixtures for the QEMU test bed. See tests/vm/README.md for the API.

- vm_image (session): the cached Debian guest image (built on first use).
- vm_accel (session): "kvm" or "tcg" (probed once; CRYPTLOCKD_VM_ACCEL overrides).
- vm_installed (session): the image with the project installed by `make install`.
- guest / installed_guest (function): a booted copy-on-write guest of either, agent ready.
On failure, the console log and the guest journal are saved under
tests/vm/artifacts/<suite>/<test>/ and their tails printed. The summary at the end gives the
VM suite's times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.vm import image as image_mod
from tests.vm import machine
from tests.vm.guest import SOCKETS_PREFIX, DiskSet, Guest, artifacts_dir
from tests.vm.install import InstalledLayer, build_installed_layer

log = logging.getLogger(__name__)


@dataclass
class VmTimes:
    started: float | None = None
    image: str = ""
    accel: str = ""
    install: str = ""
    snapshots: list[str] = field(default_factory=list)
    tests: list[tuple[str, str, float, float | None]] = field(default_factory=list)


TIMES = VmTimes()


def _unavailable() -> str | None:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make deps installs it)"
    if not os.access("/dev/null", os.W_OK):
        return "no usable /dev"
    return None


def _mark_started() -> None:
    if TIMES.started is None:
        TIMES.started = time.monotonic()


@pytest.fixture(scope="session")
def vm_image() -> image_mod.TestbedImage:
    _mark_started()
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CRYPTLOCKD_VM_SKIP") == "1":
            pytest.skip(f"QEMU test bed skipped by CRYPTLOCKD_VM_SKIP=1: {reason}")
        pytest.fail(
            f"this machine cannot run the QEMU test bed: {reason} "
            "(set CRYPTLOCKD_VM_SKIP=1 to skip the VM tests deliberately)"
        )
    start = time.monotonic()
    img = image_mod.ensure_image()
    took = time.monotonic() - start
    built = img.report.get("build_seconds")
    TIMES.image = f"{img.suite} image {img.directory.name}: " + (
        f"built in {built} s" if took > 5 and built else "cached"
    )
    return img


@pytest.fixture(scope="session")
def vm_accel(vm_image: image_mod.TestbedImage) -> str:
    accel = machine.choose_accel(vm_image.kernel, image_mod.cache_root())
    TIMES.accel = accel
    return accel


def _remove_what_dead_runs_left(suite_dir: Path) -> None:
    """A run that was killed (Ctrl-C, a cancelled CI job) cannot clean up: its session
    directory (saved guest RAM, hundreds of MiB) and its guests' socket directories stay."""
    leftovers = [
        *suite_dir.glob("session-*"),
        *Path(tempfile.gettempdir()).glob(f"{SOCKETS_PREFIX}*"),
    ]
    for path in leftovers:
        pid = path.name.removeprefix("session-").removeprefix(SOCKETS_PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vm_session_dir(vm_image: image_mod.TestbedImage) -> Iterator[Path]:
    _remove_what_dead_runs_left(artifacts_dir(vm_image.suite))
    path = artifacts_dir(vm_image.suite) / f"session-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    if os.environ.get("CRYPTLOCKD_VM_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class BootedState:
    """A guest booted once and saved (RAM + devices) on `disks`, which stay untouched: each
    test resumes it on its own copy-on-write overlays instead of booting."""

    image: image_mod.TestbedImage
    accel: str
    disks: DiskSet
    state: Path | None  # None: snapshots disabled, every test boots
    boot_seconds: float | None


def _snapshots_enabled() -> bool:
    return os.environ.get("CRYPTLOCKD_VM_SNAPSHOT", "1") != "0"


async def _boot_and_save(
    img: image_mod.TestbedImage,
    accel: str,
    backing: DiskSet,
    workdir: Path,
    name: str,
    ready: str | None,
) -> BootedState:
    disks = backing.overlay(workdir / "disks")
    guest = Guest(img, disks, workdir, accel, name=name)
    try:
        await guest.start()
        # Let the boot settle, so no test inherits half-started units.
        await guest.run("systemctl is-system-running --wait", timeout=180, check=False)
        if ready:
            await guest.wait_for_command(ready, 180, ready)
        await guest.save_state(workdir / "state")
    finally:
        await guest.close()
    log.info("%s: booted in %.1f s and saved", name, guest.boot_seconds or -1)
    return BootedState(img, accel, disks, workdir / "state", guest.boot_seconds)


@pytest.fixture(scope="session")
def vm_base_state(
    vm_image: image_mod.TestbedImage, vm_accel: str, vm_session_dir: Path
) -> BootedState:
    backing = DiskSet.of_image(vm_image)
    if not _snapshots_enabled():
        return BootedState(vm_image, vm_accel, backing, None, None)
    state = asyncio.run(
        _boot_and_save(vm_image, vm_accel, backing, vm_session_dir / "base-state", "base", None)
    )
    TIMES.snapshots.append(f"base guest: booted once in {state.boot_seconds:.1f} s, saved")
    return state


@pytest.fixture(scope="session")
def vm_installed_state(
    vm_image: image_mod.TestbedImage,
    vm_accel: str,
    vm_installed: InstalledLayer,
    vm_session_dir: Path,
) -> BootedState:
    if not vm_installed.ok:
        pytest.fail("installing the project in the guest failed:\n" + vm_installed.log[-6000:])
    if not _snapshots_enabled():
        return BootedState(vm_image, vm_accel, vm_installed.disks, None, None)
    state = asyncio.run(
        _boot_and_save(
            vm_image,
            vm_accel,
            vm_installed.disks,
            vm_session_dir / "installed-state",
            "installed",
            "systemctl is-active cryptlockd.service",
        )
    )
    TIMES.snapshots.append(f"installed guest: booted once in {state.boot_seconds:.1f} s, saved")
    return state


@pytest.fixture(scope="session")
def vm_installed(
    vm_image: image_mod.TestbedImage, vm_accel: str, vm_session_dir: Path
) -> InstalledLayer:
    layer = asyncio.run(build_installed_layer(vm_image, vm_accel, vm_session_dir / "installed"))
    TIMES.install = (
        f"installed layer: {layer.seconds:.1f} s ({'ok' if layer.ok else 'make install FAILED'})"
    )
    return layer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm_suites(*suites): a guest test that runs on these Debian releases only "
        "(see 'Where a new guest test goes' in tests/vm/README.md)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test's timeout covers its body only: the session fixtures (image build, installed
    layer) run in the setup of whichever test comes first and have their own deadlines.
    A test marked vm_suites(...) is skipped, with the reason, in the other releases' runs."""
    suite = image_mod.selected_suite()
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and "tests/vm/" in item.nodeid.replace("\\", "/"):
            seconds = marker.args[0] if marker.args else marker.kwargs.get("timeout", 900)
            item.add_marker(pytest.mark.timeout(seconds, func_only=True), append=False)
        only = item.get_closest_marker("vm_suites")
        if only is not None and suite not in only.args:
            reason = f"runs on {' and '.join(only.args)} only; this run is {suite}"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _test_dir(request: pytest.FixtureRequest, suite: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    path = artifacts_dir(suite) / name
    shutil.rmtree(path, ignore_errors=True)
    return path


async def _boot(request: pytest.FixtureRequest, booted: BootedState) -> AsyncIterator[Guest]:
    workdir = _test_dir(request, booted.image.suite)
    accel = booted.accel
    guest = Guest(
        booted.image,
        booted.disks.overlay(workdir / "disks"),
        workdir,
        accel,
        name=request.node.name,
        incoming=booted.state,
    )
    start = time.monotonic()
    failed = True
    try:
        await guest.start()
        yield guest
        rep = getattr(request.node, "rep_call", None)
        failed = rep is None or rep.failed
    finally:
        TIMES.tests.append(
            (request.node.nodeid, accel, time.monotonic() - start, guest.boot_seconds)
        )
        if failed:
            await _save_failure(guest, workdir)
        await guest.close()
        shutil.rmtree(workdir / "disks", ignore_errors=True)
        if not failed and os.environ.get("CRYPTLOCKD_VM_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


async def _save_failure(guest: Guest, workdir: Path) -> None:
    journal = "(guest agent did not answer; no journal)"
    if guest.running:
        try:
            journal = await asyncio.wait_for(guest.journal(timeout=15), 30)
        except Exception as e:
            journal = f"(no journal: {e})"
    (workdir / "journal.txt").write_text(journal)
    tail_j = "\n".join(journal.splitlines()[-40:])
    print(f"\n==== guest artifacts: {workdir} (console.log, journal.txt, qemu.log) ====")
    print(f"---- console tail ----\n{guest.console_tail(40)}")
    print(f"---- journal tail ----\n{tail_j}")


@pytest_asyncio.fixture
async def guest(request: pytest.FixtureRequest, vm_base_state: BootedState) -> AsyncIterator[Guest]:
    """A running base guest (root on LUKS, data disk on /data, no cryptlockd)."""
    async for g in _boot(request, vm_base_state):
        yield g


@pytest_asyncio.fixture
async def installed_guest(
    request: pytest.FixtureRequest, vm_installed_state: BootedState
) -> AsyncIterator[Guest]:
    """A running guest with the project installed and cryptlockd.service active."""
    async for g in _boot(request, vm_installed_state):
        yield g


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMES.started is None:
        return
    tr = terminalreporter
    tr.section("QEMU test bed times")
    for line in (TIMES.image, f"accelerator: {TIMES.accel}", TIMES.install, *TIMES.snapshots):
        if line:
            tr.write_line(line)
    for nodeid, accel, total, boot in TIMES.tests:
        boot_s = f"start {boot:5.1f} s" if boot is not None else "start  n/a"
        tr.write_line(f"{total:6.1f} s ({boot_s}, {accel})  {nodeid}")
    tr.write_line(f"VM suite total: {time.monotonic() - TIMES.started:.1f} s")
