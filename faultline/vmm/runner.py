"""The real backend: run a scenario on the host's /dev/kvm with faultline's guest kernel.

:class:`KvmRun` builds the VM (memory map, memslots, boot image, vCPUs), wires its parts
together and supervises the run; the parts live in their own modules:

- ``machine``: the state they share (vCPUs, lock, outcome, event log; stop and kick),
- ``exit_loop``: the vCPU threads' KVM_RUN loop, dispatch only,
- ``reports``: the guest's report port, decoded into named records,
- ``fault_handler`` (+ ``faults``, ``decode``, ``mmu``): detection, resolution, decision,
- ``inject``: machine checks and notifications for the guest,
- ``hostevents``: host events with the world stopped,
- ``watch``: the backing-file watcher, for a policy that declares it needs one,
- ``control``: pause / resume / stop / fire an event / follow the log, for a monitor,
- ``policy``: every decision, as pure functions shared with the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from faultline.interrupt import STOP_SIGNALS  # the CLI turns both into KeyboardInterrupt
from faultline.kvm import Kvm, KvmError, Vm, uapi
from faultline.memory import GuestMemory, Region
from faultline.outcome import EventLog, Outcome, TaskOutcome, unfinished_fate
from faultline.scenario import Scenario, file_contents
from faultline.vmm import DEFAULT_MAX_SECONDS, DEFAULT_MAX_STEPS, DEFAULT_WATCHDOG_S
from faultline.vmm import policy as pol
from faultline.vmm.control import RunControl
from faultline.vmm.exit_loop import ExitLoop
from faultline.vmm.fault_handler import MMIO_FILL, FaultHandler
from faultline.vmm.faults import Detector
from faultline.vmm.hostevents import HostEvents, needs_real_poison
from faultline.vmm.inject import Injector
from faultline.vmm.locate import Locator
from faultline.vmm.machine import Machine, VcpuState, install_kick_handler
from faultline.vmm.reports import ReportPort
from faultline.vmm.uffd import SigbusOnMissing, UffdUnavailable, on_tmpfs
from faultline.vmm.watch import FileWatcher

__all__ = [
    "MMIO_FILL",
    "BackendError",
    "Interrupted",
    "KvmRun",
    "VcpuState",
    "install_kick_handler",
    "kvm_available",
    "run_kvm",
]

JOIN_TIMEOUT_S = 5.0
SUPERVISE_TICK_S = 0.05


class BackendError(Exception):
    """The scenario cannot run on this backend here (one line for the CLI, exit 2)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run; `outcome` is what it had come to (vm aborted,
    reason 'interrupted'; or how it ended, when the signal came as it was ending),
    already written to the event log."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


