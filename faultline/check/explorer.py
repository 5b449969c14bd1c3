"""Exhaustive breadth-first exploration of a transition system, keeping the graph.

States get ids in discovery order; since the frontier is FIFO, states are also *expanded*
in id order, so a state's id order is its BFS depth order and the parent pointers give
shortest paths. The graph is kept compactly for the liveness analysis: CSR arrays
(``offsets``, ``dst``, ``cls``) of int64 instead of per-state Python lists, and per state
one parent id and the index of the edge in the parent's ``actions()`` list (names are
recomputed only for counterexamples).

What is stored and hashed per state is the adapter's *key*: for faultline's model a flat
tuple of interned component ids (adapter._Codec: cheap to hash and compare, where the
nested state costs a deep hash per edge), for any other system the state itself.
``Graph.states[i]`` decodes, so everything downstream sees the system's own states.

Bounds (``max_states``, ``timeout_s``) stop the search with ``complete = False``: every
verdict that needs the whole graph is then reported as incomplete, never as "holds".
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from faultline.check.adapter import Adapter

State = Hashable
_CLOCK_EVERY = 1024  # states between looks at the clock


class States(Sequence):
    """id -> state, decoded on access from the keys the explorer stores (the adapter's
    interned form: see adapter._Codec); a plain list's behaviour otherwise."""

    def __init__(self, keys: list[State], decode: Callable[[State], State]) -> None:
        self.keys = keys
        self._decode = decode

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._decode(k) for k in self.keys[i]]
        return self._decode(self.keys[i])


@dataclass
class Graph:
    adapter: Adapter
    states: States  # id -> state (decoded from its key)
    index: dict[State, int]  # key -> id
    parent: array  # id -> parent id (-1: the initial state)
    parent_edge: array  # id -> index of the edge in the parent's action list
    offsets: array  # edges of state i (i < expanded): [offsets[i], offsets[i + 1])
    dst: array
    cls: array  # fairness class id per edge
    expanded: int  # states [0, expanded) have their edges
    complete: bool
    stop_reason: str  # "" when complete, else "max_states" or "timeout"
    seconds: float
    first_bad: dict[int, int] = field(default_factory=dict)  # property bit -> first state id
    canonical_states: int | None = None  # with symmetry reduction: states after reduction

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_transitions(self) -> int:
        return len(self.dst)

    def edges(self, i: int) -> range:
        if i >= self.expanded:
            return range(0)
        return range(self.offsets[i], self.offsets[i + 1])

    def path_to(self, i: int) -> list[int]:
        """State ids from the initial state to ``i`` along BFS parents (a shortest path)."""
        out = [i]
        while self.parent[out[-1]] >= 0:
            out.append(self.parent[out[-1]])
        out.reverse()
        return out

    def edge_index(self, src: int, dst: int) -> int:
        """Index in ``src``'s action list of its first edge to ``dst``."""
        for j, e in enumerate(self.edges(src)):
            if self.dst[e] == dst:
                return j
        raise KeyError((src, dst))


def explore(system: Any, *, max_states: int = 5_000_000, timeout_s: float | None = None,
            safety: bool = True, adapter: Adapter | None = None) -> Graph:
    """BFS from ``init()`` over every enabled action, deduplicating states by hash. With
    ``safety``, each new state's safety labels (the adapter's bitmask, bit i = the i-th
    safety property) are read once; the first violating state per property is kept."""
    ad = adapter if adapter is not None else Adapter(system)
    bad = ad.bad if safety and ad.safety else None
    t0 = time.perf_counter()
    deadline = t0 + timeout_s if timeout_s is not None else None
    s0 = ad.init()  # a key: ad.decode(key) is the system's state (identity but for the model)
    decode = ad.decode
    states: list[State] = [s0]
    index: dict[State, int] = {s0: 0}
    parent = array("q", [-1])
    parent_edge = array("l", [0])
    offsets = array("q", [0])
    dst = array("q")
    cls = array("l")
    first_bad: dict[int, int] = {}
    bad_seen = 0  # properties already violated: no need to record later states

    def note_bad(sid: int, mask: int) -> None:
        nonlocal bad_seen
        for bit in range(mask.bit_length()):
            if mask >> bit & 1 and bit not in first_bad:
                first_bad[bit] = sid
        bad_seen |= mask

    if bad is not None:
        m = bad(s0)
        if m:
            note_bad(0, m)
    expand = ad.expand
    setdefault = index.setdefault
    dst_append = dst.append
    cls_append = cls.append
    states_append = states.append
    parent_append = parent.append
    pedge_append = parent_edge.append
    sid = 0
    stop = ""
    while sid < len(states):
        if deadline is not None and sid % _CLOCK_EVERY == 0 and time.perf_counter() > deadline:
            stop = "timeout"
            break
        succ = expand(states[sid])
        if len(states) + len(succ) > max_states:
            # Expanding this state might exceed the bound: stop before it, so that every
            # expanded state has all its edges.
            new = sum(1 for _c, t in succ if t not in index)
            if len(states) + new > max_states:
                stop = "max_states"
                break
        j = 0
        for c, t in succ:
            # One hash of the key (a flat int tuple for the model) per edge: setdefault inserts
            # the next id if t is new, else returns its id.
            n = len(states)
            tid = setdefault(t, n)
            if tid == n:
                states_append(t)
                parent_append(sid)
                pedge_append(j)
                if bad is not None:
                    m = bad(t)
                    if m & ~bad_seen:
                        note_bad(tid, m)
            dst_append(tid)
            cls_append(c)
            j += 1
        offsets.append(len(dst))
        sid += 1
    return Graph(ad, States(states, decode), index, parent, parent_edge, offsets, dst, cls,
                 sid, not stop, stop, time.perf_counter() - t0, first_bad,
                 len(states) if ad.canonical is not None else None)
