"""The properties, judged on the explored graph, with shortest counterexamples.

The properties are the model's (``model.properties``, faultline.check.contract.Property).
Safety labels are evaluated once per distinct state (per distinct record for faultline's
model) during the BFS; the first violating state found is at minimal depth, so its
parent path is a shortest counterexample. ``no_hang`` is liveness, judged on the whole graph:

1. from every reachable state a *done* state (every task exited or killed, or the VM
   stopped) is reachable: backward reachability from the done states;
2. no *fair* cycle avoids the done states. Weak fairness per class of action (the
   class each enabled action declares: contract.Model.enabled): a cycle is fair if
   every fair class enabled in all of its states is taken on it. For a strongly
   connected component C of the non-done subgraph that is exact at the SCC level: C
   contains a fair cycle iff every fair class enabled in all states of C labels an edge
   inside C (a cycle through all of C is then fair, and any cycle inside C sees every
   such class enabled throughout). SCCs come from an iterative Tarjan (no recursion:
   SCCs of 10^6 states).

A violation is shown as a lasso: the BFS path to the cycle, then a fair cycle built by
walking inside the SCC to an edge of each obligated class (or to a state where it is
disabled) and back. With an incomplete graph, a violation found among the expanded
states is still real (fails); "holds" needs the whole graph (None = incomplete).

Verdicts: ``holds`` is True, False, or None (incomplete: bounds hit before a verdict).
"""

from __future__ import annotations

import itertools
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faultline.check.adapter import Adapter, diff_views, state_view
from faultline.check.contract import LIVENESS
from faultline.check.explorer import Graph, explore


@dataclass
class PropertyResult:
    holds: bool | None
    counterexample: list[dict[str, Any]] = field(default_factory=list)
    kind: str = ""  # "path" (safety), "lasso" (fair cycle), "deadlock", "" (holds/unknown)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"holds": self.holds, "counterexample": self.counterexample}
        if self.kind:
            d["kind"] = self.kind
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class CheckResult:
    states: int
    transitions: int
    seconds: float  # exploration + analysis
    explore_seconds: float
    complete: bool
    stop_reason: str
    properties: dict[str, PropertyResult]
    states_before_symmetry: int | None = None

    def failing(self) -> list[str]:
        return [n for n, p in self.properties.items() if p.holds is False]

    def to_json(self) -> dict[str, Any]:
        return {
            "states": self.states, "transitions": self.transitions,
            "seconds": round(self.seconds, 3), "complete": self.complete,
            "stop_reason": self.stop_reason,
            "properties": {n: p.to_json() for n, p in self.properties.items()},
        } | ({} if self.states_before_symmetry is None
             else {"states_before_symmetry": self.states_before_symmetry})


# --- the check -------------------------------------------------------------------------

def check_system(system: Any, *, max_states: int = 5_000_000, timeout_s: float | None = None,
                 liveness: bool = True, count_unreduced: bool = False,
                 check_memo: bool | None = None) -> CheckResult:
    """Explore ``system`` (a faultline.check.contract.Model, or a plain init / actions /
    is_done system) exhaustively within the bounds and judge every property it declares.
    ``count_unreduced``: if the model reduces by symmetry (``canonical``), also explore
    without it (states only, no analysis) to report ``states_before_symmetry``.
    ``check_memo``: assert the memo footprint on every memoised edge (default: the
    FAULTLINE_CHECK_MEMO environment variable)."""
    t0 = time.perf_counter()
    ad = Adapter(system, check_memo=check_memo)
    g = explore(system, max_states=max_states, timeout_s=timeout_s, adapter=ad)
    results: dict[str, PropertyResult] = {}
    safety_bit = {p.name: i for i, p in enumerate(ad.safety)}
    for p in ad.model.properties:
        if p.kind == LIVENESS:
            if liveness:
                results[p.name] = no_hang(g)
            continue
        sid = g.first_bad.get(safety_bit[p.name])
        if sid is not None:
            results[p.name] = PropertyResult(False, counterexample(g, g.path_to(sid)), "path")
        else:
            results[p.name] = PropertyResult(True if g.complete else None)
    before = None
    if count_unreduced and ad.canonical is not None:
        plain = Adapter(system)
        plain.canonical = None
        before = explore(system, max_states=max_states, timeout_s=timeout_s, safety=False,
                         adapter=plain).n_states
    return CheckResult(g.n_states, g.n_transitions, time.perf_counter() - t0, g.seconds,
                       g.complete, g.stop_reason, results, before)


# --- liveness: no_hang ----------------------------------------------------------------------

