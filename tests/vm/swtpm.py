"""A software TPM 2.0 (swtpm, the host's `swtpm` package) for one guest: QEMU's TPM emulator
backend talks to it over its control socket, and the guest sees a TIS TPM (/dev/tpmrm0).

The TPM's state lives in a directory of the test's own (its artifacts), so two boots of one
test see the same TPM (the same seed, so the same keys: what one boot sealed, the next
unseals), and no two tests share one. Opt-in: only a test that starts one gets a TPM; the
other tests' guests, and their saved states, stay as they are.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.wait import GiveUp, wait_until

SWTPM = "swtpm"


class Swtpm:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A Unix socket path has 107 bytes at most; the artifacts path can be longer.
        self._sockets = Path(tempfile.mkdtemp(prefix="cryptlockd-swtpm-"))
        self.ctrl = self._sockets / "ctrl.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        if shutil.which(SWTPM) is None:
            return "swtpm is not installed on the host (the Makefile's HOST_DEBS has it)"
        return None

    def start(self) -> None:
        """Starts swtpm for one QEMU run: it serves one connection and exits with it."""
        self.stop()
        self.ctrl.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [
                "setpriv",
                "--pdeathsig",
                "KILL",
                SWTPM,
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--ctrl",
                f"type=unixio,path={self.ctrl}",
                "--log",
                f"file={self.state_dir / 'swtpm.log'},level=2",
                "--terminate",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.state_dir / "swtpm.stderr").open("ab"),
        )
        proc = self._proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise GiveUp(f"swtpm exited with {proc.returncode}: {self.log_tail()}")
            return self.ctrl.exists()

        wait_until(listening, 10, 0.1, "swtpm listens on its control socket")

    def qemu_args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=chrtpm,path={self.ctrl}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]

    def log_tail(self) -> str:
        parts = []
        for name in ("swtpm.log", "swtpm.stderr"):
            path = self.state_dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Ends this swtpm (it exits by itself once its QEMU is gone; this makes sure)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._sockets, ignore_errors=True)
