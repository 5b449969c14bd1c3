"""The guest's report port: the guest writes a ``struct report`` into its per-vCPU buffer
and does ``outl`` of its GPA to ``abi.REPORT_PORT``; the exit loop hands the GPA here.

Each record is checked (inside RAM, magic, kind, task index), decoded into its named
fields (``faultline.abi.REPORT_RECORDS``), logged as an event, and applied to the
outcome. Called on the reporting vCPU's thread; everything shared goes through the
machine's lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from faultline import abi
from faultline.outcome import Signal, TaskOutcome
from faultline.vmm.machine import Machine, VcpuState

MAX_BAD_REPORTS = 64  # a guest that keeps writing garbage is stopped, not logged forever


def signal_fate(signo: int) -> str:
    """The task fate a fatal signal means (scenario.FATES)."""
    return {abi.SIGBUS: "sigbus", abi.SIGSEGV: "sigsegv"}.get(signo, "killed")


class ReportPort:
    """``on_step(v, task, steps)``: a task finished its step number ``steps`` (its exit
    counts as a step): host events triggered there fire from it.
    ``on_taken(vcpu, first_gpa, npages)``: the guest took an event for these pages (it
    offlined them, or killed vCPU ``vcpu``'s task for an access there; vcpu None: any)."""

    def __init__(self, m: Machine, *, on_step: Callable[[VcpuState, str, int], None],
                 on_taken: Callable[[int | None, int, int], None]) -> None:
        self.m = m
        self.on_step = on_step
        self.on_taken = on_taken
        self.bad_reports = 0
        self.writes: dict[int, int] = {}  # window gpa -> last value a task wrote there
        self.steps: dict[str, int] = {}  # task -> steps done (what the guest last said)
        self.guest_steps = 0  # every task's steps together (the run's step budget)
        self.booted = False  # a vCPU reported R_BOOT: vCPU 0 has set up every task
        self._task_names = tuple(t.name for t in m.sc.tasks)
        self._handlers: dict[int, Callable[[VcpuState, str | None, Any], None]] = {
            abi.R_BOOT: self._boot,
            abi.R_TASK_START: self._task_start,
            abi.R_STEP: self._step,
            abi.R_VALUE: self._value,
            abi.R_EXIT: self._exit,
            abi.R_SIGNAL: self._signal,
            abi.R_OFFLINE: self._offline,
            abi.R_MCE: self._mce,
            abi.R_NOTIFY: self._notify,
            abi.R_EXCEPTION: self._exception,
            abi.R_IDLE: self._idle,
            abi.R_PANIC: self._panic,
        }

    def on_report(self, v: VcpuState, gpa: int) -> None:
        """An ``outl`` to the report port by vCPU v: `gpa` is the record's address."""
        ram = self.m.ram_view
        assert ram is not None
        try:
            kind, _vcpu, task, record = abi.decode_report(ram, gpa, self._task_names)
        except abi.BadReport as e:
            self._bad(v, str(e))
            return
        v.last_progress = time.monotonic()
        self._handlers[kind](v, task, record)

    def _bad(self, v: VcpuState, why: str) -> None:
        self.bad_reports += 1
        self.m.log.emit("guest_bad_report", vcpu=v.index, error=why)
        if self.bad_reports >= MAX_BAD_REPORTS:
            self.m.stop("aborted", f"guest protocol error: {self.bad_reports} bad reports")

    # --- one handler per kind ---------------------------------------------------------------
    def _boot(self, v: VcpuState, task: str | None, r: abi.BootReport) -> None:
        m = self.m
        m.log.emit("guest_boot", vcpu=v.index, tasks=r.tasks)
        with m.lock:
            if not self.booted:  # the guest is up: the watchdog starts counting now
                self.booted = True
                for o in m.vcpus:
                    o.last_progress = v.last_progress

    def _task_start(self, v: VcpuState, task: str | None, r: abi.TaskStartReport) -> None:
        self.m.log.emit("task_start", vcpu=v.index, task=task, insns=r.insns)

    def _step(self, v: VcpuState, task: str | None, r: abi.StepReport) -> None:
        if task is None:
            return
        prog = self.m.sc.task(task).program
        self.m.log.emit("task_step", vcpu=v.index, task=task, pc=r.pc, steps=r.steps,
                        insn=prog[r.pc].text if r.pc < len(prog) else None)
        self._count_step(v, task, r.steps)

    def _count_step(self, v: VcpuState, task: str, steps: int) -> None:
        with self.m.lock:
            self.guest_steps += max(steps - self.steps.get(task, 0), 1)
            self.steps[task] = steps
        self.on_step(v, task, steps)

    def _value(self, v: VcpuState, task: str | None, r: abi.ValueReport) -> None:
        op = abi.VALUE_OPS.get(r.op, str(r.op))
        m = self.m
        m.log.emit("guest_value", vcpu=v.index, task=task, op=op, vaddr=hex(r.vaddr),
                   value=hex(r.value), gpa=hex(r.gpa))
        region = m.memory.find_region(r.gpa)
        if region is None or region.kind != "file":
            return
        if op == "write":
            with m.lock:
                self.writes[r.gpa] = r.value
            return
        page = r.gpa & ~(abi.PAGE_SIZE - 1)
        offset = region.file_offset_of(page)
        size = region.file_size()
        if page in m.outcome.offlined or (offset is not None and size is not None
                                          and offset >= size):
            with m.lock:
                m.outcome.bad_values.append(
                    f"task {task} read {r.value:#x} from gpa {r.gpa:#x}, a page that cannot "
                    "be backed")

    def _exit(self, v: VcpuState, task: str | None, r: abi.ExitReport) -> None:
        if task is None:
            return
        self.m.log.emit("task_exit", vcpu=v.index, task=task, code=r.code)
        self.m.finish_task(task, TaskOutcome("exited", r.code, None))
        # `exit` is a step like any other (docs/scenarios.md), but the guest reports it
        # with R_EXIT instead of R_STEP: a trigger on it fires here.
        self._count_step(v, task, self.steps.get(task, 0) + 1)

    def _signal(self, v: VcpuState, task: str | None, r: abi.SignalReport) -> None:
        code = abi.SI_CODES.get((r.signo, r.si_code), f"sig{r.signo}/{r.si_code}")
        self.m.log.emit("guest_signal", vcpu=v.index, task=task, signo=r.signo, code=code,
                        vaddr=hex(r.vaddr), gpa=hex(r.gpa))
        if r.gpa:
            self.on_taken(v.index, r.gpa & ~(abi.PAGE_SIZE - 1), 1)
        if task is not None:
            self.m.finish_task(task, TaskOutcome(signal_fate(r.signo), None,
                                                 Signal(code, r.vaddr)))

    def _offline(self, v: VcpuState, task: str | None, r: abi.OfflineReport) -> None:
        src = abi.OFFLINE_SOURCES.get(r.source, str(r.source))
        npages = max(1, min(r.pages, 1 << 20))
        with self.m.lock:
            self.m.outcome.offlined.update(range(r.gpa, r.gpa + npages * abi.PAGE_SIZE,
                                                 abi.PAGE_SIZE))
        self.on_taken(None, r.gpa, npages)
        self.m.log.emit("guest_memory_failure", vcpu=v.index, gpa=hex(r.gpa), pages=npages,
                        source=src)

    def _mce(self, v: VcpuState, task: str | None, r: abi.MceReport) -> None:
        self.m.log.emit("guest_mce", vcpu=v.index, task=task, mcg_status=hex(r.mcg_status),
                        mci_status=hex(r.mci_status), mci_addr=hex(r.mci_addr),
                        mci_misc=hex(r.mci_misc))

    def _notify(self, v: VcpuState, task: str | None, r: abi.NotifyReport) -> None:
        self.m.log.emit("guest_notify", vcpu=v.index, records=r.records, pages=r.pages)

    def _exception(self, v: VcpuState, task: str | None, r: abi.ExceptionReport) -> None:
        self.m.log.emit("guest_exception", vcpu=v.index, task=task, vector=r.vector,
                        error_code=hex(r.error_code), rip=hex(r.rip), cr2=hex(r.cr2))

    def _idle(self, v: VcpuState, task: str | None, r: abi.IdleReport) -> None:
        self.m.log.emit("vcpu_idle", vcpu=v.index)
        with self.m.lock:
            v.idle = True
            self.m.cond.notify_all()

    def _panic(self, v: VcpuState, task: str | None, r: abi.PanicReport) -> None:
        what = abi.PANIC_NAMES.get(r.code, f"unknown panic code {r.code}")
        self.m.log.emit("guest_panic", vcpu=v.index, code=r.code, what=what,
                        detail=[hex(r.detail1), hex(r.detail2), hex(r.detail3)])
        self.m.stop("panic", f"guest panic on vCPU {v.index}: {what}")
