"""The large scenario (1.8M states over 20 cells, ~10 s on 2 workers): slow, so only in
`make test-slow`. Three tasks per vCPU instead of one or two must not change which design
fails which property: the verdicts are the mechanism's, not the scenario size's."""

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


@functools.cache
def _cells(path: Path) -> dict[tuple[str, str], dict]:
    res = check_matrix([str(path)], workers=2)
    return {(c["design"], c["policy"]): c for c in res["cells"]}


def _verdicts(path: Path) -> dict[tuple[str, str], dict[str, bool | None]]:
    return {k: {n: p["holds"] for n, p in c["properties"].items()}
            for k, c in _cells(path).items()}


def test_large_matrix_is_complete_and_big() -> None:
    cells = _cells(LARGE)
    assert len(cells) == 20 and all(c["complete"] for c in cells.values())
    assert sum(c["states"] for c in cells.values()) > 1_000_000


def test_large_verdicts_equal_the_standard_ones() -> None:
    assert _verdicts(LARGE) == _verdicts(STANDARD)


def test_large_counterexamples_replay() -> None:
    sc = load(LARGE)
    for (design, policy), cell in _cells(LARGE).items():
        for name, prop in cell["properties"].items():
            if prop["holds"] is not False:
                continue
            system = System(sc, design, policy, symmetry=True)
            states = replay(system, prop["counterexample"], canonical=True)
            assert len(states) == len(prop["counterexample"]) + 1, (design, policy, name)
            if name == "vm_survives":
                assert system.vm_aborted(states[-1])
