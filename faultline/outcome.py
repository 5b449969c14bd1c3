"""The result of a run, shared by both backends, and its comparison with expectations."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from faultline.scenario import Expectation, Scenario

OUTCOME_KEYS = ("scenario", "backend", "profile", "design", "policy", "vm", "tasks", "offlined",
                "exits", "faults", "events_path")


@dataclass(slots=True)
class Signal:
    code: str  # "BUS_MCEERR_AR", "BUS_MCEERR_AO", "SEGV_MAPERR", "SI_KERNEL", ...
    vaddr: int | None  # None: the signal carries no address (SI_KERNEL)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "vaddr": None if self.vaddr is None else hex(self.vaddr)}


def unfinished_fate(vm: str) -> str:
    """The fate of a task that had not finished when the run ended with ``vm``, the same
    on every backend: gone with the VMM process (crashed: lost), stopped, reset or
    panicked with the VM (killed), else still waiting (hung)."""
    if vm == "crashed":
        return "lost"
    return "killed" if vm in ("aborted", "reset", "panic") else "hung"


@dataclass(slots=True)
class TaskOutcome:
    fate: str = "hung"  # exited | sigbus | sigsegv | killed | hung | lost (the VMM process died)
    code: int | None = None
    signal: Signal | None = None

    def to_json(self) -> dict[str, Any]:
        return {"fate": self.fate, "code": self.code,
                "signal": self.signal.to_json() if self.signal else None}


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One resolved bad access: GPA -> HVA -> file + offset, and why it failed."""

    gpa: int
    hva: int | None
    path: str | None
    offset: int | None
    file_size: int | None
    cause: str  # beyond-eof | hole | poisoned | read-only | unmapped | unknown
    source: str  # how it was detected: memory-fault-exit, bare-efault, mmio, internal-error, ...

    def to_json(self) -> dict[str, Any]:
        return {"gpa": hex(self.gpa), "hva": hex(self.hva) if self.hva is not None else None,
                "path": self.path, "offset": self.offset, "file_size": self.file_size,
                "cause": self.cause, "source": self.source}

    def line(self) -> str:
        """The one-line resolution a human reads in the timeline."""
        hva = f"hva {self.hva:#x}" if self.hva is not None else "hva ?"
        where = (f"{self.path} +{self.offset:#x} (file size {self.file_size:#x})"
                 if self.path is not None and self.offset is not None and self.file_size is not None
                 else "no backing file")
        return f"gpa {self.gpa:#x} -> {hva} -> {where}: {self.cause}"


