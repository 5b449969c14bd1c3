"""The real backend: run a scenario on the host's /dev/kvm with faultline's guest kernel.

One Python thread per vCPU (KVM_RUN releases the GIL). Each thread owns its vCPU: every
vCPU ioctl (run, MCE, interrupt, registers) is issued from it, so other threads only
*queue* work for a vCPU and kick it (``immediate_exit`` plus a signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultline import abi
from faultline.kvm import Kvm, KvmError, Vcpu, Vm, exits, uapi
from faultline.memory import GuestMemory, GuestMemoryError, PageRanges, Resolution, file_holes
from faultline.outcome import EventLog, Outcome, Signal, TaskOutcome
from faultline.scenario import HostEvent, Scenario, file_contents
from faultline.vmm import decode, mmu
from faultline.vmm import policy as pol
from faultline.vmm.faults import (
    Detector,
    GuestUnmapped,
    MemoryFault,
    Unrecoverable,
    bad_ranges,
    classify,
    record,
)
from faultline.vmm.uffd import SigbusOnMissing, UffdUnavailable, on_tmpfs

KICK_SIGNAL = signal.SIGUSR1
_FAULT_EXITS = frozenset({exits.MemoryFault, exits.BareEfault, exits.InternalError})
_BAD_CAUSES = frozenset({"beyond-eof", "hole", "unmapped"})  # classify() returns these as-is
EHWPOISON = exits.EHWPOISON
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MMIO_FILL = b"\xde\xad\xfa\x17" * 2  # what a caught load "reads"; the task dies before use
_OFF_REQ_IRQ_WINDOW = uapi.kvm_run.request_interrupt_window.offset
# kvm_sregs' cr0, cr2, cr3, cr4, cr8, efer: consecutive u64s, read in one unpack
_OFF_CR0 = uapi.kvm_sregs.cr0.offset
_SREGS_CRS = struct.Struct("<6Q")
assert uapi.kvm_sregs.efer.offset == _OFF_CR0 + 5 * 8
_OFF_READY_FOR_IRQ = uapi.kvm_run.ready_for_interrupt_injection.offset
_OFF_IF_FLAG = uapi.kvm_run.if_flag.offset
_REPORT = abi.REPORT_STRUCT
_REPORT_SIZE = abi.REPORT_STRUCT.size


class BackendError(Exception):
    """The scenario cannot run on this backend here (one line for the CLI, exit 2)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run; `outcome` is what it had come to (vm aborted,
    reason 'interrupted'), already written to the event log."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


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
    in_run: bool = False
    last_progress: float = 0.0
    pending_mce: list[tuple[int, bool]] = field(default_factory=list)  # (gpa, AR)
    pending_irq: bool = False
    mce_injected: bool = False  # MCIP can only be set by an #MC we injected
    parked: bool = False  # stopped at the top of its loop while a host event runs
    unmapped_retries: int = 0  # consecutive bare EFAULTs on addresses the guest unmapped
    waiting: bool = False  # idle and parked in userspace
    synced_regs: bool = False  # KVM stores the GPRs into kvm_run at every exit
    sregs: uapi.kvm_sregs = field(default_factory=uapi.kvm_sregs)  # reused by _locate


