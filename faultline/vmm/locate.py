"""Where a bare -EFAULT's access went: decode the instruction at RIP and translate what it
touches to GPAs (the detector's ``locate`` and ``translate``). Called on the faulting
vCPU's own thread (it issues that vCPU's ioctls)."""

from __future__ import annotations

import contextlib
import struct

from faultline import abi
from faultline.kvm import uapi
from faultline.memory import GuestMemoryError
from faultline.vmm import decode, mmu
from faultline.vmm.machine import Machine

# kvm_sregs' cr0, cr2, cr3, cr4, cr8, efer: consecutive u64s, read in one unpack
_OFF_CR0 = uapi.kvm_sregs.cr0.offset
_SREGS_CRS = struct.Struct("<6Q")
assert uapi.kvm_sregs.efer.offset == _OFF_CR0 + 5 * 8
MAX_INSN = 15  # x86's longest instruction


class Locator:
    def __init__(self, m: Machine) -> None:
        self.m = m

    def translate(self, vcpu: int, gva: int) -> int | None:
        """KVM_TRANSLATE: gva -> gpa in vCPU `vcpu`'s current address space."""
        t = self.m.vcpus[vcpu].vcpu.translate(gva)
        return t.gpa if t.valid else None

    def locate(self, vcpu: int) -> list[tuple[int | None, int, str]]:
        """GPAs the instruction at RIP touches (fetch first), for a bare -EFAULT; None where
        the guest's page tables no longer translate the address. The GPRs come from
        kvm_run (KVM_CAP_SYNC_REGS) and one KVM_GET_SREGS gives CR3, then the page tables
        are walked in RAM (mmu.py); KVM_TRANSLATE only where that walk does not apply."""
        state = self.m.vcpus[vcpu]
        v = state.vcpu
        regs = v.synced_regs() if state.synced_regs else v.get_regs()
        cr0, _, cr3, cr4, _, efer = _SREGS_CRS.unpack_from(v.get_sregs(state.sregs), _OFF_CR0)
        ram = self.m.ram_view
        walk = mmu.walker_for(cr0, cr4, efer) if ram is not None else None
        unhandled = mmu.UNHANDLED
        # (no helper function for the two translations: each call is a cold frame here)
        rip = regs.rip
        rip_gpa = walk(ram, cr3, rip) if walk is not None else unhandled  # type: ignore[arg-type]
        if rip_gpa == unhandled:
            rip_gpa = self.translate(vcpu, rip)
        if rip_gpa is None:
            return []
        out: list[tuple[int | None, int, str]] = [(rip_gpa, 1, "exec")]
        # Never read the code through a window mapping that may be gone: pread/RAM only.
        n = min(MAX_INSN, abi.PAGE_SIZE - (rip_gpa & (abi.PAGE_SIZE - 1)))
        memory = self.m.memory
        try:
            if ram is not None and rip_gpa + n <= len(ram):
                code = bytes(ram[rip_gpa:rip_gpa + n])
            else:
                code = memory.read(rip_gpa, n)
        except (GuestMemoryError, OSError):
            return out
        if n < MAX_INSN and (nxt := self.translate(vcpu, rip + n)) is not None:
            with contextlib.suppress(GuestMemoryError, OSError):  # decode what there is
                code += memory.read(nxt, MAX_INSN - n)
        for gva, size, kind in decode.operand_accesses(code, rip, regs):
            gpa = walk(ram, cr3, gva) if walk is not None else unhandled  # type: ignore[arg-type]
            if gpa == unhandled:
                gpa = self.translate(vcpu, gva)
            out.append((gpa, size, kind))
        return out
