"""``bench_check(workers)``: distinct states/s of the explorer on one core, and the wall
time of the standard matrix; ``compare_trees(other)`` (``python -m faultline.check.bench
--against TREE``): check-large's states per CPU second against another checkout, as a
ratio. Measured, never asserted."""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

from faultline.check.matrix import check_matrix
from faultline.check.properties import check_system
from faultline.scenario import PROFILES, load

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


# Run in a child per tree: check-large on one worker, exploration timed in CPU seconds of
# the process (time.process_time: on a shared machine, wall time measures the others).
_CHILD = ("import json, time; time.perf_counter = time.process_time; "
          "from faultline.check.matrix import check_matrix; "
          "r = check_matrix([{path!r}], workers=1, profiles=[{profile!r}]); "
          "print(json.dumps([r['states_per_second'], sum(c['states'] for c in r['cells'])]))")


def compare_trees(other: str | Path, rounds: int = 2,
                  scenario: str = "scenarios/check-large.toml",
                  profile: str | None = None) -> dict[str, Any]:
    """states/s of exploration per CPU second, this tree against ``other`` (a checkout of
    another revision, e.g. ``git worktree add /tmp/old REV``), alternately, ``rounds``
    times each, in one command: the ratio is what to read. ``profile``: the model's
    (None: the scenario's own, else the default)."""
    import subprocess
    import sys

    here = Path(__file__).resolve().parents[2]
    trees = {"other": Path(other).resolve(), "this": here}
    runs: dict[str, list[list[int]]] = {k: [] for k in trees}
    for _ in range(rounds):
        for k, d in trees.items():
            out = subprocess.run([sys.executable, "-c",
                                  _CHILD.format(path=scenario, profile=profile)],
                                 cwd=d, env={"PYTHONPATH": str(d)}, capture_output=True,
                                 text=True, check=True).stdout
            runs[k].append(json.loads(out))
    rate = {k: sum(r[0] for r in v) / len(v) for k, v in runs.items()}
    return {"scenario": scenario, "profile": profile, "runs": runs, "states": runs["this"][0][1],
            "other_states_per_cpu_second": round(rate["other"]),
            "this_states_per_cpu_second": round(rate["this"]),
            "ratio_this_over_other": round(rate["this"] / rate["other"], 3)}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="checker throughput")
    ap.add_argument("workers", nargs="?", type=int, default=2)
    ap.add_argument("--against", metavar="TREE",
                    help="compare check-large with another checkout, alternately")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", choices=PROFILES, help="with --against: the model's profile")
    a = ap.parse_args()
    if a.against:
        print(json.dumps(compare_trees(a.against, a.rounds, profile=a.profile), indent=1))
    else:
        res = bench_check(a.workers, profile=True)
        prof_text = res.pop("profile", "")
        print(json.dumps(res, indent=1))
        print(prof_text)
