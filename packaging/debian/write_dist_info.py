"""Writes cryptlockd's .dist-info (METADATA, INSTALLER) from pyproject.toml, for the Debian
package: bookworm's setuptools (66) cannot read pyproject.toml's SPDX license (PEP 639 needs
77), and the package is pure Python, so debian/rules copies the modules itself. This gives
dh_python3 the Requires-Dist it turns into the package's Depends (debian/py3dist-overrides
names the distribution's packages), and importlib.metadata the version.

Usage: write_dist_info.py SOURCE_DIR SITE_PACKAGES_DIR
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path
from typing import Any


def package_version(init_source: str) -> str:
    """`__version__` of cryptlockd/__init__.py, read without importing it."""
    for node in ast.parse(init_source).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise ValueError("no __version__ = '...' in cryptlockd/__init__.py")


def metadata(project: dict[str, Any], version: str) -> str:
    """Core metadata (PEP 566 / 639) of the installed distribution: no extras, since the
    package carries none of them."""
    lines = [
        "Metadata-Version: 2.4",
        f"Name: {project['name']}",
        f"Version: {version}",
        f"Summary: {project['description']}",
        f"License-Expression: {project['license']}",
        f"Requires-Python: {project['requires-python']}",
        *(f"Requires-Dist: {dep}" for dep in project.get("dependencies", [])),
    ]
    return "\n".join(lines) + "\n"


def dist_info_name(project: dict[str, Any], version: str) -> str:
    return f"{project['name'].replace('-', '_')}-{version}.dist-info"


def main(source: Path, site: Path) -> None:
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    version = package_version((source / "cryptlockd/__init__.py").read_text())
    out = site / dist_info_name(project, version)
    out.mkdir(parents=True, exist_ok=True)
    (out / "METADATA").write_text(metadata(project, version))
    (out / "INSTALLER").write_text("debian\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
