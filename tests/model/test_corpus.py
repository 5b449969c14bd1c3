"""Every shipped scenario meets its [[expect]] blocks on the model, under every KVM design,
every policy it lists and every profile it describes: the designs' differences are the
mechanism's, not the scenarios' (a hang where the async page-fault path loops, an exit
where it does not)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faultline.model.simulate import simulate
from faultline.outcome import check
from faultline.scenario import DESIGNS, PROFILES, load
from tests.conftest import SCENARIOS

# Every profile a scenario describes: its own [vm] profile, else both (docs/linux-qemu.md).
CASES = [(p, d, pol, prof) for p in sorted(SCENARIOS.rglob("*.toml"))
         for d in DESIGNS for pol in load(p).policies
         for prof in ((load(p).profile,) if load(p).profile else PROFILES)]


@pytest.mark.parametrize(("path", "design", "policy", "profile"), CASES,
                         ids=[f"{p.stem}-{d}-{pol}-{prof}" for p, d, pol, prof in CASES])
def test_scenario_on_every_design(path: Path, design: str, policy: str, profile: str) -> None:
    sc = load(path)
    out = simulate(sc, design, policy, profile=profile)
    assert out.profile == profile
    assert check(out, sc) == []
