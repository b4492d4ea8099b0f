"""For Lock(), the daemon plays the sleep entry's part (sleep_entry.py) on the armed helper's
socket: `begin` (answered `ready`: the VT is switched), `sleep` (answered `resumed` once the
devices are back and everything is thawed, however long the prompt took), `finish`
(answered `done`). No system-sleep hooks run: nothing sleeps. The helper's record comes on
the arm connection, as after a sleep.

Between `sleep` and `resumed` the daemon is frozen with everything else; its read simply
goes on after the thaw.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from cryptlockd.errors import LockFailed
from cryptlockd.helper import protocol

if TYPE_CHECKING:
    from cryptlockd.helper.protocol import Message

__all__ = ["HelperEntry"]

# After `resumed`, the helper switches the VT back and sends its record: quick.
DONE_TIMEOUT = 30.0


class HelperEntry:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = protocol.LineBuffer()
        self._pending: list[Message] = []

    async def begin(self, timeout: float) -> None:
        """Starts the armed helper's cycle: returns once it has switched to its VT. Raises
        LockFailed when it does not (nothing frozen or suspended yet)."""
        try:
            async with asyncio.timeout(timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=protocol.MAX_LINE
                )
                reply = await self._exchange({"op": protocol.OP_BEGIN, "lock": True})
        except (OSError, TimeoutError, protocol.ProtocolError) as e:
            self.close()
            raise LockFailed(f"the helper did not begin the cycle: {e or 'timed out'}") from e
        if reply is None or reply["op"] != protocol.OP_READY:
            self.close()
            why = reply["reason"] if reply is not None and reply["op"] == "error" else reply
            raise LockFailed(f"the helper did not begin the cycle: {why or 'no answer'}")

    async def run(self, times: dict[str, float]) -> str:
        """The cycle, from the freeze to the thaw; returns what went wrong ("" if nothing).
        No deadline for `resumed`: the prompt waits for the user."""
        try:
            resumed = await self._exchange({"op": protocol.OP_SLEEP, "times": times})
            if resumed is None or resumed["op"] != protocol.OP_RESUMED:
                return "the helper went away during the cycle"
            async with asyncio.timeout(DONE_TIMEOUT):
                await self._exchange({"op": protocol.OP_FINISH, "times": {}})
            return resumed["reason"]
        except (OSError, TimeoutError, protocol.ProtocolError) as e:
            return f"talking to the helper: {e or 'timed out'}"
        finally:
            self.close()

    async def _exchange(self, msg: Message) -> Message | None:
        """Sends `msg`; the helper's next message, None at the end of the stream."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(protocol.encode(msg))
        await self._writer.drain()
        while not self._pending:
            data = await self._reader.read(65536)
            if not data:
                return None
            self._pending.extend(self._buffer.feed(data))
        return self._pending.pop(0)

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = self._reader = None
