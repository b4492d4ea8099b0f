"""JSON for the protocol's lines without importing the `json` package.

The sleep entry starts between logind's go and the sleep. `import json` brings `re`, `enum`,
`functools` and `collections`, and in the guest under TCG that was a third of a second of
the entry's start (bench/RESULTS.md). The parser is CPython's own C scanner (`_json`, what
`json.loads` runs); the encoder is the few lines our messages need (objects with string
keys, arrays, strings, numbers, booleans, null) and writes what `json.dumps` writes with
`separators=(",", ":")` and `allow_nan=False` (tests/unit/test_helper_jsonline.py).
"""

from __future__ import annotations

import _json  # CPython's; the only interpreter our units run

TYPE_CHECKING = False  # typing stays out of the sleep entry's closure
if TYPE_CHECKING:
    from collections.abc import Callable

_INF = float("inf")
_WHITESPACE = " \t\n\r"


class _Context:
    """What the C scanner reads from a JSONDecoder: json.loads' defaults, except that the
    non-JSON constants NaN and Infinity are refused, as the encoder refuses them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"{name} is not JSON")


_scan: Callable[[str, int], tuple[object, int]] = _json.make_scanner(_Context())  # type: ignore[arg-type]
_quote: Callable[[str], str] = _json.encode_basestring_ascii


def loads(text: str) -> object:
    """One JSON value; ValueError for anything else (as json.loads)."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as e:
        raise ValueError(f"expecting a JSON value at character {e.value}") from None
    except SystemError:
        # Python 3.11's scanner raises its errors inside a value through json.decoder's
        # JSONDecodeError, which it looks up in sys.modules only: in a process that never
        # imported json (the sleep entry, the helper) it fails without an exception set.
        raise ValueError("not JSON") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data at character {end}")
    return value


def dumps(value: object) -> str:
    """Compact JSON, ASCII only. TypeError for what JSON cannot hold (and for keys that
    are not strings, which json.dumps would convert), ValueError for NaN and infinities."""
    out: list[str] = []
    _dump(value, out)
    return "".join(out)


def _dump(v: object, out: list[str]) -> None:
    if isinstance(v, str):
        out.append(_quote(v))
    elif v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, int):
        out.append(int.__repr__(v))
    elif isinstance(v, float):
        if v != v or v == _INF or v == -_INF:
            raise ValueError(f"{float.__repr__(v)} is not JSON")
        out.append(float.__repr__(v))
    elif isinstance(v, dict):
        out.append("{")
        for i, (key, item) in enumerate(v.items()):
            if not isinstance(key, str):
                raise TypeError(f"a JSON key must be a string, not {type(key).__name__}")
            out.append("," if i else "")
            out.append(_quote(key))
            out.append(":")
            _dump(item, out)
        out.append("}")
    elif isinstance(v, (list, tuple)):
        out.append("[")
        for i, item in enumerate(v):
            out.append("," if i else "")
            _dump(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(v).__name__} is not JSON serializable")
