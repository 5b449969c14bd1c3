"""Which guest addresses did the faulting instruction touch?

A bare -EFAULT from KVM_RUN names no GPA. The vCPU is still at the faulting instruction,
so the VMM can decode it (iced-x86: a maintained, exact x86 decoder; a hand-written
ModRM/SIB decoder would be a bug farm), compute each memory operand's effective address
from the registers, and translate it (KVM_TRANSLATE). An instruction fetch is the
instruction's own address.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class Access(NamedTuple):
    """(A NamedTuple: built on the fault path, where a frozen dataclass costs more.)"""

    gva: int
    size: int
    kind: str  # read | write | exec


@dataclass(frozen=True, slots=True)
class _Operand:
    """One memory operand, independent of register values (what the cache keeps)."""

    rip_rel: bool  # disp is then relative to the instruction's address
    base: tuple[str, int] | None  # (kvm_regs name, mask)
    index: tuple[str, int] | None
    scale: int
    disp: int
    size: int
    kind: str


@functools.lru_cache(maxsize=4096)
def _operands(code: bytes) -> tuple[_Operand, ...]:
    """Decode once per instruction site: a guest faults again and again at the same few
    load/store instructions (its copy loops), and a cold iced-x86 decode right after the
    guest ran costs tens of microseconds on the fault path. Decoded at ip 0, so a
    RIP-relative operand's address is (rip + disp)."""
    ins = ix.Decoder(64, code, ip=0).decode()
    if ins.code == ix.Code.INVALID:
        return ()
    out = []
    for mem in _info.info(ins).used_memory():
        # iced folds a RIP-relative operand into an absolute displacement (from ip 0 here)
        # with no base register.
        rip_rel = ins.is_ip_rel_memory_operand and mem.base == ix.Register.NONE \
            and mem.index == ix.Register.NONE
        out.append(_Operand(
            rip_rel,
            None if rip_rel or mem.base == ix.Register.NONE else _REGS.get(mem.base, ("", 0)),
            None if mem.index == ix.Register.NONE else _REGS.get(mem.index, ("", 0)),
            mem.scale,
            mem.displacement,
            max(1, int(ix.MemorySizeExt.size(mem.memory_size))),
            "read" if mem.access in _READS else "write"))
    return tuple(out)


def accesses(code: bytes, rip: int, regs: Mapping[str, int] | Any) -> list[Access]:
    """The memory accesses of the instruction at `rip` (its bytes in `code`), with their
    guest virtual addresses computed from `regs` (a kvm_regs, or a mapping of its field
    names), fetch first."""
    return [_new(Access, (rip, 1, "exec")), *operand_accesses(code, rip, regs)]


def operand_accesses(code: bytes, rip: int, regs: Mapping[str, int] | Any) -> list[Access]:
    """accesses() without the fetch: the memory operands only (what the fault path needs;
    one call, no list to slice)."""
    out: list[Access] = []
    ops = _operands(code if type(code) is bytes else bytes(code))
    if not ops:
        return out
    # a kvm_regs (ctypes fields: the builtin getattr), or a mapping of register names
    get = getattr if isinstance(regs, ctypes.Structure) else _mapping_get
    for op in ops:
        ea = op.disp + (rip if op.rip_rel else 0)
        if (base := op.base) is not None:
            ea += get(regs, base[0], 0) & base[1]
        if (index := op.index) is not None:
            ea += (get(regs, index[0], 0) & index[1]) * op.scale
        out.append(_new(Access, (ea & 0xFFFF_FFFF_FFFF_FFFF, op.size, op.kind)))
    return out


_new = tuple.__new__


def _mapping_get(regs: Mapping[str, int], name: str, default: int) -> int:
    return regs.get(name, default)