@dataclass
class Outcome:
    scenario: str
    backend: str
    design: str
    policy: str
    # completed | hung | aborted (the VMM stopped the VM) | crashed (the VMM process died)
    # | reset (the VMM reset the guest) | panic (the guest kernel panicked)
    vm: str = "completed"
    # What the run describes (docs/linux-qemu.md): the kvm backend is faultline's own VMM
    # and guest; the model says which profile it ran; the qemu backend is "qemu".
    profile: str = "faultline-vmm"
    tasks: dict[str, TaskOutcome] = field(default_factory=dict)
    offlined: set[int] = field(default_factory=set)
    exits: dict[str, int] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    events_path: str = ""
    # backend qemu only: version, exit_status, and on a crash the signal and QEMU's last
    # stderr line (a "qemu" key in the JSON outcome; absent for the other backends)
    qemu: dict[str, Any] | None = None
    # Not part of the JSON outcome (its keys are fixed); kept for checks and the timeline.
    reason: str = ""
    file_mismatches: list[str] = field(default_factory=list)
    bad_values: list[str] = field(default_factory=list)  # values read from bad pages

    def count_exit(self, kind: str, n: int = 1) -> None:
        self.exits[kind] = self.exits.get(kind, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "backend": self.backend,
            "profile": self.profile,
            "design": self.design,
            "policy": self.policy,
            "vm": self.vm,
            "tasks": {k: v.to_json() for k, v in self.tasks.items()},
            "offlined": [hex(g) for g in sorted(self.offlined)],
            "exits": dict(sorted(self.exits.items())),
            "faults": [f.to_json() for f in self.faults],
            "events_path": self.events_path,
        } | ({"qemu": self.qemu} if self.qemu is not None else {})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def mismatches(outcome: Outcome, expect: Expectation | None) -> list[str]:
    """Each way the outcome differs from the expectation, as a readable line."""
    out: list[str] = []
    if outcome.bad_values:
        out.extend(f"fabricated data consumed: {b}" for b in outcome.bad_values)
    if expect is None:
        return out
    if expect.vm is not None and outcome.vm != expect.vm:
        out.append(f"vm: expected {expect.vm}, got {outcome.vm}"
                   + (f" ({outcome.reason})" if outcome.reason else ""))
    for name, te in expect.tasks.items():
        got = outcome.tasks.get(name)
        if got is None:
            out.append(f"tasks.{name}: missing from the outcome")
            continue
        if te.fate is not None and got.fate != te.fate:
            out.append(f"tasks.{name}.fate: expected {te.fate}, got {got.fate}")
        if te.code is not None and got.code != te.code:
            out.append(f"tasks.{name}.code: expected {te.code}, got {got.code}")
        if te.signal is not None and (got.signal is None or got.signal.code != te.signal):
            out.append(f"tasks.{name}.signal: expected {te.signal}, "
                       f"got {got.signal.code if got.signal else None}")
        if te.vaddr is not None and (got.signal is None or got.signal.vaddr != te.vaddr):
            got_vaddr = got.signal.vaddr if got.signal else None
            out.append(f"tasks.{name}.signal.vaddr: expected {te.vaddr:#x}, "
                       f"got {None if got_vaddr is None else hex(got_vaddr)}")
    if expect.offlined is not None and sorted(outcome.offlined) != list(expect.offlined):
        out.append(f"offlined: expected {[hex(g) for g in expect.offlined]}, "
                   f"got {[hex(g) for g in sorted(outcome.offlined)]}")
    for kind, n in expect.exits.items():
        if outcome.exits.get(kind, 0) != n:
            out.append(f"exits.{kind}: expected {n}, got {outcome.exits.get(kind, 0)}")
    for spec in expect.faults or ():
        if not any(_fault_matches(f, spec) for f in outcome.faults):
            shown = {k: (hex(v) if k == "gpa" else v) for k, v in spec.items()}
            out.append(f"faults: no record matches {shown}")
    if expect.files_match_writes is not False and outcome.file_mismatches:
        out.extend(f"file contents: {m}" for m in outcome.file_mismatches)
    return out


def _fault_matches(f: FaultRecord, spec: dict[str, Any]) -> bool:
    return all(getattr(f, k) == v for k, v in spec.items())


def check(outcome: Outcome, scenario: Scenario) -> list[str]:
    return mismatches(outcome, scenario.expectation(outcome.backend, outcome.design,
                                                    outcome.policy, outcome.profile))


