"""cryptlockctl's command line: the parser, and the man page that documents it."""

from __future__ import annotations

import re
from pathlib import Path

from cryptlockd.cli.commands import COMMANDS
from cryptlockd.cli.main import build_parser


def test_json_flag_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--json", "status"]).json is True
    assert parser.parse_args(["status", "--json"]).json is True
    assert not getattr(parser.parse_args(["status"]), "json", False)


def test_man_page_covers_every_command_and_option() -> None:
    page = (Path(__file__).resolve().parents[2] / "man" / "cryptlockctl.1").read_text()
    section = page.split(".SH COMMANDS", 1)[1].split(".SH OPTIONS", 1)[0]
    # Each command is the tag of a .TP item: the line right after ".TP".
    tags = " ".join(re.findall(r"^\.TP\n(.*)$", section, re.MULTILINE))
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", tags), f"{name} has no item in cryptlockctl(1)"
    for action in build_parser()._actions:
        for opt in action.option_strings:
            assert opt in page.replace("\\-", "-"), f"{opt} is not in cryptlockctl(1)"
