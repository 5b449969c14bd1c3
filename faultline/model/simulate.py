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

from faultline.model.design import Design
from faultline.model.state import TS_EXITED, TS_KILLED, TS_SIGBUS, TS_SIGSEGV, State
from faultline.model.system import System
from faultline.outcome import (
    EventLog,
    FaultRecord,
    Outcome,
    Signal,
    TaskOutcome,
    unfinished_fate,
)
from faultline.scenario import Scenario

DEFAULT_MAX_STEPS = 100_000


def simulate(scenario: Scenario, design: str | Design, policy: str, *, seed: int | None = None,
             events_path: str | Path | None = None, max_steps: int = DEFAULT_MAX_STEPS,
             livelock_visits: int = 20, log: EventLog | None = None,
             schedule: list[str] | None = None, **params: Any) -> Outcome:
    """One deterministic schedule (round-robin, or seeded random) of the model. The event
    log is `log` if given (the caller closes it), else a new one at `events_path`.
    `schedule` (action names, e.g. a checker counterexample) is followed first, step by
    step; a step whose action is not enabled raises ReplayError. The default schedule then
    finishes the run."""
    own_log = log is None
    if log is None:
        log = EventLog(events_path, clock="step")
    try:
        sink = _Recorder(log)
        system = System(scenario, design, policy, sink=sink, **params)
        outcome = Outcome(scenario.name, "model", system.design, policy, events_path=log.path,
                          profile=system.profile)
        sink.outcome = outcome
        _run(system, log, outcome, seed, max_steps, livelock_visits, schedule or [], sink)
    finally:
        if own_log:
            log.close()
    outcome.events = log.events  # type: ignore[attr-defined]
    return outcome


class ReplayError(Exception):
    """A replayed trace names an action that is not enabled at that step."""


class _Recorder:
    """The model's event sink here: the run's log, plus what the outcome needs from the
    events (memory-fault exits, the VMM's fault records)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.outcome: Outcome | None = None
        self.records: list[dict[str, Any]] = []

    def emit(self, kind: str, *, vcpu: int | None = None, task: str | None = None,
             **fields: Any) -> None:
        ev = self.log.emit(kind, vcpu=vcpu, task=task, **fields)
        if kind == "kvm_exit" and self.outcome is not None:
            self.outcome.count_exit(fields.get("exit", "memory_fault"))
        elif kind == "vmm_resolve":
            self.records.append(ev)


def _run(system: System, log: EventLog, outcome: Outcome, seed: int | None, max_steps: int,
         livelock_visits: int, schedule: list[str], sink: _Recorder) -> None:
    sc = system.sc
    actors = ([f"vcpu{v}" for v in range(sc.vcpus)] + [f"async{v}" for v in range(sc.vcpus)]
              + ["vmm", "kworker"])
    actor_pos = {a: i for i, a in enumerate(actors)}
    rng = random.Random(seed) if seed is not None else None
    ptr = 0
    # The guest CPU's machine-check set-up next to the profile, when it is not the default.
    extra: dict[str, Any] = {}
    if system.params.cpu_label():
        extra["guest_cpu"] = system.params.cpu_label()
    log.emit("model_start", profile=system.profile, design=system.design, policy=system.policy,
             params=system.params.as_dict(), **extra)
    state = system.init()
    seen: dict[Any, int] = {}
    visits: dict[Any, int] = {}
    history: list[str] = []
    vm = None
    # Under a profile whose guest takes timer interrupts during an artificial halt
    # (linux-qemu), host I/O is slower than the guest's tick: the round-robin schedule
    # gives each async work item one round of latency before its worker runs, so the
    # timer's effect shows in a simulation too (the checker explores every order).
    slow_io = system.timer_ends_halt
    passed: set[Any] = set()  # async work classes the schedule has passed over once
    while True:
        if system.is_done(state):
            vm = system.vm_end(state) if system.vm_aborted(state) else "completed"
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
            state = hit[2](state, *hit[3])
            if len(history) == len(schedule):
                log.emit("replay_end", steps=len(schedule))
            continue
        en = system.enabled(state)
        if slow_io:
            passed &= {item[1] for item in en if _actor(item[1]).startswith("async")}
        key = (state, ptr, frozenset(passed)) if rng is None else state
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
        if not en:
            vm = "hung"
            outcome.reason = "deadlock: no enabled action"
            log.emit("deadlock")
            break
        if rng is None:
            order = sorted(en, key=lambda item: (actor_pos[_actor(item[1])] - ptr) % len(actors))
            pick = order[0]
            if slow_io:
                # An async worker whose turn comes for the first time waits one round.
                for item in order:
                    if not _actor(item[1]).startswith("async") or item[1] in passed:
                        pick = item
                        break
                    passed.add(item[1])
            name, cls, fn, args = pick
            ptr = (actor_pos[_actor(cls)] + 1) % len(actors)
        else:
            name, _cls, fn, args = en[rng.randrange(len(en))]
        log.step += 1
        history.append(name or "")
        state = fn(state, *args)
    outcome.vm = vm
    _fill(system, state, outcome, sink.records)
    log.emit("model_end", vm=vm, reason=outcome.reason)


def _actor(cls: Any) -> str:
    """The actor of a fairness class: "vcpuN", or the first item of a tuple class
    (("asyncN", token, gfn), ("vmm", action, target))."""
    return cls if isinstance(cls, str) else str(cls[0])


def _livelock(log: EventLog, outcome: Outcome, cycle: list[str]) -> None:
    outcome.reason = f"livelock: a cycle of {len(cycle)} actions repeats with no progress"
    log.emit("livelock", length=len(cycle), cycle=cycle)


def _fill(system: System, state: State, outcome: Outcome, records: list[dict[str, Any]]
          ) -> None:
    for t, name in enumerate(system.names):
        tk = state.tasks[t]
        st = tk.status
        if st == TS_EXITED:
            outcome.tasks[name] = TaskOutcome("exited", tk.result)
        elif st in (TS_SIGBUS, TS_SIGSEGV):
            fate, code, vaddr = system.task_fate(state, t)
            outcome.tasks[name] = TaskOutcome(fate, None, Signal(code, vaddr))
        elif st == TS_KILLED:
            outcome.tasks[name] = TaskOutcome("killed")
        elif system.vm_aborted(state):
            outcome.tasks[name] = TaskOutcome(unfinished_fate(outcome.vm))
        else:
            outcome.tasks[name] = TaskOutcome("hung")
    outcome.offlined = system.offlined_gpas(state)
    outcome.exits.setdefault("memory_fault", 0)
    if system.vm_aborted(state):
        outcome.reason = state.vmm.abort
    for ev in records:
        outcome.faults.append(FaultRecord(int(ev["gpa"], 16), None, ev["path"], ev["offset"],
                                          ev["file_size"], ev["cause"], ev["source"]))
    n = system.bad_reads(state)
    if n:
        outcome.bad_values.append(f"{n} access(es) completed from a page beyond EOF, a hole or "
                                  "a poisoned page")
