"""Booting faultline's guest kernel: pure set-up, no run loop and no policy.

- ``load_kernel(path)``: the guest ELF's PT_LOAD segments and entry point.
- ``build_boot_info(scenario)``: the boot info block (layouts from ``faultline.abi``).
- ``write_boot(write, scenario, image)``: kernel segments (bss zeroed), boot info, an empty
  notification ring, and a boot GDT + identity page tables below 1 MiB.
- ``setup_vcpu(vcpu, vcpu_id, image, kvm=None)``: 64-bit long mode at the kernel entry with
  %rdi = boot info GPA, %rsi = vCPU id, and the host's supported CPUID (MCE/MCA visible).

Guest-physical layout used here, below 1 MiB (not part of the ABI; abi.py owns the rest):
BOOT_GDT_GPA (boot GDT), BOOT_PML4_GPA / BOOT_PDPT_GPA / BOOT_PD_GPA (identity map of the
first BOOT_IDENTITY_BYTES with 2 MiB pages). The kernel replaces all of them at once.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultline import abi
from faultline.scenario import Scenario, TaskSpec, encode_program

BOOT_GDT_GPA = 0x20000
BOOT_PML4_GPA = 0x21000
BOOT_PDPT_GPA = 0x22000
BOOT_PD_GPA = 0x23000
BOOT_TABLES_END = 0x24000
BOOT_IDENTITY_BYTES = 1 << 30

BOOT_CS = 0x08  # the kernel's GDT uses the same selectors
BOOT_DS = 0x10
# null, 64-bit code DPL 0, data DPL 0
BOOT_GDT = (0, 0x00209A0000000000, 0x00CF92000000FFFF)

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_MCE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 6, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_W, PTE_PS = 1, 2, 0x80

_RESERVED_LOW = (
    ("boot info", abi.BOOT_INFO_GPA, abi.BOOT_INFO_GPA + abi.BOOT_INFO_MAX_BYTES),
    ("notify ring", abi.NOTIFY_RING_GPA,
     abi.NOTIFY_RING_GPA + abi.NOTIFY_HEADER.size + abi.NOTIFY_ENTRIES * abi.NOTIFY_ENTRY.size),
    ("report buffers", abi.REPORT_BUF_GPA, abi.REPORT_BUF_GPA + 8 * abi.REPORT_BUF_STRIDE),
)


class BootError(Exception):
    """The kernel image or the boot info cannot be used."""


@dataclass(frozen=True, slots=True)
class Segment:
    gpa: int
    data: bytes  # file contents; [len(data), memsz) is zero (bss)
    memsz: int


@dataclass(frozen=True, slots=True)
class KernelImage:
    path: str
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return max((s.gpa + s.memsz for s in self.segments), default=abi.KERNEL_LOAD_GPA)


def load_kernel(path: str | Path) -> KernelImage:
    """Read the guest ELF: PT_LOAD segments (by physical address) and the entry point."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    lo, hi = abi.KERNEL_LOAD_GPA, abi.KERNEL_LOAD_GPA + abi.KERNEL_MAX_BYTES
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_X86_64" or elf.elfclass != 64:
                raise BootError(f"{path}: not an x86-64 ELF64 image")
            segs = []
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                    continue
                gpa, memsz, filesz = seg["p_paddr"], seg["p_memsz"], seg["p_filesz"]
                if filesz > memsz or gpa < lo or gpa + memsz > hi:
                    raise BootError(f"{path}: segment [{gpa:#x}, {gpa + memsz:#x}) is outside "
                                    f"the kernel area [{lo:#x}, {hi:#x})")
                segs.append(Segment(gpa, seg.data()[:filesz], memsz))
            entry = elf["e_entry"]
    except OSError as e:
        raise BootError(f"cannot read kernel {path}: {e.strerror or e}") from None
    except ELFError as e:
        raise BootError(f"{path}: bad ELF: {e}") from None
    segs.sort(key=lambda s: s.gpa)
    for a, b in itertools.pairwise(segs):
        if a.gpa + a.memsz > b.gpa:
            raise BootError(f"{path}: overlapping segments at {b.gpa:#x}")
    if not segs:
        raise BootError(f"{path}: no loadable segment")
    if not any(s.gpa <= entry < s.gpa + len(s.data) for s in segs):
        raise BootError(f"{path}: entry point {entry:#x} is not in a loaded segment")
    return KernelImage(str(path), entry, tuple(segs))


