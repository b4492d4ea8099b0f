"""The sleep entry's hand-over rules, for both of its versions (the C program that installs
build, and the Python one they fall back to without a compiler), run as the processes they
are against a scripted helper on a real unix socket: fall back to the stock sleep only before
the helper was told to sleep, never after; run the hooks around the sleep; leave the trace."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cryptlockd.helper import protocol

REPO = Path(__file__).resolve().parents[2]
Script = Callable[[protocol.Channel], None]

PYTHON_ENTRY = (
    f"import sys; sys.path.insert(0, {str(REPO)!r}); "
    "from cryptlockd.sleep_entry import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="session")
def native_entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the Makefile's own rule, as `make install` builds it."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler to build the sleep entry with (make deps installs gcc)")
    build = tmp_path_factory.mktemp("sleep-entry")
    subprocess.run(
        ["make", "-s", "-C", str(REPO), "sleep-entry", f"BUILDDIR={build}"],
        check=True,
        capture_output=True,
    )
    return build / "cryptlockd-sleep"


@dataclass
class Entry:
    argv: list[str]
    root: Path
    errors: list[BaseException] = field(default_factory=list)

    @property
    def socket_path(self) -> str:
        return str(self.root) + protocol.SOCKET_PATH

    def serve(self, script: Script) -> threading.Thread:
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)

        def run() -> None:
            conn, _ = srv.accept()
            try:
                script(protocol.Channel(conn))
            except BaseException as e:  # raised in the test's thread by done()
                self.errors.append(e)
            finally:
                conn.close()
                srv.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def converse(self, script: Script) -> subprocess.CompletedProcess[str]:
        """Runs the entry against `script` as the helper."""
        t = self.serve(script)
        proc = self.run()
        self.done(t)
        return proc

    def done(self, t: threading.Thread) -> None:
        t.join(10)
        assert not t.is_alive(), "the scripted helper is still waiting"
        if self.errors:
            raise self.errors[0]

    def hook(self, directory: str, name: str, exit_code: int = 0) -> Path:
        path = self.root / directory.lstrip("/") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $1 $2 $SYSTEMD_SLEEP_ACTION ${{NOTIFY_SOCKET-unset}}" '
            f">> {self.root}/hooks.log\nexit {exit_code}\n"
        )
        path.chmod(0o755)
        return path

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, NOTIFY_SOCKET="/run/systemd/notify")
        return subprocess.run(
            [*self.argv, f"--root={self.root}", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    @property
    def hooks_ran(self) -> list[str]:
        log = self.root / "hooks.log"
        return log.read_text().splitlines() if log.exists() else []

    @property
    def stock_ran(self) -> str | None:
        marker = self.root / "stock-ran"
        return marker.read_text().strip() if marker.exists() else None

    @property
    def trace(self) -> dict[str, object] | None:
        path = Path(str(self.root) + protocol.STOCK_SLEEP_TRACE)
        if not path.exists():
            return None
        trace: dict[str, object] = json.loads(path.read_text())
        return trace


@pytest.fixture(params=["native", "python"])
def entry(request: pytest.FixtureRequest) -> Iterator[Entry]:
    if request.param == "native":
        argv = [str(request.getfixturevalue("native_entry"))]
    else:
        argv = [sys.executable, "-I", "-S", "-B", "-c", PYTHON_ENTRY]
    # Short: the helper's socket path must fit a sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="cse", dir="/tmp"))
    stock = root / "usr/lib/systemd/systemd-sleep"
    stock.parent.mkdir(parents=True)
    stock.write_text(f'#!/bin/sh\necho "$@" > {root}/stock-ran\n')
    stock.chmod(0o755)
    yield Entry(argv, root)
    shutil.rmtree(root)


def ready_then(rest: Script) -> Script:
    def script(ch: protocol.Channel) -> None:
        msg = ch.receive(10)
        assert msg is not None and msg["op"] == protocol.OP_BEGIN and msg["lock"] is False
        ch.send({"op": protocol.OP_READY})
        rest(ch)

    return script


def slept_and_done(ch: protocol.Channel) -> None:
    """After `ready`: the sleep went well, and so did the finish."""
    ch.receive(10)
    ch.send({"op": protocol.OP_RESUMED, "slept": True, "reason": ""})
    ch.receive(10)
    ch.send({"op": protocol.OP_DONE, "success": True})


def test_no_helper_means_the_stock_sleep_and_a_trace(entry: Entry) -> None:
    proc = entry.run()
    assert proc.returncode == 0 and entry.stock_ran == "suspend"
    why = "no cryptlockd helper is armed (is cryptlockd running, and protecting any LUKS device?)"
    assert (
        f"<2>cryptlockd-sleep: this sleep is UNPROTECTED, the LUKS keys stay in RAM: {why}\n"
        in (proc.stdout)
    )
    trace = entry.trace
    assert trace is not None and trace["reason"] == why
    assert isinstance(trace["boottime"], float) and trace["boottime"] > 0
    tracefile = Path(str(entry.root) + protocol.STOCK_SLEEP_TRACE)
    assert tracefile.stat().st_mode & 0o777 == 0o600
    assert tracefile.parent.stat().st_mode & 0o777 == 0o700


def test_not_armed_means_the_stock_sleep_without_hooks(entry: Entry) -> None:
    entry.hook("/usr/lib/systemd/system-sleep", "a")

    def script(ch: protocol.Channel) -> None:
        assert ch.receive(10)["op"] == protocol.OP_BEGIN  # type: ignore[index]
        ch.send({"op": protocol.OP_ERROR, "reason": "not armed"})

    proc = entry.converse(script)
    assert proc.returncode == 0 and entry.stock_ran == "suspend"
    assert entry.trace is not None and entry.trace["reason"] == "the helper is not armed: not armed"
    assert entry.hooks_ran == []


def test_the_full_hand_over_runs_the_hooks_around_the_sleep(entry: Entry) -> None:
    entry.hook("/usr/lib/systemd/system-sleep", "b")
    entry.hook("/usr/lib/systemd/system-sleep", "a")
    seen: list[protocol.Message] = []
    hooks_before_sleep: list[str] = []

    def rest(ch: protocol.Channel) -> None:
        msg = ch.receive(10)
        assert msg is not None
        seen.append(msg)
        hooks_before_sleep.extend(entry.hooks_ran)
        ch.send({"op": protocol.OP_RESUMED, "slept": True, "reason": ""})
        finish = ch.receive(10)
        assert finish is not None
        seen.append(finish)
        ch.send({"op": protocol.OP_DONE, "success": True})

    proc = entry.converse(ready_then(rest))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [m["op"] for m in seen] == ["sleep", "finish"]
    # All at once (as systemd-sleep runs them): in no particular order.
    assert sorted(hooks_before_sleep) == [
        "a pre suspend suspend unset",
        "b pre suspend suspend unset",
    ]
    sleep_times = seen[0]["times"]  # type: ignore[typeddict-item]
    assert set(sleep_times) == {"sleep_entry", "hooks_pre_start", "hooks_pre_end"}
    assert (
        sleep_times["sleep_entry"] <= sleep_times["hooks_pre_start"] <= sleep_times["hooks_pre_end"]
    )
    post_times = seen[1]["times"]  # type: ignore[typeddict-item]
    assert (
        sleep_times["hooks_pre_end"]
        <= post_times["hooks_post_start"]
        <= post_times["hooks_post_end"]
    )
    assert sorted(entry.hooks_ran[2:]) == [
        "a post suspend suspend unset",
        "b post suspend suspend unset",
    ]
    assert "<6>cryptlockd-sleep: protected sleep done\n" in proc.stdout
    assert entry.stock_ran is None and entry.trace is None


def test_hooks_are_masked_by_name_and_a_failing_one_does_not_stop_the_sleep(entry: Entry) -> None:
    lib, local, etc = (
        "/usr/lib/systemd/system-sleep",
        "/usr/local/lib/systemd/system-sleep",
        "/etc/systemd/system-sleep",
    )
    entry.hook(lib, "b")
    entry.hook(etc, "b", exit_code=3)  # masks lib's b
    entry.hook(lib, "a")
    (entry.root / etc.lstrip("/") / "a").symlink_to("/dev/null")  # masks lib's a
    entry.hook(local, "c")
    entry.hook(lib, ".hidden")
    entry.hook(lib, "noexec").chmod(0o644)

    proc = entry.converse(ready_then(slept_and_done))
    assert proc.returncode == 0
    ran = [line.split()[:2] for line in entry.hooks_ran]
    assert sorted(ran[:2]) == [["b", "pre"], ["c", "pre"]]
    assert sorted(ran[2:]) == [["b", "post"], ["c", "post"]]
    failed = f"<4>cryptlockd-sleep: hook {entry.root}{etc}/b pre failed (3)"
    assert failed in proc.stdout


def test_the_hooks_run_all_at_once(entry: Entry) -> None:
    # As systemd-sleep runs them: each of these two waits (10 s at most) until the other
    # has started, so one after another, the first would give up and fail.
    hooks = entry.root / "usr/lib/systemd/system-sleep"
    hooks.mkdir(parents=True)
    for me, other in (("a", "b"), ("b", "a")):
        path = hooks / me
        path.write_text(
            "#!/bin/sh\n"
            f"touch {entry.root}/started-{me}-$1\n"
            "i=0\n"
            f"while [ ! -e {entry.root}/started-{other}-$1 ]; do\n"
            "  i=$((i + 1)); [ $i -gt 1000 ] && exit 7\n"
            "  sleep 0.01\n"
            "done\n"
        )
        path.chmod(0o755)

    proc = entry.converse(ready_then(slept_and_done))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failed" not in proc.stdout, proc.stdout
    assert {p.name for p in entry.root.glob("started-*")} == {
        "started-a-pre",
        "started-b-pre",
        "started-a-post",
        "started-b-post",
    }


def test_a_helper_lost_after_the_sleep_order_never_means_a_second_sleep(entry: Entry) -> None:
    entry.hook("/usr/lib/systemd/system-sleep", "a")

    def rest(ch: protocol.Channel) -> None:
        ch.receive(10)  # the sleep order, then the helper vanishes

    proc = entry.converse(ready_then(rest))
    assert proc.returncode == 1
    assert "<2>cryptlockd-sleep: the helper went away during the cycle\n" in proc.stdout
    assert entry.stock_ran is None and entry.trace is None
    assert [h.split()[1] for h in entry.hooks_ran] == ["pre", "post"]


def test_a_bad_answer_to_begin_means_the_stock_sleep(entry: Entry) -> None:
    def script(ch: protocol.Channel) -> None:
        ch.receive(10)
        ch.sock.sendall(b'{"op": "ready"\n')  # not JSON

    proc = entry.converse(script)
    assert proc.returncode == 0 and entry.stock_ran == "suspend"
    assert "<3>cryptlockd-sleep: a bad message from the helper: " in proc.stdout
    assert entry.trace is not None and entry.trace["reason"] == "the helper is not armed: no answer"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"op": "bogus"}', "unknown message 'bogus'"),
        (b'{"op": 3}', "a message must be an object with a string 'op'"),
        (b'["ready"]', "a message must be an object with a string 'op'"),
        (b'{"op": "error"}', "'error' message without reason"),
        (b'{"op": "ready"} x', "not a JSON line"),
        (b'{"op": "ready", "x": [1, 2.5e3, {"y": null}], }', "not a JSON line"),
        (b'{"op": "r\xe9ady"}', "not a JSON line"),
    ],
)
def test_what_is_not_a_message_is_refused(entry: Entry, line: bytes, why: str) -> None:
    def script(ch: protocol.Channel) -> None:
        ch.receive(10)
        ch.sock.sendall(line + b"\n")

    proc = entry.converse(script)
    assert proc.returncode == 0 and entry.stock_ran == "suspend"
    assert f"<3>cryptlockd-sleep: a bad message from the helper: {why}" in proc.stdout


def test_the_helpers_reason_is_decoded_and_kept_whole_in_the_trace(entry: Entry) -> None:
    reason = 'caf\u00e9 "quoted" \\ back\nsecond line \U0001f512 \t tab'

    def script(ch: protocol.Channel) -> None:
        ch.receive(10)
        # Blank lines are skipped; unknown keys and nested values are read past.
        ch.sock.sendall(b"\n  \n")
        ch.send({"op": protocol.OP_ERROR, "reason": reason, "extra": [{"a": [None, True]}]})  # type: ignore[typeddict-unknown-key]

    proc = entry.converse(script)
    assert entry.trace is not None and entry.trace["reason"] == f"the helper is not armed: {reason}"
    # One journal line per line of text, each with its priority.
    assert "<2>cryptlockd-sleep: second line \U0001f512 \t tab\n" in proc.stdout


@pytest.mark.parametrize(
    ("slept", "reason", "rc", "line"),
    [
        # Not slept: the failure is logged, and no second sleep follows.
        (False, "freezing timed out", 1, "<3>cryptlockd-sleep: the protected sleep failed: "),
        # Slept, but the cycle ended with problems: a warning.
        (True, "data: wrong passphrase", 0, "<4>cryptlockd-sleep: protected sleep done: "),
    ],
)
def test_how_the_cycle_ended_is_logged_and_never_repeated(
    entry: Entry, slept: bool, reason: str, rc: int, line: str
) -> None:
    def rest(ch: protocol.Channel) -> None:
        ch.receive(10)
        ch.send({"op": protocol.OP_RESUMED, "slept": slept, "reason": reason})
        ch.receive(10)
        ch.send({"op": protocol.OP_DONE, "success": False})

    proc = entry.converse(ready_then(rest))
    assert proc.returncode == rc and entry.stock_ran is None
    assert f"{line}{reason}\n" in proc.stdout


def test_a_resumed_without_its_fields_counts_as_a_lost_helper(entry: Entry) -> None:
    def rest(ch: protocol.Channel) -> None:
        ch.receive(10)
        ch.sock.sendall(b'{"op":"resumed","slept":true}\n')

    proc = entry.converse(ready_then(rest))
    assert proc.returncode == 1 and entry.stock_ran is None
    assert "'resumed' message without reason" in proc.stdout
    assert "the helper went away during the cycle" in proc.stdout


def test_an_unknown_argument_is_refused_and_changes_nothing(entry: Entry) -> None:
    proc = entry.run("--bogus")
    assert proc.returncode == 2
    assert proc.stderr == "usage: cryptlockd-sleep [--root=DIR]\n"
    assert entry.stock_ran is None and entry.trace is None


def test_a_helper_that_never_answers_begin_means_the_stock_sleep_after_its_deadline(
    entry: Entry,
) -> None:
    """A helper that took the connection and hangs: the sleep still happens (unprotected,
    said and traced) once BEGIN_TIMEOUT (10 s) has passed, and nothing waits for ever."""
    release = threading.Event()

    def script(ch: protocol.Channel) -> None:
        ch.receive(10)
        release.wait(30)  # holds the connection open, answering nothing

    t = entry.serve(script)
    start = time.monotonic()
    proc = entry.run()
    took = time.monotonic() - start
    release.set()
    entry.done(t)
    assert proc.returncode == 0 and entry.stock_ran == "suspend"
    assert entry.trace is not None and entry.trace["reason"] == "the helper is not armed: no answer"
    assert 9.5 < took < 30, took
