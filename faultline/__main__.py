"""The command line's entry point: the ``faultline`` console script, ``python -m faultline``
and ``python -m faultline.cli``. Ctrl-C handling comes first, before faultline.cli's
imports: a Ctrl-C at any moment is one line and exit 130 (faultline/interrupt.py)."""

from __future__ import annotations

import sys

# Not `from typing import TYPE_CHECKING`: typing (~5 ms to import) would load before the
# handling is in place; mypy reads the name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from faultline.interrupt import handled

        with handled():
            from faultline import cli

            return cli.main(argv)
    except KeyboardInterrupt:  # before cli.main() runs, or as handled() puts things back
        sys.stderr.write("faultline: error: interrupted\n")
        return EXIT_INTERRUPTED


def run_as_main() -> NoReturn:
    rc = main()
    if rc == EXIT_INTERRUPTED:
        import signal

        # Exit 130 under `python -m` too. CPython marks a KeyboardInterrupt unhandled when it
        # passes out of an exec() of source text (a dataclass or namedtuple created by a lazy
        # import), even once we catch it; at exit Py_RunMain() then calls exit_sigint()
        # (Modules/main.c), which kill()s the process with SIGINT and returns 130 only if it
        # survives. With SIGINT blocked it survives (the console script never gets there).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sys.exit(rc)


if __name__ == "__main__":
    run_as_main()
