"""Today's behaviour, pinned: what the model and the checker answer must not move when the
model's code is reorganised (designs as modules, named state, the checker contract).

Pinned (tests/check/pinned/*.json, written by ``python -m tests.check.test_pinned``):
- ``faultline check`` on check-standard (default and conformance parameters) and on
  check-large (slow): per design x policy cell the verdict of every property, the number
  of distinct states and of transitions, and the action names of each counterexample
  (standard only);
- every shipped scenario x design x policy, simulated (round-robin and seed 7, default
  and conformance parameters): the outcome's JSON without paths, and a digest of its
  event log (kinds, fields and order).

Regenerate only for an intended change of behaviour, and say which in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from faultline.conform import MODEL_PARAMS
from faultline.scenario import DESIGNS, POLICIES, load

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
PINNED = Path(__file__).resolve().parent / "pinned"
# Pinned: faultline-vmm, the model as it was before the profiles (docs/linux-qemu.md).
PARAMS: dict[str, dict[str, Any]] = {"default": {"profile": "faultline-vmm"},
                                     "conform": MODEL_PARAMS}


def check_pins(name: str, params: str, traces: bool) -> dict[str, Any]:
    from faultline.check.properties import check_system
    from faultline.model import System

    sc = load(SCENARIOS / f"{name}.toml")
    out: dict[str, Any] = {}
    for d in DESIGNS:
        for p in POLICIES:
            # As `faultline check` runs a cell (check.matrix.check_cell): symmetry on.
            r = check_system(System(sc, d, p, symmetry=True, **PARAMS[params]))
            cell: dict[str, Any] = {"states": r.states, "transitions": r.transitions,
                                    "complete": r.complete,
                                    "holds": {n: x.holds for n, x in r.properties.items()}}
            if traces:
                cell["traces"] = {n: [st["action"] for st in x.counterexample]
                                  for n, x in r.properties.items() if x.counterexample}
            out[f"{d} {p}"] = cell
    return out


def _digest(events: list[dict[str, Any]]) -> str:
    clean = [{k: v for k, v in e.items() if k != "path"} for e in events]  # a tmp dir
    text = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def simulate_pins() -> dict[str, Any]:
    from faultline.model import simulate

    out: dict[str, Any] = {}
    for path in sorted(SCENARIOS.rglob("*.toml")):
        sc = load(path)
        for d in DESIGNS:
            for p in POLICIES:
                for pname, params in PARAMS.items():
                    for seed in (None, 7):
                        o = simulate(sc, d, p, seed=seed, **params)
                        j = o.to_json()
                        for k in ("events_path", "scenario", "backend", "design", "policy"):
                            j.pop(k)  # paths, and what the key already says
                        for f in j["faults"]:
                            f.pop("path", None)
                        j["events"] = _digest(o.events)  # type: ignore[attr-defined]
                        key = f"{path.stem} {d} {p} {pname} {seed}"
                        # Readable for the round-robin run with default parameters; a
                        # digest of the same for the other variants (small file).
                        out[key] = j if (pname, seed) == ("default", None) else _digest([j])
    return out


def _pinned(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PINNED / f"{name}.json").read_text())
    return data


def _compare(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if got[k] != want[k]]
    assert not bad, f"{len(bad)} changed, first {bad[0]}: {got[bad[0]]} != {want[bad[0]]}"


@pytest.mark.parametrize("params", sorted(PARAMS))
def test_standard_matrix_is_pinned(params: str) -> None:
    _compare(check_pins("check-standard", params, True), _pinned(f"standard-{params}"))


def test_simulated_outcomes_are_pinned() -> None:
    _compare(simulate_pins(), _pinned("simulate"))


@pytest.mark.slow
def test_large_matrix_is_pinned() -> None:
    _compare(check_pins("check-large", "default", False), _pinned("large"))


def _write() -> None:
    PINNED.mkdir(exist_ok=True)
    todo: dict[str, Any] = {
        "standard-default": lambda: check_pins("check-standard", "default", True),
        "standard-conform": lambda: check_pins("check-standard", "conform", True),
        "simulate": simulate_pins,
        "large": lambda: check_pins("check-large", "default", False),
    }
    for name in sys.argv[1:] or todo:
        data = todo[name]()
        # One line per entry: small files, readable diffs.
        lines = [f"{json.dumps(k)}: {json.dumps(data[k], sort_keys=True)}" for k in sorted(data)]
        (PINNED / f"{name}.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    _write()
