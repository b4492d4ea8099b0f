"""cryptlockctl: the command-line client. It only talks D-Bus to cryptlockd.

Exit status: 0 success, 1 a failed check or operation (or no daemon), 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from cryptlockd import __version__
from cryptlockd.cli.client import Client, CtlError
from cryptlockd.cli.commands import COMMANDS
from cryptlockd.cli.output import Output

__all__ = ["build_parser", "main"]

PROG = "cryptlockctl"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output (JSON; JSON lines for monitor)",
    )
    common.add_argument(
        "--timeout",
        type=positive_float,
        default=argparse.SUPPRESS,
        metavar="SEC",
        help="give up on a D-Bus call after SEC seconds",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Query and control cryptlockd, which wipes LUKS keys from RAM across suspend.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "devices":
            p.add_argument("names", nargs="*", metavar="NAME", help="dm name")
    return parser


async def run(args: argparse.Namespace) -> int:
    command, _ = COMMANDS[args.command]
    out = Output(getattr(args, "json", False), sys.stdout)
    client = await Client.connect(getattr(args, "timeout", None))
    try:
        return await command(client, args, out)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits 2 here
    try:
        return asyncio.run(run(args))
    except CtlError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `cryptlockctl monitor | head`: the reader left, which is not an error of ours.
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
