"""Conformance: the same scenario on the real backend and on the model must end the same.

The real backend (``kvm``) runs this host's KVM, which never does async page faults (the
VMM has no in-kernel LAPIC) and reports a failed guest access synchronously. The model
matching it is design ``memory-fault-exit`` with the guest's APF off (``vm.apf = false``,
and no async PF without PV either) and holes failing like EOF (the real VMM catches holes
with userfaultfd). :func:`compare_pair` runs both for one policy and compares, field by
field, what both backends can know the same way:

- ``vm``: completed | aborted | hung | panic | reset, word for word (the kvm backend says
  ``panic`` on its guest's panic report and ``reset`` on a triple fault, as the model does);
- per task: fate, exit code, signal code and signal vaddr;
- the offlined pages;
- the number of memory-fault exits to userspace (other exit kinds are backend
  specific: I/O exits for reports, HLT, ...);
- the fault records, as a multiset of (gpa, path relative to the run directory, offset
  in the file, file size, cause). Exact to the byte: the real VMM decodes the faulting
  instruction, and so does the model's VMM (``vmm_exact_gpa``). ``hva`` (an address in
  one process) and ``source`` (how the fault reached userspace: mmio, bare-efault,
  memory-fault-exit ...) are not compared: they describe the host, not the outcome.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultline.outcome import EventLog, FaultRecord, Outcome
from faultline.scenario import Scenario, load

MODEL_DESIGN = "memory-fault-exit"
# The model's parameters that make it the real backend of this host (see the module doc).
# The profile is faultline-vmm: what the kvm backend is (docs/linux-qemu.md).
MODEL_PARAMS: dict[str, Any] = {"profile": "faultline-vmm", "async_without_pv": False,
                                "uffd_sigbus_holes": True, "vmm_exact_gpa": True,
                                "proactive_sync": True, "notify_one_vcpu": True}
# With several vCPUs the real vCPUs run in parallel: the kvm outcome is one interleaving.
# It conforms if the model reaches it under some schedule: round-robin first, then these
# seeded random schedules.
SCHEDULE_SEEDS = 64
CORPUS = Path(__file__).resolve().parent.parent / "scenarios"


@dataclass(frozen=True, slots=True)
class Difference:
    field: str  # e.g. "tasks.toucher.signal.vaddr", "faults[0].cause"
    kvm: Any
    model: Any

    def line(self) -> str:
        return f"{self.field}: kvm {_show(self.kvm)} != model {_show(self.model)}"


@dataclass
class Comparison:
    """One scenario x policy on both backends."""

    scenario: str
    policy: str
    kvm: dict[str, Any] = field(default_factory=dict)  # normalised outcome views
    model: dict[str, Any] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    skipped: str = ""  # why the pair could not run (e.g. poison on this host)
    # Several vCPUs: the model schedule (seed) that reproduced the kvm outcome when the
    # round-robin one did not (None: round-robin matched, or nothing matched; -1: found
    # by exploring every schedule).
    schedule_seed: int | None = None
    events: dict[str, str] = field(default_factory=dict)  # backend -> event log path

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "policy": self.policy, "ok": self.ok,
                "skipped": self.skipped or None, "schedule_seed": self.schedule_seed,
                "kvm": self.kvm, "model": self.model,
                "differences": [{"field": d.field, "kvm": d.kvm, "model": d.model}
                                for d in self.differences],
                "events": self.events}


def _show(v: Any) -> str:
    return "-" if v is None else json.dumps(v) if not isinstance(v, str) else v


def model_scenario(sc: Scenario) -> Scenario:
    """The scenario as the model must run it to stand for this host: guest APF off."""
    return dataclasses.replace(sc, apf=False)


def corpus(root: Path = CORPUS) -> list[Path]:
    return sorted(root.glob("*.toml"))


# --- normalised views -------------------------------------------------------------------

def _fault_view(f: FaultRecord, run_dir: str | None) -> dict[str, Any]:
    path = f.path
    if path is not None and run_dir and os.path.isabs(path):
        path = os.path.relpath(path, run_dir)
    return {
        "gpa": hex(f.gpa),
        "path": path,
        "offset": None if f.offset is None else hex(f.offset),
        "file_size": None if f.file_size is None else hex(f.file_size),
        "cause": f.cause,
    }


def view(outcome: Outcome, run_dir: str | None = None) -> dict[str, Any]:
    """What conformance compares, as plain JSON-able data (hex strings for addresses)."""
    tasks = {}
    for name, t in sorted(outcome.tasks.items()):
        tasks[name] = {
            "fate": t.fate,
            "code": t.code,
            "signal": t.signal.code if t.signal else None,
            "vaddr": hex(t.signal.vaddr) if t.signal and t.signal.vaddr is not None else None,
        }
    faults = sorted((_fault_view(f, run_dir) for f in outcome.faults),
                    key=lambda d: json.dumps(d, sort_keys=True))
    return {
        "vm": outcome.vm,
        "tasks": tasks,
        "offlined": [hex(g) for g in sorted(outcome.offlined)],
        "memory_fault_exits": outcome.exits.get("memory_fault", 0),
        "faults": faults,
    }


def diff(kvm: dict[str, Any], model: dict[str, Any]) -> list[Difference]:
    """Every field where the two views differ, with a dotted path."""
    out: list[Difference] = []
    for key in ("vm", "offlined", "memory_fault_exits"):
        if kvm[key] != model[key]:
            out.append(Difference(key, kvm[key], model[key]))
    for name in sorted(set(kvm["tasks"]) | set(model["tasks"])):
        a, b = kvm["tasks"].get(name), model["tasks"].get(name)
        if a is None or b is None:
            out.append(Difference(f"tasks.{name}", a, b))
            continue
        for k in ("fate", "code", "signal", "vaddr"):
            if a[k] != b[k]:
                out.append(Difference(f"tasks.{name}.{k}", a[k], b[k]))
    fa, fb = kvm["faults"], model["faults"]
    if len(fa) != len(fb):
        out.append(Difference("faults.count", len(fa), len(fb)))
    # Pair records by page first so one extra record does not shift every later one.
    rest_b = list(fb)
    unpaired_a = []
    for ra in fa:
        match = next((rb for rb in rest_b if rb["gpa"] == ra["gpa"]), None)
        if match is None:
            unpaired_a.append(ra)
            continue
        rest_b.remove(match)
        for k in ("path", "offset", "file_size", "cause"):
            if ra[k] != match[k]:
                out.append(Difference(f"faults[{ra['gpa']}].{k}", ra[k], match[k]))
    for ra in unpaired_a:
        out.append(Difference(f"faults[{ra['gpa']}]", ra, None))
    for rb in rest_b:
        out.append(Difference(f"faults[{rb['gpa']}]", None, rb))
    return out


# --- running ----------------------------------------------------------------------------

def _run_dir(log: EventLog) -> str | None:
    for ev in log.events:
        if ev.get("kind") == "vm_create":
            return str(ev.get("run_dir"))
    return None


def model_params(profile: str = "faultline-vmm",
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's parameters for a comparison under `profile`: MODEL_PARAMS, except that
    under another profile the kernel's own setting replaces the host's async_without_pv
    (linux-qemu: async faults without PV, docs/linux-qemu.md difference 1). ``extra``:
    more (conform --cpu: the linux-qemu guest CPU's)."""
    params = {**MODEL_PARAMS, "profile": profile, **(extra or {})}
    if profile != "faultline-vmm":
        del params["async_without_pv"]
    return params


