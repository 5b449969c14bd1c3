"""The guest page-table walk (faultline.vmm.mmu): on hand-built tables, and against
KVM_TRANSLATE (the oracle) on a running faultline guest, kernel and task address spaces."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faultline import abi
from faultline.vmm import mmu
from faultline.vmm.runner import KvmRun

from .conftest import SCENARIOS

P, W, PS = mmu.PTE_P, 2, mmu.PTE_PS
LONG = (mmu.CR0_PG, mmu.CR4_PAE, mmu.EFER_LMA)


def _ram(entries: dict[int, int], size: int = 0x10000) -> bytearray:
    ram = bytearray(size)
    for gpa, pte in entries.items():
        struct.pack_into("<Q", ram, gpa, pte)
    return ram


def _idx(gva: int, level: int) -> int:
    return (gva >> (12 + 9 * (level - 1))) & 0x1FF


def test_levels_follow_cr0_cr4_efer() -> None:
    assert mmu.levels(*LONG) == 4
    assert mmu.levels(LONG[0], LONG[1] | mmu.CR4_LA57, LONG[2]) == 5
    assert mmu.levels(0, LONG[1], LONG[2]) == 0  # paging off
    assert mmu.levels(LONG[0], 0, LONG[2]) == 0  # legacy 32-bit paging
    assert mmu.levels(LONG[0], LONG[1], 0) == 0  # PAE without long mode


def test_4k_2m_1g_pages_and_not_present() -> None:
    gva = 0x7F12_3456_7ABC
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    base = {pml4 + _idx(gva, 4) * 8: pdpt | P | W, pdpt + _idx(gva, 3) * 8: pd | P,
            pd + _idx(gva, 2) * 8: pt | P}
    ram = _ram({**base, pt + _idx(gva, 1) * 8: 0xABCD_E000 | P | W | (1 << 63)})  # NX bit
    assert mmu.walk(ram, pml4, gva, 4) == 0xABCD_E000 | (gva & 0xFFF)
    ram = _ram({**base, pd + _idx(gva, 2) * 8: 0x4000_0000 | P | PS})
    assert mmu.walk(ram, pml4, gva, 4) == 0x4000_0000 | (gva & 0x1F_FFFF)
    ram = _ram({pml4 + _idx(gva, 4) * 8: pdpt | P, pdpt + _idx(gva, 3) * 8: 0xC000_0000 | P | PS})
    assert mmu.walk(ram, pml4, gva, 4) == 0xC000_0000 | (gva & 0x3FFF_FFFF)
    ram = _ram(base)  # the PTE itself is not present
    assert mmu.walk(ram, pml4, gva, 4) is None
    # CR3's low bits (PCID, PWT/PCD) are not part of the table address
    ram = _ram({**base, pt + _idx(gva, 1) * 8: 0x5000 | P})
    assert mmu.walk(ram, pml4 | 0x18, gva, 4) == 0x5000 | (gva & 0xFFF)


def test_5_level_and_tables_outside_ram() -> None:
    gva = 0x00AB_0000_0000_1234
    pml5, pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    ram = _ram({pml5 + ((gva >> 48) & 0x1FF) * 8: pml4 | P, pml4 + _idx(gva, 4) * 8: pdpt | P,
                pdpt + _idx(gva, 3) * 8: pd | P, pd + _idx(gva, 2) * 8: pt | P,
                pt + _idx(gva, 1) * 8: 0x9000 | P})
    assert mmu.walk(ram, pml5, gva, 5) == 0x9000 | 0x234
    assert mmu.walk(_ram({0x1000: 0x10_0000_0000 | P}), 0x1000, 0, 4) == mmu.UNHANDLED


def _random_tables(seed: int) -> bytearray:
    """8 pages of entries pointing into those pages (1 in 9: just past them), present 9 in
    10, PS 1 in 5, other flag bits random."""
    rnd = random.Random(seed)
    ram = bytearray(8 * 4096)
    for slot in range(0, len(ram), 8):
        pte = rnd.getrandbits(64) & ~(mmu.ADDR_MASK | mmu.PTE_P | mmu.PTE_PS)
        pte |= rnd.randrange(9) << 12 | (rnd.random() < 0.9) | (rnd.random() < 0.2) << 7
        struct.pack_into("<Q", ram, slot, pte)
    return ram


def _leaf(ram: bytearray, gva: int) -> str:
    """How a 4-level walk from table 0 ends: 4k | 2m | 1g | none | beyond-ram."""
    table, shift = 0, 39
    while True:
        slot = table | ((gva >> shift) & 0x1FF) << 3
        if slot > len(ram) - 8:
            return "beyond-ram"
        pte = struct.unpack_from("<Q", ram, slot)[0]
        if not pte & 1:
            return "none"
        if shift == 12 or (shift <= 30 and pte & 0x80):
            return {12: "4k", 21: "2m", 30: "1g"}[shift]
        table, shift = pte & mmu.ADDR_MASK, shift - 9


def test_walk_ends_where_random_tables_say() -> None:
    """Random tables (4 KiB, 2 MiB and 1 GiB pages, not-present entries, tables past RAM):
    the walk ends as _leaf says, and a page's offset bits come from the gva."""
    rnd = random.Random(1)
    seen = set()
    for seed in range(100):
        ram, gva = _random_tables(seed), rnd.getrandbits(48)
        leaf = _leaf(ram, gva)
        seen.add(leaf)
        got = mmu.walk(ram, 0, gva, 4)
        if leaf == "none":
            assert got is None
        elif leaf == "beyond-ram":
            assert got == mmu.UNHANDLED
        else:
            mask = {"4k": 0xFFF, "2m": 0x1F_FFFF, "1g": 0x3FFF_FFFF}[leaf]
            assert got is not None and got & mask == gva & mask
    assert seen == {"4k", "2m", "1g", "none", "beyond-ram"}


