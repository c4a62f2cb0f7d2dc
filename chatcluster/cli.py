"""How a process of the cluster starts and reports an operator's mistake.

A mistake of the operator's (a bad option, a busy port, a missing key file, an
app that does not import) is one line on stderr and an exit code, never a
traceback: 2 for a usage error, 1 for anything else. Tracebacks are for bugs,
and for ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

USAGE = 2
"""Exit code of a usage error (a bad option or value)."""
FAILED = 1


class OperatorError(Exception):
    """Something the operator can fix; its message says what and how."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: what is wrong (see --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see --help)\n")
        sys.exit(USAGE)


def run(main: Callable[[Sequence[str] | None], int], prog: str) -> NoReturn:
    """Call ``main`` and exit with its code; an OperatorError becomes its one line."""
    try:
        code = main(None)
    except OperatorError as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger(prog).debug("operator error", exc_info=exc)
        sys.stderr.write(f"{prog}: {exc}\n")
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `python -m register status | head`
        sys.stderr.close()
        code = 0
    sys.exit(code)