def compare_pair(sc: Scenario, policy: str, *, events_dir: Path | None = None,
                 watchdog_s: float = 10.0, profile: str = "faultline-vmm",
                 params: dict[str, Any] | None = None) -> Comparison:
    """Run `sc` under `policy` on kvm and on the model (under `profile`, with the model
    parameters `params` on top) and compare the outcomes."""
    params = model_params(profile, params)
    from faultline.model.simulate import simulate
    from faultline.vmm.runner import BackendError, run_kvm

    cmp = Comparison(sc.name, policy)
    paths: dict[str, Path | None] = {"kvm": None, "model": None}
    if events_dir is not None:
        events_dir.mkdir(parents=True, exist_ok=True)
        for b in paths:
            paths[b] = events_dir / f"conform-{sc.name}-{b}-{policy}.jsonl"
            cmp.events[b] = str(paths[b])
    klog = EventLog(paths["kvm"], clock="us")
    try:
        kout = run_kvm(sc, policy, log=klog, watchdog_s=watchdog_s)
    except BackendError as e:
        cmp.skipped = str(e)
        return cmp
    finally:
        klog.close()
    msc = model_scenario(sc)
    mout = simulate(msc, MODEL_DESIGN, policy, events_path=paths["model"], **params)
    cmp.kvm = view(kout, _run_dir(klog))
    cmp.model = view(mout)
    cmp.differences = diff(cmp.kvm, cmp.model)
    if cmp.differences and sc.vcpus > 1:
        for seed in range(SCHEDULE_SEEDS):
            alt = view(simulate(msc, MODEL_DESIGN, policy, seed=seed, **params))
            if not diff(cmp.kvm, alt):
                cmp.model, cmp.differences, cmp.schedule_seed = alt, [], seed
                if paths["model"] is not None:  # keep the log of the schedule that matched
                    simulate(msc, MODEL_DESIGN, policy, seed=seed,
                             events_path=paths["model"], **params)
                break
        else:
            found = _exhaustive_match(msc, policy, cmp.kvm, params)
            if found is not None:
                cmp.model, names = found
                cmp.differences, cmp.schedule_seed = [], -1
                if paths["model"] is not None:
                    simulate(msc, MODEL_DESIGN, policy, schedule=names,
                             events_path=paths["model"], **params)
    return cmp


