"""Ctrl-C (SIGINT) and SIGTERM for the command line: wherever they land, the command
stops with one line on stderr and exit 130, never a traceback.

Python's own handler raises KeyboardInterrupt at whatever bytecode runs. Inside an
import that goes wrong twice over: during the console script's import of faultline.cli
nothing catches it yet (a traceback, exit -2), and inside a class's creation CPython 3.11
wraps it (``RuntimeError: Error calling __set_name__``, seen in pyelftools' lazy import).
So while the main thread imports, a stop signal is held; it is raised as
KeyboardInterrupt once the outermost import has finished.
"""

from __future__ import annotations

import _thread
import builtins
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGTERM stops a run the way SIGINT does

_import: Callable[..., Any] = builtins.__import__
_main_ident = 0  # the thread whose imports hold the signals: the one that installed them
_depth = 0  # imports in progress in that thread (nested)
_pending = False  # a stop signal arrived during one
_installed = False


def _on_stop_signal(signum: int, frame: object) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def _holding_import(name: str, globals: Any = None, locals: Any = None,
                    fromlist: Any = (), level: int = 0) -> Any:
    """builtins.__import__, with a stop signal held until the outermost import is done."""
    global _depth, _pending
    if _thread.get_ident() != _main_ident:  # handlers run in the main thread only
        return _import(name, globals, locals, fromlist, level)
    _depth += 1
    try:
        return _import(name, globals, locals, fromlist, level)
    finally:
        _depth -= 1
        if _pending and not _depth:
            _pending = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt, but never inside an
    import (held until it finishes). Set explicitly, also for SIGINT: a parent that
    ignores it (a script's background job) passes SIG_IGN on, and Python leaves it so.
    Outside the main thread, or nested, it does nothing. The previous handlers and
    __import__ are back after the block."""
    global _installed, _main_ident, _pending
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _main_ident, _pending, _installed = _thread.get_ident(), False, True
    builtins.__import__ = _holding_import
    try:
        for s in STOP_SIGNALS:
            signal.signal(s, _on_stop_signal)
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:  # one installed outside Python cannot be put back
                signal.signal(s, handler)
        builtins.__import__ = _import
        _installed = False

