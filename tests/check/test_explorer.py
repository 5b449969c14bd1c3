"""The explorer and the property analysis on toy systems whose answers are known by
construction (no model needed)."""

from __future__ import annotations

from collections.abc import Callable

from faultline.check.explorer import explore
from faultline.check.properties import check_system, tarjan
from faultline.check.replay import ReplayError, replay


class Toy:
    """A system given as a dict: state -> [(action, next state)]; done states listed."""

    def __init__(self, edges: dict[object, list[tuple[str, object]]], done: set[object],
                 init: object = 0, unfair: set[str] = frozenset(),
                 safety: dict[str, Callable[[object], bool]] | None = None) -> None:
        self.edges, self.done, self._init, self.unfair = edges, done, init, unfair
        if safety is not None:
            self.safety = safety

    def init(self) -> object:
        return self._init

    def actions(self, s: object) -> list[tuple[str, object]]:
        return list(self.edges.get(s, []))

    def is_done(self, s: object) -> bool:
        return s in self.done

    def is_fair(self, name: str) -> bool:
        return name not in self.unfair


def names(steps: list[dict]) -> list[str]:
    return [st["action"] for st in steps]


def test_lasso_shortest_prefix_then_cycle() -> None:
    # 0 -a-> 1 -b-> 2 -c-> 3 -d-> 4 <-> 5 (the hang); a longer way in: 0 -x-> 7 -> ... -> 4;
    # and an exit: 0 -e-> 9 (done). The cycle 4 <-> 5 is fair (nothing else is enabled).
    edges = {
        0: [("a", 1), ("x", 7), ("e", 9)], 1: [("b", 2)], 2: [("c", 3)], 3: [("d", 4)],
        4: [("spin", 5)], 5: [("back", 4)],
        7: [("x1", 8)], 8: [("x2", 10)], 10: [("x3", 11)], 11: [("x4", 4)],
    }
    r = check_system(Toy(edges, {9}))
    nh = r.properties["no_hang"]
    assert nh.holds is False and nh.kind == "lasso"
    steps = nh.counterexample
    assert names(steps) == ["a", "b", "c", "d", "spin", "back"]
    assert [bool(st.get("cycle")) for st in steps] == [False] * 4 + [True] * 2
    states = replay(Toy(edges, {9}), steps)
    assert states[4] == states[-1] == 4  # the cycle returns to its entry


def test_unfair_cycle_is_no_hang() -> None:
    # 1 spins on itself while "finish" (to done) stays enabled: weak fairness takes it.
    edges = {0: [("go", 1)], 1: [("spin", 1), ("finish", 2)]}
    assert check_system(Toy(edges, {2})).properties["no_hang"].holds is True
    # With "finish" outside every fairness assumption, spinning forever is a hang.
    r = check_system(Toy(edges, {2}, unfair={"finish"}))
    assert r.properties["no_hang"].holds is False
    assert names(r.properties["no_hang"].counterexample) == ["go", "spin"]


def test_fair_cycle_when_exit_is_not_continuously_enabled() -> None:
    # 1 <-> 2, "finish" enabled in 1 only: a run alternating forever never sees "finish"
    # continuously enabled, so weak fairness does not force it: a (fair) hang.
    edges = {0: [("go", 1)], 1: [("ping", 2), ("finish", 3)], 2: [("pong", 1)]}
    r = check_system(Toy(edges, {3}))
    nh = r.properties["no_hang"]
    assert nh.holds is False and nh.kind == "lasso"
    assert names(nh.counterexample) == ["go", "ping", "pong"]


def test_fair_cycle_must_take_every_obligated_class() -> None:
    # SCC {1, 2, 3}: "tick" is enabled everywhere and taken only on 2 -> 3; the shortest
    # cycle through 1 (1 -> 2 -> 1) does not take it, so the lasso must go round via 3.
    edges = {0: [("go", 1)],
             1: [("a", 2), ("tick", 1)], 2: [("b", 1), ("tick", 3)], 3: [("c", 1), ("tick", 3)]}
    r = check_system(Toy(edges, set()))
    steps = r.properties["no_hang"].counterexample
    cyc = [st["action"] for st in steps if st.get("cycle")]
    assert "tick" in cyc