EXHAUSTIVE_MAX_STATES = 200_000


def _exhaustive_match(msc: Scenario, policy: str, kvm: dict[str, Any],
                      params: dict[str, Any]) -> tuple[dict[str, Any], list[str]] | None:
    """Seeded schedules are a sample; real vCPUs under load can interleave in a way none of
    them hit. So explore every schedule (the checker's BFS) and try each distinct final
    state: replay the shortest path to it through the simulator and compare the full
    outcome. A match means the kvm outcome is one the model allows."""
    from faultline.check.explorer import explore
    from faultline.model.simulate import simulate
    from faultline.model.system import System

    system = System(msc, MODEL_DESIGN, policy, **params)
    g = explore(system, max_states=EXHAUSTIVE_MAX_STATES, timeout_s=60)
    for sid, state in enumerate(g.states):
        if not system.is_done(state):
            continue
        path = g.path_to(sid)
        names: list[str] = []
        for a, b in itertools.pairwise(path):
            nxt = g.states[b]
            names.append(next(n for n, t in system.actions(g.states[a]) if t == nxt))
        alt = view(simulate(msc, MODEL_DESIGN, policy, schedule=names, **params))
        if not diff(kvm, alt):
            return alt, names
    return None


def conform(scenarios: Iterable[Scenario], *, policies: Sequence[str] | None = None,
            events_dir: Path | None = None, profile: str = "faultline-vmm",
            params: dict[str, Any] | None = None) -> list[Comparison]:
    """Every scenario under every policy it lists (or `policies`)."""
    out = []
    for sc in scenarios:
        for policy in policies or sc.policies:
            out.append(compare_pair(sc, policy, events_dir=events_dir, profile=profile,
                                    params=params))
    return out


@dataclass
class ConformRun:
    results: list[Comparison]
    total: int  # pairs asked for
    interrupted: bool = False


