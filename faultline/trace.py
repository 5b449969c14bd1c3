"""Export a run's event log as a Chrome / Perfetto trace (JSON trace-event format).

Open the file in https://ui.perfetto.dev or chrome://tracing. One process ("VM"), with
tracks (threads):

- ``VMM`` (tid 1): fault resolution and policy decisions, as spans;
- ``host / KVM`` (tid 2): host changes to the backing files (instants) and, for the
  model, KVM's internal steps (async page faults, kvm_handle_error_pfn, ...);
- ``vCPU n`` (tid 10 + n): which task runs (spans), exits to userspace (spans until the
  VMM lets the vCPU go), injections (spans from injection to the guest's handler),
  offlining (instants);
- ``task NAME`` (tid 100 + index): one span per step, instants for SIGBUS and exits.

Flow arrows (``s`` / ``t`` / ``f``, one id per fault) link a fault to its exit, its
resolution, its injection and the resulting SIGBUS. Every flow point lies inside a span
of its track, so viewers bind it.

Both backends: kvm events carry ``t_us`` (wall microseconds), model events ``step``
(simulation steps; drawn STEP_US apart, events of one step 1 us apart in log order).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

STEP_US = 100
PID = 1
TID_VMM, TID_HOST = 1, 2
_VCPU_BASE, _TASK_BASE = 10, 100

# Events drawn on the host / KVM track (the model's KVM internals and host changes).
_HOST_PREFIXES = ("host_", "kvm_try_", "kvm_async_pf", "kvm_arch_async", "kvm_add_error",
                  "kvm_find_and_remove", "kvm_make_request", "kvm_apf", "kvm_handle_error_pfn")
# Events that record one host change to a backing file (kvm: host_event; the model: one
# kind per action): one per [[events]] entry that fired.
HOST_CHANGES = ("host_event", "host_truncate", "host_extend", "host_punch_hole",
                 "host_memory_failure", "host_write")
_INJECT = ("vmm_inject_mce", "vmm_notify", "vmm_inject_irq")
_GUEST_HANDLERS = ("guest_mce", "guest_notify")
_VMM_KINDS = ("vmm_resolve", "vmm_queue_mce", "vmm_inject_mce", "vmm_notify", "vmm_inject_irq",
              "vmm_ignore", "vmm_in_flight", "vmm_abort", "vm_abort", "vmm_mce_deferred",
              "vmm_notify_ring_full")
_STEP_END = ("task_step", "task_exit", "guest_signal", "guest_sigbus")


def _page(v: Any) -> int | None:
    if v is None:
        return None
    try:
        return (int(v, 16) if isinstance(v, str) else int(v)) & ~0xFFF
    except (TypeError, ValueError):
        return None


def _times(events: Sequence[dict[str, Any]]) -> list[int]:
    """Microsecond timestamps, strictly increasing within a model step."""
    out = []
    last_step, k = None, 0
    for ev in events:
        if "t_us" in ev:
            out.append(int(ev["t_us"]))
            continue
        step = int(ev.get("step", 0))
        k = k + 1 if step == last_step else 0
        last_step = step
        out.append(step * STEP_US + min(k, STEP_US - 1))
    return out


class _Builder:
    def __init__(self, tasks: Sequence[str]) -> None:
        self.out: list[dict[str, Any]] = []
        self.task_tid = {name: _TASK_BASE + i for i, name in enumerate(tasks)}
        self.vcpus: set[int] = set()

    def tid_task(self, name: str) -> int:
        if name not in self.task_tid:
            self.task_tid[name] = _TASK_BASE + len(self.task_tid)
        return self.task_tid[name]

    def tid_vcpu(self, v: int) -> int:
        self.vcpus.add(v)
        return _VCPU_BASE + v

    def span(self, tid: int, name: str, ts: int, dur: int, cat: str,
             args: dict[str, Any] | None = None) -> None:
        self.out.append({"ph": "X", "name": name, "cat": cat, "pid": PID, "tid": tid,
                         "ts": ts, "dur": max(1, dur), "args": args or {}})

    def instant(self, tid: int, name: str, ts: int, cat: str,
                args: dict[str, Any] | None = None) -> None:
        self.out.append({"ph": "i", "s": "t", "name": name, "cat": cat, "pid": PID, "tid": tid,
                         "ts": ts, "args": args or {}})

    def flow(self, ph: str, fid: int, tid: int, ts: int) -> None:
        ev: dict[str, Any] = {"ph": ph, "id": fid, "name": "fault", "cat": "fault",
                              "pid": PID, "tid": tid, "ts": ts}
        if ph == "f":
            ev["bp"] = "e"  # bind to the enclosing slice at ts
        self.out.append(ev)

    def metadata(self) -> list[dict[str, Any]]:
        meta: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "VM"}},
            {"ph": "M", "name": "thread_name", "pid": PID, "tid": TID_VMM,
             "args": {"name": "VMM"}},
            {"ph": "M", "name": "thread_name", "pid": PID, "tid": TID_HOST,
             "args": {"name": "host / KVM"}},
        ]
        for v in sorted(self.vcpus):
            meta.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": _VCPU_BASE + v,
                         "args": {"name": f"vCPU {v}"}})
        for name, tid in self.task_tid.items():
            meta.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": tid,
                         "args": {"name": f"task {name}"}})
        for tid in [TID_VMM, TID_HOST, *(_VCPU_BASE + v for v in sorted(self.vcpus)),
                    *self.task_tid.values()]:
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid,
                         "args": {"sort_index": tid}})
        return meta


def _fields(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items()
            if k not in ("seq", "t_us", "step", "kind") and v is not None}


def build(events: Iterable[dict[str, Any]], tasks: Sequence[str] = ()) -> dict[str, Any]:
    """The trace (a JSON-able dict) for one run's events."""
    evs = [e for e in events if isinstance(e, dict) and "kind" in e]
    ts = _times(evs)
    b = _Builder(tasks)
    end_ts = (ts[-1] + 1) if ts else 0
    # Where the current step on each vCPU began (the previous step boundary there).
    vcpu_mark: dict[int, int] = {}
    # Open faults: flow id -> state (vcpu, task, page, stage); matched in log order.
    faults: list[dict[str, Any]] = []
    next_fid = 1

    def next_index(i: int, pred: Any) -> int | None:
        for j in range(i + 1, len(evs)):
            if pred(evs[j]):
                return j
        return None

    for i, ev in enumerate(evs):
        kind = str(ev["kind"])
        t = ts[i]
        v = ev.get("vcpu")
        task = ev.get("task")
        args = _fields(ev)
        vtid = b.tid_vcpu(v) if isinstance(v, int) else None
        if isinstance(task, str):
            b.tid_task(task)

        if kind == "task_start" and isinstance(v, int):
            vcpu_mark.setdefault(v, t)
        if kind in _STEP_END and isinstance(task, str):
            start = vcpu_mark.get(v, t - 1) if isinstance(v, int) else t - 1
            start = min(start, t - 1) if start >= t else start
            name = str(ev.get("insn") or kind.replace("task_", ""))
            if kind == "task_step":
                b.span(b.tid_task(task), name, start, t - start, "step", args)
                if vtid is not None:
                    b.span(vtid, task, start, t - start, "run", {"insn": name})
            else:
                # The step that ended the task (exit / SIGBUS): a short span on its track
                # (binds the SIGBUS flow) plus an instant.
                b.span(b.tid_task(task), kind, t, 1, "end", args)
                b.instant(b.tid_task(task), kind if kind == "task_exit" else "SIGBUS", t,
                          "signal" if kind != "task_exit" else "exit", args)
            if isinstance(v, int):
                vcpu_mark[v] = t
        elif kind in HOST_CHANGES:
            b.instant(TID_HOST, f"{ev.get('action', kind)} {ev.get('file', '')}".strip(), t,
                      "host", args)
        elif kind == "kvm_handle_error_pfn":
            b.span(TID_HOST, kind, t, 1, "kvm", args)
            faults.append({"fid": next_fid, "vcpu": v, "task": task, "page": _page(ev.get("gpa")),
                           "stage": "fault"})
            b.flow("s", next_fid, TID_HOST, t)
            next_fid += 1
        elif kind.startswith(_HOST_PREFIXES):
            b.span(TID_HOST, kind, t, 1, "kvm", args)
        elif kind == "kvm_exit" and vtid is not None:
            # The exit lasts until the VMM is done with it: the next vCPU-side event.
            j = next_index(i, lambda e, _v=v: e.get("vcpu") == _v and e["kind"] not in
                           _VMM_KINDS and e["kind"] != "kvm_exit")
            dur = (ts[j] - t) if j is not None else end_ts - t
            reason = ev.get("exit") or ev.get("reason") or "exit"
            b.span(vtid, f"exit {reason}", t, dur, "exit", args)
            f = next((f for f in faults if f["stage"] == "fault" and f["vcpu"] == v), None)
            if f is None:
                f = {"fid": next_fid, "vcpu": v, "task": task, "page": _page(ev.get("gpa")),
                     "stage": "exit"}
                faults.append(f)
                b.flow("s", next_fid, vtid, t)
                next_fid += 1
            else:
                f["stage"] = "exit"
                b.flow("t", f["fid"], vtid, t)
        elif kind in _VMM_KINDS:
            j = next_index(i, lambda e: e["kind"] not in _VMM_KINDS)
            dur = 1 if kind not in ("vmm_resolve",) else max(1, ((ts[j] if j else end_ts) - t))
            label = str(ev.get("line")) if kind == "vmm_resolve" and ev.get("line") else kind
            b.span(TID_VMM, label if kind == "vmm_resolve" else kind, t, dur, "vmm", args)
            f = next((f for f in faults if f["stage"] in ("exit", "resolve")
                      and (f["vcpu"] == v or v is None)), None)
            if kind == "vmm_resolve" and f is not None and f["stage"] == "exit":
                f["stage"] = "resolve"
                f["page"] = _page(ev.get("gpa")) or f["page"]
                b.flow("t", f["fid"], TID_VMM, t)
            if kind in _INJECT and f is not None and f["stage"] == "resolve":
                f["stage"] = "inject"
                b.flow("t", f["fid"], TID_VMM, t)
                # The injection lasts until the guest's handler runs on the target vCPU.
                tv = v if isinstance(v, int) else f["vcpu"]
                if isinstance(tv, int):
                    j2 = next_index(i, lambda e, _tv=tv: e.get("vcpu") == _tv
                                    and e["kind"] in _GUEST_HANDLERS)
                    if j2 is not None:
                        b.span(b.tid_vcpu(tv), f"inject {kind.removeprefix('vmm_')}", t,
                               ts[j2] - t + 1, "inject", args)
            if kind in ("vmm_abort", "vm_abort") and f is not None:
                f["stage"] = "done"
                b.flow("f", f["fid"], TID_VMM, t)
        elif kind in ("guest_memory_failure",) and vtid is not None:
            b.instant(vtid, f"offline {ev.get('gpa')}", t, "offline", args)
        elif kind in _GUEST_HANDLERS and vtid is not None:
            b.instant(vtid, kind, t, "guest", args)
        elif kind in ("model_end", "vm_stop") and ev.get("vm") not in (None, "completed"):
            # How the run ended, in the outcome's word (aborted, crashed, reset, panic, hung).
            b.instant(TID_VMM, f"vm {ev['vm']}", t, "vm", args)
        elif kind in ("vm_hung", "livelock", "deadlock", "step_limit", "guest_panic"):
            b.instant(vtid if vtid is not None else TID_VMM, kind, t, "vm", args)
        # A SIGBUS ends the flow of the fault it answers: AR, same page (or same task).
        if kind in ("guest_signal", "guest_sigbus") and isinstance(task, str) \
                and str(ev.get("code", "")).endswith("_AR"):
            page = _page(ev.get("gpa")) or _page(ev.get("vaddr"))
            f = next((f for f in faults if f["stage"] in ("resolve", "inject")
                      and (f["page"] == page or f["task"] == task)), None)
            if f is None:
                f = next((f for f in faults if f["stage"] in ("resolve", "inject")
                          and f["vcpu"] == v), None)
            if f is not None:
                f["stage"] = "done"
                b.flow("f", f["fid"], b.tid_task(task), t)
    # Faults that never reached a SIGBUS (task exit 5, abort, hang): close their flows at
    # their last point so every id is bound at both ends.
    for f in faults:
        if f["stage"] != "done":
            last = max((e for e in b.out if e.get("id") == f["fid"]), key=lambda e: e["ts"])
            b.out.remove(last)
            if sum(1 for e in b.out if e.get("id") == f["fid"]) == 0:
                continue  # a lone start: no arrow to draw
            last = dict(last, ph="f", bp="e")
            b.out.append(last)
    # The profile the run describes (docs/linux-qemu.md): the model says it in model_start
    # and in its outcome; the real backends are faultline's own VMM and guest.
    profile = next((e["profile"] for e in evs if e.get("kind") == "model_start"
                    and "profile" in e), "faultline-vmm")
    vm = next((e["vm"] for e in evs if e.get("kind") in ("model_end", "vm_stop")), None)
    return {"traceEvents": b.metadata() + b.out, "displayTimeUnit": "ms",
            "otherData": {"generator": "faultline", "profile": profile, "vm": vm,
                          "clock": "t_us" if evs and "t_us" in evs[0] else "step"}}


def write(path: str | Path, events: Iterable[dict[str, Any]], tasks: Sequence[str] = ()) -> None:
    with open(path, "w") as fh:
        dump(fh, events, tasks)


def dump(fh: IO[str], events: Iterable[dict[str, Any]], tasks: Sequence[str] = ()) -> None:
    """The trace to an open file (the CLI opens it before the run, so a bad path is
    reported before anything runs). Raises OSError on a failed write (a full disk)."""
    json.dump(build(events, tasks), fh)
    fh.flush()


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """A JSON-lines event log (as written by EventLog)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
