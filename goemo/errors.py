"""goemo's one error type: a problem the user can fix, printed by the commands as one line."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn


class GoemoError(Exception):
    """An error the user can fix; the CLI prints it as one line (set GOEMO_DEBUG=1 for the traceback)."""


@contextmanager
def exit_on_error() -> Iterator[None]:
    """A command's body: a GoemoError becomes `error: ...` on stderr and exit status 2 (GOEMO_DEBUG=1: the traceback)."""
    try:
        yield
    except GoemoError as e:
        if os.environ.get("GOEMO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the `python -m goemo.*` commands, with main.py's one-line errors: `error: MESSAGE (see: PROG
    --help)`, status 2, without argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")
