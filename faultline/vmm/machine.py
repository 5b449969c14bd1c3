"""What every part of one kvm run shares: the vCPUs' state, the lock, the outcome and the
event log, and the two ways of making vCPUs leave KVM_RUN (stop the run, kick one vCPU).

Threads: one per vCPU (each owns its vCPU: every vCPU ioctl is issued from it), the main
thread (set-up, supervision, teardown), the proactive watcher, and whoever drives the
:class:`~faultline.vmm.control.RunControl` (e.g. a QMP monitor). Other threads only
*queue* work for a vCPU (``pending_*``) and kick it (``immediate_exit`` plus a signal).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field

from faultline.kvm import KvmError, Vcpu, uapi
from faultline.memory import GuestMemory, PageRanges
from faultline.outcome import EventLog, Outcome, TaskOutcome
from faultline.scenario import Scenario

KICK_SIGNAL = signal.SIGUSR1


def _noop_handler(signum: int, frame: object) -> None:  # the kick only needs EINTR
    pass


def install_kick_handler() -> bool:
    """A handler for the kick signal, so that it interrupts KVM_RUN instead of killing the
    process. Only the main thread can install it; without it kicks rely on
    immediate_exit alone (the vCPU leaves at its next exit)."""
    if signal.getsignal(KICK_SIGNAL) is _noop_handler:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _noop_handler)
    return True


@dataclass
class VcpuState:
    index: int
    vcpu: Vcpu
    thread: threading.Thread | None = None
    idle: bool = False
    halted: bool = False  # left its loop
    last_progress: float = 0.0
    pending_mce: list[tuple[int, bool]] = field(default_factory=list)  # (gpa, AR)
    pending_irq: bool = False
    ar_pages: set[int] = field(default_factory=set)  # pages with an AR event queued for it
    mce_injected: bool = False  # MCIP can only be set by an #MC we injected
    parked: bool = False  # stopped at the top of its loop (paused)
    unmapped_retries: int = 0  # consecutive bare EFAULTs on addresses the guest unmapped
    waiting: bool = False  # idle and parked in userspace
    synced_regs: bool = False  # KVM stores the GPRs into kvm_run at every exit
    sregs: uapi.kvm_sregs = field(default_factory=uapi.kvm_sregs)  # reused by locate
    # Set by the vCPU's thread as the last thing it does. Not Thread.is_alive(): on Python
    # 3.11 a KeyboardInterrupt landing in Thread.join() can mark a running thread stopped.
    done: threading.Event = field(default_factory=threading.Event)

    def running(self) -> bool:
        """Its thread was started and has not finished."""
        return self.thread is not None and self.thread.ident is not None \
            and not self.done.is_set()

    def stopped(self) -> bool:
        """Not running guest code, and will not until told (parked, idle, or gone)."""
        return self.parked or self.waiting or self.halted or not self.running()


class Machine:
    """The shared state of one run. ``lock`` (re-entrant) guards the outcome, the task and
    vCPU bookkeeping and the flags; ``cond`` (on the same lock) is notified whenever any of
    them changes."""

    def __init__(self, scenario: Scenario, log: EventLog, outcome: Outcome) -> None:
        self.sc = scenario
        self.log = log
        self.outcome = outcome
        self.memory = GuestMemory()
        self.ram_view: memoryview | None = None
        self.vcpus: list[VcpuState] = []
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.stopping = False
        self.host_pauses = 0  # host events running with the world stopped
        self.monitor_paused = False  # paused by RunControl.pause() until resume()
        # either of the two: every vCPU parks (one attribute for the exit loop to test)
        self.hold = False
        self.finished_tasks: set[str] = set()
        self.notified = PageRanges()  # pages the guest was told about
        # window -> the file size the VMM knows of (at map time, or the watcher's last look)
        self.known_size = {f.name: f.size for f in scenario.files}
        self.can_kick = False

    def stop(self, vm_state: str, reason: str) -> None:
        """End the run with this VM state and reason (the first call wins); any thread."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            self.outcome.vm = vm_state
            self.outcome.reason = reason
            # a panic or a reset has its own event before this (guest_panic, kvm_exit)
            # and vm_stop after: the VMM did not abort it
            if vm_state not in ("panic", "reset"):
                self.log.emit("vm_abort" if vm_state == "aborted" else "vm_hung",
                              reason=reason)
            self.cond.notify_all()
        for v in self.vcpus:
            self.kick(v)

    def kick(self, v: VcpuState) -> None:
        """Make vCPU v leave KVM_RUN soon (now, if the kick signal handler is installed)."""
        with contextlib.suppress(KvmError, ValueError):
            v.vcpu.immediate_exit = True
        t = v.thread
        if self.can_kick and t is not None and t.ident is not None and v.running() \
                and t is not threading.current_thread():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(t.ident, KICK_SIGNAL)

    def count_exit(self, kind: str, n: int = 1) -> None:
        """Exit counters are updated from every vCPU thread: under the lock, so they are
        exact (``memory_fault`` is a conformance key)."""
        with self.lock:
            self.outcome.count_exit(kind, n)

    def finish_task(self, task: str, fate: TaskOutcome) -> None:
        with self.lock:
            if task in self.finished_tasks:
                return
            self.finished_tasks.add(task)
            self.outcome.tasks[task] = fate
            self.cond.notify_all()

    def all_done(self) -> bool:
        return len(self.finished_tasks) == len(self.sc.tasks) and all(
            v.idle or v.halted or v.waiting for v in self.vcpus)

    def irq_target(self) -> VcpuState | None:
        """The vCPU that takes an interrupt nobody in particular caused (the watcher's)."""
        for v in self.vcpus:
            if not v.halted:
                return v
        return None

    def set_pause(self, *, host: int = 0, monitor: bool | None = None) -> None:
        """Count a host event's pause in (host=1) or out (host=-1), or set the monitor's
        pause; the caller holds the lock."""
        self.host_pauses += host
        if monitor is not None:
            self.monitor_paused = monitor
        self.hold = bool(self.host_pauses) or self.monitor_paused
        self.cond.notify_all()

    def park(self, v: VcpuState) -> None:
        """vCPU v's own thread: wait at the top of its loop while the VM is paused."""
        with self.cond:
            v.parked = True
            self.cond.notify_all()
            while self.hold and not self.stopping:
                self.cond.wait(0.1)
            v.parked = False
        v.last_progress = time.monotonic()

    def pause_all(self, except_vcpu: VcpuState | None, timeout_s: float) -> bool:
        """Ask every vCPU but ``except_vcpu`` to park, kick them and wait until each is
        stopped. The caller must have set a pause (:meth:`set_pause`). Returns
        False when some vCPU did not stop within ``timeout_s`` (and the run is not
        stopping)."""
        others = [o for o in self.vcpus if o is not except_vcpu]
        for o in others:
            self.kick(o)
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not all(o.stopped() for o in others) and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.01))
        return True
