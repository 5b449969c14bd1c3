"""Which guest addresses did the faulting instruction touch?

A bare -EFAULT from KVM_RUN names no GPA. The vCPU is still at the faulting instruction,
so the VMM can decode it (iced-x86: a maintained, exact x86 decoder; a hand-written
ModRM/SIB decoder would be a bug farm), compute each memory operand's effective address
from the registers, and translate it (KVM_TRANSLATE). An instruction fetch is the
instruction's own address.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import iced_x86 as ix

_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15")
# 64-bit GPRs and their 32-bit halves (an address-size override uses those).
_REGS: dict[int, tuple[str, int]] = {}
for _n in _REG_NAMES:
    _REGS[getattr(ix.Register, _n.upper())] = (_n, (1 << 64) - 1)
for _n, _e in zip(_REG_NAMES, ("EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "ESP", "EBP",
                               "R8D", "R9D", "R10D", "R11D", "R12D", "R13D", "R14D", "R15D"),
                  strict=True):
    _REGS[getattr(ix.Register, _e)] = (_n, 0xFFFF_FFFF)
_READS = {ix.OpAccess.READ, ix.OpAccess.COND_READ, ix.OpAccess.READ_WRITE,
          ix.OpAccess.READ_COND_WRITE}
_info = ix.InstructionInfoFactory()


@dataclass(frozen=True, slots=True)
class Access:
    gva: int
    size: int
    kind: str  # read | write | exec


def accesses(code: bytes, rip: int, regs: Mapping[str, int]) -> list[Access]:
    """The memory accesses of the instruction at `rip` (its bytes in `code`), with their
    guest virtual addresses computed from `regs` (kvm_regs names), fetch first."""
    out = [Access(rip, 1, "exec")]
    ins = ix.Decoder(64, code, ip=rip).decode()
    if ins.code == ix.Code.INVALID:
        return out
    for mem in _info.info(ins).used_memory():
        if mem.base == ix.Register.RIP:
            ea = ins.ip_rel_memory_address
        else:
            ea = mem.displacement
            if mem.base != ix.Register.NONE:
                ea += _value(regs, mem.base)
            if mem.index != ix.Register.NONE:
                ea += _value(regs, mem.index) * mem.scale
        size = max(1, int(ix.MemorySizeExt.size(mem.memory_size)))
        kind = "read" if mem.access in _READS else "write"
        out.append(Access(ea & ((1 << 64) - 1), size, kind))
    return out


def _value(regs: Mapping[str, int], reg: int) -> int:
    name, mask = _REGS.get(reg, ("", 0))
    return regs.get(name, 0) & mask
