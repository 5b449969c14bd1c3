"""The large scenario under both profiles (faultline-vmm: 1.8M states over 20 cells, ~10 s
on 2 workers; linux-qemu: 6.7M, ~1.5 min): slow, so only in `make test-slow`. Three tasks
per vCPU instead of one or two must not change which design fails which property: the
verdicts are the mechanism's, not the scenario size's."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from faultline.check.matrix import check_matrix
from faultline.check.replay import replay
from faultline.model import System
from faultline.scenario import load

pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
LARGE = SCENARIOS / "check-large.toml"
STANDARD = SCENARIOS / "check-standard.toml"


PROFILES = ("faultline-vmm", "linux-qemu")


@functools.cache
def _cells(path: Path, profile: str) -> dict[tuple[str, str], dict]:
    res = check_matrix([str(path)], workers=2, profiles=[profile])
    return {(c["design"], c["policy"]): c for c in res["cells"]}


def _verdicts(path: Path, profile: str) -> dict[tuple[str, str], dict[str, bool | None]]:
    return {k: {n: p["holds"] for n, p in c["properties"].items()}
            for k, c in _cells(path, profile).items()}


@pytest.mark.parametrize("profile", PROFILES)
def test_large_matrix_is_complete_and_big(profile: str) -> None:
    cells = _cells(LARGE, profile)
    assert len(cells) == 20 and all(c["complete"] for c in cells.values())
    assert all(c["profile"] == profile for c in cells.values())
    assert sum(c["states"] for c in cells.values()) > 1_000_000


@pytest.mark.parametrize("profile", PROFILES)
def test_large_verdicts_equal_the_standard_ones(profile: str) -> None:
    assert _verdicts(LARGE, profile) == _verdicts(STANDARD, profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_large_counterexamples_replay(profile: str) -> None:
    sc = load(LARGE)
    for (design, policy), cell in _cells(LARGE, profile).items():
        for name, prop in cell["properties"].items():
            if prop["holds"] is not False:
                continue
            system = System(sc, design, policy, symmetry=True, profile=profile)
            states = replay(system, prop["counterexample"], canonical=True)
            assert len(states) == len(prop["counterexample"]) + 1, (design, policy, name)
            if name == "vm_survives":
                assert system.vm_aborted(states[-1])