def _map_flags(m: Any) -> tuple[int, int]:
    flags = (abi.MAP_F_WRITE if m.writable else 0) | (abi.MAP_F_EXEC if m.executable else 0)
    if m.window is None:
        return flags, abi.MAP_NO_WINDOW
    return flags | abi.MAP_F_WINDOW, m.window


def build_boot_info(scenario: Scenario, *, tasks: Iterable[TaskSpec] | None = None,
                    programs: dict[int, bytes] | None = None, bench_exits: int = 0) -> bytes:
    """The boot info block. ``programs`` (task index -> raw bytecode) overrides a task's
    compiled program (tests use it to feed the guest hand-packed, unvalidated bytecode).
    ``bench_exits`` > 0 sets BOOT_OPT_BENCH_EXITS: vCPU 0 does that many BENCH_PORT exits
    right after boot (``faultline bench exit-loop``)."""
    if not 0 <= bench_exits <= 0xFFFF_FFFF:
        raise BootError(f"bench_exits {bench_exits} does not fit in a u32")
    task_list = list(scenario.tasks if tasks is None else tasks)
    programs = programs or {}
    hdr = abi.BOOT_HEADER
    windows_off = hdr.size
    tasks_off = windows_off + len(scenario.files) * abi.BOOT_WINDOW.size
    cursor = tasks_off + len(task_list) * abi.BOOT_TASK.size
    windows = b"".join(
        abi.BOOT_WINDOW.pack(f.window_gpa, f.window_bytes, f.index,
                             abi.WINDOW_F_READONLY if f.readonly else 0)
        for f in scenario.files)
    task_recs, blobs = [], []
    for t in task_list:
        maps = b"".join(abi.BOOT_MAP.pack(m.vaddr, m.gpa, *_map_flags(m)) for m in t.maps)
        prog = programs.get(t.index, encode_program(t))
        if len(prog) % abi.INSN.size:
            raise BootError(f"task {t.name}: program is not a whole number of instructions")
        maps_off = cursor
        prog_off = maps_off + len(maps)
        cursor = prog_off + len(prog)
        task_recs.append(abi.BOOT_TASK.pack(
            t.index, t.vcpu, len(t.maps), len(prog) // abi.INSN.size, maps_off, prog_off,
            abi.TASK_F_EARLY_KILL if t.early_kill else 0, 0))
        blobs += [maps, prog]
    options = (abi.BOOT_OPT_APF if scenario.apf else 0) | \
        (abi.BOOT_OPT_VERBOSE if scenario.verbose else 0) | \
        (abi.BOOT_OPT_BENCH_EXITS if bench_exits else 0)
    header = hdr.pack(
        abi.BOOT_MAGIC, abi.BOOT_VERSION, scenario.vcpus, scenario.ram_bytes,
        len(scenario.files), len(task_list), windows_off, tasks_off, options,
        abi.NOTIFY_RING_GPA, abi.NOTIFY_VECTOR, abi.NOTIFY_ENTRIES,
        abi.REPORT_BUF_GPA, abi.REPORT_BUF_STRIDE, bench_exits)
    blob = header + windows + b"".join(task_recs) + b"".join(blobs)
    assert len(blob) == cursor
    if len(blob) > abi.BOOT_INFO_MAX_BYTES:
        raise BootError(f"boot info is {len(blob)} bytes, more than "
                        f"{abi.BOOT_INFO_MAX_BYTES} (too many tasks/maps/instructions)")
    return blob


def boot_gdt() -> bytes:
    return struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)


def boot_page_tables() -> dict[int, bytes]:
    """Identity map of the first BOOT_IDENTITY_BYTES with 2 MiB pages, supervisor, RW."""
    pml4 = struct.pack("<Q", BOOT_PDPT_GPA | PTE_P | PTE_W) + bytes(4096 - 8)
    pdpt = struct.pack("<Q", BOOT_PD_GPA | PTE_P | PTE_W) + bytes(4096 - 8)
    pd = struct.pack("<512Q", *((i << 21) | PTE_P | PTE_W | PTE_PS
                                for i in range(BOOT_IDENTITY_BYTES >> 21)))
    return {BOOT_PML4_GPA: pml4, BOOT_PDPT_GPA: pdpt, BOOT_PD_GPA: pd}


