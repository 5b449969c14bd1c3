"""The explorer over interned keys (adapter._Codec + the vCPU-local memo) must give the
very graph the plain nested-state exploration gives: same states in the same BFS order,
same edges, same fairness classes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from faultline import scenario
from faultline.check.adapter import Adapter, _identity
from faultline.check.explorer import explore
from faultline.conform import MODEL_PARAMS
from faultline.model import System
from faultline.scenario import DESIGNS

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def racers(n: int) -> scenario.Scenario:
    """check-standard with vCPU 1 running n identical racers (a symmetry group)."""
    raw = tomllib.loads((SCENARIOS / "check-standard.toml").read_text())
    raw.pop("expect", None)
    raw["tasks"] = [raw["tasks"][0]] + [
        {"name": f"racer{i}", "vcpu": 1,
         "program": ["read dax0[1] expect=@", "read dax0[3]", "exit 0"]} for i in range(n)]
    return scenario.from_dict(raw, source="racers")


def _plain(system: System) -> Adapter:
    ad = Adapter(system)
    ad._codec = None
    ad.decode = _identity
    ad.expand = ad._expand_plain
    ad.bad = ad._bad_plain
    return ad


def _same_graph(system: System, max_states: int = 20_000) -> int:
    a = explore(system, max_states=max_states)
    b = explore(system, max_states=max_states, adapter=_plain(system))
    assert a.adapter._codec is not None and b.adapter._codec is None
    assert list(a.states) == list(b.states)
    assert (a.dst, a.offsets, a.parent, a.parent_edge) == (b.dst, b.offsets, b.parent,
                                                           b.parent_edge)
    assert [a.adapter.classes[c] for c in a.cls] == [b.adapter.classes[c] for c in b.cls]
    assert (a.complete, a.first_bad) == (b.complete, b.first_bad)
    return a.n_states


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("name", ["check-standard", "dax-truncate-smp", "dax-punch-hole",
                                  "conf-smp-shared"])
def test_interned_exploration_is_the_plain_one(name: str, design: str) -> None:
    sc = scenario.load(SCENARIOS / f"{name}.toml")
    for policy in sc.policies:
        for params in ({}, MODEL_PARAMS):
            assert _same_graph(System(sc, design, policy, **params)) > 1


@pytest.mark.parametrize(("name", "design"), [("conf-shared-page", "request"),
                                              ("model/lq9-mce-broadcast", "error-gfn")])
def test_interned_exploration_with_the_global_and_wide_memos(name: str, design: str) -> None:
    # linux-qemu: the guest's workqueue (_guest_mf_work, memoised on the global footprint;
    # conf-shared-page's early-kill watcher is in it) and QEMU's MCE broadcast (_vmm_exit,
    # memoised as a wide action; error-gfn's SRARs broadcast).
    sc = scenario.load(SCENARIOS / f"{name}.toml")
    for policy in sc.policies:
        system = System(sc, design, policy, profile="linux-qemu")
        assert system.memo_footprint.wide == {"_vmm_exit"}
        assert _same_graph(system, max_states=60_000) > 1


def test_interned_exploration_with_symmetry() -> None:
    # canonical() is applied per edge: the memo is bypassed, encoding still used.
    for policy in ("mce", "notify"):
        _same_graph(System(racers(3), "request", policy, symmetry=True))


def test_decode_inverts_encode() -> None:
    system = System(scenario.load(SCENARIOS / "check-standard.toml"), "request", "mce")
    g = explore(system)
    codec = g.adapter._codec
    for key, s in zip(g.states.keys, g.states, strict=True):
        assert codec.encode(s) == key and codec.decode(key) == s