def conform_interruptible(scenarios: Sequence[Scenario], *,
                          policies: Sequence[str] | None = None,
                          events_dir: Path | None = None,
                          progress: bool = False, profile: str = "faultline-vmm",
                          params: dict[str, Any] | None = None) -> ConformRun:
    """As :func:`conform`, but Ctrl-C (or SIGTERM) stops it at once and keeps the pairs
    compared so far; ``progress`` shows a progress bar on stderr (for a terminal)."""
    from faultline.vmm.runner import Interrupted

    pairs = [(sc, p) for sc in scenarios for p in (policies or sc.policies)]
    run = ConformRun([], len(pairs))
    bar: Any = None
    if progress:
        from faultline.timeline import make_progress

        bar = make_progress()
        bar.start()
        task = bar.add_task("conform", total=len(pairs))
    try:
        for sc, policy in pairs:
            if bar is not None:
                bar.update(task, description=f"{sc.name} [{policy}]")
            run.results.append(compare_pair(sc, policy, events_dir=events_dir,
                                            profile=profile, params=params))
            if bar is not None:
                bar.advance(task)
    except (KeyboardInterrupt, Interrupted):
        run.interrupted = True
    finally:
        if bar is not None:
            bar.stop()
    return run


def load_all(paths: Sequence[str | Path]) -> list[Scenario]:
    return [load(p) for p in (paths or corpus())]


# --- presentation -----------------------------------------------------------------------

def _tasks_cell(v: dict[str, Any]) -> str:
    parts = []
    for name, t in v["tasks"].items():
        if t["fate"] == "exited":
            parts.append(f"{name}:exit {t['code']}")
        elif t["fate"] == "sigbus":
            parts.append(f"{name}:{t['signal']}@{t['vaddr']}")
        else:
            parts.append(f"{name}:{t['fate']}")
    return " ".join(parts)


def render(comparisons: Sequence[Comparison], console: Any = None,
           profile: str = "faultline-vmm") -> None:
    """A table (one row per scenario x policy) and, below it, every difference."""
    from rich.table import Table

    from faultline.timeline import make_console

    con = console or make_console()  # a log or a pipe: the table is not folded to 80
    table = Table(title="faultline conform: kvm (this host) vs model (memory-fault-exit, "
                        f"APF off, profile {profile})", show_lines=False)
    for col in ("scenario", "policy", "vm", "tasks", "offlined", "exits", "faults", "result"):
        table.add_column(col, overflow="fold", min_width=34 if col == "tasks" else None)
    for c in comparisons:
        if c.skipped:
            table.add_row(c.scenario, c.policy, "", "", "", "", "", "[yellow]skipped[/]")
            continue
        k = c.kvm
        vm = k["vm"] if k["vm"] == c.model["vm"] else f"{k['vm']} / {c.model['vm']}"
        faults = ", ".join(f"{f['gpa']} {f['cause']}" for f in k["faults"]) or "-"
        result = "[green]same[/]" if c.ok else f"[bold red]{len(c.differences)} diff[/]"
        if c.schedule_seed is not None:
            result += (" (exhaustive)" if c.schedule_seed < 0
                       else f" (seed {c.schedule_seed})")
        table.add_row(c.scenario, c.policy, vm, _tasks_cell(k),
                      ", ".join(k["offlined"]) or "-", str(k["memory_fault_exits"]), faults,
                      result)
    con.print(table)
    for c in comparisons:
        if c.skipped:
            con.print(f"{c.scenario} [{c.policy}]: skipped: {c.skipped}")
        for d in c.differences:
            con.print(f"{c.scenario} [{c.policy}]: {d.line()}", style="red", markup=False)
    same = sum(c.ok and not c.skipped for c in comparisons)
    diffs = sum(not c.ok for c in comparisons)
    skipped = sum(bool(c.skipped) for c in comparisons)
    con.print(f"{same} same, {diffs} different, {skipped} skipped "
              f"({len(comparisons)} scenario x policy pairs)")


def dumps(comparisons: Sequence[Comparison]) -> str:
    return json.dumps([c.to_json() for c in comparisons], indent=2)
