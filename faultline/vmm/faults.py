"""Detection and resolution: every way a failed guest access reaches userspace becomes one
:class:`MemoryFault`, and every MemoryFault is resolved GPA -> memslot -> HVA -> mapping
(/proc/self/maps) -> file + offset, with the reason it failed.

The ways in (docs/design.md, "The fault path"):

1. KVM_RUN -1, errno EFAULT/EHWPOISON, exit_reason KVM_EXIT_MEMORY_FAULT: gpa given.
2. KVM_RUN -1 with a bare EFAULT (x86 upstream today): no gpa; recovered by decoding the
   instruction at RIP and walking the guest's page tables to its operand (locate.py),
   else by scanning the file-backed windows for pages that are now bad; guarded (per
   page and vCPU, policy.count_fault) against repeating forever.
3. KVM_EXIT_MMIO whose gpa lies in RAM or a window: what this host's KVM does for a
   truncated page, and for a store to a read-only memslot.
4. KVM_EXIT_INTERNAL_ERROR from an instruction fetch out of such a page: the fetch address
   is translated with KVM_TRANSLATE.

Not handled: upstream x86 reports a hardware-poisoned host page by sending SIGBUS
BUS_MCEERR_AR to the vCPU thread (kvm_send_hwpoison_signal), which QEMU catches
(kvm_arch_on_sigbus_vcpu). Python cannot take a synchronous SIGBUS with its address on a
vCPU thread, and this host cannot make real poison (CONFIG_MEMORY_FAILURE is off): here
EHWPOISON is only met through path 1, tested by decoding; the model covers poison.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

from faultline.abi import PAGE_SIZE
from faultline.kvm import exits
from faultline.memory import GuestMemory, MapsEntry, PageRanges, Region, Resolution, file_holes
from faultline.outcome import FaultRecord
from faultline.vmm import policy as pol

EHWPOISON = exits.EHWPOISON


class MemoryFault(NamedTuple):
    """A guest access the host could not back, however KVM reported it. (A NamedTuple: it
    is built on the fault path, where a frozen dataclass's __init__ costs several times
    more.)"""

    gpa: int
    size: int
    access: str  # read | write | exec | unknown
    source: str  # memory-fault-exit | bare-efault | mmio | internal-error
    vcpu: int
    poisoned: bool = False  # EHWPOISON / BUS_MCEERR_*: the host page itself is bad
    in_progress: bool = False  # the access completes on re-entry (MMIO): kill before use
    # the detector's resolution (no maps cross-check yet), when it needed one to decide
    resolution: Resolution | None = None


# MemoryFault(...) without the NamedTuple's Python-level __new__ (all fields given): the
# fault path builds one, and each Python frame there is a cold one.
_new_fault = functools.partial(tuple.__new__, MemoryFault)


class Unrecoverable(Exception):
    """A fault whose gpa cannot be found, or that keeps repeating after it was handled."""


class GuestUnmapped(Exception):
    """A bare -EFAULT whose decoded access the guest no longer maps: another vCPU's
    memory_failure() rewrote the PTE under an access already on its way (a stale TLB).
    Nothing to resolve: re-entering lets the guest fault on its own poisoned PTE."""


def bad_ranges(region: Region) -> PageRanges:
    """The pages of a file window that cannot be backed now (holes, beyond EOF), as
    ranges: a truncated 1 GiB window is one range, not 131,072 pages."""
    out = PageRanges()
    if region.kind != "file":
        return out
    size = os.fstat(region.fd).st_size
    end = min(size, region.file_offset + region.size)
    for off, length in file_holes(region.fd, region.file_offset, end):
        first = -(-off // PAGE_SIZE) * PAGE_SIZE  # whole pages inside the hole only
        last = (off + length) // PAGE_SIZE * PAGE_SIZE
        out.add(region.gpa + first - region.file_offset, (last - first) // PAGE_SIZE)
    first_beyond = -(-(size - region.file_offset) // PAGE_SIZE) if size > region.file_offset else 0
    out.add(region.gpa + first_beyond * PAGE_SIZE, region.size // PAGE_SIZE - first_beyond)
    return out


class Detector:
    """Turns raw exits into MemoryFaults for one VM. Thread-safe enough: per-vCPU state
    is only touched by that vCPU's thread; the handled set is append-only."""

    def __init__(self, memory: GuestMemory, ram_end: int,
                 translate: Callable[[int, int], int | None],
                 locate: Callable[[int], list[tuple[int | None, int, str]]] | None = None
                 ) -> None:
        self.memory = memory
        self.ram_end = ram_end
        self.translate = translate  # (vcpu, gva) -> gpa | None, via KVM_TRANSLATE
        # (vcpu) -> [(gpa, size, kind)] the instruction at RIP touches, fetch first; gpa is
        # None for an access whose address the guest's page tables no longer translate
        self.locate = locate
        self.handled: dict[int, int] = {}  # page gpa -> times handled (any vCPU)
        self.repeats: dict[tuple[int, int], int] = {}  # (page gpa, vCPU) -> times handled

    def from_exit(self, vcpu: int, ex: exits.Exit, rip: int | None = None) -> MemoryFault | None:
        """The MemoryFault an exit stands for, or None if it is not a memory fault."""
        if isinstance(ex, exits.Mmio):
            r = self.memory.find_region(ex.phys_addr)
            if r is None:
                return None  # a real MMIO access (no device there)
            return MemoryFault(ex.phys_addr, ex.len, "write" if ex.is_write else "read",
                               "mmio", vcpu, in_progress=not ex.is_write)
        if isinstance(ex, exits.MemoryFault):
            return MemoryFault(ex.gpa, ex.size, "unknown", "memory-fault-exit", vcpu,
                               poisoned=ex.errno == EHWPOISON)
        if isinstance(ex, exits.BareEfault):
            return self.bare_efault(vcpu, ex.errno == EHWPOISON)
        if isinstance(ex, exits.InternalError) and rip is not None:
            gpa = self.translate(vcpu, rip)
            if gpa is None or self.memory.find_region(gpa) is None or gpa < self.ram_end:
                return None
            return MemoryFault(gpa, 1, "exec", "internal-error", vcpu)
        return None

    def bare_efault(self, vcpu: int, poisoned: bool) -> MemoryFault:
        """A bare -EFAULT names no gpa. First decode the instruction at RIP and translate
        what it touches: a window page that cannot be backed (or a store to a read-only
        window) is the fault, exact to the byte. Failing that (no decodable access), the
        bad page is one of the windows' pages beyond EOF or a hole not yet handled: take
        the lowest. If there is none, the fault cannot be connected to a file and the VM
        cannot continue."""
        if self.locate is not None:
            accesses = self.locate(vcpu)
            ram_end = self.ram_end
            for gpa, size, kind in accesses:
                if gpa is None or gpa < ram_end:  # RAM is [0, ram_end): never a window
                    continue
                res = self.memory.resolve(gpa, cross_check=False)
                if res.file_offset is None or res.region is None:  # not a file window
                    continue
                if poisoned or res.cause in ("beyond-eof", "hole") or (
                        kind == "write" and self.memory.region(res.region).readonly):
                    return _new_fault((gpa, size, kind, "bare-efault", vcpu, poisoned, False,
                                       res))
            if any(gpa is None for gpa, _, _ in accesses[1:]):
                raise GuestUnmapped(f"vCPU {vcpu}: bare EFAULT on an access the guest no "
                                    "longer maps")
        for r in self.memory:
            gpa = pol.pick_bare_efault_page(bad_ranges(r).ranges(), self.handled)
            if gpa is not None:
                return MemoryFault(gpa, PAGE_SIZE, "unknown", "bare-efault", vcpu,
                                   poisoned=poisoned)
        raise Unrecoverable("KVM_RUN failed with a bare EFAULT and no window page is bad")

    def note_handled(self, fault: MemoryFault, in_flight: bool = False) -> bool:
        """Count a fault about to be handled (policy.count_fault: per page and vCPU).
        Returns False when the page's event is still on its way to this vCPU
        (``in_flight``): nothing new to do. Raises Unrecoverable when the same vCPU keeps
        failing on the page after it was handled: the handling did not take, and looping
        would hang the VM."""
        page = fault.gpa & ~(PAGE_SIZE - 1)
        key = (page, fault.vcpu)
        n, verdict = pol.count_fault(self.repeats.get(key, 0), in_flight)
        if verdict == pol.IN_FLIGHT:
            return False
        self.repeats[key] = n
        self.handled[page] = self.handled.get(page, 0) + 1
        if verdict == pol.GIVE_UP:
            raise Unrecoverable(f"gpa {page:#x} faulted {n} times on vCPU {fault.vcpu} "
                                "after being handled")
        return True


