"""Every shipped scenario meets its [[expect]] blocks on the model, under every KVM design
and every policy it lists: the designs' differences are the mechanism's, not the
scenarios' (a hang where the async page-fault path loops, an exit where it does not)."""

from __future__ import annotations

import pytest

from faultline.model.simulate import simulate
from faultline.outcome import check
from faultline.scenario import DESIGNS, load
from tests.conftest import SCENARIOS

CASES = [(p.stem, d, pol) for p in sorted(SCENARIOS.glob("*.toml"))
         for d in DESIGNS for pol in load(p).policies]


@pytest.mark.parametrize(("name", "design", "policy"), CASES,
                         ids=[f"{n}-{d}-{p}" for n, d, p in CASES])
def test_scenario_on_every_design(name: str, design: str, policy: str) -> None:
    sc = load(SCENARIOS / f"{name}.toml")
    out = simulate(sc, design, policy)
    assert check(out, sc) == []
