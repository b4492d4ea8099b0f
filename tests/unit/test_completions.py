"""The bash and zsh completions know every cryptlockctl command, and bash's completes them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cryptlockd.cli.commands import COMMANDS

REPO = Path(__file__).resolve().parents[2]
BASH = REPO / "packaging/completions/cryptlockctl.bash"
ZSH = REPO / "packaging/completions/_cryptlockctl"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def test_bash_lists_every_command() -> None:
    match = re.search(r'local commands="([^"]*)"', BASH.read_text())
    assert match is not None
    assert match.group(1).split() == list(COMMANDS)


def test_zsh_lists_every_command_with_its_help() -> None:
    entries = re.findall(r"^    '([a-z]+):(.*)'$", ZSH.read_text(), re.MULTILINE)
    assert entries == [(name, help_text) for name, (_, help_text) in COMMANDS.items()]


def _bash_complete(line: str) -> list[str]:
    script = (
        f"source {BASH_COMPLETION}; source {BASH}; "
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; "
        'read -ra COMP_WORDS <<< "$COMP_LINE"; '
        '[[ $COMP_LINE == *" " ]] && COMP_WORDS+=(""); '
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); "
        '_cryptlockctl cryptlockctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"; '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    proc = subprocess.run(
        ["bash", "--norc", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="bash-completion is not installed")
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cryptlockctl ", list(COMMANDS)),
        ("cryptlockctl st", ["status"]),
        ("cryptlockctl --json d", ["devices", "disable"]),
        ("cryptlockctl --timeout 5 mon", ["monitor"]),
        ("cryptlockctl status --j", ["--json"]),
        ("cryptlockctl --v", ["--version"]),
        ("cryptlockctl --timeout ", []),
    ],
)
def test_bash_completes(line: str, expected: list[str]) -> None:
    assert sorted(_bash_complete(line)) == sorted(expected)


# An interactive zsh on a pty, with compinit and our directory on fpath; compadd is wrapped so
# that every completion prints what it offers (after zsh's own matching against the word)
# as "MATCHES=a,b;". zpty -r with a pattern blocks until that line comes; the subprocess
# timeout is the deadline.
ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1='%% '; fpath=($1 \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'compadd() { local -a m; builtin compadd -O m "$@"'
zpty -w z '(( $#m )) && print -r -- "${(U):-matches}=${(j:,:)m};"'
zpty -w z 'builtin compadd "$@"; }'
zpty -n -w z "$2"$'\t'
zpty -r z out '*MATCHES=*;*'
print -r -- "${${out##*MATCHES=}%%;*}"
zpty -d z
"""


def _zsh_complete(line: str) -> list[str]:
    proc = subprocess.run(
        ["zsh", "-f", "-c", ZSH_DRIVER, "zsh", str(ZSH.parent), line],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.strip().split(",") if w]


def test_zsh_file_parses() -> None:
    proc = subprocess.run(["zsh", "-n", str(ZSH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cryptlockctl ", list(COMMANDS)),
        ("cryptlockctl st", ["status"]),
        ("cryptlockctl --json d", ["devices", "disable"]),
        ("cryptlockctl status --j", ["--json"]),
    ],
)
def test_zsh_completes(line: str, expected: list[str]) -> None:
    assert sorted(_zsh_complete(line)) == sorted(expected)
