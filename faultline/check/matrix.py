"""The design x policy matrix: one exhaustive check per cell, cells in parallel processes.

JSON shape::

    {"cells": [{"design", "policy", "scenario", "states", "transitions", "seconds",
                "complete", "properties": {name: {"holds": true|false|null,
                                                  "counterexample": [...]}}}],
     "states_per_second": N}

``states_per_second`` is distinct states per second of one core: all cells' states over
all cells' exploration time (not wall time), so it does not depend on ``workers``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from faultline.scenario import DESIGNS, POLICIES, load

MATRIX_DESIGNS = DESIGNS
MATRIX_POLICIES = POLICIES


def check_cell(scenario_path: str, design: str, policy: str, max_states: int = 5_000_000,
               timeout_s: float | None = None) -> dict[str, Any]:
    """One cell, in whatever process runs it (picklable arguments, JSON-able result)."""
    from faultline.check.properties import check_system
    from faultline.model import System

    sc = load(scenario_path)
    # Symmetry reduction on (a no-op unless the scenario has interchangeable tasks: see
    # System._symmetry_groups); a counterexample then replays with canonical=True.
    r = check_system(System(sc, design, policy, symmetry=True), max_states=max_states,
                     timeout_s=timeout_s)
    cell: dict[str, Any] = {"design": design, "policy": policy, "scenario": sc.name}
    cell.update(r.to_json())
    cell["explore_seconds"] = round(r.explore_seconds, 3)
    return cell


def check_matrix(scenario_paths: Sequence[str | Path], designs: Sequence[str] | None = None,
                 policies: Sequence[str] | None = None, workers: int | None = None, *,
                 max_states: int = 5_000_000, timeout_s: float | None = None
                 ) -> dict[str, Any]:
    designs = list(designs or MATRIX_DESIGNS)
    policies = list(policies or MATRIX_POLICIES)
    jobs = [(str(p), d, pol) for p in scenario_paths for d in designs for pol in policies]
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    if workers == 1 or len(jobs) == 1:
        cells = [check_cell(p, d, pol, max_states, timeout_s) for p, d, pol in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as ex:
            futs = [ex.submit(check_cell, p, d, pol, max_states, timeout_s)
                    for p, d, pol in jobs]
            cells = [f.result() for f in futs]
    states = sum(c["states"] for c in cells)
    busy = sum(c["explore_seconds"] for c in cells)
    return {"cells": cells,
            "states_per_second": round(states / busy) if busy > 0 else None,
            "wall_seconds": round(time.perf_counter() - t0, 3),
            "workers": workers}


def failing(cell: dict[str, Any]) -> list[str]:
    return [n for n, p in cell["properties"].items() if p["holds"] is False]


def render(result: dict[str, Any], console: Any = None) -> None:
    """Rows = designs, columns = policies, one table per scenario; each cell lists its
    failing properties (green "ok" when all hold, yellow "?" for incomplete ones)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for c in result["cells"]:
        by_scenario.setdefault(c["scenario"], []).append(c)
    for name, cells in by_scenario.items():
        designs = list(dict.fromkeys(c["design"] for c in cells))
        policies = list(dict.fromkeys(c["policy"] for c in cells))
        table = Table(title=f"{name}: failing properties", show_lines=True)
        table.add_column("design \\ policy")
        for p in policies:
            table.add_column(p)
        at = {(c["design"], c["policy"]): c for c in cells}
        for d in designs:
            row = [d]
            for p in policies:
                c = at.get((d, p))
                if c is None:
                    row.append("")
                    continue
                bad = failing(c)
                unknown = [n for n, x in c["properties"].items() if x["holds"] is None]
                text = "\n".join(f"[red]{n}[/red]" for n in bad) or "[green]ok[/green]"
                if unknown:
                    text += "\n" + "\n".join(f"[yellow]? {n}[/yellow]" for n in unknown)
                text += f"\n[dim]{c['states']} states[/dim]"
                row.append(text)
            table.add_row(*row)
        console.print(table)
    console.print(f"{sum(c['states'] for c in result['cells'])} states in "
                  f"{len(result['cells'])} cells, {result['wall_seconds']} s wall on "
                  f"{result['workers']} workers, {result['states_per_second']} states/s "
                  f"per core")
