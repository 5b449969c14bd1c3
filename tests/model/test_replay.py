"""A checker counterexample replays through the simulator: the same hang, step for step."""

from __future__ import annotations

import pytest

from faultline.check.properties import check_system
from faultline.model.simulate import ReplayError, simulate
from faultline.model.system import System
from faultline.scenario import load
from tests.conftest import SCENARIOS


def test_no_hang_lasso_replays_into_the_same_livelock() -> None:
    sc = load(SCENARIOS / "check-standard.toml")
    res = check_system(System(sc, "upstream", "mce"), max_states=200_000, timeout_s=60)
    prop = res.properties["no_hang"]
    assert prop.holds is False and prop.counterexample
    names = [st["action"] for st in prop.counterexample]
    out = simulate(sc, "upstream", "mce", schedule=names)
    assert out.vm == "hung" and out.tasks["toucher"].fate == "hung"
    assert out.exits.get("memory_fault", 0) == 0


def test_a_stale_trace_fails_loudly() -> None:
    sc = load(SCENARIOS / "check-standard.toml")
    with pytest.raises(ReplayError, match="trace step 1: action 'no such action' is not enabled"):
        simulate(sc, "upstream", "mce", schedule=["no such action"])
