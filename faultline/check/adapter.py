"""What the checker needs from a transition system, derived from its public API.

The explorer wants, per state, the successor states with a *fairness class* per edge
(which scheduler choice the edge is), cheaply: no action-name strings on the hot path.
Action names are recomputed with ``actions()`` only for the states on a counterexample.

Two kinds of systems are accepted:

- faultline's model (``faultline.model.System``): it has ``enabled(state, names=False)``
  returning ``(name, actor, fn, args)``; the class is derived from the actor (see
  :func:`model_class`).
- any object with ``init()``, ``actions(state) -> [(name, next)]`` and ``is_done(state)``
  (toy systems in tests): the class of an edge is its action name. Such a system may define
  ``is_fair(name) -> bool`` to mark actions that no fairness assumption covers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

State = Hashable


class TransitionSystem(Protocol):
    def init(self) -> State: ...

    def actions(self, s: State) -> list[tuple[str, State]]: ...

    def is_done(self, s: State) -> bool: ...


class Adapter:
    """Successors with interned fairness-class ids, for one system."""

    def __init__(self, system: Any) -> None:
        self.system = system
        self.class_ids: dict[Hashable, int] = {}
        self.classes: list[Hashable] = []
        self._unfair: set[int] = set()
        self._is_fair: Callable[[Any], bool] | None = getattr(system, "is_fair", None)
        enabled = getattr(system, "enabled", None)
        self.expand: Callable[[State], list[tuple[int, State]]]
        if enabled is not None:
            self._enabled = enabled
            self.expand = self._expand_model
        else:
            self.expand = self._expand_generic
        canonical = getattr(system, "canonical", None)
        self.canonical: Callable[[State], State] | None = canonical

    def init(self) -> State:
        s = self.system.init()
        return self.canonical(s) if self.canonical is not None else s

    def is_done(self, s: State) -> bool:
        return bool(self.system.is_done(s))

    def intern(self, key: Hashable) -> int:
        cid = self.class_ids.get(key)
        if cid is None:
            cid = len(self.classes)
            self.class_ids[key] = cid
            self.classes.append(key)
            if self._is_fair is not None and not self._is_fair(key):
                self._unfair.add(cid)
        return cid

    def fair_class(self, cid: int) -> bool:
        return cid not in self._unfair

    def _expand_model(self, s: State) -> list[tuple[int, State]]:
        # Hot path (once per state): model_class() inlined. A vCPU edge's class is its
        # actor string, interned by the model (hash cached), so one dict hit per edge.
        ids = self.class_ids
        canon = self.canonical
        out = []
        append = out.append
        for _name, actor, fn, args in self._enabled(s, False):
            if actor[0] == "a":  # asyncN: one class per work item (token, gfn)
                item = args[1]
                key: Hashable = (actor, item[0], item[1])
            elif actor == "vmm":
                key = (actor, fn.__name__, args)
            else:
                key = actor
            cid = ids.get(key)
            if cid is None:
                cid = self.intern(key)
            t = fn(s, *args)
            append((cid, t if canon is None else canon(t)))
        return out

    def _expand_generic(self, s: State) -> list[tuple[int, State]]:
        ids = self.class_ids
        canon = self.canonical
        out = []
        for name, t in self.system.actions(s):
            cid = ids.get(name)
            if cid is None:
                cid = self.intern(name)
            out.append((cid, canon(t) if canon is not None else t))
        return out

    def named(self, s: State) -> list[tuple[str, State]]:
        """``actions(s)`` with canonical next states: what a counterexample step names."""
        canon = self.canonical
        acts = self.system.actions(s)
        if canon is None:
            return acts
        return [(n, canon(t)) for n, t in acts]


def model_class(actor: str, fn: Callable[..., Any], args: tuple) -> Hashable:
    """The weak-fairness class of one of the model's enabled actions.

    - ``vcpuN``: the vCPU runs (a task step, an interrupt or #MC delivered at entry, a
      page-ready, the request exit): "each runnable vCPU eventually runs".
    - ``asyncN`` work item: one class per queued item (token, gfn), so that each
      outstanding async PF eventually completes, not merely some of them.
    - ``vmm``: one class per kind of VMM work and its target (an exit of vCPU N, a change
      of file N): each exit is eventually handled, each file change eventually seen.
    """
    c = actor[0]
    if c == "a":  # asyncN: args = (v, (token, gfn, injected))
        item = args[1]
        return (actor, item[0], item[1])
    if c == "v" and actor == "vmm":
        return (actor, fn.__name__, args)
    return actor


# --- readable views of a state, for counterexample diffs -------------------------------

_FILE_FIELDS = ("size", "cached", "holes", "zeroed", "poison", "zero_from")
_VCPU_FIELDS = ("cur", "mode", "apf_hash", "queue", "done", "requests", "error_gfns",
                "exit", "mce_queue", "apf_id")
_TASK_FIELDS = ("status", "pc", "sub", "loop_ctrs", "steps", "token", "touched", "fails",
                "result")
_GUEST_FIELDS = ("offlined", "ring", "bad_reads")
_VMM_FIELDS = ("abort", "handled", "known", "exits", "repeats")
_MODES = ("run", "halted", "exit")
_TASK_STATUS = ("run", "sleep", "exited", "sigbus", "killed")


def state_view(system: Any, s: Any) -> dict[str, Any]:
    """A flat ``{"tasks.toucher.pc": 1, ...}`` view of a state.

    For faultline's model the field names come from the state encoding (model/state.py);
    if the encoding has changed shape, or for any other system, a generic view by index
    path (``"[3][0][1]"``) is given instead: never wrong, only less readable.
    """
    try:
        return _model_view(system, s)
    except Exception:  # an encoding this view does not know: fall back, never fail
        return _flatten(s, "")


def _model_view(system: Any, s: Any) -> dict[str, Any]:
    files, mem, vcpus, tasks, guest, vmm, fired = s
    names = system.names
    if len(tasks) != len(names) or len(vcpus) != system.sc.vcpus:
        raise ValueError("unknown encoding")
    out: dict[str, Any] = {}

    def put(prefix: str, fields: tuple[str, ...], values: tuple) -> None:
        if len(values) != len(fields):
            raise ValueError("unknown encoding")
        for k, v in zip(fields, values, strict=True):
            out[f"{prefix}.{k}"] = v

    for i, f in enumerate(files):
        put(f"files.{system.files[i].name}", _FILE_FIELDS, f)
    out["mem"] = mem
    for v, vc in enumerate(vcpus):
        put(f"vcpus[{v}]", _VCPU_FIELDS, vc)
        out[f"vcpus[{v}].mode"] = _MODES[vc[1]] if 0 <= vc[1] < len(_MODES) else vc[1]
    for t, tk in enumerate(tasks):
        put(f"tasks.{names[t]}", _TASK_FIELDS, tk)
        st = tk[0]
        out[f"tasks.{names[t]}.status"] = _TASK_STATUS[st] if 0 <= st < 5 else st
    put("guest", _GUEST_FIELDS, guest)
    put("vmm", _VMM_FIELDS, vmm)
    out["fired"] = fired
    return out


def _flatten(x: Any, prefix: str) -> dict[str, Any]:
    if isinstance(x, tuple) and len(x) <= 16 and any(isinstance(y, tuple) for y in x):
        out: dict[str, Any] = {}
        for i, y in enumerate(x):
            out.update(_flatten(y, f"{prefix}[{i}]"))
        return out
    return {prefix or "state": x}


def diff_views(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The fields that changed, with their new values (None: the field went away)."""
    out = {k: v for k, v in after.items() if before.get(k, _MISSING) != v}
    out.update({k: None for k in before if k not in after})
    return out


_MISSING = object()
