"""``bench_check(workers)``: distinct states/s of the explorer on one core, and the wall
time of the standard matrix. Measured, never asserted (DESIGN.md §6)."""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

from faultline.check.matrix import check_matrix
from faultline.check.properties import check_system
from faultline.scenario import load

STANDARD = Path(__file__).resolve().parents[2] / "scenarios" / "check-standard.toml"


def bench_check(workers: int = 2, scenario: str | Path = STANDARD, *,
                design: str = "request", policy: str = "proactive",
                profile: bool = False) -> dict[str, Any]:
    """One cell on one core (states/s of exploration alone and with the analysis), then
    the whole design x policy matrix of ``scenario`` on ``workers`` processes."""
    from faultline.model import System

    sc = load(scenario)
    system = System(sc, design, policy)
    t0 = time.perf_counter()
    r = check_system(system)
    one = time.perf_counter() - t0
    out: dict[str, Any] = {
        "cell": f"{sc.name} {design} {policy}", "states": r.states,
        "transitions": r.transitions,
        "explore_states_per_second": round(r.states / r.explore_seconds),
        "check_states_per_second": round(r.states / one),
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        check_system(System(sc, design, policy))
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        out["profile"] = buf.getvalue()
    m = check_matrix([str(scenario)], workers=workers)
    out["matrix_cells"] = len(m["cells"])
    out["matrix_states"] = sum(c["states"] for c in m["cells"])
    out["matrix_wall_seconds"] = m["wall_seconds"]
    out["matrix_states_per_second_per_core"] = m["states_per_second"]
    out["workers"] = workers
    return out


if __name__ == "__main__":
    import json
    import sys

    res = bench_check(int(sys.argv[1]) if len(sys.argv) > 1 else 2, profile=True)
    prof_text = res.pop("profile", "")
    print(json.dumps(res, indent=1))
    print(prof_text)
