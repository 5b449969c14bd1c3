"""The KVM designs the model compares, one module each (see faultline/model/design.py
for the hooks, docs/designs.md for writing one), and loading a design from a file."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
from pathlib import Path
from typing import Any

from faultline.model.design import HOOKS, Design
from faultline.model.state import EXIT_SOURCES, State

# name -> module (in this package); the order is the matrix's row order.
SHIPPED = {
    "upstream": "upstream",
    "memory-fault-exit": "memory_fault_exit",
    "error-gfn": "error_gfn",
    "request": "request",
    "apf-error-to-guest": "apf_error_to_guest",
}


class DesignError(Exception):
    """A design file that cannot be used, or a hook of it that failed: one line naming the
    file (and the hook)."""


def get_design(spec: str) -> Design:
    """A shipped design by name, or a design file (a path ending in .py)."""
    if spec.endswith(".py"):
        return load_design_file(spec)
    mod = SHIPPED.get(spec)
    if mod is None:
        raise ValueError(f"unknown design {spec!r} (one of: {', '.join(SHIPPED)})")
    # __import__, not importlib.import_module: the CLI holds a Ctrl-C until an import
    # made through it has finished (faultline/interrupt.py)
    d: Design = __import__(f"faultline.model.designs.{mod}", fromlist=["DESIGN"]).DESIGN
    return d


def load_design_file(path: str | Path) -> Design:
    """Import a design from ``path``: its ``DESIGN`` (a Design instance), or the one
    Design subclass it defines. Every hook it overrides is guarded: an exception inside
    it, or a result of the wrong type, becomes a DesignError naming the hook and file."""
    p = Path(path)
    if not p.is_file():
        raise DesignError(f"{path}: no such design file")
    key = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"faultline_design_{key}", p)
    if spec is None or spec.loader is None:
        raise DesignError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # a user's file: anything it raises means "does not import"
        if isinstance(e, KeyboardInterrupt):
            raise
        raise DesignError(f"{path}: does not import: {type(e).__name__}: {e}") from None
    design = getattr(module, "DESIGN", None)
    if design is None:
        classes = [c for c in vars(module).values() if isinstance(c, type)
                   and issubclass(c, Design) and c.__module__ == module.__name__]
        if len(classes) > 1:
            raise DesignError(f"{path}: defines several designs "
                              f"({', '.join(c.__name__ for c in classes)}): set DESIGN = one()")
        if not classes:
            raise DesignError(f"{path}: defines no design (a subclass of "
                              "faultline.model.design.Design, or DESIGN = an instance of one)")
        try:
            design = classes[0]()
        except Exception as e:
            raise DesignError(f"{path}: {classes[0].__name__}() raised "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(design, Design):
        raise DesignError(f"{path}: DESIGN is a {type(design).__name__}, not a Design")
    if not design.name:
        design.name = p.stem.replace("_", "-")
    if design.name in SHIPPED:
        raise DesignError(f"{path}: design name {design.name!r} is a shipped design's: "
                          "give yours another name")
    try:
        hash(design.vcpu_init)
    except TypeError:
        raise DesignError(f"{path}: vcpu_init must be hashable (a tuple, an int...), not "
                          f"{type(design.vcpu_init).__name__}") from None
    if design.entry_requests and not design.entry_action:
        raise DesignError(f"{path}: entry_requests needs an entry_action (the action's name)")
    for hook in HOOKS:
        if getattr(type(design), hook) is not getattr(Design, hook):
            setattr(design, hook, _guard(getattr(design, hook), hook, str(path)))
    return design


def _returns_ok(hook: str, r: Any) -> bool:
    if hook == "kvm_mmu_faultin_pfn":
        return (isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], bool)
                and isinstance(r[1], State))
    if hook == "kvm_handle_error_pfn":
        return isinstance(r, int) and 0 <= r < len(EXIT_SOURCES)
    if hook == "kvm_arch_async_page_present":
        return isinstance(r, bool)
    return isinstance(r, State)


_RETURNS = {"kvm_mmu_faultin_pfn": "(bool, State)", "kvm_handle_error_pfn": "an EXIT_* kind",
            "kvm_arch_async_page_present": "a bool"}


def _guard(fn: Any, hook: str, path: str) -> Any:
    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            r = fn(*args)
        except DesignError:
            raise
        except Exception as e:
            raise DesignError(f"{path}: hook {hook} raised {type(e).__name__}: {e}") from None
        if not _returns_ok(hook, r):
            raise DesignError(f"{path}: hook {hook} returned {type(r).__name__}, expected "
                              f"{_RETURNS.get(hook, 'a State')}")
        return r
    return call