class KvmRun:
    """One run of a scenario on real KVM. Use :func:`run_kvm`."""

    def __init__(self, scenario: Scenario, policy: str, *, events_path: str | Path | None,
                 run_dir: str | Path | None = None, keep: bool = False,
                 watchdog_s: float = 10.0, kernel: str | Path | None = None,
                 log: EventLog | None = None, programs: dict[int, bytes] | None = None,
                 image: Any = None) -> None:
        """`programs` (task index -> raw bytecode) and `image` (a boot.KernelImage, e.g. of
        random bytes) replace what the scenario would load: hostile-guest tests use them."""
        if policy not in pol.POLICIES:
            raise BackendError(f"unknown policy {policy!r} (one of: {', '.join(pol.POLICIES)})")
        for ev in scenario.events:
            if ev.action == "poison":
                raise BackendError(
                    f"{scenario.source}: events[{ev.index}]: 'poison' needs real hardware "
                    "poison (CONFIG_MEMORY_FAILURE is off on this host); use --backend model")
        self.sc = scenario
        self.policy = policy
        self.watchdog_s = watchdog_s
        self.kernel = kernel
        self.programs = programs
        self.image = image
        self.keep = keep
        self.log = log if log is not None else EventLog(events_path)
        self.outcome = Outcome(scenario.name, "kvm", "host", policy,
                               events_path=self.log.path)
        for t in scenario.tasks:
            self.outcome.tasks[t.name] = TaskOutcome()
        self._own_dir = run_dir is None
        # tmpfs by default: holes are caught only on shmem-backed windows (see uffd.py).
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and on_tmpfs("/dev/shm") else None
        self.run_dir = Path(run_dir) if run_dir else Path(
            tempfile.mkdtemp(prefix="faultline-", dir=shm))
        self.uffd: SigbusOnMissing | None = None
        self.lock = threading.RLock()
        self.watch_lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.stopping = False
        self.pause_req = False  # a host event is running: every other vCPU parks
        self.finished_tasks: set[str] = set()
        self.bad_reports = 0
        self.writes: dict[int, int] = {}  # window gpa -> last value a task wrote there
        self.known_size: dict[str, int] = {f.name: f.size for f in scenario.files}
        self.notified = PageRanges()  # pages the guest was told about
        self.bad_seen: dict[str, PageRanges] = {}  # window -> bad pages at the watcher's last look
        self.steps: dict[str, int] = {}
        self.vcpus: list[VcpuState] = []
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory = GuestMemory()
        self.ram_view: memoryview | None = None
        self.inotify: Any = None
        self.watch_paths: dict[int, str] = {}  # inotify wd -> file name
        self.detector: Detector | None = None
        self.can_kick = False

    # --- set-up ---------------------------------------------------------------------------
    def _setup(self) -> None:
        from faultline.guest.build import kernel_path
        from faultline.vmm import boot

        sc = self.sc
        self.log.emit("vm_create", scenario=sc.name, policy=self.policy, vcpus=sc.vcpus,
                      ram_bytes=sc.ram_bytes, run_dir=str(self.run_dir))
        root = self.run_dir.resolve()
        for f in sc.files:
            path = self.run_dir / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or not str(path.resolve()).startswith(str(root) + os.sep):
                raise BackendError(f"{sc.source}: files.{f.name}.path: {f.path!r} leaves the "
                                   "run directory (symlink?)")
            path.write_bytes(file_contents(f))
        ram = self.memory.add_anonymous("ram", 0, sc.ram_bytes)
        self.ram_view = memoryview((ctypes.c_char * sc.ram_bytes).from_address(ram.hva)).cast("B")
        for f in sc.files:
            self.memory.add_file(f.name, f.window_gpa, self.run_dir / f.path,
                                 size=f.window_bytes, readonly=f.readonly)
        self._arm_hole_detection()
        for r in self.memory:  # read each window's /proc/self/maps line now, not on a fault
            if r.kind == "file":
                r.maps_entry(r.hva)
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        with contextlib.suppress(KvmError):  # VMX needs it; harmless elsewhere
            self.vm.set_tss_addr(0xFFFB_D000)
        for slot, gpa, size, hva, ro in self.memory.memslots():
            self.vm.set_user_memory_region(slot, gpa, size, hva,
                                           uapi.KVM_MEM_READONLY if ro else 0)
            self.log.emit("memslot", slot=slot, gpa=hex(gpa), size=size, hva=hex(hva),
                          readonly=ro)
        image = self.image
        if image is None:
            image = boot.load_kernel(kernel_path() if self.kernel is None else Path(self.kernel))
        boot.write_boot(self.memory.write, sc, image,
                        boot_info=boot.build_boot_info(sc, programs=self.programs))
        mcg_cap = (self.kvm.mce_cap_supported() & (uapi.MCG_CTL_P | uapi.MCG_SER_P)) | 10
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
            self.vcpus.append(VcpuState(i, vcpu, synced_regs=bool(sync)))
        self.detector = Detector(self.memory, sc.ram_bytes, self._translate, self._locate)
        if self.policy == "proactive":
            self._start_watch()

    def _arm_hole_detection(self) -> None:
        windows = [r for r in self.memory if r.kind == "file"]
        if not windows:
            return
        try:
            self.uffd = SigbusOnMissing()
            for r in windows:
                self.uffd.register(r.hva, r.size)
            self.log.emit("vmm_hole_detection", enabled=True, mechanism="userfaultfd "
                          "MISSING + UFFD_FEATURE_SIGBUS", windows=[r.name for r in windows])
        except UffdUnavailable as e:
            if self.uffd is not None:
                self.uffd.close()
                self.uffd = None
            self.log.emit("vmm_hole_detection", enabled=False, reason=str(e))

    def _translate(self, vcpu: int, gva: int) -> int | None:
        t = self.vcpus[vcpu].vcpu.translate(gva)
        return t.gpa if t.valid else None

    def _locate(self, vcpu: int) -> list[tuple[int | None, int, str]]:
        """GPAs the instruction at RIP touches (fetch first), for a bare -EFAULT; None where
        the guest's page tables no longer translate the address. The GPRs come from
        kvm_run (KVM_CAP_SYNC_REGS) and one KVM_GET_SREGS gives CR3, then the page tables
        are walked in RAM (mmu.py); KVM_TRANSLATE only where that walk does not apply."""
        state = self.vcpus[vcpu]
        v = state.vcpu
        regs = v.synced_regs() if state.synced_regs else v.get_regs()
        cr0, _, cr3, cr4, _, efer = _SREGS_CRS.unpack_from(v.get_sregs(state.sregs), _OFF_CR0)
        ram = self.ram_view
        walk = mmu.walker_for(cr0, cr4, efer) if ram is not None else None
        unhandled = mmu.UNHANDLED
        # (no helper function for the two translations: each call is a cold frame here)
        rip = regs.rip
        rip_gpa = walk(ram, cr3, rip) if walk is not None else unhandled  # type: ignore[arg-type]
        if rip_gpa == unhandled:
            rip_gpa = self._translate(vcpu, rip)
        if rip_gpa is None:
            return []
        out: list[tuple[int | None, int, str]] = [(rip_gpa, 1, "exec")]
        # Never read the code through a window mapping that may be gone: pread/RAM only.
        n = min(15, abi.PAGE_SIZE - (rip_gpa & (abi.PAGE_SIZE - 1)))
        try:
            if ram is not None and rip_gpa + n <= len(ram):
                code = bytes(ram[rip_gpa:rip_gpa + n])
            else:
                code = self.memory.read(rip_gpa, n)
        except (GuestMemoryError, OSError):
            return out
        if n < 15 and (nxt := self._translate(vcpu, rip + n)) is not None:
            with contextlib.suppress(GuestMemoryError, OSError):  # decode what there is
                code += self.memory.read(nxt, 15 - n)
        for gva, size, kind in decode.operand_accesses(code, rip, regs):
            gpa = walk(ram, cr3, gva) if walk is not None else unhandled  # type: ignore[arg-type]
            if gpa == unhandled:
                gpa = self._translate(vcpu, gva)
            out.append((gpa, size, kind))
        return out

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        try:
            try:
                self._setup()
            except (KvmError, OSError) as e:
                raise BackendError(f"cannot set up the VM: {e}") from None
            for ev in self.sc.events:
                if ev.trigger.task is None:
                    self._fire(ev, None)
            self.can_kick = install_kick_handler()
            now = time.monotonic()
            for v in self.vcpus:
                v.last_progress = now
                v.thread = threading.Thread(target=self._vcpu_thread, args=(v,),
                                            name=f"vcpu{v.index}", daemon=True)
            for v in self.vcpus:
                assert v.thread is not None
                v.thread.start()
            try:
                self._supervise()
            except KeyboardInterrupt:
                self._finish()
                raise Interrupted(self.outcome) from None
            self._finish()
            return self.outcome
        finally:
            self._teardown()

    def _supervise(self) -> None:
        """Main thread: wait for the vCPU threads; the watchdog ends a VM whose vCPUs make
        no progress (no report) for watchdog_s."""
        try:
            while True:
                alive = [v for v in self.vcpus if v.thread is not None and v.thread.is_alive()]
                if not alive:
                    return
                alive[0].thread.join(0.05)  # type: ignore[union-attr]
                now = time.monotonic()
                with self.lock:
                    if self.stopping:
                        continue
                    stuck = [v for v in alive if not v.waiting
                             and now - v.last_progress > self.watchdog_s]
                    if stuck:
                        self._stop("hung", f"watchdog: vCPU {stuck[0].index} made no progress "
                                           f"for {self.watchdog_s:g} s")
        except KeyboardInterrupt:
            self._stop("aborted", "interrupted")
            for v in self.vcpus:
                if v.thread is not None:
                    v.thread.join(5)
            raise

    def _finish(self) -> None:
        self.log.flush()  # every fault's record (built off the fault path) is in the outcome
        o = self.outcome
        if not self.stopping and o.vm == "completed":
            unfinished = [t.name for t in self.sc.tasks if t.name not in self.finished_tasks]
            if unfinished:
                o.vm = "hung"
                o.reason = f"every vCPU stopped with tasks unfinished: {', '.join(unfinished)}"
        for name, t in o.tasks.items():
            if name not in self.finished_tasks:
                t.fate = "hung" if o.vm != "aborted" else "killed"
        self._check_files()
        self.log.emit("vm_stop", vm=o.vm, reason=o.reason)
        self.log.emit("outcome", outcome=o.to_json())

    def _teardown(self) -> None:
        with self.lock:
            self.stopping = True
        for v in self.vcpus:
            if v.thread is not None and v.thread.is_alive():
                self._kick(v)
                v.thread.join(5)
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None
        self.log.flush()  # records still owed need the memory map: before it goes
        self.ram_view = None
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None:
            self.kvm.close()
        self.memory.close()
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        self.log.close()
        if self._own_dir and not self.keep:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _stop(self, vm_state: str, reason: str) -> None:
        """End the run (caller holds the lock or is single-threaded)."""
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            self.outcome.vm = vm_state
            self.outcome.reason = reason
            self.log.emit("vm_abort" if vm_state == "aborted" else "vm_hung", reason=reason)
            self.cond.notify_all()
        for v in self.vcpus:
            self._kick(v)

    def _kick(self, v: VcpuState) -> None:
        with contextlib.suppress(KvmError, ValueError):
            v.vcpu.immediate_exit = True
        if self.can_kick and v.thread is not None and v.thread.ident is not None \
                and v.thread is not threading.current_thread() and v.thread.is_alive():
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(v.thread.ident, KICK_SIGNAL)

    # --- the vCPU loop ------------------------------------------------------------------------
    def _vcpu_thread(self, v: VcpuState) -> None:
        try:
            self._vcpu_loop(v)
        except Exception as e:  # a VMM bug must still end the run with an outcome
            self.log.emit("vmm_error", vcpu=v.index, error=f"{type(e).__name__}: {e}")
            self._stop("aborted", f"VMM error on vCPU {v.index}: {type(e).__name__}: {e}")
        finally:
            if self.outcome.vm == "hung" or (self.stopping and self.outcome.reason
                                             and self.outcome.reason != "completed"):
                self._dump_regs(v)
            v.halted = True
            with self.lock:
                self.cond.notify_all()

    def _vcpu_loop(self, v: VcpuState) -> None:
        vcpu = v.vcpu
        run = vcpu.run
        kvm_run = vcpu.kvm_run
        io_out, mmio_t, hlt_t = exits.IoOut, exits.Mmio, exits.Hlt
        fault_exits = _FAULT_EXITS
        report_port, serial_port = abi.REPORT_PORT, abi.SERIAL_PORT
        serial = bytearray()
        # Port I/O exits are counted in a local, added to the outcome when the loop ends:
        # a dict update per exit is ~1% of an exit's cost.
        n_io = 0
        try:
            while not self.stopping:
                if self.pause_req:
                    self._park(v)
                    continue
                if v.pending_mce or v.pending_irq:
                    self._inject(v, kvm_run)
                ex = run()
                t = type(ex)
                if t is io_out:
                    n_io += 1
                    port = ex[0]
                    if port == report_port:
                        self._on_report(v, int.from_bytes(ex[4], "little"))
                    elif port == serial_port:
                        serial += ex[4]
                        if serial.endswith(b"\n") or len(serial) > 200:
                            self.log.emit("serial", vcpu=v.index,
                                          text=serial.decode("ascii", "replace").rstrip("\n"))
                            serial.clear()
                elif t is hlt_t:
                    if not self._on_hlt(v):
                        return
                elif t is mmio_t:
                    self._on_mmio(v, ex)  # type: ignore[arg-type]  # narrowed by `t is`
                elif t in fault_exits:  # straight to the fault path (no dispatch frames)
                    if not self._on_fault_exit(v, ex):
                        return
                elif not self._on_other(v, ex):
                    return
        finally:
            if n_io:
                with self.lock:
                    self.outcome.count_exit("io", n_io)

    def _on_hlt(self, v: VcpuState) -> bool:
        """An idle vCPU parks here until the VM is done or something is queued for it."""
        self.outcome.count_exit("hlt")
        with self.lock:
            if not v.idle:
                # hlt outside the idle loop (cli; hlt after a panic, or a hostile guest)
                self.log.emit("vcpu_halted", vcpu=v.index)
                v.waiting = True
                self.cond.notify_all()
                return False
            v.waiting = True
            while not self.stopping and not self._all_done() and not (
                    v.pending_irq or v.pending_mce):
                self.cond.wait(0.5)
            v.waiting = False
            v.last_progress = time.monotonic()
            if self.stopping:
                return False
            return bool(v.pending_irq or v.pending_mce) or not self._all_done()

    def _all_done(self) -> bool:
        return len(self.finished_tasks) == len(self.sc.tasks) and all(
            v.idle or v.halted or v.waiting for v in self.vcpus)

    def _on_mmio(self, v: VcpuState, ex: exits.Mmio) -> None:
        assert self.detector is not None
        fault = self.detector.from_exit(v.index, ex)
        if fault is None:
            self.outcome.count_exit("mmio")
            if not ex.is_write:  # no device there: reads float high, like an empty bus
                v.vcpu.complete_mmio_read(ex, b"\xff" * ex.len)
            return
        if not ex.is_write:
            # KVM completes this load on re-entry whatever we do; what it gets is never
            # used: the injected #MC / AR notification kills the task first.
            v.vcpu.complete_mmio_read(ex, MMIO_FILL[: ex.len])
        self._on_fault(v, fault)

    def _on_other(self, v: VcpuState, ex: exits.Exit) -> bool:
        assert self.detector is not None
        if type(ex) in _FAULT_EXITS:  # the loop dispatches these itself; other callers
            return self._on_fault_exit(v, ex)
        if isinstance(ex, exits.Intr):
            self.outcome.count_exit("intr")
            v.vcpu.immediate_exit = False
            return not self.stopping
        if isinstance(ex, exits.IrqWindowOpen):
            self.outcome.count_exit("irq_window")
            return True
        if isinstance(ex, exits.IoIn):
            self.outcome.count_exit("io")
            v.vcpu.complete_io_in(ex, b"\xff" * (ex.size * ex.count))
            return True
        return self._unhandled(v, ex)

    def _unhandled(self, v: VcpuState, ex: exits.Exit) -> bool:
        kind = type(ex).__name__
        self.outcome.count_exit(kind.lower())
        self.log.emit("kvm_exit", vcpu=v.index, exit=kind, detail=repr(ex))
        if isinstance(ex, exits.Shutdown):
            self._stop("aborted", f"vCPU {v.index}: triple fault (KVM_EXIT_SHUTDOWN)")
        else:
            self._stop("aborted", f"vCPU {v.index}: unhandled exit {ex!r}")
        return False

    def _on_fault_exit(self, v: VcpuState, ex: exits.Exit) -> bool:
        """KVM_EXIT_MEMORY_FAULT, a bare -EFAULT, or an internal error (a fetch KVM could
        not emulate): a memory fault if the detector can place it."""
        assert self.detector is not None
        rip = None
        if type(ex) is exits.InternalError:
            with contextlib.suppress(KvmError):
                rip = v.vcpu.get_regs().rip
        try:
            fault = self.detector.bare_efault(v.index, ex[0] == EHWPOISON) \
                if type(ex) is exits.BareEfault else self.detector.from_exit(v.index, ex, rip)
        except GuestUnmapped as e:
            # Bounded: a guest that keeps faulting on what it does not map is stuck.
            v.unmapped_retries += 1
            self.outcome.count_exit("efault_retry")
            self.log.emit("vmm_retry", vcpu=v.index, reason=str(e),
                          retries=v.unmapped_retries)
            if v.unmapped_retries > 8:
                self._stop("aborted", f"{e}, {v.unmapped_retries} times in a row")
                return False
            return True
        except Unrecoverable as e:
            self.outcome.count_exit("memory_fault")
            self.log.emit("kvm_exit", vcpu=v.index, exit=type(ex).__name__, detail=repr(ex))
            self._stop("aborted", str(e))
            return False
        if fault is None:
            return self._unhandled(v, ex)
        self._on_fault(v, fault)
        return not self.stopping

    # --- faults -------------------------------------------------------------------------------
    def _on_fault(self, v: VcpuState, fault: MemoryFault) -> None:
        """Resolve, decide, queue. Only what the decision needs is on this path (the cause:
        region lookup, the file's size, SEEK_DATA); the record with its /proc/self/maps
        cross-check is built after the injection is queued (EventLog.emit_later),
        overlapping the guest's handling of it. A cross-check that fails then stops the VM.
        (The path runs cold after every guest run, so it is kept short in Python frames:
        docs/performance.md.)"""
        assert self.detector is not None
        v.unmapped_retries = 0
        counts = self.outcome.exits
        counts["memory_fault"] = counts.get("memory_fault", 0) + 1
        self.log.emit("kvm_exit", vcpu=v.index, exit="memory_fault", source=fault.source,
                      gpa=hex(fault.gpa), access=fault.access, size=fault.size)
        res = fault.resolution or self.memory.resolve(fault.gpa, cross_check=False)
        # the common case without a call: a bad page the exit did not call poisoned
        cause = res.cause if res.cause in _BAD_CAUSES and not fault.poisoned \
            else classify(self.memory, fault, res)
        self.log.emit_later("vmm_resolve", functools.partial(self._record, fault, res, cause),
                            vcpu=v.index)
        try:
            self.detector.note_handled(fault)
        except Unrecoverable as e:
            self._stop("aborted", str(e))
            return
        window = self._window(fault.gpa, res.file_size) if self.policy in pol.WINDOWED \
            else None
        self._apply(v, fault, pol.decide(self.policy, fault.gpa, cause, window))

    def _record(self, fault: MemoryFault, res: Resolution, cause: str) -> dict[str, Any]:
        """The fault's record and its vmm_resolve fields (off the fault path)."""
        rec, maps, problems = record(self.memory, fault, res, cause)
        with self.lock:
            self.outcome.faults.append(rec)
            if problems and not self.stopping:
                self._stop("aborted", f"gpa {fault.gpa:#x}: resolution disagrees with "
                                      f"/proc/self/maps: {'; '.join(problems)}")
        return {"line": rec.line(), **rec.to_json(),
                "maps": maps._asdict() if maps is not None else None}

    def _window(self, gpa: int, file_size: int | None) -> pol.Window | None:
        region = self.memory.find_region(gpa)
        if region is None or region.kind != "file":
            return None
        f = self.sc.file(region.name)
        size = file_size if file_size is not None else 0
        holes = tuple(file_holes(region.fd, 0, min(size, f.window_bytes)))
        return pol.Window(int(region.gpa), region.size, size, self.known_size.get(f.name), holes)

    def _apply(self, v: VcpuState, fault: MemoryFault, d: pol.Decision) -> None:
        if isinstance(d, pol.Abort):
            self._stop("aborted", d.reason)
        elif isinstance(d, pol.InjectMce):
            # The faulting vCPU is still in the faulting context: an SRAR for it.
            gpa = fault.gpa if d.action_required else d.gpa
            v.pending_mce.append((gpa, d.action_required))
            self.log.emit("vmm_queue_mce", vcpu=v.index, gpa=hex(gpa), ar=d.action_required)
        elif isinstance(d, pol.Notify):
            self._notify(v, d, ar_gpa=fault.gpa)
        else:
            self.log.emit("vmm_ignore", vcpu=v.index, reason=d.reason)

    def _notify(self, v: VcpuState, d: pol.Notify, ar_gpa: int | None) -> None:
        """Post ring records and queue the interrupt for vCPU v (v runs the handler)."""
        assert self.ram_view is not None
        ring = abi.NOTIFY_RING_GPA
        with self.lock:
            head, tail, entries, _ = abi.NOTIFY_HEADER.unpack_from(self.ram_view, ring)
            entries = entries or abi.NOTIFY_ENTRIES
            for i, (first, npages, cause) in enumerate(d.ranges):
                if (head - tail) & 0xFFFF_FFFF >= entries:
                    self.log.emit("vmm_notify_ring_full", vcpu=v.index, first=hex(first))
                    break
                flags, ar = 0, 0
                if ar_gpa is not None and i == 0:
                    flags = abi.NOTIFY_F_AR | (v.index << abi.NOTIFY_AR_VCPU_SHIFT)
                    ar = ar_gpa
                slot = ring + abi.NOTIFY_HEADER.size + (head % entries) * abi.NOTIFY_ENTRY.size
                abi.NOTIFY_ENTRY.pack_into(self.ram_view, slot, first, npages,
                                           pol.CAUSE_CODES.get(cause, 0), flags, ar)
                head = (head + 1) & 0xFFFF_FFFF
                self.notified.add(first, npages)
                self.log.emit("vmm_notify", vcpu=v.index, first=hex(first), npages=npages,
                              cause=cause, ar_gpa=hex(ar) if flags else None)
            abi.NOTIFY_HEADER.pack_into(self.ram_view, ring, head, tail, entries, 0)
            if ar_gpa is not None:
                mbox = abi.REPORT_BUF_GPA + v.index * abi.REPORT_BUF_STRIDE + abi.AR_MAILBOX_OFFSET
                self.ram_view[mbox:mbox + 8] = ar_gpa.to_bytes(8, "little")
            v.pending_irq = True
            self.cond.notify_all()
        if v.thread is not threading.current_thread():
            self._kick(v)

    def _inject(self, v: VcpuState, kvm_run: Any) -> None:
        """Deliver what is queued for this vCPU (called from its own thread)."""
        vcpu = v.vcpu
        if v.pending_mce:
            # MCG_STATUS.MCIP is set only by an #MC we injected, so the first one needs no
            # MSR read; after that, check it (a guest still in its handler would be shut down).
            mcg = vcpu.get_msrs([uapi.MSR_IA32_MCG_STATUS]).get(uapi.MSR_IA32_MCG_STATUS, 0) \
                if v.mce_injected else 0
            if mcg & uapi.MCG_STATUS_MCIP:
                # A second #MC while MCIP is set shuts the VM down: wait for the guest to
                # finish its handler (it clears MCIP).
                self.log.emit("vmm_mce_deferred", vcpu=v.index, mcg_status=hex(mcg))
            else:
                gpa, ar = v.pending_mce.pop(0)
                status, misc, mcg_status = pol.MCE_FIELDS[ar]  # = pol.mce_encoding, no call
                mce = uapi.kvm_x86_mce(status=status, addr=gpa, misc=misc,
                                       mcg_status=mcg_status, bank=pol.MCE_BANK)
                vcpu.set_mce(mce)
                v.mce_injected = True
                self.log.emit("vmm_inject_mce", vcpu=v.index, gpa=hex(gpa),
                              mce="SRAR" if ar else "SRAO", status=hex(status),
                              mcg_status=hex(mcg_status), bank=pol.MCE_BANK)
        if v.pending_irq:
            if kvm_run[_OFF_READY_FOR_IRQ] and kvm_run[_OFF_IF_FLAG]:
                vcpu.interrupt(abi.NOTIFY_VECTOR)
                v.pending_irq = False
                kvm_run[_OFF_REQ_IRQ_WINDOW] = 0
                self.log.emit("vmm_inject_irq", vcpu=v.index, vector=abi.NOTIFY_VECTOR)
            else:
                kvm_run[_OFF_REQ_IRQ_WINDOW] = 1  # exit when the guest can take it

    # --- reports ------------------------------------------------------------------------------
    def _on_report(self, v: VcpuState, gpa: int) -> None:
        ram = self.ram_view
        assert ram is not None
        if not 0 <= gpa <= len(ram) - _REPORT_SIZE:
            self._bad_report(v, f"record gpa {gpa:#x} outside RAM")
            return
        kind, magic, _vcpu, tix, a, b, c, d = _REPORT.unpack_from(ram, gpa)
        name = abi.REPORT_KINDS.get(kind)
        if magic != abi.REPORT_MAGIC or name is None:
            self._bad_report(v, f"bad record at {gpa:#x}: kind {kind} magic {magic:#x}")
            return
        tasks = self.sc.tasks
        task = tasks[tix].name if tix < len(tasks) else None
        if tix != abi.NO_TASK and task is None:
            self._bad_report(v, f"{name} record names task {tix}, which does not exist")
            return
        v.last_progress = time.monotonic()
        handler = _REPORT_HANDLERS[kind]
        handler(self, v, task, a, b, c, d)

    def _bad_report(self, v: VcpuState, why: str) -> None:
        self.bad_reports += 1
        self.log.emit("guest_bad_report", vcpu=v.index, error=why)
        if self.bad_reports >= 64:
            self._stop("aborted", f"guest protocol error: {self.bad_reports} bad reports")

    def _r_boot(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        self.log.emit("guest_boot", vcpu=v.index, tasks=b)

    def _r_task_start(self, v: VcpuState, task: str | None, a: int, b: int, c: int,
                      d: int) -> None:
        self.log.emit("task_start", vcpu=v.index, task=task, insns=a)

    def _r_step(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        if task is None:
            return
        prog = self.sc.task(task).program
        self.log.emit("task_step", vcpu=v.index, task=task, pc=a, steps=b,
                      insn=prog[a].text if a < len(prog) else None)
        self.steps[task] = b
        for ev in self.sc.events:
            if ev.trigger.task == task and ev.trigger.step == b:
                self._fire(ev, v)

    def _r_value(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        kinds = ("read", "write", "exec", "kread")
        kind = kinds[d] if d < len(kinds) else str(d)
        self.log.emit("guest_value", vcpu=v.index, task=task, op=kind, vaddr=hex(a),
                      value=hex(b), gpa=hex(c))
        region = self.memory.find_region(c)
        if region is None or region.kind != "file":
            return
        if kind == "write":
            self.writes[c] = b
            return
        page = c & ~(abi.PAGE_SIZE - 1)
        offset = region.file_offset_of(page)
        size = region.file_size()
        if page in self.outcome.offlined or (offset is not None and size is not None
                                             and offset >= size):
            self.outcome.bad_values.append(
                f"task {task} read {b:#x} from gpa {c:#x}, a page that cannot be backed")

    def _r_exit(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        if task is None:
            return
        self.log.emit("task_exit", vcpu=v.index, task=task, code=a)
        self._finish_task(task, TaskOutcome("exited", a, None))
        # `exit` is a step like any other (docs/scenarios.md), but the guest reports it
        # with R_EXIT instead of R_STEP: a trigger on it fires here.
        steps = self.steps.get(task, 0) + 1
        self.steps[task] = steps
        for ev in self.sc.events:
            if ev.trigger.task == task and ev.trigger.step == steps:
                self._fire(ev, v)

    def _r_signal(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        code = abi.SI_CODES.get((a, b), f"sig{a}/{b}")
        self.log.emit("guest_signal", vcpu=v.index, task=task, signo=a, code=code,
                      vaddr=hex(c), gpa=hex(d))
        if task is not None:
            fate = "sigbus" if a == abi.SIGBUS else "killed"
            self._finish_task(task, TaskOutcome(fate, None, Signal(code, c)))

    def _r_offline(self, v: VcpuState, task: str | None, a: int, b: int, c: int,
                   d: int) -> None:
        src = {abi.OFFLINE_MCE_AR: "mce-ar", abi.OFFLINE_MCE_AO: "mce-ao",
               abi.OFFLINE_NOTIFY: "notify"}.get(b, str(b))
        npages = max(1, min(c, 1 << 20))
        with self.lock:
            self.outcome.offlined.update(range(a, a + npages * abi.PAGE_SIZE, abi.PAGE_SIZE))
        self.log.emit("guest_memory_failure", vcpu=v.index, gpa=hex(a), pages=npages,
                      source=src)

    def _r_mce(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        self.log.emit("guest_mce", vcpu=v.index, task=task, mcg_status=hex(a),
                      mci_status=hex(b), mci_addr=hex(c), mci_misc=hex(d))

    def _r_notify(self, v: VcpuState, task: str | None, a: int, b: int, c: int,
                  d: int) -> None:
        self.log.emit("guest_notify", vcpu=v.index, records=a, pages=b)

    def _r_exception(self, v: VcpuState, task: str | None, a: int, b: int, c: int,
                     d: int) -> None:
        self.log.emit("guest_exception", vcpu=v.index, task=task, vector=a,
                      error_code=hex(b), rip=hex(c), cr2=hex(d))

    def _r_idle(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        self.log.emit("vcpu_idle", vcpu=v.index)
        with self.lock:
            v.idle = True
            self.cond.notify_all()

    def _r_panic(self, v: VcpuState, task: str | None, a: int, b: int, c: int, d: int) -> None:
        self.log.emit("guest_panic", vcpu=v.index, code=a, detail=[hex(b), hex(c), hex(d)])
        self._stop("aborted", f"guest panic on vCPU {v.index} (code {a})")

    def _finish_task(self, task: str, fate: TaskOutcome) -> None:
        with self.lock:
            if task in self.finished_tasks:
                return
            self.finished_tasks.add(task)
            self.outcome.tasks[task] = fate
            self.cond.notify_all()

    # --- host events ----------------------------------------------------------------------------
    def _park(self, v: VcpuState) -> None:
        with self.cond:
            v.parked = True
            self.cond.notify_all()
            while self.pause_req and not self.stopping:
                self.cond.wait(0.1)
            v.parked = False
        v.last_progress = time.monotonic()

    @contextlib.contextmanager
    def _world_stopped(self, v: VcpuState | None) -> Any:
        """Stop every other vCPU (kick it out of KVM_RUN, park it) while a host event and
        the VMM's reaction to it run, as QEMU pauses all vCPUs for such work. A trigger
        'after T:N' then means the same on SMP as in the model: nothing else runs between
        T's step N, the host change and (proactive) the notification."""
        others = [o for o in self.vcpus if o is not v]
        if v is None or not others:
            yield
            return
        with self.cond:
            # Another vCPU's host event may be running: wait for it parked, as it expects.
            while self.pause_req and not self.stopping:
                v.parked = True
                self.cond.notify_all()
                self.cond.wait(0.1)
            v.parked = False
            self.pause_req = True
        for o in others:
            self._kick(o)
        deadline = time.monotonic() + 2.0
        with self.cond:
            while not all(o.parked or o.waiting or o.halted for o in others) \
                    and not self.stopping and time.monotonic() < deadline:
                self.cond.wait(0.01)
        try:
            yield
        finally:
            with self.cond:
                self.pause_req = False
                self.cond.notify_all()

    def _fire(self, ev: HostEvent, v: VcpuState | None) -> None:
        with self._world_stopped(v):
            self._fire_stopped(ev, v)

    def _fire_stopped(self, ev: HostEvent, v: VcpuState | None) -> None:
        region = self.memory.region(ev.file)
        f = self.sc.file(ev.file)
        path = str(self.run_dir / f.path)
        before = os.fstat(region.fd).st_size
        argv: list[str] | None = None
        if ev.action == "extend" and ev.size is not None and ev.size <= before:
            self.log.emit("host_event", vcpu=v.index if v else None, action=ev.action,
                          file=ev.file, path=path, by=ev.by, trigger=str(ev.trigger),
                          size_before=before, size_after=before, skipped="already larger")
            return
        if ev.action in ("truncate", "extend"):
            assert ev.size is not None
            argv = ["truncate", "-s", str(ev.size), path]
            if ev.by == "runner":
                os.truncate(path, ev.size)
        elif ev.action == "punch-hole":
            argv = ["fallocate", "-p", "-o", str(ev.offset), "-l", str(ev.length), path]
            if ev.by == "runner":
                _punch_hole(region.fd, ev.offset, ev.length)
        elif ev.action == "write":
            argv = ["python3", "-c", _WRITE_SNIPPET, path, str(ev.offset), str(ev.value)]
            if ev.by == "runner":
                os.pwrite(region.fd, ev.value.to_bytes(8, "little"), ev.offset)
        if ev.by == "subprocess" and argv is not None:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        after = os.fstat(region.fd).st_size
        self.log.emit("host_event", vcpu=v.index if v else None, action=ev.action,
                      file=ev.file, path=path, by=ev.by, trigger=str(ev.trigger),
                      size_before=before, size_after=after, offset=ev.offset,
                      length=ev.length)
        if self.policy == "proactive":
            self._sync_watch(v if v is not None else (self.vcpus[0] if self.vcpus else None),
                             region)

    # --- proactive: watch the backing files ---------------------------------------------------
    def _start_watch(self) -> None:
        from inotify_simple import INotify, flags

        self.inotify = INotify()
        for r in self.memory:  # pages bad from the start (window beyond EOF) are not news
            if r.kind == "file":
                self.bad_seen[r.name] = bad_ranges(r)
        mask = flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE
        for f in self.sc.files:
            wd = self.inotify.add_watch(str(self.run_dir / f.path), mask)
            self.watch_paths[wd] = f.name
        self.log.emit("vmm_watch", files=[f.name for f in self.sc.files])
        t = threading.Thread(target=self._watch_thread, name="watch", daemon=True)
        t.start()

    def _watch_thread(self) -> None:
        import select

        while not self.stopping and self.inotify is not None:
            try:
                ready, _, _ = select.select([self.inotify.fileno()], [], [], 0.1)
                if ready:
                    self._poll_watch(None)
            except (OSError, ValueError):
                return

    def _poll_watch(self, v: VcpuState | None) -> int:
        """Read pending inotify events (the change may come from any process) and notify
        the guest of every page that became bad and that it was not told about yet.
        Returns the number of pages notified. Never blocks on the VM lock while reading."""
        with self.watch_lock:
            ino = self.inotify
            if ino is None:
                return 0
            events = ino.read(timeout=0)
            names = sorted({n for e in events if (n := self.watch_paths.get(e.wd))})
            total = 0
            for name in names:
                region = self.memory.region(name)
                size = os.fstat(region.fd).st_size
                old = self.known_size.get(name, self.sc.file(name).size)
                now_bad = bad_ranges(region)
                # Only pages that became bad since the last look (policy.on_file_change's
                # rule), and that the guest was not already told about by the fault path.
                fresh = now_bad.minus(self.bad_seen.get(name, PageRanges())).minus(self.notified)
                self.bad_seen[name] = now_bad
                self.log.emit("vmm_file_change", file=name, size_before=old, size_after=size,
                              bad_pages=len(fresh))
                self.known_size[name] = size
                if not fresh:
                    continue
                # one record per range and cause: holes below the EOF page, beyond-EOF from it
                eof_page = -(-max(size - region.file_offset, 0) // abi.PAGE_SIZE)
                holes, beyond = fresh.split_at(region.gpa + eof_page * abi.PAGE_SIZE)
                d = pol.Notify(tuple((first, n, cause) for part, cause in
                                     ((holes, "hole"), (beyond, "beyond-eof"))
                                     for first, n in part.ranges()))
                target = v if v is not None else self._irq_target()
                if target is not None:
                    self._notify(target, d, ar_gpa=None)
                    total += len(fresh)
            return total

    def _sync_watch(self, v: VcpuState | None, region: Any) -> None:
        """After a host event the runner itself caused: wait (briefly) until the watcher
        has seen it, so 'proactive' really acts before the guest runs on."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if bad_ranges(region) == self.bad_seen.get(region.name):
                return
            self._poll_watch(v)
            time.sleep(0.001)
        self.log.emit("vmm_watch_timeout", file=region.name)

    def _irq_target(self) -> VcpuState | None:
        for v in self.vcpus:
            if not v.halted:
                return v
        return None

    # --- end of run ------------------------------------------------------------------------------
    def _check_files(self) -> None:
        """The DAX files must hold what the tasks wrote (where the page still exists)."""
        for gpa, value in sorted(self.writes.items()):
            region = self.memory.find_region(gpa)
            if region is None or region.closed:
                continue
            page = gpa & ~(abi.PAGE_SIZE - 1)
            off = region.file_offset_of(gpa)
            if off is None or page in self.outcome.offlined:
                continue
            size = os.fstat(region.fd).st_size
            if off + 8 > size:
                continue
            got = int.from_bytes(os.pread(region.fd, 8, off), "little")
            if got != value:
                self.outcome.file_mismatches.append(
                    f"{region.name} +{off:#x}: the guest wrote {value:#x}, the file has {got:#x}")
        self.log.emit("file_check", writes=len(self.writes),
                      mismatches=self.outcome.file_mismatches)

    def _dump_regs(self, v: VcpuState) -> None:
        with contextlib.suppress(KvmError, ValueError, OSError):
            r = v.vcpu.get_regs()
            regs = {f[0]: hex(getattr(r, f[0])) for f in uapi.kvm_regs._fields_}
            self.log.emit("vcpu_regs", vcpu=v.index, **regs)


_REPORT_HANDLERS: dict[int, Callable[..., None]] = {
    abi.R_BOOT: KvmRun._r_boot,
    abi.R_TASK_START: KvmRun._r_task_start,
    abi.R_STEP: KvmRun._r_step,
    abi.R_VALUE: KvmRun._r_value,
    abi.R_EXIT: KvmRun._r_exit,
    abi.R_SIGNAL: KvmRun._r_signal,
    abi.R_OFFLINE: KvmRun._r_offline,
    abi.R_MCE: KvmRun._r_mce,
    abi.R_NOTIFY: KvmRun._r_notify,
    abi.R_EXCEPTION: KvmRun._r_exception,
    abi.R_IDLE: KvmRun._r_idle,
    abi.R_PANIC: KvmRun._r_panic,
}

_WRITE_SNIPPET = ("import os,sys;fd=os.open(sys.argv[1],os.O_WRONLY);"
                  "os.pwrite(fd,int(sys.argv[3]).to_bytes(8,'little'),int(sys.argv[2]))")


def _punch_hole(fd: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


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
