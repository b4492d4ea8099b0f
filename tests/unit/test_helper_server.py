"""The helper's socket (cryptlockd/helper/server.py) against scripted clients on a real unix
socket: who may say what and when, and the order of a cycle's messages. The helper's own
steps are a fake; serve() runs in the main thread, as drive_cycle sets signal handlers."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryptlockd.helper import protocol, server
from cryptlockd.helper.record import CycleRecord

Client = Callable[[str], None]


class FakeHelper:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.devices = {"root": None}
        self.daemon: protocol.Channel | None = None
        self.record = CycleRecord(["root"])
        self.watchdog = 1  # as if forked: the tests fork no watchdog
        self.reserve_error = ""
        self.sleeps = True
        self.watchdogs_pending = True

    def arm(self, msg: protocol.ArmMessage) -> protocol.ArmedMessage:
        self.calls.append("arm")
        self.sleeps = bool(msg.get("sleeps", True))
        return {"op": protocol.OP_ARMED, "vt": 7, "reserve_kib": 64, "pid": 1}

    def watchdogs_off(self, msg: protocol.WatchdogsOffMessage) -> None:
        self.calls.append(f"watchdogs_off {msg.get('sleep_state')}")
        self.watchdogs_pending = False

    def take_reserve(self) -> None:
        self.calls.append("reserve")
        self.reserve_error = ""

    def start_sync_worker(self) -> None:
        pass  # the tests fork no worker either

    def begin(self) -> protocol.ReadyMessage:
        self.calls.append("begin")
        return {"op": protocol.OP_READY}

    def sleep(self, msg: protocol.SleepMessage) -> protocol.ResumedMessage:
        self.calls.append(f"sleep {sorted(msg['times'])}")
        self.record.slept = True
        return {"op": protocol.OP_RESUMED, "slept": True, "reason": ""}

    def finish(self, msg: protocol.FinishMessage | None) -> protocol.DoneMessage:
        self.calls.append("finish" if msg is not None else "finish without message")
        self.record.success = self.record.slept
        return {"op": protocol.OP_DONE, "success": self.record.success}

    def report(self) -> None:
        self.calls.append("report")
        if self.daemon is not None:
            self.daemon.send({"op": protocol.OP_RECORD, "success": True, "record": {}})


@pytest.fixture
def run_serve(tmp_path: Path) -> Iterator[Callable[[Client], tuple[int, FakeHelper]]]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    path = str(tmp_path / "helper.sock")
    errors: list[BaseException] = []

    def run(client: Client) -> tuple[int, FakeHelper]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)

        def guarded() -> None:
            try:
                client(path)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=guarded, daemon=True)
        t.start()
        helper = FakeHelper()
        try:
            rc = server.serve(helper, listener)  # type: ignore[arg-type]
        finally:
            listener.close()
        # Longer than any wait of a client, so that a loaded machine cannot fail the test.
        t.join(30)
        assert not t.is_alive() and errors == []
        return rc, helper

    yield run
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def talk(path: str, *msgs: bytes) -> list[protocol.Message | None]:
    """Sends each line and reads one answer to each; the connection is closed after."""
    chan = protocol.connect(path, timeout=5.0)
    assert chan is not None
    answers = []
    for msg in msgs:
        chan.sock.sendall(msg)
        answers.append(chan.receive(5.0))
    chan.close()
    return answers


ARM = protocol.encode(
    protocol.arm_message(
        [],
        sleep_state="mem",
        mem_sleep=None,
        vt=0,
        freeze_timeout=1.0,
        backoff_initial=1.0,
        backoff_max=1.0,
        poweroff_after=0,
        keyslots={},
    )
)


def test_begin_before_arm_is_refused_and_disarm_stands_down(
    run_serve: Callable[[Client], tuple[int, FakeHelper]],
) -> None:
    def client(path: str) -> None:
        assert talk(path, b'{"op":"begin"}\n') == [{"op": "error", "reason": "not armed"}]
        assert talk(path, b'{"op":"bogus"}\n') == [
            {"op": "error", "reason": "unknown message 'bogus'"}
        ]
        assert talk(path, b'{"op":"ready"}\n') == [{"op": "error", "reason": "unexpected 'ready'"}]
        talk(path, b'{"op":"disarm"}\n')

    rc, helper = run_serve(client)
    assert rc == 0 and helper.calls == []


def test_a_lock_is_begun_only_by_the_daemons_lock_entry_and_a_sleep_only_by_a_sleep_entry(
    run_serve: Callable[[Client], tuple[int, FakeHelper]],
) -> None:
    # logind's sleep racing the daemon's Lock(): the sleep entry must not start the lock's
    # cycle (nor the lock entry a sleep's); each is refused and the helper stays armed.
    lock_arm = ARM.replace(b'"sleeps":true', b'"sleeps":false')
    assert lock_arm != ARM

    def client(path: str) -> None:
        daemon = protocol.connect(path, timeout=5.0)
        assert daemon is not None
        daemon.sock.sendall(lock_arm)
        assert daemon.receive(5.0) == {"op": "armed", "vt": 7, "reserve_kib": 64, "pid": 1}
        assert talk(path, b'{"op":"begin"}\n') == [
            {"op": "error", "reason": "armed for a lock, not a sleep"}
        ]
        daemon.close()
        talk(path, b'{"op":"disarm"}\n')

    rc, helper = run_serve(client)
    assert rc == 0 and helper.calls == ["arm", "reserve"] and not helper.sleeps
    assert server.begin_mismatch(sleeps=True, lock=True) == "armed for a sleep, not a lock"
    assert server.begin_mismatch(sleeps=True, lock=False) == ""
    assert server.begin_mismatch(sleeps=False, lock=True) == ""


def test_a_whole_cycle_in_order_with_the_record_on_the_daemons_connection(
    run_serve: Callable[[Client], tuple[int, FakeHelper]],
) -> None:
    got: list[protocol.Message | None] = []

    def client(path: str) -> None:
        daemon = protocol.connect(path, timeout=5.0)
        assert daemon is not None
        daemon.sock.sendall(ARM)
        got.append(daemon.receive(5.0))
        got.extend(
            talk(
                path,
                b'{"op":"begin"}\n',
                b'{"op":"sleep","times":{"hooks_pre_end":1.0}}\n',
                b'{"op":"finish","times":{}}\n',
            )
        )
        got.append(daemon.receive(5.0))
        daemon.close()

    rc, helper = run_serve(client)
    assert rc == 0
    assert helper.calls == [
        "arm",
        "reserve",
        "begin",
        "sleep ['hooks_pre_end']",
        "finish",
        "report",
    ]
    assert [m["op"] if m else None for m in got] == ["armed", "ready", "resumed", "done", "record"]


def test_the_entry_leaving_before_the_sleep_fails_the_cycle_without_sleeping(
    run_serve: Callable[[Client], tuple[int, FakeHelper]],
) -> None:
    def client(path: str) -> None:
        assert talk(path, ARM)[0] is not None  # the daemon leaves: the helper stays armed
        assert talk(path, b'{"op":"begin"}\n') == [{"op": "ready"}]

    rc, helper = run_serve(client)
    assert rc == 0 and helper.daemon is None
    assert helper.calls == ["arm", "reserve", "begin", "finish without message", "report"]
    assert helper.record.reason == "the sleep entry went away before the sleep"


def test_the_reserve_is_taken_after_armed_and_without_it_begin_is_refused(
    run_serve: Callable[[Client], tuple[int, FakeHelper]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken once `armed` is out (the daemon closes logind's delay lock on it): its cost
    # overlaps logind starting the sleep entry. Without it the entry gets an error and
    # sleeps the stock way, reported unprotected.
    monkeypatch.setattr(FakeHelper, "take_reserve", _failing_reserve)

    def client(path: str) -> None:
        daemon = protocol.connect(path, timeout=5.0)
        assert daemon is not None
        daemon.sock.sendall(ARM)
        assert (m := daemon.receive(5.0)) is not None and m["op"] == "armed"
        assert talk(path, b'{"op":"begin"}\n') == [{"op": "error", "reason": "no memory"}]
        daemon.sock.sendall(b'{"op":"disarm"}\n')

    rc, helper = run_serve(client)
    assert rc == 0 and helper.calls == ["arm", "reserve"]


def _failing_reserve(self: FakeHelper) -> None:
    self.calls.append("reserve")
    self.reserve_error = "no memory"


def test_the_daemons_watchdogs_off_while_armed_is_noted_for_the_cycle(
    run_serve: Callable[[Client], tuple[int, FakeHelper]],
) -> None:
    # The daemon let logind go on before PID 1 had the service watchdogs off, and says so
    # once it has: read while the helper waits armed, it is noted, and the cycle's freeze
    # need not wait for it (session.Helper.wait_watchdogs).
    def client(path: str) -> None:
        daemon = protocol.connect(path, timeout=5.0)
        assert daemon is not None
        daemon.sock.sendall(ARM)
        assert daemon.receive(5.0) is not None
        daemon.send({"op": protocol.OP_WATCHDOGS_OFF, "sleep_state": "freeze"})
        daemon.send({"op": protocol.OP_DISARM})  # so that serve() returns
        # Nothing more comes (the connection closes only when the helper exits).
        assert daemon.receive(1.0) is None
        daemon.close()

    rc, helper = run_serve(client)
    assert rc == 0 and not helper.watchdogs_pending
    assert "watchdogs_off freeze" in helper.calls  # the sleep state read again, passed on


def test_a_daemon_gone_before_armed_is_sent_stands_the_helper_down(
    run_serve: Callable[[Client], tuple[int, FakeHelper]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon gave the arm up (and closed) while the helper armed: the answer cannot
    # be sent, and a helper armed for nobody must not wait for a sleep entry.
    gone = threading.Event()
    arm = FakeHelper.arm

    def slow_arm(self: FakeHelper, msg: protocol.ArmMessage) -> protocol.ArmedMessage:
        assert gone.wait(5)
        return arm(self, msg)

    monkeypatch.setattr(FakeHelper, "arm", slow_arm)

    def client(path: str) -> None:
        daemon = protocol.connect(path, timeout=5.0)
        assert daemon is not None
        daemon.sock.sendall(ARM)
        daemon.close()
        gone.set()

    rc, helper = run_serve(client)
    assert rc == 0 and helper.calls == ["arm"]  # no reserve taken: it stood down
