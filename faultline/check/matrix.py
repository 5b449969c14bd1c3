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

import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from faultline.model.designs import DesignError
from faultline.scenario import DESIGNS, POLICIES, load

MATRIX_DESIGNS = DESIGNS
MATRIX_POLICIES = POLICIES


def check_cell(scenario_path: str, design: str, policy: str, max_states: int = 5_000_000,
               timeout_s: float | None = None, profile: str | None = None,
               params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cell, in whatever process runs it (picklable arguments, JSON-able result).
    ``params``: model parameters for the cell (check --cpu: the guest CPU's, which are
    for the linux-qemu profile only, so a scenario pinned to faultline-vmm runs
    without them)."""
    from faultline.check.properties import check_system
    from faultline.model import System
    from faultline.model.params import DEFAULT_PROFILE

    sc = load(scenario_path)
    if (profile or sc.profile or DEFAULT_PROFILE) != "linux-qemu":
        params = None
    # Symmetry reduction on (a no-op unless the scenario has interchangeable tasks: see
    # System._symmetry_groups); a counterexample then replays with canonical=True.
    # `design`: a shipped design's name or a design file (.py), loaded in this process.
    system = System(sc, design, policy, symmetry=True, profile=profile, **(params or {}))
    r = check_system(system, max_states=max_states, timeout_s=timeout_s)
    cell: dict[str, Any] = {"design": system.design, "policy": policy, "scenario": sc.name,
                            "profile": system.profile}
    cpu = system.params.cpu_label()
    if cpu:
        cell["cpu"] = cpu
    cell.update(r.to_json())
    cell["explore_seconds"] = round(r.explore_seconds, 3)
    return cell


def _worker(conn: Connection) -> None:
    """A worker process: cells in, results (or the error) out, until told to stop.
    Interruption is the parent's: Ctrl-C reaches the whole process group, and the parent
    then kills the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("ok", check_cell(*job)))
        except DesignError as e:  # a design file's hook: the user's error, said as is
            conn.send(("design", str(e)))
        except Exception as e:  # the parent raises it: one line there, not a traceback here
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Workers:
    """A fixed set of forked worker processes, each fed one cell at a time over a pipe.
    (Not multiprocessing.Pool: a Ctrl-C that lands while Pool starts or terminates can
    leave it hung with a live worker; these are simply killed.)"""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.procs: list[tuple[Any, Connection]] = []
        self.conns: dict[Any, Connection] = {}  # as wait() hands them back
        # Blocked across fork, so a worker never runs the parent's handlers: it unblocks
        # once it ignores SIGINT. One that arrives meanwhile reaches the parent after.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for _ in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child,), daemon=True)
                p.start()
                child.close()
                self.procs.append((p, parent))
                self.conns[parent] = parent
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def run(self, jobs: list[tuple[Any, ...]], done: dict[int, dict[str, Any]],
            on_done: Any) -> None:
        """Fill ``done`` (job index -> cell) as cells finish: an interrupted run keeps what
        was finished."""
        busy: dict[Any, int] = {}  # connection -> job index
        todo = list(enumerate(jobs))
        idle = [conn for _, conn in self.procs]
        while todo or busy:
            while idle and todo:
                i, job = todo.pop(0)
                conn = idle.pop()
                conn.send(job)
                busy[conn] = i
            for ready in wait(list(busy), timeout=0.5):
                i = busy.pop(ready)
                conn = self.conns[ready]
                try:
                    status, value = conn.recv()
                except EOFError:
                    raise RuntimeError(f"check: the worker for cell {jobs[i][1:]} died") \
                        from None
                if status == "design":
                    raise DesignError(value)
                if status != "ok":
                    raise RuntimeError(f"check: cell {jobs[i][1:]}: {value}")
                done[i] = value
                idle.append(conn)
                on_done()

    def stop(self, *, kill: bool) -> None:
        for p, conn in self.procs:
            if kill:
                p.kill()
            else:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for p, conn in self.procs:
            p.join()
            conn.close()