def no_hang(g: Graph) -> PropertyResult:
    ad = g.adapter
    n = g.n_states
    states = g.states
    done = bytearray(1 if ad.is_done(states[i]) else 0 for i in range(n))
    include = bytearray(n)
    for i in range(g.expanded):
        if not done[i]:
            include[i] = 1
    comp, sccs = tarjan(g, include)
    fair_sccs: list[list[int]] = []
    for c in sccs:
        if _nontrivial(g, c, comp) and _is_fair_scc(g, c, comp):
            fair_sccs.append(c)
    in_fair = bytearray(n)
    for c in fair_sccs:
        for v in c:
            in_fair[v] = 1
    # Deadlocks: expanded, not done, no successor. Real even in an incomplete graph.
    dead = [i for i in range(g.expanded) if not done[i] and g.offsets[i] == g.offsets[i + 1]]
    cannot: bytearray | None = None
    if g.complete:
        cannot = _cannot_reach(g, done)
    candidates = [min(c) for c in fair_sccs] + dead[:1]
    if cannot is not None:
        first_cannot = next((i for i in range(n) if cannot[i]), None)
        if first_cannot is not None:
            candidates.append(first_cannot)
    if not candidates:
        if g.complete:
            return PropertyResult(True)
        return PropertyResult(None, note=f"incomplete ({g.stop_reason}): no fair cycle or "
                                         f"deadlock among the {g.expanded} expanded states")
    entry = min(candidates)
    stem = g.path_to(entry)
    if in_fair[entry]:
        cyc = _fair_cycle(g, entry, comp)
        return PropertyResult(False, counterexample(g, stem, cyc), "lasso",
                              "a fair cycle that never reaches a done state")
    if entry < g.expanded and g.offsets[entry] == g.offsets[entry + 1]:
        return PropertyResult(False, counterexample(g, stem), "deadlock",
                              "no action enabled and not every task finished")
    # Done is unreachable from `entry`: continue to the nearest fair cycle or deadlock.
    more = _bfs(g, entry, lambda v: bool(in_fair[v]) or (
        g.offsets[v] == g.offsets[v + 1] and not done[v]), lambda v: not done[v],
        min_len=0)
    assert more is not None, "a state that cannot reach done must lead to a fair SCC"
    path = stem + [g.dst[e] for e in more]
    last = path[-1]
    if in_fair[last]:
        cyc = _fair_cycle(g, last, comp)
        return PropertyResult(False, counterexample(g, path, cyc), "lasso",
                              "from here no done state is reachable")
    return PropertyResult(False, counterexample(g, path), "deadlock",
                          "no action enabled and not every task finished")


def tarjan(g: Graph, include: bytearray) -> tuple[array, list[list[int]]]:
    """Strongly connected components of the subgraph induced by ``include``, iteratively.
    Returns comp (state -> component number, -1 outside) and the components."""
    n = g.n_states
    index = array("q", [-1]) * n
    low = array("q", [0]) * n
    comp = array("q", [-1]) * n
    onstack = bytearray(n)
    stack: list[int] = []
    sccs: list[list[int]] = []
    offsets, dst, expanded = g.offsets, g.dst, g.expanded
    counter = 0
    for root in range(n):
        if not include[root] or index[root] != -1:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        onstack[root] = 1
        work = [(root, offsets[root] if root < expanded else 0)]
        while work:
            v, ei = work[-1]
            end = offsets[v + 1] if v < expanded else 0
            descended = False
            while ei < end:
                w = dst[ei]
                ei += 1
                if not include[w]:
                    continue
                if index[w] == -1:
                    work[-1] = (v, ei)
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    onstack[w] = 1
                    work.append((w, offsets[w] if w < expanded else 0))
                    descended = True
                    break
                if onstack[w] and index[w] < low[v]:
                    low[v] = index[w]
            if descended:
                continue
            work.pop()
            if work:
                u = work[-1][0]
                if low[v] < low[u]:
                    low[u] = low[v]
            if low[v] == index[v]:
                c: list[int] = []
                while True:
                    w = stack.pop()
                    onstack[w] = 0
                    comp[w] = len(sccs)
                    c.append(w)
                    if w == v:
                        break
                sccs.append(c)
    return comp, sccs


def _nontrivial(g: Graph, c: list[int], comp: array) -> bool:
    if len(c) > 1:
        return True
    v = c[0]
    return any(g.dst[e] == v for e in g.edges(v))


def _is_fair_scc(g: Graph, c: list[int], comp: array) -> bool:
    ad = g.adapter
    k = comp[c[0]]
    enabled_all: set[int] | None = None
    taken: set[int] = set()
    for v in c:
        here = set()
        for e in g.edges(v):
            cid = g.cls[e]
            here.add(cid)
            if comp[g.dst[e]] == k:
                taken.add(cid)
        enabled_all = here if enabled_all is None else enabled_all & here
    assert enabled_all is not None
    return all(cid in taken for cid in enabled_all if ad.fair_class(cid))


def _cannot_reach(g: Graph, goal: bytearray) -> bytearray:
    """States from which no goal state is reachable (complete graph), by a backward BFS
    over a reverse CSR built by counting."""
    n = g.n_states
    count = array("q", [0]) * (n + 1)
    dst = g.dst
    for w in dst:
        count[w + 1] += 1
    for i in range(n):
        count[i + 1] += count[i]
    rsrc = array("q", [0]) * len(dst)
    fill = array("q", count)
    for v in range(g.expanded):
        for e in range(g.offsets[v], g.offsets[v + 1]):
            w = dst[e]
            rsrc[fill[w]] = v
            fill[w] += 1
    reach = bytearray(goal)
    q = deque(i for i in range(n) if goal[i])
    while q:
        w = q.popleft()
        for k in range(count[w], count[w + 1]):
            v = rsrc[k]
            if not reach[v]:
                reach[v] = 1
                q.append(v)
    return bytearray(0 if r else 1 for r in reach)


