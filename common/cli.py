"""What every command-line entry point of the project shares: one-line errors and exit codes."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (a flag, a file, a row): printed as one line, exit code 2."""


EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str = "") -> int:
    """Call ``main`` and turn expected failures into one line on stderr and a non-zero exit code.

    Programming errors keep their traceback: they are bugs to report, not input to fix.
    """
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"{prog + ': ' if prog else ''}error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog + ': ' if prog else ''}interrupted", file=sys.stderr)
        return 130


def parse_int_list(text: str, flag: str) -> list[int]:
    """'160,240' -> [160, 240]; anything but positive integers is a UserError naming the flag."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"{flag}: {part!r} is not an integer") from None
        if value <= 0:
            raise UserError(f"{flag}: {value} is not positive")
        values.append(value)
    if not values:
        raise UserError(f"{flag}: no values given")
    return values


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in epilogs as written and shows defaults."""

    def _get_help_string(self, action):
        # None ("not given") and False (a switch that is off) say nothing; a required flag has none.
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)
