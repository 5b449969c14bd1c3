"""no_fabricated_data covers every bad read (beyond EOF, a hole never written, a poisoned
page), and the labels the model declares per record (what the checker evaluates) agree
with its label methods over whole states."""

from __future__ import annotations

import pytest

from faultline import scenario
from faultline.check.adapter import _state_mask
from faultline.check.contract import SAFETY
from faultline.check.explorer import explore
from faultline.check.properties import check_system
from faultline.model.properties import FIRST_ACCESS_MAX_TRIES, PROPERTIES
from faultline.model.system import A_KREAD, A_READ, System
from faultline.scenario import DESIGNS, POLICIES


class NoFaultPath(System):
    """Deliberately broken: a read of a file page completes at once, whatever the host
    page is (no gup, no exit): the model's own label must catch it."""

    def _access(self, s, v, pos, t, a):
        if a.gidx >= 0 and a.kind in (A_READ, A_KREAD):
            return self._complete(s, a, t)
        return super()._access(s, v, pos, t, a)


def _scenario(event: dict) -> scenario.Scenario:
    raw = {"name": "fab", "vm": {"vcpus": 1, "apf": True},
           "files": [{"name": "dax0", "size": 0x3000}],
           "tasks": [{"name": "t", "vcpu": 0,
                      "program": ["yield", "read dax0[1]", "exit 0"]}],
           "events": [dict(event, file="dax0", after="t:1")]}
    return scenario.from_dict(raw, source="fab")


BAD_PAGES = {
    "beyond-eof": {"action": "truncate", "size": 0x1000},
    "hole": {"action": "punch-hole", "offset": 0x1000, "length": 0x1000},
    "poison": {"action": "poison", "offset": 0x1000, "length": 0x1000},
}


@pytest.mark.parametrize("cause", sorted(BAD_PAGES))
def test_the_predicate_fires_on_a_model_that_fabricates(cause: str) -> None:
    sc = _scenario(BAD_PAGES[cause])
    broken = check_system(NoFaultPath(sc, "request", "mce"))
    assert broken.properties["no_fabricated_data"].holds is False
    ok = check_system(System(sc, "request", "mce"))
    assert ok.properties["no_fabricated_data"].holds is True


def test_a_written_hole_is_good_data() -> None:
    # A hole refilled by a write is backed again: reading it is not fabricated.
    raw = {"name": "fab", "vm": {"vcpus": 1, "apf": True},
           "files": [{"name": "dax0", "size": 0x3000}],
           "tasks": [{"name": "t", "vcpu": 0, "program": ["yield", "read dax0[1]", "exit 0"]}],
           "events": [{"action": "punch-hole", "file": "dax0", "offset": 0x1000,
                       "length": 0x1000, "after": "start"},
                      {"action": "write", "file": "dax0", "offset": 0x1000, "value": 7,
                       "after": "t:1"}]}
    sc = scenario.from_dict(raw, source="fab")
    assert check_system(NoFaultPath(sc, "request", "mce")).properties[
        "no_fabricated_data"].holds is True


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("policy", POLICIES)
def test_record_labels_agree_with_the_label_methods(design: str, policy: str) -> None:
    from pathlib import Path

    sc = scenario.load(Path(__file__).resolve().parents[2] / "scenarios"
                       / "check-standard.toml")
    safety = [p for p in PROPERTIES if p.kind == SAFETY]
    assert [p.name for p in safety] == ["vm_survives", "no_fabricated_data", "precise_kill",
                                        "one_exit_per_bad_page", "first_access_reported",
                                        "right_victim"]
    for system in (System(sc, design, policy), NoFaultPath(sc, design, policy)):
        g = explore(system)
        # the interned explorer's labels (per record id) are the plain ones (per state)
        assert all(g.adapter.bad(k) == _state_mask(safety, st)
                   for k, st in zip(g.states.keys, g.states, strict=True))
        for st in g.states:
            want = [system.vm_aborted(st), system.bad_reads(st) > 0,
                    bool(system.imprecise_kills(st)),
                    any(n > 1 for n in system.exits_per_page(st).values()),
                    any(n > FIRST_ACCESS_MAX_TRIES
                        for n in system.failing_accesses(st).values()),
                    system.wrong_mce(st) > 0]
            m = _state_mask(safety, st)
            assert [bool(m >> i & 1) for i in range(len(safety))] == want, st