def _bfs(g: Graph, start: int, goal: Callable[[int], bool], allowed: Callable[[int], bool],
         min_len: int = 0) -> list[int] | None:
    """Shortest edge list from ``start`` to a goal state through allowed states; with
    ``min_len`` = 1 the path has at least one edge (a cycle back to ``start``)."""
    if min_len == 0 and goal(start):
        return []
    prev: dict[int, tuple[int, int]] = {}
    seen = {start} if min_len == 0 else set()
    q = deque([start])
    while q:
        v = q.popleft()
        for e in g.edges(v):
            w = g.dst[e]
            if w in seen or not allowed(w):
                continue
            seen.add(w)
            prev[w] = (v, e)
            if goal(w):
                out = []
                x = w
                while True:
                    u, ed = prev[x]
                    out.append(ed)
                    x = u
                    if x == start and (min_len == 0 or len(out) >= 1):
                        break
                out.reverse()
                return out
            q.append(w)
    return None


def _fair_cycle(g: Graph, entry: int, comp: array) -> list[int]:
    """A fair cycle through ``entry`` inside its SCC, as a list of edge indices.

    Walk from ``entry``; while some fair class is enabled in every state walked so far and
    not taken, go to a state of the SCC where it is disabled or take an edge of it (the SCC
    is fair, so one of the two exists); then close the walk back to ``entry``. Closing only
    adds states and edges, so it cannot make the cycle unfair again."""
    ad = g.adapter
    k = comp[entry]

    def inside(v: int) -> bool:
        return comp[v] == k

    def classes(v: int) -> set[int]:
        return {g.cls[e] for e in g.edges(v) if ad.fair_class(g.cls[e])}

    walk: list[int] = []  # edge indices
    cur = entry
    enabled_all = classes(entry)
    taken: set[int] = set()
    scc = [v for v in range(g.n_states) if comp[v] == k] if len(enabled_all) else []
    while True:
        missing = enabled_all - taken
        if not missing:
            break
        c = min(missing)
        where = [v for v in scc if c not in classes(v)]
        if where:
            targets = set(where)
            path = _bfs(g, cur, targets.__contains__, inside)
            assert path is not None
        else:
            sources = {v for v in scc for e in g.edges(v) if g.cls[e] == c and inside(g.dst[e])}
            path = _bfs(g, cur, sources.__contains__, inside)
            assert path is not None
            last = g.dst[path[-1]] if path else cur
            path.append(next(e for e in g.edges(last) if g.cls[e] == c and inside(g.dst[e])))
        for e in path:
            walk.append(e)
            taken.add(g.cls[e])
            cur = g.dst[e]
            enabled_all &= classes(cur)
    back = _bfs(g, cur, lambda v: v == entry, inside, min_len=0 if walk else 1)
    assert back is not None
    return walk + back


# --- counterexamples -------------------------------------------------------------------------

def counterexample(g: Graph, path: list[int], cycle: list[int] | None = None
                   ) -> list[dict[str, Any]]:
    """Steps ``{"action", "changes"}`` along ``path`` (state ids from the initial state),
    then, for a lasso, the cycle's steps (edge indices) marked ``"cycle": true``."""
    ad = g.adapter
    steps: list[dict[str, Any]] = []
    view = state_view(ad.system, g.states[path[0]])
    for a, b in itertools.pairwise(path):
        j = g.edge_index(a, b)
        steps.append(_step(ad, g, a, j, view))
        view = state_view(ad.system, g.states[b])
    for e in cycle or ():
        src = _edge_source(g, e)
        j = e - g.offsets[src]
        st = _step(ad, g, src, j, view)
        st["cycle"] = True
        steps.append(st)
        view = state_view(ad.system, g.states[g.dst[e]])
    return steps


def _step(ad: Adapter, g: Graph, src: int, j: int, view: dict[str, Any]) -> dict[str, Any]:
    name, nxt = ad.named(g.states[src])[j]
    return {"action": name, "changes": _jsonable(diff_views(view, state_view(ad.system, nxt)))}


def _edge_source(g: Graph, e: int) -> int:
    # offsets is sorted: binary search for the state whose edge range holds e.
    lo, hi = 0, g.expanded - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if g.offsets[mid] <= e:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (tuple, list, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


def format_counterexample(steps: list[dict[str, Any]]) -> str:
    """Readable: one line per action, the changed fields indented under it."""
    lines = []
    in_cycle = False
    for i, st in enumerate(steps, 1):
        if st.get("cycle") and not in_cycle:
            lines.append("  --- cycle (repeats forever) ---")
            in_cycle = True
        lines.append(f"  {i:3}. {st['action']}")
        for k, v in st["changes"].items():
            lines.append(f"         {k} = {v}")
    return "\n".join(lines)


__all__ = ["CheckResult", "PropertyResult", "check_system",
           "format_counterexample", "no_hang", "tarjan"]
