"""Guest page-table walk from guest RAM (x86-64, 4- and 5-level paging), as KVM_TRANSLATE
does it: gva -> gpa, or None where the walk meets a not-present entry.

Why not KVM_TRANSLATE: a bare -EFAULT needs two or three translations (the instruction
fetch, its memory operand, a fetch that crosses a page). One KVM_GET_SREGS (for CR0, CR3,
CR4 and EFER) plus this walk over the page tables in RAM replaces them, which takes about
ten microseconds off the fault path (docs/performance.md). Like KVM_TRANSLATE the walk
checks only presence, not permissions. Paging modes it does not handle (paging off,
legacy 32-bit, PAE without long mode) and tables outside RAM make it return
:data:`UNHANDLED`, and the caller falls back to KVM_TRANSLATE.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Final

CR0_PG: Final = 1 << 31
CR4_PAE: Final = 1 << 5
CR4_LA57: Final = 1 << 12
EFER_LMA: Final = 1 << 10
PTE_P: Final = 1
PTE_PS: Final = 1 << 7
ADDR_MASK: Final = 0x000F_FFFF_FFFF_F000  # bits 51:12: the next table's or page's frame
UNHANDLED: Final = -1  # not a mode or place this walk reads: use KVM_TRANSLATE

_Q = struct.Struct("<Q").unpack_from


def levels(cr0: int, cr4: int, efer: int) -> int:
    """4 or 5 for long-mode paging; 0 when this walk does not apply."""
    if not cr0 & CR0_PG or not cr4 & CR4_PAE or not efer & EFER_LMA:
        return 0
    return 5 if cr4 & CR4_LA57 else 4


Walker = Callable[[memoryview | bytes | bytearray, int, int], int | None]


def walker_for(cr0: int, cr4: int, efer: int) -> Walker | None:
    """:func:`walk` for levels(cr0, cr4, efer) as a (ram, cr3, gva) function, or None where
    this module does not apply: the caller tests the mode once per fault, not per
    translation."""
    n = levels(cr0, cr4, efer)
    return functools.partial(walk, nlevels=n) if n else None


def walk(ram: memoryview | bytes | bytearray, cr3: int, gva: int, nlevels: int) -> int | None:
    """gva -> gpa through the tables rooted at CR3, read from `ram` (guest-physical 0 up).

    Returns None for a not-present entry, UNHANDLED for a table that is not in `ram`.
    A PS bit at the PDPT (1 GiB) or PD (2 MiB) level ends the walk with a large page."""
    table = cr3 & ADDR_MASK
    shift = 9 * nlevels + 3  # the top level's index bits start here: 39 (4-level), 48
    end = len(ram) - 8
    while True:
        slot = table | ((gva >> shift) & 0x1FF) << 3  # tables are page-aligned
        if slot > end:
            return UNHANDLED
        pte = _Q(ram, slot)[0]
        if not pte & PTE_P:
            return None
        if shift == 12 or (shift <= 30 and pte & PTE_PS):  # a 4 KiB, 2 MiB or 1 GiB page
            mask = (1 << shift) - 1
            return (pte & ADDR_MASK & ~mask) | (gva & mask)
        table = pte & ADDR_MASK
        shift -= 9
