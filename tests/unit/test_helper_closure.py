"""The helper's closure: what importing it in isolated mode loads is what the RAM filesystem
holds (daemon/ramfs.py computes it the same way). Only the standard library and the helper
package may be in it. Runs without root."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cryptlockd

ROOT = Path(cryptlockd.__file__).resolve().parent.parent  # the directory holding cryptlockd/
HELPER = ROOT / "cryptlockd" / "helper"

# As ramfs._CLOSURE_SCRIPT: `python3 -I -S -c`, the package's parent passed explicitly.
# sys.modules is read before anything else is imported.
_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import runpy
import cryptlockd.helper.main
loaded = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
import json
print(json.dumps({"modules": loaded, "stdlib_names": sorted(sys.stdlib_module_names)}))
"""


def _allowed_package_module(name: str) -> bool:
    return name in ("cryptlockd", "cryptlockd.helper") or name.startswith("cryptlockd.helper.")


def closure_problems(modules: dict[str, str | None], stdlib_names: set[str]) -> list[str]:
    problems = []
    for name, path in sorted(modules.items()):
        if name == "__main__":
            continue
        if name == "cryptlockd" or name.startswith("cryptlockd."):
            if not _allowed_package_module(name):
                problems.append(f"{name} ({path}) is cryptlockd but not the helper package")
            elif path is None or not Path(path).resolve().is_relative_to(ROOT / "cryptlockd"):
                problems.append(f"{name} was loaded from {path}, not from {ROOT}")
        elif name.split(".")[0] not in stdlib_names:
            problems.append(f"{name} ({path}) is not in the standard library")
        elif path is not None and ("site-packages" in path or "dist-packages" in path):
            problems.append(f"{name} was loaded from {path}")
    return problems


def test_the_helper_loads_only_the_stdlib_and_the_helper_package() -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _SCRIPT, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"importing the helper in isolated mode failed:\n{proc.stderr}"
    info = json.loads(proc.stdout)
    modules: dict[str, str | None] = info["modules"]
    assert "cryptlockd.helper.main" in modules
    assert closure_problems(modules, set(info["stdlib_names"])) == []
    # Typing-only imports stay behind `TYPE_CHECKING = False`: these would only grow it.
    assert {"typing", "logging", "dataclasses", "asyncio"} & set(modules) == set()


def test_the_check_catches_a_forbidden_module() -> None:
    stdlib = {"os", "json", "sys"}
    own = str(ROOT / "cryptlockd" / "defs.py")
    assert closure_problems({"os": "/usr/lib/python3/os.py", "sys": None}, stdlib) == []
    assert closure_problems({"cryptlockd.defs": own}, stdlib) != []
    assert closure_problems({"pydantic": "/x/site-packages/pydantic/__init__.py"}, stdlib) != []
    assert closure_problems({"json": "/x/site-packages/json/__init__.py"}, stdlib) != []


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports outside the `if TYPE_CHECKING:` blocks."""
    typing_only: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only.update(id(n) for n in ast.walk(node))
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only
    ]


def _imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def test_no_helper_module_imports_from_outside_the_helper_package() -> None:
    # Typing-only imports too: the helper's types must not depend on the daemon's.
    for path in sorted(HELPER.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            assert not (isinstance(node, ast.ImportFrom) and node.level), (
                f"{path.name}:{node.lineno}: relative import"
            )
            for name in _imported_names(node):
                if name == "cryptlockd" or name.startswith("cryptlockd."):
                    assert _allowed_package_module(name), f"{path.name}:{node.lineno}: {name}"


def test_helper_modules_import_at_module_level() -> None:
    # The closure is what importing the helper loads: an import inside a function would
    # load a module the RAM filesystem does not hold.
    for path in sorted(HELPER.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node in _runtime_imports(tree):
            assert id(node) in top_level, f"{path.name}:{node.lineno}: import inside a block"
