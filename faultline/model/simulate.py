"""One traced run of the model: the same Outcome and event log as the real backend.

Schedule: round-robin over actors (vcpu0.., async0.., vmm) by default; with ``seed``, a
seeded random choice among the enabled actions. Livelock: with round-robin, a revisited
(state, schedule position) repeats forever; with a seed, a state revisited
``livelock_visits`` times counts as a livelock. Either way the unfinished tasks are
``hung``, the VM is ``hung``, and the repeating cycle of actions is written once to the
log (event ``livelock``). A state with no enabled action that is not done is a deadlock
(``hung`` too).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from faultline import abi
from faultline.model.state import S_TASKS, T_RESULT, T_STATUS, TS_EXITED, TS_KILLED, TS_SIGBUS
from faultline.model.system import System
from faultline.outcome import EventLog, FaultRecord, Outcome, Signal, TaskOutcome
from faultline.scenario import Scenario

DEFAULT_MAX_STEPS = 100_000


def simulate(scenario: Scenario, design: str, policy: str, *, seed: int | None = None,
             events_path: str | Path | None = None, max_steps: int = DEFAULT_MAX_STEPS,
             livelock_visits: int = 20, log: EventLog | None = None,
             schedule: list[str] | None = None, **params: Any) -> Outcome:
    """One deterministic schedule (round-robin, or seeded random) of the model. The event
    log is `log` if given (the caller closes it), else a new one at `events_path`.
    `schedule` (action names, e.g. a checker counterexample) is followed first, step by
    step; a step whose action is not enabled raises ReplayError. The default schedule then
    finishes the run."""
    system = System(scenario, design, policy, **params)
    own_log = log is None
    if log is None:
        log = EventLog(events_path, clock="step")
    outcome = Outcome(scenario.name, "model", design, policy, events_path=log.path)
    try:
        _run(system, log, outcome, seed, max_steps, livelock_visits, schedule or [])
    finally:
        system._ev = None
        if own_log:
            log.close()
    outcome.events = log.events  # type: ignore[attr-defined]
    return outcome


class ReplayError(Exception):
    """A replayed trace names an action that is not enabled at that step."""


def _run(system: System, log: EventLog, outcome: Outcome, seed: int | None, max_steps: int,
         livelock_visits: int, schedule: list[str]) -> None:
    sc = system.sc
    actors = ([f"vcpu{v}" for v in range(sc.vcpus)] + [f"async{v}" for v in range(sc.vcpus)]
              + ["vmm"])
    actor_pos = {a: i for i, a in enumerate(actors)}
    rng = random.Random(seed) if seed is not None else None
    ptr = 0
    records: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        ev = log.emit(kind, **fields)
        if kind == "kvm_exit":
            outcome.count_exit("memory_fault")
        elif kind == "vmm_resolve":
            records.append(ev)

    log.emit("model_start", design=system.design, policy=system.policy,
             params=dict(system.params))
    system._ev = emit
    state = system.init()
    system._ev = None
    seen: dict[Any, int] = {}
    visits: dict[Any, int] = {}
    history: list[str] = []
    vm = None
    while True:
        if system.is_done(state):
            vm = "aborted" if system.vm_aborted(state) else "completed"
            break
        if log.step >= max_steps:
            vm = "hung"
            outcome.reason = f"no end after {max_steps} steps"
            log.emit("step_limit", steps=max_steps)
            break
        if len(history) < len(schedule):
            want = schedule[len(history)]
            en = system.enabled(state)
            hit = next((item for item in en if item[0] == want), None)
            if hit is None:
                shown = ", ".join(item[0] or "" for item in en) or "none"
                raise ReplayError(f"trace step {len(history) + 1}: action {want!r} is not "
                                  f"enabled (enabled: {shown})")
            log.step += 1
            history.append(want)
            system._ev = emit
            state = hit[2](state, *hit[3])
            system._ev = None
            if len(history) == len(schedule):
                log.emit("replay_end", steps=len(schedule))
            continue
        key = (state, ptr) if rng is None else state
        if rng is None:
            if key in seen:
                _livelock(log, outcome, history[seen[key]:])
                vm = "hung"
                break
            seen[key] = len(history)
        else:
            n = visits.get(key, 0) + 1
            visits[key] = n
            if n >= livelock_visits:
                start = seen.get(key, len(history))
                _livelock(log, outcome, history[start:])
                vm = "hung"
                break
            seen[key] = len(history)
        en = system.enabled(state)
        if not en:
            vm = "hung"
            outcome.reason = "deadlock: no enabled action"
            log.emit("deadlock")
            break
        if rng is None:
            best = None
            for item in en:
                d = (actor_pos[item[1]] - ptr) % len(actors)
                if best is None or d < best[0]:
                    best = (d, item)
            assert best is not None
            name, actor, fn, args = best[1]
            ptr = (actor_pos[actor] + 1) % len(actors)
        else:
            name, actor, fn, args = en[rng.randrange(len(en))]
        log.step += 1
        history.append(name or "")
        system._ev = emit
        state = fn(state, *args)
        system._ev = None
    outcome.vm = vm
    _fill(system, state, outcome, records)
    log.emit("model_end", vm=vm, reason=outcome.reason)


def _livelock(log: EventLog, outcome: Outcome, cycle: list[str]) -> None:
    outcome.reason = f"livelock: a cycle of {len(cycle)} actions repeats with no progress"
    log.emit("livelock", length=len(cycle), cycle=cycle)


def _fill(system: System, state: tuple, outcome: Outcome, records: list[dict[str, Any]]) -> None:
    for t, name in enumerate(system.names):
        tk = state[S_TASKS][t]
        st = tk[T_STATUS]
        if st == TS_EXITED:
            outcome.tasks[name] = TaskOutcome("exited", tk[T_RESULT])
        elif st == TS_SIGBUS:
            code, vaddr = tk[T_RESULT]
            outcome.tasks[name] = TaskOutcome(
                "sigbus", None, Signal(abi.SI_CODES.get((abi.SIGBUS, code), str(code)), vaddr))
        elif st == TS_KILLED:
            outcome.tasks[name] = TaskOutcome("killed")
        elif system.vm_aborted(state):
            outcome.tasks[name] = TaskOutcome("killed")  # stopped with the VM
        else:
            outcome.tasks[name] = TaskOutcome("hung")
    outcome.offlined = system.offlined_gpas(state)
    outcome.exits.setdefault("memory_fault", 0)
    if system.vm_aborted(state):
        outcome.reason = state[5][0]
    for ev in records:
        outcome.faults.append(FaultRecord(int(ev["gpa"], 16), None, ev["path"], ev["offset"],
                                          ev["file_size"], ev["cause"], ev["source"]))
    n = system.bad_reads(state)
    if n:
        outcome.bad_values.append(f"{n} access(es) completed from a page beyond EOF, a hole or "
                                  "a poisoned page")