def classify(memory: GuestMemory, fault: MemoryFault, res: Resolution) -> str:
    """The cause the policy decides on: the resolution's, refined by what the exit said
    (poison) and by the access (a store to a read-only window)."""
    if fault.poisoned:
        return "poisoned"
    if res.cause != "ok":
        return res.cause
    region = memory.find_region(fault.gpa)
    if fault.access == "write" and region is not None and region.readonly:
        return "read-only"
    return "unknown"


def record(memory: GuestMemory, fault: MemoryFault, res: Resolution,
           cause: str) -> tuple[FaultRecord, MapsEntry | None, list[str]]:
    """The fault's record, cross-checked with /proc/self/maps (the mapping must be the
    region's file at the region's offset): (record, the maps line, disagreements)."""
    res = res.checked(memory)
    problems = res.cross_check() if res.mapping is not None and res.path is not None else []
    if problems:
        cause = f"{cause} (maps: {'; '.join(problems)})"
    return FaultRecord(fault.gpa, res.hva, res.path, res.file_offset, res.file_size, cause,
                       fault.source), res.mapping, problems


def resolve(memory: GuestMemory, fault: MemoryFault) -> tuple[FaultRecord, MapsEntry | None]:
    """GPA -> HVA -> (file, offset, size now) and the cause, cross-checked with
    /proc/self/maps. Returns the record and the maps line it was checked against."""
    res = memory.resolve(fault.gpa, cross_check=False)
    rec, mapping, _ = record(memory, fault, res, classify(memory, fault, res))
    return rec, mapping
