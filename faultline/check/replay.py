"""Replay a counterexample: re-apply its actions by name from ``init()``.

The model is deterministic and its action names are stable, so a trace (the JSON list of
``{"action": name, ...}`` steps the checker prints, or a file holding it) fully determines
the run. A step whose action is not enabled is an error naming the step and the actions
that were enabled, so a stale trace fails loudly instead of drifting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ReplayError(Exception):
    def __init__(self, step: int, action: str, enabled: list[str]) -> None:
        self.step, self.action, self.enabled = step, action, enabled
        shown = "; ".join(enabled) if enabled else "none"
        super().__init__(f"step {step}: action {action!r} is not enabled (enabled: {shown})")


def load_trace(src: str | Path | list | dict) -> list[dict[str, Any]]:
    """A trace from a path, a JSON text, a step list, or a property/cell dict holding one
    under ``"counterexample"`` (or ``"steps"``)."""
    data: Any = src
    if isinstance(src, Path) or (isinstance(src, str) and not src.lstrip().startswith(("[", "{"))):
        data = json.loads(Path(src).read_text())
    elif isinstance(src, str):
        data = json.loads(src)
    if isinstance(data, dict):
        data = data.get("counterexample", data.get("steps"))
    if not isinstance(data, list):
        raise ValueError("a trace is a list of {\"action\": NAME} steps")
    return [st if isinstance(st, dict) else {"action": st} for st in data]


def replay(system: Any, trace: str | Path | list | dict, *, canonical: bool = False
           ) -> list[Any]:
    """The states of the run: ``init()`` then one per step. With ``canonical`` (a trace
    from a symmetry-reduced check) each state is canonicalised before the next step."""
    steps = load_trace(trace)
    canon = getattr(system, "canonical", None) if canonical else None
    s = system.init()
    if canon is not None:
        s = canon(s)
    out = [s]
    for i, st in enumerate(steps, 1):
        name = st["action"]
        nxt = None
        acts = system.actions(s)
        for n, t in acts:
            if n == name:
                nxt = t
                break
        if nxt is None:
            raise ReplayError(i, name, [n for n, _t in acts])
        s = canon(nxt) if canon is not None else nxt
        out.append(s)
    return out
