"""The sleep entry starts between logind's go and the sleep: under `python3 -I -S` it must
import only the standard library and the few package modules it needs, and none of the
heavy stdlib modules a daemon module would drag in. Runs without root."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.unit.test_helper_closure import ROOT

_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)
import cryptlockd.sleep_entry
loaded = sorted(set(sys.modules) - before)
import json
print(json.dumps({"loaded": loaded,
                  "stdlib_names": sorted(sys.stdlib_module_names)}))
"""

OWN = {
    "cryptlockd",
    "cryptlockd.sleep_entry",
    "cryptlockd.searchpath",
    "cryptlockd.helper",
    "cryptlockd.helper.journal",
    "cryptlockd.helper.jsonline",
    "cryptlockd.helper.protocol",
}
# What the daemon's modules and the subprocess wrapper (imported only when hooks exist) bring.
HEAVY = {"logging", "subprocess", "typing", "pathlib", "asyncio", "dataclasses", "cryptlockd.run"}
# What the entry itself did without (jsonline.py): under TCG, a third of a second of its start.
PYTHON_LEVEL = {"json", "socket", "re", "enum", "selectors", "functools", "collections"}


def test_the_sleep_entry_imports_only_the_stdlib_and_its_few_modules() -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _SCRIPT, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    loaded = set(info["loaded"])
    stdlib = set(info["stdlib_names"])
    own = {m for m in loaded if m.split(".")[0] == "cryptlockd"}
    assert own == OWN
    assert {m for m in loaded - own if m.split(".")[0] not in stdlib} == set()
    assert loaded & HEAVY == set()
    assert loaded & PYTHON_LEVEL == set()