class KvmRun:
    """One run of a scenario on real KVM. Use :func:`run_kvm`, or build one, take its
    :attr:`control` for a monitor, then call :meth:`run` (once)."""

    def __init__(self, scenario: Scenario, policy: str, *, events_path: str | Path | None,
                 run_dir: str | Path | None = None, keep: bool = False,
                 watchdog_s: float = DEFAULT_WATCHDOG_S, max_steps: int = DEFAULT_MAX_STEPS,
                 max_seconds: float = DEFAULT_MAX_SECONDS, kernel: str | Path | None = None,
                 log: EventLog | None = None, programs: dict[int, bytes] | None = None,
                 image: Any = None) -> None:
        """`programs` (task index -> raw bytecode) and `image` (a boot.KernelImage, e.g. of
        random bytes) replace what the scenario would load: hostile-guest tests use them.
        `watchdog_s`: the run is hung when no vCPU made progress (a report) for this long
        after the guest booted. `max_steps` / `max_seconds`: the run's budget (every task's
        steps together; wall time from the start): past it the run ends as hung."""
        if policy not in pol.POLICIES:
            raise BackendError(f"unknown policy {policy!r} (one of: {', '.join(pol.POLICIES)})")
        for name, value in (("watchdog", watchdog_s), ("max-seconds", max_seconds),
                            ("max-steps", max_steps)):
            if not value > 0:  # also NaN
                raise BackendError(f"--{name} must be positive, got {value}")
        if (why := needs_real_poison(scenario)) is not None:
            raise BackendError(why)
        self.sc = scenario
        self.policy = policy
        self.needs = pol.NEEDS[policy]
        self.watchdog_s = watchdog_s
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.kernel = kernel
        self.programs = programs
        self.image = image
        self.keep = keep
        log = log if log is not None else EventLog(events_path)
        outcome = Outcome(scenario.name, "kvm", "host", policy, events_path=log.path)
        for t in scenario.tasks:
            outcome.tasks[t.name] = TaskOutcome()
        self.m = Machine(scenario, log, outcome)
        self._own_dir = run_dir is None
        # tmpfs by default: holes are caught only on shmem-backed windows (see uffd.py).
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and on_tmpfs("/dev/shm") else None
        self.run_dir = Path(run_dir) if run_dir else Path(
            tempfile.mkdtemp(prefix="faultline-", dir=shm))
        self.uffd: SigbusOnMissing | None = None
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.injector = Injector(self.m)
        self.watcher = FileWatcher(self.m, self.injector, self.run_dir) \
            if self.needs.watch_files else None
        self.events = HostEvents(self.m, self.run_dir,
                                 self.watcher.sync if self.watcher is not None else None)
        self.reports = ReportPort(self.m, on_step=self._on_step, on_taken=self._on_taken)
        self.locator = Locator(self.m)
        self.detector = Detector(self.m.memory, scenario.ram_bytes, self.locator.translate,
                                 self.locator.locate)
        self.faults = FaultHandler(self.m, self.detector, self.injector, policy)
        self.exit_loop = ExitLoop(self.m, on_report=self.reports.on_report,
                                  faults=self.faults, injector=self.injector)
        self.control = RunControl(self.m, self.events)
        self._t_start = 0.0
        self._stuck_threads = False

    # --- the shared state, by the names tests and benchmarks use --------------------------
    @property
    def log(self) -> EventLog:
        return self.m.log

    @property
    def outcome(self) -> Outcome:
        return self.m.outcome

    @property
    def memory(self) -> GuestMemory:
        return self.m.memory

    @property
    def vcpus(self) -> list[VcpuState]:
        return self.m.vcpus

    @property
    def ram_view(self) -> memoryview | None:
        return self.m.ram_view

    @property
    def stopping(self) -> bool:
        return self.m.stopping

    # --- set-up ---------------------------------------------------------------------------
    def _setup(self) -> None:
        from faultline.guest.build import kernel_path
        from faultline.vmm import boot

        sc, m = self.sc, self.m
        # profile: this VMM and guest are what the model calls faultline-vmm
        m.log.emit("vm_create", scenario=sc.name, profile="faultline-vmm", policy=self.policy,
                   vcpus=sc.vcpus, ram_bytes=sc.ram_bytes, run_dir=str(self.run_dir))
        root = self.run_dir.resolve()
        for f in sc.files:
            path = self.run_dir / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or not str(path.resolve()).startswith(str(root) + os.sep):
                raise BackendError(f"{sc.source}: files.{f.name}.path: {f.path!r} leaves the "
                                   "run directory (symlink?)")
            path.write_bytes(file_contents(f))
        ram = m.memory.add_anonymous("ram", 0, sc.ram_bytes)
        m.ram_view = memoryview((ctypes.c_char * sc.ram_bytes).from_address(ram.hva)).cast("B")
        for f in sc.files:
            m.memory.add_file(f.name, f.window_gpa, self.run_dir / f.path,
                              size=f.window_bytes, readonly=f.readonly)
        self._arm_hole_detection()
        for r in m.memory:  # read each window's /proc/self/maps line now, not on a fault
            if r.kind == "file":
                r.maps_entry(r.hva)
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        with contextlib.suppress(KvmError):  # VMX needs it; harmless elsewhere
            self.vm.set_tss_addr(0xFFFB_D000)
        for slot, gpa, size, hva, ro in m.memory.memslots():
            self.vm.set_user_memory_region(slot, gpa, size, hva,
                                           uapi.KVM_MEM_READONLY if ro else 0)
            m.log.emit("memslot", slot=slot, gpa=hex(gpa), size=size, hva=hex(hva),
                       readonly=ro)
        image = self.image
        if image is None:
            image = boot.load_kernel(kernel_path() if self.kernel is None else Path(self.kernel))
        boot.write_boot(m.memory.write, sc, image,
                        boot_info=boot.build_boot_info(sc, programs=self.programs))
        mcg_cap = pol.mcg_cap(self.kvm.mce_cap_supported())
        # GPRs synced into kvm_run: a bare -EFAULT's decode reads them with no ioctl. Not
        # the sregs: storing those costs ~0.4 us on every exit (the fault path does one
        # KVM_GET_SREGS instead); the GPRs cost nothing measurable (docs/performance.md).
        sync = self.kvm.check_extension(uapi.KVM_CAP_SYNC_REGS) & uapi.KVM_SYNC_X86_REGS
        for i in range(sc.vcpus):
            vcpu = self.vm.create_vcpu(i)
            boot.setup_vcpu(vcpu, i, image, self.kvm)
            vcpu.setup_mce(mcg_cap)
            if sync:
                vcpu.sync_regs(uapi.KVM_SYNC_X86_REGS)
            m.vcpus.append(VcpuState(i, vcpu, synced_regs=bool(sync)))
        if self.watcher is not None:
            self.watcher.start()

    def _arm_hole_detection(self) -> None:
        """userfaultfd on every window it can take. A read-only window cannot be one: the
        kernel registers a shared file mapping only if it may be written (VM_MAYWRITE),
        so a hole there is not caught (it reads as zeros)."""
        windows = [r for r in self.m.memory if r.kind == "file"]
        if not windows:
            return
        armed: list[str] = []
        left_out: dict[str, str] = {}
        try:
            self.uffd = SigbusOnMissing()
            for r in windows:
                try:
                    self.uffd.register(r.hva, r.size)
                    armed.append(r.name)
                except UffdUnavailable as e:
                    left_out[r.name] = str(e) + (" (read-only window)" if r.readonly else "")
        except UffdUnavailable as e:
            left_out = {r.name: str(e) for r in windows}
        if not armed and self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        self.m.log.emit("vmm_hole_detection", enabled=bool(armed),
                        mechanism="userfaultfd MISSING + UFFD_FEATURE_SIGBUS", windows=armed,
                        left_out=left_out)

    # --- wiring -----------------------------------------------------------------------------
    def _on_step(self, v: VcpuState, task: str, steps: int) -> None:
        self.events.on_step(v, task, steps)

    def _on_taken(self, vcpu: int | None, first: int, npages: int) -> None:
        """The guest took an event for [first, first + npages): it is no longer in flight."""
        end = first + npages * pol.PAGE_SIZE
        with self.m.lock:
            for v in self.m.vcpus:
                if vcpu is None or v.index == vcpu:
                    v.ar_pages = {p for p in v.ar_pages if not first <= p < end}

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        m = self.m
        interrupted = False
        try:
            # Interrupted in set-up too, the log ends as every run's does: vm_stop, outcome.
            try:
                try:
                    self._setup()
                except (KvmError, OSError) as e:
                    raise BackendError(f"cannot set up the VM: {e}") from None
                for ev in self.sc.events:
                    if ev.trigger.task is None:
                        self.events.fire(ev, None)
                m.can_kick = install_kick_handler()
                self._t_start = now = time.monotonic()
                for v in m.vcpus:
                    v.last_progress = now
                    v.thread = threading.Thread(target=self.exit_loop.thread, args=(v,),
                                                name=f"vcpu{v.index}", daemon=True)
                self.control._mark_started()
                # A KeyboardInterrupt landing in Thread.start() can leave a thread running
                # whose ident is not set yet: _join_threads would not wait for it, and it
                # would log after the outcome, on a torn-down VM. Held, it raises after.
                with _stop_signals_held():
                    for v in m.vcpus:
                        assert v.thread is not None
                        v.thread.start()
                self._supervise()
            except KeyboardInterrupt:  # (also while the threads start: vCPU 0 may be running)
                m.stop("aborted", "interrupted")
                interrupted = True
            # Nothing to stop any more: a signal now (another Ctrl-C) must not cut the log
            # short of its outcome. It makes the run an interrupted one.
            with _stop_signals_held(reraise=False) as held:
                self._join_threads()
                self._finish()
            if interrupted or held:
                raise Interrupted(m.outcome)
            return m.outcome
        finally:
            self._teardown()

    def _supervise(self) -> None:
        """Main thread: wait for the vCPU threads, and end a run that makes no progress
        (the watchdog) or exceeds its budget (steps, wall time)."""
        m = self.m
        while True:
            alive = [v for v in m.vcpus if v.running()]
            if not alive:
                return
            # an Event, not Thread.join(): see VcpuState.done
            alive[0].done.wait(SUPERVISE_TICK_S)
            with m.lock:
                if m.stopping:
                    continue
                why = self._over_budget(time.monotonic())
                if why is not None:
                    m.stop("hung", why)

    def _over_budget(self, now: float) -> str | None:
        """Why the run must end now (hung), or None. The watchdog measures the VM's lack of
        progress: no report from any vCPU for watchdog_s (vCPUs idle or paused aside).
        Until the guest is up, the APs only spin (waiting for vCPU 0 to set up every
        task): the progress then is vCPU 0's, one BOOT_PROGRESS_PORT exit per task set up,
        so a large guest booting on a loaded host is not hung, and a guest that never
        boots (random code looping) is."""
        m = self.m
        if now - self._t_start > self.max_seconds:
            return f"budget: still running after {self.max_seconds:g} s (--max-seconds)"
        if self.reports.guest_steps > self.max_steps:
            return (f"budget: more than {self.max_steps} guest steps (--max-steps), "
                    f"{self.reports.guest_steps} so far")
        if m.monitor_paused:
            return None
        if not self.reports.booted:
            v0 = m.vcpus[0]
            if not v0.stopped() and now - v0.last_progress > self.watchdog_s:
                return (f"watchdog: the guest did not boot (no progress from vCPU 0 for "
                        f"{self.watchdog_s:g} s)")
            return None
        active = [v for v in m.vcpus if not (v.waiting or v.parked or v.halted)]
        if active and now - max(v.last_progress for v in m.vcpus) > self.watchdog_s:
            return (f"watchdog: no vCPU made progress for {self.watchdog_s:g} s "
                    f"(vCPU {', '.join(str(v.index) for v in active)} running)")
        return None

    def _join_threads(self) -> None:
        """Every vCPU thread and the watcher stopped (kicked until they leave): nothing
        emits events or touches guest memory after this, so the outcome and the log end
        together and the memory can go."""
        m = self.m
        with m.lock:
            m.stopping = True
            m.cond.notify_all()
        if self.watcher is not None:
            self.watcher.close()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for v in m.vcpus:
            while v.running():
                m.kick(v)
                v.done.wait(0.05)
                if time.monotonic() > deadline:
                    m.log.emit("vmm_thread_stuck", vcpu=v.index)
                    self._stuck_threads = True
                    break

    def _finish(self) -> None:
        m = self.m
        m.log.flush()  # every fault's record (built off the fault path) is in the outcome
        o = m.outcome
        with m.lock:
            if o.vm == "completed":
                unfinished = [t.name for t in self.sc.tasks if t.name not in m.finished_tasks]
                if unfinished:
                    o.vm = "hung"
                    o.reason = f"every vCPU stopped with tasks unfinished: {', '.join(unfinished)}"
            for name, t in o.tasks.items():
                if name not in m.finished_tasks:
                    t.fate = unfinished_fate(o.vm)
        self._check_files()
        m.log.emit("vm_stop", vm=o.vm, reason=o.reason)
        m.log.emit("outcome", outcome=o.to_json())

    def _teardown(self) -> None:
        m = self.m
        if not m.stopping:  # set-up failed, or a test drives the parts itself
            self._join_threads()
        m.log.flush()  # records still owed need the memory map: before it goes
        m.ram_view = None
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        if not self._stuck_threads:  # a vCPU thread still in KVM_RUN keeps its memory
            m.memory.close()
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        m.log.close()
        if self._own_dir and not self.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- end of run ------------------------------------------------------------------------------
    def _check_files(self) -> None:
        """The DAX files must hold what the tasks wrote (where the page still exists)."""
        m = self.m
        for gpa, value in sorted(self.reports.writes.items()):
            region: Region | None = m.memory.find_region(gpa)
            if region is None or region.closed:
                continue
            page = gpa & ~(pol.PAGE_SIZE - 1)
            off = region.file_offset_of(gpa)
            if off is None or page in m.outcome.offlined:
                continue
            size = os.fstat(region.fd).st_size
            if off + 8 > size:
                continue
            got = int.from_bytes(os.pread(region.fd, 8, off), "little")
            if got != value:
                m.outcome.file_mismatches.append(
                    f"{region.name} +{off:#x}: the guest wrote {value:#x}, the file has {got:#x}")
        m.log.emit("file_check", writes=len(self.reports.writes),
                   mismatches=m.outcome.file_mismatches)