class EventLog:
    """The run's event log: one JSON object per line.

    ``emit`` only stamps the event and queues it; a writer thread (polling every 2 ms)
    serialises and writes it (line-buffered), mostly while the vCPU threads sit in KVM_RUN
    with the GIL released, so logging stays off the exit path. ``close`` (always called,
    also when a run fails or is interrupted) drains the queue, so the log holds every
    event. Thread-safe: every vCPU thread and the VMM's watcher emit.

    ``emit_later`` stamps an event now (its place in the order, its time) and computes its
    fields afterwards, on the writer thread, or at ``flush`` when there is no file: the
    VMM's diagnostic work on a fault (the /proc/self/maps cross-check, the record) then
    overlaps the guest's handling of the injected event instead of delaying it.

    Bounded: a guest that loops for hours must not grow the log (and the timeline) without
    end. After ``max_repeats`` events of one (kind, vCPU, task) -- a task's steps, its
    reports -- further ones are dropped and counted (one ``log_capped`` event says where it
    started); past ``max_events`` every event is, except the few that end a run
    (``_ALWAYS``). ``close`` writes the counts as one ``log_dropped`` event, as the model
    writes a livelock's cycle once.
    """

    _STOP = object()
    MAX_REPEATS = 2_000
    MAX_EVENTS = 200_000
    _ALWAYS = frozenset({"outcome", "vm_stop", "vm_abort", "vm_hung", "error", "model_end",
                         "livelock", "deadlock", "step_limit", "guest_panic", "log_capped",
                         "log_dropped", "file_check"})

    def __init__(self, path: str | Path | None, *, clock: str = "us",
                 max_repeats: int = MAX_REPEATS, max_events: int = MAX_EVENTS,
                 fh: IO[str] | None = None) -> None:
        """``fh``: the file at ``path`` already open (the CLI opens and locks it before
        the run starts); the log closes it."""
        self.path = str(path) if path is not None else ""
        self._fh: IO[str] | None = fh if fh is not None else (
            open(path, "w", buffering=1) if path else None)
        self._lock = threading.Lock()
        self._t0 = time.monotonic_ns()
        self._clock = clock  # "us": wall microseconds (kvm); "step": model step numbers
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._later: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = []
        self._writer: threading.Thread | None = None
        self.write_error: str | None = None  # why the file stopped being written, if it did
        self._max_repeats, self._max_events = max_repeats, max_events
        self._repeats: dict[tuple[str, int | None, str | None], int] = {}
        self.dropped: dict[str, int] = {}  # kind -> events not kept (see the class doc)
        self._summarised = False
        self._closed_path = ""  # set by close(): where events emitted after it go
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self.subscriber_errors: list[str] = []
        if self._fh is not None:
            self._start_writer()

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="eventlog", daemon=True)
        self._writer.start()

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event emitted from now on, in order, with its
        fields complete (emit_later's too), on the writer thread (started for it when the
        log has no file): never on the emitting thread, so a vCPU never waits for it. A
        callback that raises is dropped, its error kept in ``subscriber_errors``.
        Returns the function that unsubscribes it."""
        with self._lock:
            self._subscribers = [*self._subscribers, callback]
            if self._writer is None and self._fh is None and not self._closed:
                self._start_writer()

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [c for c in self._subscribers if c is not callback]

        return unsubscribe

    def emit(self, kind: str, *, vcpu: int | None = None, task: str | None = None,
             **fields: Any) -> dict[str, Any]:
        if kind == "outcome":  # the counts go before the run's last line
            self._summarise_drops()
        with self._lock:
            events = self.events
            key = (kind, vcpu, task)
            n = self._repeats.get(key, 0) + 1
            self._repeats[key] = n
            if (n > self._max_repeats or len(events) >= self._max_events) \
                    and kind not in self._ALWAYS:
                return self._drop(kind, vcpu, task, n, fields)
            # one dict display in the written key order: emit is on the fault path
            ev: dict[str, Any] = {
                "seq": len(events), "t_us": (time.monotonic_ns() - self._t0) // 1000,
                "vcpu": vcpu, "task": task, "kind": kind, **fields} if self._clock == "us" \
                else {"seq": len(events), "step": self.step, "vcpu": vcpu, "task": task,
                      "kind": kind, **fields}
            events.append(ev)
            if self._writer is not None:
                self._q.put(ev)
            elif self._closed_path:
                self._append_late(ev)
            return ev

    def _append_late(self, ev: dict[str, Any]) -> None:
        """An event emitted after close (a vCPU thread still tearing down when the run was
        interrupted): written straight to the file, so the log says what the timeline
        shows."""
        if self.write_error:
            return
        try:
            with open(self._closed_path, "a") as fh:
                fh.write(json.dumps(ev, default=_jsonable) + "\n")
        except OSError as e:
            self.write_error = f"{self.path}: {e.strerror or e}"

    def _summarise_drops(self) -> None:
        if self.dropped and not self._summarised:
            self._summarised = True
            self.emit("log_dropped", counts=dict(self.dropped))

    def _drop(self, kind: str, vcpu: int | None, task: str | None, n: int,
              fields: dict[str, Any]) -> dict[str, Any]:
        """Count a dropped event (lock held); the caller still gets a dict to read."""
        first = kind not in self.dropped
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        if first:
            events = self.events
            ev = self._stamp("log_capped", None, None, len(events))
            ev.update(dropping=kind, vcpu_of=vcpu, task_of=task,
                      after=n - 1 if n > self._max_repeats else len(events))
            events.append(ev)
            if self._writer is not None:
                self._q.put(ev)
        return {"kind": kind, "vcpu": vcpu, "task": task, **fields}

    def _stamp(self, kind: str, vcpu: int | None, task: str | None, seq: int
               ) -> dict[str, Any]:
        if self._clock == "us":
            return {"seq": seq, "t_us": (time.monotonic_ns() - self._t0) // 1000,
                    "vcpu": vcpu, "task": task, "kind": kind}
        return {"seq": seq, "step": self.step, "vcpu": vcpu, "task": task, "kind": kind}

    def emit_later(self, kind: str, fill: Callable[[], dict[str, Any]], *,
                   vcpu: int | None = None, task: str | None = None) -> dict[str, Any]:
        """An event stamped now whose fields ``fill()`` supplies later, before the events
        emitted after it are written. A ``fill`` that raises leaves ``fill_error``."""
        with self._lock:
            events = self.events
            # as in emit (not shared through a helper: one frame less on the fault path)
            ev: dict[str, Any] = {
                "seq": len(events), "t_us": (time.monotonic_ns() - self._t0) // 1000,
                "vcpu": vcpu, "task": task, "kind": kind} if self._clock == "us" \
                else {"seq": len(events), "step": self.step, "vcpu": vcpu, "task": task,
                      "kind": kind}
            events.append(ev)
            if self._writer is not None:
                self._q.put((ev, fill))
            else:
                self._later.append((ev, fill))
            return ev

    @staticmethod
    def _fill(ev: dict[str, Any], fill: Callable[[], dict[str, Any]]) -> None:
        try:
            ev.update(fill())
        except Exception as e:  # the log must survive a failed diagnostic
            ev["fill_error"] = f"{type(e).__name__}: {e}"

    # The writer polls instead of blocking on the queue: a put() that wakes it costs the
    # emitting thread a futex syscall, and the woken writer takes the GIL from that thread
    # at its next ioctl. The emitter is usually a vCPU thread handling an exit (a fault:
    # four events), which would be delayed by tens of microseconds. Asleep, the writer
    # holds no GIL; when it wakes, the vCPU is most likely back in KVM_RUN.
    POLL_S = 0.002

    def _write_loop(self) -> None:
        fh: IO[str] | None = self._fh
        get_nowait, empty = self._q.get_nowait, queue.Empty
        dumps, stop, fill, sleep, poll = json.dumps, self._STOP, self._fill, time.sleep, \
            self.POLL_S
        while True:
            sleep(poll)
            while True:
                try:
                    item = get_nowait()
                except empty:
                    break
                if item is stop:
                    return
                t = type(item)
                if t is tuple:  # emit_later: fields first
                    ev = item[0]
                    fill(ev, item[1])
                elif t is threading.Event:  # a flush() marker
                    item.set()
                    continue
                else:
                    ev = item
                if self._subscribers:
                    self._publish(ev)
                if fh is None:
                    continue  # no file, or it failed: events still get their fields
                try:
                    fh.write(dumps(ev, default=_jsonable) + "\n")
                except OSError as e:  # e.g. ENOSPC: keep the run going, say so once
                    self.write_error = f"{self.path}: {e.strerror or e}"
                    fh = None

    def _publish(self, ev: dict[str, Any]) -> None:
        for cb in self._subscribers:
            try:
                cb(ev)
            except Exception as e:  # a broken subscriber must not stop the log
                with self._lock:
                    self._subscribers = [c for c in self._subscribers if c is not cb]
                self.subscriber_errors.append(f"{type(e).__name__}: {e}")

    def flush(self) -> None:
        """Wait until every event emitted so far has its fields (and is written)."""
        with self._lock:
            writer = self._writer
            later, self._later = self._later, []
        for ev, fill in later:
            self._fill(ev, fill)
        if writer is not None and writer is not threading.current_thread():
            done = threading.Event()
            self._q.put(done)
            while not done.wait(0.1):
                if not writer.is_alive():  # it died (a write failed): nothing to wait for
                    break

    def close(self) -> None:
        self._summarise_drops()
        with self._lock:
            self._closed = True
            writer, self._writer = self._writer, None
        if writer is not None:
            self._q.put(self._STOP)
            writer.join()
        self.flush()  # without a file: fields still owed
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a full disk: write_error says so
                self._fh.close()
            self._fh = None
            if os.path.isfile(self.path):  # not a device or a pipe: late events append
                self._closed_path = self.path

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    if hasattr(v, "to_json"):
        return v.to_json()
    return str(v)
