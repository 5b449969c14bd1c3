"""The fault path: an exit the detector places as a memory fault is resolved (GPA -> memslot
-> HVA -> file + offset + cause), decided by the policy (``faultline.vmm.policy``) and
acted on (an event queued for the guest, or the run stopped).

Runs on the faulting vCPU's thread. Only what the decision needs is on this path (the
cause: region lookup, the file's size, SEEK_DATA); the record with its /proc/self/maps
cross-check is built after the injection is queued (``EventLog.emit_later``),
overlapping the guest's handling of it. The path runs cold after every guest run, so it
is kept short in Python frames (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from faultline import abi
from faultline.kvm import KvmError, exits
from faultline.memory import Resolution, file_holes
from faultline.vmm import policy as pol
from faultline.vmm.faults import (
    Detector,
    GuestUnmapped,
    MemoryFault,
    Unrecoverable,
    classify,
    record,
)
from faultline.vmm.inject import Injector
from faultline.vmm.machine import Machine, VcpuState

EHWPOISON = exits.EHWPOISON
FAULT_EXITS = frozenset({exits.MemoryFault, exits.BareEfault, exits.InternalError})
_BAD_CAUSES = frozenset({"beyond-eof", "hole", "unmapped"})  # classify() returns these as-is
MMIO_FILL = b"\xde\xad\xfa\x17" * 2  # what a caught load "reads"; the task dies before use
MAX_UNMAPPED_RETRIES = 8


class FaultHandler:
    def __init__(self, m: Machine, detector: Detector, injector: Injector,
                 policy: str) -> None:
        self.m = m
        self.detector = detector
        self.injector = injector
        self.policy = policy
        self.needs = pol.NEEDS[policy]

    def on_mmio(self, v: VcpuState, ex: exits.Mmio) -> None:
        """KVM_EXIT_MMIO: a real MMIO access (no device there), or a memory fault where
        this host's KVM reports a failed access to a memslot as MMIO."""
        fault = self.detector.from_exit(v.index, ex)
        if fault is None:
            self.m.count_exit("mmio")
            if not ex.is_write:  # no device there: reads float high, like an empty bus
                v.vcpu.complete_mmio_read(ex, b"\xff" * ex.len)
            return
        if not ex.is_write:
            # KVM completes this load on re-entry whatever we do; what it gets is never
            # used: the injected #MC / AR notification kills the task first.
            v.vcpu.complete_mmio_read(ex, MMIO_FILL[: ex.len])
        self.on_fault(v, fault)

    def on_fault_exit(self, v: VcpuState, ex: exits.Exit) -> bool:
        """KVM_EXIT_MEMORY_FAULT, a bare -EFAULT, or an internal error (a fetch KVM could
        not emulate): a memory fault if the detector can place it. False: the vCPU is
        done (the run stops)."""
        m = self.m
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
            m.count_exit("efault_retry")
            m.log.emit("vmm_retry", vcpu=v.index, reason=str(e), retries=v.unmapped_retries)
            if v.unmapped_retries > MAX_UNMAPPED_RETRIES:
                m.stop("aborted", f"{e}, {v.unmapped_retries} times in a row")
                return False
            return True
        except Unrecoverable as e:
            m.count_exit("memory_fault")
            m.log.emit("kvm_exit", vcpu=v.index, exit=type(ex).__name__, detail=repr(ex))
            m.stop("aborted", str(e))
            return False
        if fault is None:
            return self.unhandled(v, ex)
        self.on_fault(v, fault)
        return not m.stopping

    def unhandled(self, v: VcpuState, ex: exits.Exit) -> bool:
        """An exit nobody handles: the VM cannot go on."""
        m = self.m
        kind = type(ex).__name__
        m.count_exit(kind.lower())
        m.log.emit("kvm_exit", vcpu=v.index, exit=kind, detail=repr(ex))
        if isinstance(ex, exits.Shutdown):
            # KVM gives up on a triple fault with KVM_EXIT_SHUTDOWN; QEMU then resets the
            # guest (kvm_cpu_exec(): qemu_system_reset_request(SHUTDOWN_CAUSE_GUEST_RESET)).
            m.stop("reset", f"vCPU {v.index}: triple fault (KVM_EXIT_SHUTDOWN)")
        else:
            m.stop("aborted", f"vCPU {v.index}: unhandled exit {ex!r}")
        return False

    def on_fault(self, v: VcpuState, fault: MemoryFault) -> None:
        """Resolve, decide, queue."""
        m = self.m
        v.unmapped_retries = 0
        page = fault.gpa & ~(abi.PAGE_SIZE - 1)
        with m.lock:
            m.outcome.count_exit("memory_fault")
            in_flight = page in v.ar_pages
        m.log.emit("kvm_exit", vcpu=v.index, exit="memory_fault", source=fault.source,
                   gpa=hex(fault.gpa), access=fault.access, size=fault.size)
        res = fault.resolution or m.memory.resolve(fault.gpa, cross_check=False)
        # the common case without a call: a bad page the exit did not call poisoned
        cause = res.cause if res.cause in _BAD_CAUSES and not fault.poisoned \
            else classify(m.memory, fault, res)
        m.log.emit_later("vmm_resolve", functools.partial(self.record, fault, res, cause),
                         vcpu=v.index)
        try:
            if not self.detector.note_handled(fault, in_flight):
                m.log.emit("vmm_in_flight", vcpu=v.index, gpa=hex(fault.gpa))
                return
        except Unrecoverable as e:
            m.stop("aborted", str(e))
            return
        window = self.window(fault.gpa, res.file_size) if self.needs.window else None
        self.apply(v, fault, pol.decide(self.policy, fault.gpa, cause, window))

    def record(self, fault: MemoryFault, res: Resolution, cause: str) -> dict[str, Any]:
        """The fault's record and its vmm_resolve fields (off the fault path)."""
        m = self.m
        rec, maps, problems = record(m.memory, fault, res, cause)
        with m.lock:
            m.outcome.faults.append(rec)
            if problems and not m.stopping:
                m.stop("aborted", f"gpa {fault.gpa:#x}: resolution disagrees with "
                                  f"/proc/self/maps: {'; '.join(problems)}")
        return {"line": rec.line(), **rec.to_json(),
                "maps": maps._asdict() if maps is not None else None}

    def window(self, gpa: int, file_size: int | None) -> pol.Window | None:
        """What the policy needs to know of the file window around gpa."""
        m = self.m
        region = m.memory.find_region(gpa)
        if region is None or region.kind != "file":
            return None
        f = m.sc.file(region.name)
        size = file_size if file_size is not None else 0
        holes = tuple(file_holes(region.fd, 0, min(size, f.window_bytes)))
        return pol.Window(int(region.gpa), region.size, size, m.known_size.get(f.name), holes)

    def apply(self, v: VcpuState, fault: MemoryFault, d: pol.Decision) -> None:
        if isinstance(d, pol.Abort):
            self.m.stop("aborted", d.reason)
        elif isinstance(d, pol.InjectMce):
            # The faulting vCPU is still in the faulting context: an SRAR for it.
            self.injector.queue_mce(v, fault.gpa if d.action_required else d.gpa,
                                    d.action_required)
        elif isinstance(d, pol.Notify):
            self.injector.notify(v, d.ranges, ar_gpa=fault.gpa)
        elif isinstance(d, pol.RefuseWrite):
            self.injector.notify(v, ((d.gpa & ~(abi.PAGE_SIZE - 1), 1, "read-only"),),
                                 ar_gpa=d.gpa)
        else:
            self.m.log.emit("vmm_ignore", vcpu=v.index, reason=d.reason)