class _Probe(KvmRun):
    """At the first task step (the task's page tables loaded): (gva, KVM_TRANSLATE, walk)
    for each of `gvas`, then stop."""

    gvas: list[int] = []
    seen: list[tuple[int, int | None, int | None]]

    def _setup(self) -> None:
        super()._setup()
        on_report = self.exit_loop.on_report

        def probe(v: Any, gpa: int) -> None:
            on_report(v, gpa)
            assert self.ram_view is not None
            if self.stopping or struct.unpack_from("<H", self.ram_view, gpa)[0] != abi.R_STEP:
                return
            sregs = v.vcpu.get_sregs()
            n = mmu.levels(sregs.cr0, sregs.cr4, sregs.efer)
            assert n == 4 and self.ram_view is not None
            self.seen = []
            for gva in self.gvas:
                t = v.vcpu.translate(gva)
                self.seen.append((gva, t.gpa if t.valid else None,
                                  mmu.walk(self.ram_view, sregs.cr3, gva, n)))
            self.m.stop("aborted", "probe done")

        self.exit_loop.on_report = probe


# kernel text (4 KiB PTEs), the report buffer, anon pool (2 MiB pages), the task's anon
# page, window pages 0 (mapped) and 3 (not yet), its stack, and unmapped addresses
FIXED = [0x10_0000, 0x10_0123, abi.REPORT_BUF_GPA, 0x40_0123, abi.anon_vaddr(0) + 8,
         abi.window_vaddr(0, 0) + 0x10, abi.window_vaddr(0, 3), 0x3000_0000 - 8,
         0x7FFF_FFFF_F000, 0xFFFF_8000_0000_0000, 0]


def _probe(gvas: list[int]) -> list[tuple[int, int | None, int | None]]:
    from faultline.scenario import load

    _Probe.gvas = gvas
    r = _Probe(load(SCENARIOS / "dax-truncate.toml"), "mce", events_path=None)
    r.run()
    return r.seen


@pytest.mark.kvm
def test_walk_agrees_with_kvm_translate_on_the_guest() -> None:
    seen = _probe(FIXED)
    assert len(seen) == len(FIXED)
    for gva, kvm_gpa, walked in seen:
        assert walked == kvm_gpa, f"gva {gva:#x}: KVM_TRANSLATE {kvm_gpa} walk {walked}"
    # the task's view: its window page is mapped, far kernel-half addresses are not
    assert seen[5][1] == abi.WINDOW_DEFAULT_GPA + 0x10 and seen[6][1] is None
    assert seen[3][1] == 0x40_0123 and seen[9][1] is None


@pytest.mark.kvm
@settings(max_examples=5, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 0xFFFF_FFFF),
                          st.integers(0x4000_0000, 0xC000_0000),
                          st.integers(0, (1 << 47) - 1)), min_size=40, max_size=40))
def test_walk_agrees_with_kvm_translate_on_random_addresses(gvas: list[int]) -> None:
    for gva, kvm_gpa, walked in _probe(gvas):
        assert walked == kvm_gpa, f"gva {gva:#x}: KVM_TRANSLATE {kvm_gpa} walk {walked}"
