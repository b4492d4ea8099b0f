"""The daemon's exported object (cryptlockd/daemon/exported_object.py): plain values as
variants. (Its calls are exercised on a real bus by the integration suite.)"""

from __future__ import annotations

from dbus_fast import Variant

from cryptlockd.daemon.exported_object import to_variant


def test_to_variant_shapes() -> None:
    assert to_variant(True) == Variant("b", True)
    assert to_variant(3) == Variant("x", 3)
    assert to_variant(["a", "b"]) == Variant("as", ["a", "b"])
    assert to_variant([1, "a"]) == Variant("av", [Variant("x", 1), Variant("s", "a")])
    assert to_variant({"k": {"n": 1.0}}) == Variant(
        "a{sv}", {"k": Variant("a{sv}", {"n": Variant("d", 1.0)})}
    )
