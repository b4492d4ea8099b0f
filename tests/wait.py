"""The one way tests wait: poll a condition until a deadline, never a bare sleep.

`wait_until` for plain code, `wait_until_async` inside a test's event loop (it yields to the
loop between tries, so the daemon's and the mocks' callbacks keep running). Both share the
deadline rule: exceptions from the predicate count as "not yet" and the last one is shown
at the deadline, except GiveUp, which fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

__all__ = ["DEFAULT_TIMEOUT", "GiveUp", "wait_until", "wait_until_async"]

T = TypeVar("T")

# The machine is shared with a QEMU guest under TCG: deadlines are generous, and a test
# that passes quickly still passes quickly.
DEFAULT_TIMEOUT = 10.0


class GiveUp(Exception):
    """Raised by a predicate when waiting longer cannot help (a process died)."""


class _Deadline:
    def __init__(self, timeout: float, message: str) -> None:
        self.timeout = timeout
        self.message = message
        self.end = time.monotonic() + timeout
        self.last_exc: BaseException | None = None

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """One try: an exception from it is "not yet" (GiveUp aside)."""
        try:
            yield
        except GiveUp:
            raise
        except Exception as e:
            self.last_exc = e

    def check(self) -> None:
        """After a try that did not return: past the deadline, the wait fails."""
        if time.monotonic() > self.end:
            detail = f" (last error: {self.last_exc!r})" if self.last_exc else ""
            raise AssertionError(f"not true within {self.timeout} s: {self.message}{detail}")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = _Deadline(timeout, message)
    while True:
        with deadline.attempt():
            if result := predicate():
                return result
        deadline.check()
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Like `wait_until`, for predicates that may be coroutines; yields to the event loop."""
    deadline = _Deadline(timeout, message)
    while True:
        with deadline.attempt():
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        deadline.check()
        await asyncio.sleep(interval)