def write_boot(write: Callable[[int, bytes], None], scenario: Scenario, image: KernelImage,
               *, boot_info: bytes | None = None) -> None:
    """Write everything the guest needs before its first instruction."""
    for s in image.segments:
        write(s.gpa, s.data)
        if s.memsz > len(s.data):
            write(s.gpa + len(s.data), bytes(s.memsz - len(s.data)))
    info = build_boot_info(scenario) if boot_info is None else boot_info
    write(abi.BOOT_INFO_GPA, info)
    ring = abi.NOTIFY_HEADER.pack(0, 0, abi.NOTIFY_ENTRIES, 0)
    write(abi.NOTIFY_RING_GPA, ring + bytes(abi.NOTIFY_ENTRIES * abi.NOTIFY_ENTRY.size))
    write(abi.REPORT_BUF_GPA, bytes(scenario.vcpus * abi.REPORT_BUF_STRIDE))
    write(BOOT_GDT_GPA, boot_gdt())
    for gpa, data in boot_page_tables().items():
        write(gpa, data)


def _segment(uapi_seg: Any, selector: int, type_: int, *, code: bool) -> None:
    uapi_seg.base = 0
    uapi_seg.limit = 0xFFFFFFFF
    uapi_seg.selector = selector
    uapi_seg.type = type_
    uapi_seg.present = 1
    uapi_seg.dpl = 0
    uapi_seg.db = 0 if code else 1
    uapi_seg.s = 1
    uapi_seg.l = 1 if code else 0
    uapi_seg.g = 1
    uapi_seg.avl = 0
    uapi_seg.unusable = 0


_cpuid_cache: dict[int, Any] = {}


def _supported_cpuid(kvm: Any) -> list[Any]:
    key = id(kvm)
    if key not in _cpuid_cache:
        cpuid = kvm.supported_cpuid()
        _cpuid_cache.clear()
        _cpuid_cache[key] = (kvm, [cpuid.entries[i] for i in range(cpuid.nent)])
    return _cpuid_cache[key][1]


def setup_vcpu(vcpu: Any, vcpu_id: int, image: KernelImage, kvm: Any = None) -> None:
    """Registers, long-mode sregs and CPUID for one vCPU (before its first KVM_RUN)."""
    from faultline.kvm import Kvm, uapi

    own = kvm is None
    if own:
        kvm = Kvm()
    try:
        entries = []
        for e in _supported_cpuid(kvm):
            e2 = uapi.kvm_cpuid_entry2.from_buffer_copy(bytes(e))
            if e2.function == 1:
                e2.ebx = (e2.ebx & 0x00FFFFFF) | (vcpu_id << 24)  # initial APIC id
            elif e2.function in (0xB, 0x1F):
                e2.edx = vcpu_id  # x2APIC id
            entries.append(e2)
        vcpu.set_cpuid2(entries)
    finally:
        if own:
            kvm.close()

    sregs = vcpu.get_sregs()
    _segment(sregs.cs, BOOT_CS, 0xB, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), BOOT_DS, 0x3, code=False)
    sregs.tr.base, sregs.tr.limit, sregs.tr.selector = 0, 0xFFFF, 0
    sregs.tr.type, sregs.tr.present, sregs.tr.s, sregs.tr.unusable = 0xB, 1, 0, 0
    sregs.ldt.selector, sregs.ldt.present, sregs.ldt.unusable = 0, 0, 1
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_GPA, len(BOOT_GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = BOOT_PML4_GPA
    sregs.cr4 = CR4_PAE | CR4_MCE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = uapi.kvm_regs()
    regs.rip = image.entry
    regs.rdi = abi.BOOT_INFO_GPA
    regs.rsi = vcpu_id
    regs.rflags = 2
    vcpu.set_regs(regs)


def check_layout() -> None:
    """The boot tables must not overlap the ABI's low areas (a self-check for tests)."""
    for name, lo, hi in _RESERVED_LOW:
        if lo < BOOT_TABLES_END and BOOT_GDT_GPA < hi:
            raise BootError(f"boot tables overlap the {name}")
