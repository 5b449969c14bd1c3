"""The KVM designs the model compares, one module each (see faultline/model/design.py
for the hooks, docs/designs.md for writing one), and loading a design from a file."""

from __future__ import annotations

import importlib

from faultline.model.design import Design

# name -> module (in this package); the order is the matrix's row order.
SHIPPED = {
    "upstream": "upstream",
    "memory-fault-exit": "memory_fault_exit",
    "error-gfn": "error_gfn",
    "request": "request",
    "apf-error-to-guest": "apf_error_to_guest",
}


def get_design(name: str) -> Design:
    mod = SHIPPED.get(name)
    if mod is None:
        raise ValueError(f"unknown design {name!r} (one of: {', '.join(SHIPPED)})")
    d: Design = importlib.import_module(f"faultline.model.designs.{mod}").DESIGN
    return d
