from __future__ import annotations

import io

import pytest

from cryptlockd.helper import journal


def test_every_line_carries_the_priority_and_the_tag() -> None:
    out = io.StringIO()
    journal.log(journal.WARNING, "first\nsecond", out, tag="x: ")
    assert out.getvalue() == "<4>x: first\n<4>x: second\n"


def test_stderr_unless_told_and_an_empty_text_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    journal.log(journal.INFO, "")
    assert capsys.readouterr().err == "<6>\n"


def test_priorities_are_syslogs() -> None:
    levels = (journal.CRIT, journal.ERR, journal.WARNING, journal.NOTICE, journal.INFO)
    assert levels == (2, 3, 4, 5, 6) and journal.DEBUG == 7
