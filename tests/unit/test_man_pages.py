"""org.cryptlockd1(5) documents the whole interface: every property, method and signal of the
introspection XML, every error name the daemon can reply with, and every polkit action."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from cryptlockd import errors
from cryptlockd.defs import INTROSPECTION_XML

REPO = Path(__file__).resolve().parents[2]
PAGE = (REPO / "man/org.cryptlockd1.5").read_text()


def _error_names() -> set[str]:
    out: set[str] = set()
    todo: list[type[errors.CryptlockdError]] = [errors.CryptlockdError]
    while todo:
        cls = todo.pop()
        out.add(cls.dbus_name)
        todo.extend(cls.__subclasses__())
    return out


def _documented(name: str) -> bool:
    # roff escapes '-' as '\-'; a name is documented when it heads an item (.B/.BR/.TP).
    pattern = re.escape(name.replace("-", r"\-"))
    return re.search(rf"^\.(B|BR|BI) {pattern}\b", PAGE, re.MULTILINE) is not None


def test_every_member_of_the_interface_is_documented() -> None:
    iface = ET.parse(INTROSPECTION_XML).getroot().find("interface")
    assert iface is not None
    members = [el.get("name", "") for el in iface if el.tag in ("property", "method", "signal")]
    assert len(members) > 10
    assert [m for m in members if not _documented(m) and not _documented(m + "()")] == []


def test_every_error_name_is_documented() -> None:
    names = _error_names()
    assert "org.cryptlockd1.Error.NotAuthorized" in names
    assert sorted(n for n in names if not _documented(n)) == []


def test_every_polkit_action_is_documented() -> None:
    policy = (REPO / "dbus/org.cryptlockd1.policy").read_text()
    actions = re.findall(r'<action id="([^"]+)"', policy)
    assert actions
    assert [a for a in actions if not _documented(a)] == []