def check_matrix(scenario_paths: Sequence[str | Path], designs: Sequence[str] | None = None,
                 policies: Sequence[str] | None = None, workers: int | None = None, *,
                 max_states: int = 5_000_000, timeout_s: float | None = None,
                 progress: bool = False, profiles: Sequence[str | None] | None = None,
                 params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every cell, in parallel processes. Ctrl-C (KeyboardInterrupt) stops at once: the
    workers are killed and the result holds the cells finished so far, with
    ``"interrupted": true``. ``profiles``: each scenario under each (None: the scenario's
    own ``[vm] profile``, else the model's default, linux-qemu). ``params``: model
    parameters for every linux-qemu cell (the guest CPU's: check --cpu)."""
    designs = list(designs or MATRIX_DESIGNS)
    policies = list(policies or MATRIX_POLICIES)
    jobs = [(str(p), d, pol, max_states, timeout_s, prof, params)
            for prof in (profiles or [None])
            for p in scenario_paths for d in designs for pol in policies]
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    done: dict[int, dict[str, Any]] = {}
    interrupted = False
    bar: Any = None
    pool: _Workers | None = None
    try:
        if workers > 1 and len(jobs) > 1:  # forked before the progress bar's thread starts
            pool = _Workers(min(workers, len(jobs)))
        if progress:
            from faultline.timeline import make_progress

            bar = make_progress()
            bar.start()
            task = bar.add_task("check", total=len(jobs))

        def advance() -> None:
            if bar is not None:
                bar.advance(task)

        if pool is None:
            for i, job in enumerate(jobs):
                done[i] = check_cell(*job)
                advance()
        else:
            pool.run(jobs, done, advance)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if pool is not None:
            pool.stop(kill=interrupted)
        if bar is not None:
            bar.stop()
    cells = [done[i] for i in sorted(done)]
    states = sum(c["states"] for c in cells)
    busy = sum(c["explore_seconds"] for c in cells)
    out: dict[str, Any] = {
        "cells": cells,
        "states_per_second": round(states / busy) if busy > 0 else None,
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "workers": workers}
    if interrupted:
        out["interrupted"] = True
        out["cells_total"] = len(jobs)
    return out


def failing(cell: dict[str, Any]) -> list[str]:
    return [n for n, p in cell["properties"].items() if p["holds"] is False]


def render(result: dict[str, Any], console: Any = None) -> None:
    """Rows = designs, columns = policies, one table per scenario and profile; each cell
    lists its failing properties (green "ok" when all hold; "incomplete" and a yellow "?"
    per property a bound left unproven)."""
    from rich.table import Table

    from faultline.timeline import make_console

    console = console or make_console()
    by_scenario: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in result["cells"]:
        # The guest CPU's set-up, when not the default, next to the profile's name.
        profile = c.get("profile", "") + (f", {c['cpu']}" if c.get("cpu") else "")
        by_scenario.setdefault((c["scenario"], profile), []).append(c)
    for (name, profile), cells in by_scenario.items():
        designs = list(dict.fromkeys(c["design"] for c in cells))
        policies = list(dict.fromkeys(c["policy"] for c in cells))
        table = Table(title=f"{name} ({profile}): failing properties", show_lines=True)
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
                # ok only when every property was proven: a bound leaves some unknown
                text = "\n".join(f"[red]{n}[/red]" for n in bad) or (
                    "[yellow]incomplete[/yellow]" if unknown else "[green]ok[/green]")
                if unknown:
                    text += "\n" + "\n".join(f"[yellow]? {n}[/yellow]" for n in unknown)
                text += f"\n[dim]{c['states']} states[/dim]"
                row.append(text)
            table.add_row(*row)
        console.print(table)
    n = len(result["cells"])
    rate = result["states_per_second"]
    console.print(f"{sum(c['states'] for c in result['cells'])} states in "
                  f"{n} cell{'' if n == 1 else 's'}, {result['wall_seconds']} s wall on "
                  f"{result['workers']} worker{'' if result['workers'] == 1 else 's'}"
                  + (f", {rate} states/s per core" if rate is not None else ""),
                  soft_wrap=True)
