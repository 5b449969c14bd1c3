"""check: states/s and total time of the model checker's standard matrix, from
faultline.check.bench.bench_check(workers) (written by the checker's author). If that is
not there, the benchmark reports itself unavailable instead of failing."""

from __future__ import annotations

import os
from typing import Any

from faultline.bench.common import Result


def run(workers: int | None = None) -> Result:
    workers = workers or os.cpu_count() or 1
    try:
        from faultline.check.bench import bench_check  # type: ignore[import-not-found]
    except ImportError as e:
        return Result("check", "states/s", None, None, 0,
                      {"available": False, "reason": f"faultline.check.bench: {e}"})
    d: dict[str, Any] = dict(bench_check(workers))
    rate = d.get("states_per_s")
    if rate is None and d.get("matrix_states") and d.get("matrix_wall_seconds"):
        rate = d["matrix_states"] / d["matrix_wall_seconds"]  # the whole matrix, all workers
    if rate is None:
        rate = d.get("explore_states_per_second")
    return Result("check", "states/s", float(rate) if rate is not None else None, None, 1,
                  {"available": True, "workers": workers,
                   "total_s": d.get("matrix_wall_seconds", d.get("total_s")), **d})
