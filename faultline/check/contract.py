"""The contract between a model and the checker, after Stateright's ``Model`` trait: the
checker consumes exactly this and nothing private of the model.

A model declares:

- ``init()``: the initial state (hashable);
- ``enabled(state, names)``: every enabled action as ``(name, fairness class, fn,
  args)``, the next state being ``fn(state, *args)``; ``name`` may be None when
  ``names`` is False (the hot path builds no strings). The fairness class is any
  hashable: weak fairness holds per class (a class enabled forever is eventually
  taken), unless ``is_fair(class)`` says otherwise;
- ``actions(state)``: ``[(name, next state)]`` in the order of ``enabled`` (names for
  counterexamples and replay);
- ``is_done(state)``: the run is over (what ``no_hang`` must reach);
- ``properties``: every property, declared once with its label (:class:`Property`);
- ``canonical``: None, or the symmetry reduction's representative of a state;
- optionally ``view(state)``: a flat ``{field: value}`` view for counterexample diffs;
- optionally a memo footprint (:class:`MemoFootprint`) for the interned explorer.

:func:`from_actions` wraps a plain ``init / actions / is_done`` system (toys in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

LIVENESS = "liveness"
SAFETY = "safety"

Enabled = list[tuple[str | None, Hashable, Callable[..., Any], tuple]]


@dataclass(frozen=True)
class Property:
    """A property the checker judges. ``LIVENESS``: every fair run reaches a done state
    (fair cycles and deadlocks fail it). ``SAFETY``: no reachable state has the label;
    ``label`` reads the ``record`` it names: ``"state"`` (the whole state) or a record
    kind of the model's interned state (``"task"``: any task, ``"guest"``, ``"vmm"``), so
    the checker evaluates it once per distinct record."""
    name: str
    kind: str
    doc: str
    record: str = "state"
    label: Callable[[Any], bool] | None = None


class MemoFootprint(NamedTuple):
    """What the interned explorer may memoise, declared by a model whose state is a record
    of records (faultline's State) and whose actions split per vCPU:
    ``enabled_vcpu(s, v, names)`` (vCPU v's actions, in order) and
    ``enabled_global(s, names)`` (the rest; ``enabled`` is their concatenation).

    ``enabled_vcpu(s, v)`` and every action of it whose function is named in ``actions``
    (first argument v) read and write only vCPU v, the tasks ``tasks[v]`` and the
    records named in ``shared``; ``enabled_global`` reads only ``global_reads``. Every
    action of ``enabled_global`` whose function is named in ``global_actions`` reads and
    writes only the records of ``global_reads`` and the tasks ``global_tasks``. The
    checker then memoises all of them on the ids of those records. An action of
    ``enabled_vcpu(s, v)`` named in ``wide`` (first argument v) reads and writes vCPU v's
    footprint and the other vCPUs' records (not their tasks): memoised on those. A wrong
    declaration is caught by FAULTLINE_CHECK_MEMO=1 (faultline.check.adapter)."""
    actions: frozenset[str]
    tasks: tuple[tuple[int, ...], ...]
    shared: tuple[str, ...]
    global_reads: tuple[str, ...]
    global_actions: frozenset[str] = frozenset()
    global_tasks: tuple[int, ...] = ()
    wide: frozenset[str] = frozenset()


@runtime_checkable
class Model(Protocol):
    properties: Sequence[Property]
    canonical: Callable[[Any], Any] | None

    def init(self) -> Hashable: ...

    def enabled(self, s: Any, names: bool = True) -> Enabled: ...

    def actions(self, s: Any) -> list[tuple[str, Hashable]]: ...

    def is_done(self, s: Any) -> bool: ...


class _FromActions:
    """A plain system as a Model: each action is its own fairness class."""

    def __init__(self, system: Any) -> None:
        self.system = system
        self.canonical = getattr(system, "canonical", None)
        self.properties: Sequence[Property] = [
            Property("no_hang", LIVENESS, "every fair run ends"),
            *(Property(n, SAFETY, n, "state", f)
              for n, f in (getattr(system, "safety", None) or {}).items())]
        fair = getattr(system, "is_fair", None)
        if fair is not None:
            self.is_fair = fair

    def init(self) -> Hashable:
        return self.system.init()  # type: ignore[no-any-return]

    def enabled(self, s: Any, names: bool = True) -> Enabled:
        return [(n, n, _const(t), ()) for n, t in self.system.actions(s)]

    def actions(self, s: Any) -> list[tuple[str, Hashable]]:
        return self.system.actions(s)  # type: ignore[no-any-return]

    def is_done(self, s: Any) -> bool:
        return bool(self.system.is_done(s))

    def view(self, s: Any) -> dict[str, Any]:
        view = getattr(self.system, "view", None)
        return view(s) if view is not None else {"state": s}


def _const(t: Any) -> Callable[[Any], Any]:
    return lambda _s: t


def as_model(system: Any) -> Model:
    """``system`` itself if it declares the contract, else a wrapper (from_actions)."""
    if isinstance(system, Model) and hasattr(system, "properties"):
        return system
    return from_actions(system)


def from_actions(system: Any) -> Model:
    """Wrap a system offering ``init()``, ``actions(s)``, ``is_done(s)`` and optionally
    ``is_fair(name)``, ``safety`` (``{name: predicate}``), ``canonical``, ``view``."""
    return _FromActions(system)
