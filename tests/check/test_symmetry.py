"""Symmetry reduction (System(..., symmetry=True).canonical): interchangeable tasks of a
vCPU, up to rotation. The reduced check must give the same verdicts with fewer states."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from faultline import scenario
from faultline.check.properties import check_system
from faultline.check.replay import replay
from faultline.model import System
from faultline.model.state import State
from faultline.scenario import DESIGNS

STANDARD = Path(__file__).resolve().parents[2] / "scenarios" / "check-standard.toml"


def racers(n: int, pinned: bool = True) -> scenario.Scenario:
    """The standard scenario with vCPU 1 running n identical racers (pinned to it, as
    the standard scenario's tasks are, unless ``pinned`` is False)."""
    raw = tomllib.loads(STANDARD.read_text())
    raw.pop("expect", None)
    raw["tasks"] = [raw["tasks"][0]] + [
        {"name": f"racer{i}", "vcpu": 1, **({"cpus": [1]} if pinned else {}),
         "program": ["read dax0[1] expect=@", "read dax0[3]", "exit 0"]} for i in range(n)]
    return scenario.from_dict(raw, source="racers")


def test_groups_only_where_every_task_of_the_vcpu_is_alike() -> None:
    assert System(racers(3), "request", "mce", symmetry=True).sym_groups == ((1, (1, 2, 3)),)
    std = System(scenario.load(STANDARD), "request", "mce", symmetry=True)
    assert std.sym_groups == () and std.canonical is None
    assert System(racers(3), "request", "mce").canonical is None  # off by default
    # Tasks a wake may move to another vCPU (linux-qemu, difference 7) are on several
    # vCPUs' lists: no rotation group; pinned to one vCPU, or under faultline-vmm, they are.
    assert System(racers(3, pinned=False), "request", "mce", symmetry=True).sym_groups == ()
    assert System(racers(3, pinned=False), "request", "mce", symmetry=True,
                  profile="faultline-vmm").sym_groups == ((1, (1, 2, 3)),)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("policy", ["mce", "proactive"])
def test_same_verdicts_fewer_states(design: str, policy: str) -> None:
    sc = racers(3)
    red = check_system(System(sc, design, policy, symmetry=True), count_unreduced=True)
    full = check_system(System(sc, design, policy))
    assert red.states_before_symmetry == full.states
    assert red.states < full.states
    assert {n: p.holds for n, p in red.properties.items()} == \
        {n: p.holds for n, p in full.properties.items()}


def _rotate(system: System, s: State, k: int) -> State:
    (v, ts), = system.sym_groups
    n = len(ts)
    tasks = list(s.tasks)
    for p in range(n):
        tasks[ts[(p + k) % n]] = s.tasks[ts[p]]
    ren = {ts[p]: ts[(p + k) % n] for p in range(n)}
    vcpus = list(s.vcpus)
    vc = vcpus[v]
    ex = vc.exit
    if ex:
        ex = ex._replace(task=ren.get(ex.task, ex.task))
    vcpus[v] = vc._replace(cur=(vc.cur + k) % n, exit=ex)
    ring = tuple(r._replace(ar_task=ren.get(r.ar_task, r.ar_task)) for r in s.guest.ring)
    return s._replace(vcpus=tuple(vcpus), tasks=tuple(tasks), guest=s.guest._replace(ring=ring))


def test_canonical_is_an_orbit_invariant_and_rotations_commute_with_steps() -> None:
    system = System(racers(3), "request", "notify", symmetry=True)
    plain = System(racers(3), "request", "notify")
    from faultline.check.explorer import explore
    g = explore(plain, max_states=3000)
    for s in g.states[:1500]:
        c = system.canonical(s)
        assert system.canonical(c) == c
        for k in (1, 2):
            r = _rotate(system, s, k)
            assert system.canonical(r) == c
            # an automorphism: the rotated state's successors are the rotated successors
            assert sorted(map(repr, (system.canonical(t) for t in plain.successors(r)))) \
                == sorted(map(repr, (system.canonical(t) for t in plain.successors(s))))


def test_reduced_counterexamples_replay_canonically() -> None:
    system = System(racers(3), "upstream", "mce", symmetry=True)
    r = check_system(system)
    ce = r.properties["no_hang"].counterexample
    assert ce
    states = replay(system, ce, canonical=True)
    assert len(states) == len(ce) + 1