def test_cannot_reach_done_is_a_hang_whatever_the_fairness() -> None:
    edges = {0: [("go", 1), ("ok", 3)], 1: [("trap", 2)], 2: [("spin", 2)]}
    r = check_system(Toy(edges, {3}, unfair={"spin"}))
    nh = r.properties["no_hang"]
    assert nh.holds is False
    assert names(nh.counterexample)[:2] == ["go", "trap"]


def test_deadlock_is_a_hang() -> None:
    r = check_system(Toy({0: [("a", 1), ("b", 2)]}, {2}))
    nh = r.properties["no_hang"]
    assert nh.holds is False and nh.kind == "deadlock"
    assert names(nh.counterexample) == ["a"]


def test_safety_counterexample_is_shortest() -> None:
    # bad state 9 reachable in 3 steps (0-1-2-9) and in 5 (0-3-4-5-6-9), plus another
    # bad state 8 at depth 4.
    edges = {0: [("l", 3), ("s", 1)], 1: [("s", 2)], 2: [("s", 9)], 3: [("l", 4)],
             4: [("l", 5)], 5: [("l", 6), ("m", 8)], 6: [("l", 9)], 9: [("end", 10)],
             8: [("end", 10)]}
    toy = Toy(edges, {10}, safety={"never_bad": lambda s: s in (8, 9)})
    r = check_system(toy)
    p = r.properties["never_bad"]
    assert p.holds is False and p.kind == "path"
    assert names(p.counterexample) == ["s", "s", "s"]
    assert r.properties["no_hang"].holds is True


def test_changes_name_the_changed_fields() -> None:
    edges = {(0, 0): [("inc", (0, 1))], (0, 1): [("inc", (0, 1))]}
    r = check_system(Toy(edges, set(), init=(0, 0)))
    steps = r.properties["no_hang"].counterexample
    assert steps[0]["changes"] == {"state": [0, 1]}


class Counter:
    """Unbounded: n -> n + 1 forever (never done)."""

    def init(self) -> int:
        return 0

    def actions(self, s: int) -> list[tuple[str, int]]:
        return [("inc", s + 1)]

    def is_done(self, s: int) -> bool:
        return False

    safety = {"small": lambda s: s > 10**9}


def test_bounds_give_incomplete_not_holds() -> None:
    r = check_system(Counter(), max_states=1000)
    assert not r.complete and r.stop_reason == "max_states"
    assert r.states <= 1000
    assert r.properties["no_hang"].holds is None
    assert r.properties["small"].holds is None


def test_timeout_gives_incomplete() -> None:
    r = check_system(Counter(), timeout_s=0.05)
    assert not r.complete and r.stop_reason == "timeout"
    assert r.properties["no_hang"].holds is None


def test_violation_found_before_the_bound_is_real() -> None:
    # A fair cycle near the start of an otherwise unbounded system: fails even though
    # the graph is incomplete.
    class LoopThenCount(Counter):
        def actions(self, s: int) -> list[tuple[str, int]]:
            if s == 1:
                return [("loop", 1)]
            return [("inc", s + 1), ("to_loop", 1)] if s == 0 else [("inc", s + 1)]

    r = check_system(LoopThenCount(), max_states=100)
    assert r.properties["no_hang"].holds is False


def test_tarjan_is_iterative() -> None:
    # A ring of 200,000 states: one SCC, far deeper than Python's recursion limit.
    n = 200_000

    class Ring(Counter):
        def actions(self, s: int) -> list[tuple[str, int]]:
            return [("next", (s + 1) % n)]

    g = explore(Ring())
    _comp, sccs = tarjan(g, bytearray([1]) * g.n_states)
    assert g.complete and g.n_states == n and len(sccs) == 1


def test_replay_rejects_a_disabled_action() -> None:
    toy = Toy({0: [("a", 1)]}, {1})
    try:
        replay(toy, [{"action": "b"}])
    except ReplayError as e:
        assert e.step == 1 and e.enabled == ["a"]
    else:
        raise AssertionError("expected ReplayError")