@contextlib.contextmanager
def _stop_signals_held(*, reraise: bool = True) -> Iterator[list[int]]:
    """SIGINT and SIGTERM arriving inside the block take effect at its end (``reraise``),
    else are only listed in what it yields. Handlers run in the main thread only, so
    elsewhere there is nothing to hold. (Not a signal mask: the kernel would hand the
    signal to another thread, and Python still runs the handler here.)"""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    # a handler installed outside Python (None) could not be put back: left alone
    old = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) is not None}
    try:
        for s in old:
            signal.signal(s, lambda signum, _frame: pending.append(signum))
        yield pending
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(pending if reraise else ()):
            signal.raise_signal(signum)


def run_kvm(scenario: Scenario, policy: str, *, events_path: str | Path | None = None,
            **kw: Any) -> Outcome:
    """Run a scenario on /dev/kvm and return its outcome (the event log is written as it
    goes, also when the run fails)."""
    return KvmRun(scenario, policy, events_path=events_path, **kw).run()


def kvm_available() -> tuple[bool, str]:
    """Whether /dev/kvm can be used here, and why not."""
    try:
        with Kvm() as k:
            return True, f"KVM API {k.api_version()}"
    except (KvmError, OSError) as e:
        return False, f"/dev/kvm unusable: {e}"
