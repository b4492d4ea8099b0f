"""jsonline: the protocol's JSON without the json package; it must read and write what
json does, so the daemon, the helper and the sleep entry keep understanding each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cryptlockd.helper import jsonline

REPO = str(Path(__file__).resolve().parents[2])

VALUES: list[Any] = [
    {},
    [],
    {"op": "sleep", "times": {"sleep_entry": 12.345678, "hooks_pre_start": 1e-07}},
    {"op": "record", "record": {"a": [1, -2, 3.5, True, False, None, "", 'é\n"\\\x00☃']}},
    {"nested": [[{"x": [[]]}]], "big": 10**30, "neg": -0.0, "e": 1e100, "t": (1, 2)},
    "just a string",
    42,
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_writes_what_json_writes(value: Any) -> None:
    expected = json.dumps(value, separators=(",", ":"), allow_nan=False)
    assert jsonline.dumps(value) == expected


@pytest.mark.parametrize("value", VALUES)
def test_loads_reads_what_json_reads(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, indent=2), f" \n{json.dumps(value)}\r\n"):
        assert jsonline.loads(text) == json.loads(text)


@pytest.mark.parametrize(
    "text", ["", " ", "nul", "[1,]", '{"a" 1}', "[1] [2]", "{} x", "NaN", "[Infinity]", "'s'"]
)
def test_loads_refuses_what_is_not_one_json_value(text: str) -> None:
    with pytest.raises(ValueError):
        jsonline.loads(text)


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], {"x": -float("inf")}])
def test_dumps_refuses_nan_and_infinities(value: Any) -> None:
    with pytest.raises(ValueError):
        jsonline.dumps(value)


@pytest.mark.parametrize("value", [{1: "int key"}, {"set": {1}}, b"bytes", object()])
def test_dumps_refuses_what_json_cannot_hold_as_is(value: Any) -> None:
    with pytest.raises(TypeError):
        jsonline.dumps(value)


def test_loads_refuses_bad_json_in_a_process_that_never_imported_json() -> None:
    """The sleep entry and the helper never import json; Python 3.11's scanner then fails
    inside a value without an exception (SystemError), which loads must turn into the
    ValueError its callers handle."""
    bad = ['{"op": "ready"', '{"op": "ready",}', '{"a": [1 2]}', '{"a": tru}']
    code = (
        "import sys; from cryptlockd.helper import jsonline\n"
        f"for text in {bad!r}:\n"
        "    try:\n"
        "        jsonline.loads(text)\n"
        "    except ValueError:\n"
        "        print('refused')\n"
        "assert 'json' not in sys.modules, 'json was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {REPO!r})\n{code}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused"] * len(bad)
