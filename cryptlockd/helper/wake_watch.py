"""When the prompt stops waiting by itself after a wake (issue 14). Pure: the clock, the lid
and the keyboards are read by the caller (system_ops, inputs.py).

- Give-up: nobody unlocked the disks `give_up_after` seconds after the wake: power off.
  The keys are gone already; now the rest of RAM decays too.
- The lid closed again at the prompt (it was seen open since the wake): back to sleep,
  rather than stay awake in a bag.
- A wake nobody answers (the lid shut since the wake, no key touched: an RTC alarm, a
  spurious wake), `unanswered_after` seconds long: back to sleep. A docked laptop woken
  from an external keyboard has its lid shut too, so any key counts as an answer.

The sleep reasons apply only where there is a sleep to go back to (`sleep_again`); a lock
without sleep keeps prompting.
"""

from __future__ import annotations

GIVE_UP = "give-up"
LID = "lid"
UNANSWERED = "unanswered"
# Esc at the prompt (prompt_screen.SLEEP_KEY): the other reason to sleep again.
ESC = "esc"
SLEEP_REASONS = (ESC, LID, UNANSWERED)


class WakeWatch:
    def __init__(
        self,
        woke_at: float,
        *,
        give_up_after: float = 0.0,
        unanswered_after: float = 0.0,
        sleep_again: bool = True,
    ) -> None:
        self.woke_at = woke_at
        self.give_up_after = give_up_after  # 0: never
        self.unanswered_after = unanswered_after  # 0: never
        self.sleep_again = sleep_again
        self.lid_seen_open = False
        self.touched = False  # a key since the wake, or a line typed

    def check(self, now: float, lid_closed: bool | None, touched: bool) -> str:
        """The reason to stop waiting, or "" to go on. `lid_closed`: None without a lid."""
        self.touched = self.touched or touched
        if lid_closed is False:
            self.lid_seen_open = True
        since = now - self.woke_at
        if self.give_up_after and since >= self.give_up_after:
            return GIVE_UP
        if not self.sleep_again or lid_closed is not True:
            return ""
        if self.lid_seen_open:
            return LID
        if self.unanswered_after and not self.touched and since >= self.unanswered_after:
            return UNANSWERED
        return ""
