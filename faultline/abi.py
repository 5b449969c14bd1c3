"""The contract between the VMM (and the model) and faultline's guest kernel.

This module is the single source of truth: the guest build generates
``faultline/guest/out/abi_gen.h`` from it (``faultline.guest.build``), so the C
side never restates a number. Both backends use the same page layout, so a GPA or
a task virtual address means the same thing on ``kvm`` and on ``model``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# --- Guest-physical layout ---------------------------------------------------
# [0, 1 MiB): boot info, notification ring, report buffers, VMM-built boot page tables.
BOOT_INFO_GPA = 0x1000
BOOT_INFO_MAX_BYTES = 0xF000  # boot info + task programs must fit below 0x10000
NOTIFY_RING_GPA = 0x10000
REPORT_BUF_GPA = 0x11000  # one 256-byte report buffer per vCPU
REPORT_BUF_STRIDE = 0x100
KERNEL_LOAD_GPA = 0x100000  # the guest ELF is linked here (1 MiB)
KERNEL_MAX_BYTES = 0x300000  # kernel image + its heap end below ANON_POOL_GPA
ANON_POOL_GPA = 0x400000  # task anonymous pages, handed out in scenario order
# The guest kernel's image + bss ends below this (tests/test_hardening.py checks the
# build); its page allocator hands out [end, ANON_POOL_GPA): page tables, task programs
# and stacks, offline bitmaps. The scenario validator budgets that heap with this bound.
KERNEL_END_MAX = 0x170000
DEFAULT_RAM_BYTES = 16 << 20
# Windows (file-backed "DAX" memslots) default above 4 GiB, 1 GiB apart.
WINDOW_DEFAULT_GPA = 0x1_0000_0000
WINDOW_DEFAULT_STRIDE = 0x4000_0000
MAX_GUEST_PHYS_BITS = 46  # GPAs at or beyond 1 << 46 are refused by the validator

# --- Task virtual layout (the same for every task) ----------------------------
USER_ANON_BASE = 0x4000_0000  # task-private anon page i at USER_ANON_BASE + i * PAGE_SIZE
USER_WINDOW_BASE = 0x8000_0000  # window w page p at USER_WINDOW_BASE + w * stride + p * PAGE
USER_WINDOW_STRIDE = 0x4000_0000
USER_STACK_TOP = 0x3000_0000  # task stack (anon, allocated by the guest from its heap)


def anon_vaddr(index: int) -> int:
    return USER_ANON_BASE + index * PAGE_SIZE


def window_vaddr(window: int, page: int) -> int:
    return USER_WINDOW_BASE + window * USER_WINDOW_STRIDE + page * PAGE_SIZE


# --- I/O ports, vectors -------------------------------------------------------
SERIAL_PORT = 0x3F8  # COM1 data register: text, one byte per out
REPORT_PORT = 0xF0  # outl: GPA of a struct report (REPORT_STRUCT) in guest RAM
NOTIFY_VECTOR = 0x40  # paravirtual "memory gone" notification interrupt
MC_VECTOR = 18

# --- Boot info (little-endian, at BOOT_INFO_GPA; the guest gets its GPA in %rdi, vCPU id in
# %rsi). Offsets are relative to the start of boot info.
BOOT_MAGIC = 0x544F4F42544C4146  # "FALTBOOT"
BOOT_VERSION = 1
BOOT_OPT_APF = 1 << 0  # the guest enables async PF (model; ignored on kvm here)
BOOT_OPT_VERBOSE = 1 << 1  # the guest prints each step to the serial port
# Benchmark hook (`faultline bench exit-loop`): right after boot (R_BOOT and its banner),
# vCPU 0 does `bench_exits` (the header's last u32, otherwise reserved) `outl`s to
# BENCH_PORT in a tight loop, then continues normally. The VMM treats them as plain io exits.
BOOT_OPT_BENCH_EXITS = 1 << 2
BENCH_PORT = 0xF2
# outl by vCPU 0 as it boots (once before, then after each task it sets up): the progress the
# VMM's watchdog sees before the guest reports R_BOOT (the APs only spin until then).
BOOT_PROGRESS_PORT = 0xF3

# u64 magic, u32 version, u32 nr_vcpus, u64 ram_bytes, u32 nr_windows, u32 nr_tasks,
# u32 windows_off, u32 tasks_off, u64 options, u64 notify_ring_gpa, u32 notify_vector,
# u32 notify_entries, u64 report_buf_gpa, u32 report_buf_stride,
# u32 reserved (bench_exits with BOOT_OPT_BENCH_EXITS, else 0)
BOOT_HEADER = struct.Struct("<QIIQIIIIQQIIQII")
# u64 gpa, u64 bytes, u32 id, u32 flags
BOOT_WINDOW = struct.Struct("<QQII")
WINDOW_F_READONLY = 1 << 0
# u32 id, u32 vcpu, u32 nr_maps, u32 nr_insns, u32 maps_off, u32 prog_off, u32 flags, u32 pad
BOOT_TASK = struct.Struct("<IIIIIIII")
TASK_F_EARLY_KILL = 1 << 0  # gets BUS_MCEERR_AO when a page it maps is offlined
# u64 vaddr, u64 gpa, u32 flags, u32 window (0xffffffff for anon)
BOOT_MAP = struct.Struct("<QQII")
MAP_F_WRITE = 1 << 0
MAP_F_EXEC = 1 << 1
MAP_F_WINDOW = 1 << 2
MAP_NO_WINDOW = 0xFFFF_FFFF

# --- Task bytecode: 16 bytes per instruction ----------------------------------
# u8 op, u8 slot (index into the task's map table), u16 flags, u32 arg, u64 imm
INSN = struct.Struct("<BBHIQ")
MAX_INSNS = 256
MAX_MAPS = 64
OP_INVALID = 0  # never emitted: zero bytes are not a program
OP_READ = 1  # u64 load at maps[slot].vaddr + arg; INSN_F_EXPECT: compare with imm
OP_WRITE = 2  # u64 store of imm at maps[slot].vaddr + arg
OP_EXEC = 3  # call maps[slot].vaddr + arg (the page must hold code, e.g. 0xc3 = ret)
OP_YIELD = 4  # a step that touches nothing
OP_SPIN = 5  # busy loop of arg iterations (no memory access)
OP_LOOP = 6  # if ctr[pc] < imm: ctr[pc] += 1, pc = arg; else ctr[pc] = 0, pc += 1
OP_EXIT = 7  # exit with code arg
OP_KREAD = 8  # syscall: the kernel loads the u64 (kernel-mode access) and returns it
OP_READ_SPAN = 9  # u64 loads at offset arg of slots slot .. slot+imm-1, each reported
OPCODES = {
    "read": OP_READ,
    "write": OP_WRITE,
    "exec": OP_EXEC,
    "yield": OP_YIELD,
    "spin": OP_SPIN,
    "loop": OP_LOOP,
    "exit": OP_EXIT,
    "kread": OP_KREAD,
    "read_span": OP_READ_SPAN,
}
INSN_F_EXPECT = 1 << 0
EXIT_CODE_EXPECT_FAILED = 3  # a read whose value differed from its expectation
EXIT_CODE_BAD_INSN = 4  # the interpreter met an invalid instruction / out-of-bounds jump
EXIT_CODE_KREAD_EIO = 5  # a kernel-mode read failed (copy_mc-style fixup)

# --- System calls: `int3` from ring 3 (rax = nr, rdi, rsi, rdx) ----------------
# `syscall` does not switch to CPL 0 under this host's emulation, and `int imm8` from
# ring 3 raises #UD there; `int3` through a DPL-3 gate works here and on hardware.
SYS_STEP = 1  # rdi = pc of the finished step; the kernel reports and reschedules
SYS_VALUE = 2  # rdi = vaddr, rsi = value, rdx = VALUE_* kind
SYS_EXIT = 3  # rdi = code
SYS_KREAD = 4  # rdi = vaddr -> rax = value, rdx = 0 ok / -EIO
VALUE_READ = 0
VALUE_WRITE = 1
VALUE_EXEC = 2
VALUE_KREAD = 3

# --- Reports: guest -> VMM ----------------------------------------------------
# u16 kind, u16 magic, u16 vcpu, u16 task (0xffff: none), u64 a, b, c, d
REPORT_STRUCT = struct.Struct("<HHHHQQQQ")
REPORT_MAGIC = 0xFA17
NO_TASK = 0xFFFF
R_BOOT = 1  # vCPU online: a = vcpu id, b = nr tasks on it
R_TASK_START = 2  # task: a = nr insns
R_STEP = 3  # task finished a step: a = pc, b = steps done so far
R_VALUE = 4  # a = vaddr, b = value, c = gpa, d = VALUE_* kind
R_EXIT = 5  # task exited: a = code
R_SIGNAL = 6  # task got a signal: a = signo, b = si_code, c = vaddr, d = gpa
R_OFFLINE = 7  # frames offlined by memory_failure: a = first gpa, b = OFFLINE_* source,
#               c = pages (a notified range is one record)
R_MCE = 8  # #MC taken: a = MCG_STATUS, b = MCi_STATUS, c = MCi_ADDR, d = MCi_MISC
R_NOTIFY = 9  # notification ring drained: a = records, b = pages offlined
R_EXCEPTION = 10  # unexpected exception: a = vector, b = error code, c = rip, d = cr2
R_IDLE = 11  # vCPU has no runnable task left: a = vcpu id
R_PANIC = 12  # guest kernel gave up: a = reason code, b/c/d = detail
# R_PANIC reason codes (a)
PANIC_BAD_BOOT_INFO = 1  # b = which check failed, c = boot info gpa
PANIC_KERNEL_EXCEPTION = 2  # b = vector, c = rip, d = cr2 (after an R_EXCEPTION)
PANIC_NO_MEMORY = 3  # the guest's page allocator (below ANON_POOL_GPA) ran out
PANIC_KERNEL_MCE = 4  # an action-required #MC in kernel mode outside a fixable copy
PANIC_NAMES = {
    PANIC_BAD_BOOT_INFO: "bad boot info",
    PANIC_KERNEL_EXCEPTION: "exception in kernel mode",
    PANIC_NO_MEMORY: "out of guest kernel memory",
    PANIC_KERNEL_MCE: "action-required machine check in kernel mode",
}
REPORT_KINDS = {
    R_BOOT: "boot",
    R_TASK_START: "task_start",
    R_STEP: "step",
    R_VALUE: "value",
    R_EXIT: "exit",
    R_SIGNAL: "signal",
    R_OFFLINE: "offline",
    R_MCE: "mce",
    R_NOTIFY: "notify",
    R_EXCEPTION: "exception",
    R_IDLE: "idle",
    R_PANIC: "panic",
}
OFFLINE_MCE_AR = 1
OFFLINE_MCE_AO = 2
OFFLINE_NOTIFY = 3
OFFLINE_SOURCES = {OFFLINE_MCE_AR: "mce-ar", OFFLINE_MCE_AO: "mce-ao", OFFLINE_NOTIFY: "notify"}


# The four u64 words (a, b, c, d) of each report kind, by name: the VMM decodes a record
# into one of these (faultline.vmm.reports) and never handles the words positionally.
class BootReport(NamedTuple):
    vcpu_id: int
    tasks: int


class TaskStartReport(NamedTuple):
    insns: int


class StepReport(NamedTuple):
    pc: int
    steps: int


class ValueReport(NamedTuple):
    vaddr: int
    value: int
    gpa: int
    op: int  # VALUE_*


class ExitReport(NamedTuple):
    code: int


class SignalReport(NamedTuple):
    signo: int
    si_code: int
    vaddr: int
    gpa: int


class OfflineReport(NamedTuple):
    gpa: int
    source: int  # OFFLINE_*
    pages: int


class MceReport(NamedTuple):
    mcg_status: int
    mci_status: int
    mci_addr: int
    mci_misc: int


class NotifyReport(NamedTuple):
    records: int
    pages: int


class ExceptionReport(NamedTuple):
    vector: int
    error_code: int
    rip: int
    cr2: int


class IdleReport(NamedTuple):
    vcpu_id: int


class PanicReport(NamedTuple):
    code: int  # PANIC_*
    detail1: int
    detail2: int
    detail3: int


REPORT_RECORDS: dict[int, Any] = {  # kind -> its NamedTuple
    R_BOOT: BootReport,
    R_TASK_START: TaskStartReport,
    R_STEP: StepReport,
    R_VALUE: ValueReport,
    R_EXIT: ExitReport,
    R_SIGNAL: SignalReport,
    R_OFFLINE: OfflineReport,
    R_MCE: MceReport,
    R_NOTIFY: NotifyReport,
    R_EXCEPTION: ExceptionReport,
    R_IDLE: IdleReport,
    R_PANIC: PanicReport,
}

class BadReport(ValueError):
    """A report record the guest got wrong: logged as guest_bad_report, never raised out of
    a run."""


def decode_report(ram: Any, gpa: int, task_names: Sequence[str]) -> tuple[int, int, str | None,
                                                                         Any]:
    """The record at `gpa` of guest RAM: (kind, vCPU the guest wrote, task name or None, its
    named record from REPORT_RECORDS). Both backends (the kvm report port, QEMU's doorbell)
    decode through this one function. Raises BadReport with the reason."""
    if not 0 <= gpa <= len(ram) - REPORT_STRUCT.size:
        raise BadReport(f"record gpa {gpa:#x} outside RAM")
    kind, magic, vcpu, tix, a, b, c, d = REPORT_STRUCT.unpack_from(ram, gpa)
    record = REPORT_RECORDS.get(kind)
    if magic != REPORT_MAGIC or record is None:
        raise BadReport(f"bad record at {gpa:#x}: kind {kind} magic {magic:#x}")
    task = task_names[tix] if tix < len(task_names) else None
    if tix != NO_TASK and task is None:
        raise BadReport(f"{REPORT_KINDS[kind]} record names task {tix}, which does not exist")
    return kind, vcpu, task, record._make((a, b, c, d)[:len(record._fields)])


VALUE_OPS = {VALUE_READ: "read", VALUE_WRITE: "write", VALUE_EXEC: "exec", VALUE_KREAD: "kread"}

SIGBUS = 7
SIGSEGV = 11
BUS_ADRERR = 2
BUS_MCEERR_AR = 4
BUS_MCEERR_AO = 5
SEGV_MAPERR = 1
SEGV_ACCERR = 2
SI_CODES = {
    (SIGBUS, BUS_ADRERR): "BUS_ADRERR",
    (SIGBUS, BUS_MCEERR_AR): "BUS_MCEERR_AR",
    (SIGBUS, BUS_MCEERR_AO): "BUS_MCEERR_AO",
    (SIGSEGV, SEGV_MAPERR): "SEGV_MAPERR",
    (SIGSEGV, SEGV_ACCERR): "SEGV_ACCERR",
}

# --- Reports under QEMU (faultline/qemu; docs/qemu.md) ---------------------------------
# QEMU has no device at REPORT_PORT. With BOOT_OPT_DOORBELL the guest fills its report
# record as usual, sets the u64 at record + REPORT_PENDING_OFFSET to 1, writes one byte,
# (record gpa - report_buf_gpa) / DOORBELL_UNIT, to DOORBELL_PORT (QEMU's isa-debugcon,
# whose chardev faultline reads) and spins until faultline clears that u64 (guest RAM is a
# shared file). Every report is then synchronous, as an I/O exit is on our VMM: a host event
# a report triggers ("after T:N") is done before the task runs on.
BOOT_OPT_DOORBELL = 1 << 3
DOORBELL_PORT = 0xE9
DOORBELL_UNIT = 16
REPORT_PENDING_OFFSET = 0x40  # below the nested record (REPORT_BUF_STRIDE / 2)

# --- Notification ring (VMM -> guest), at NOTIFY_RING_GPA -----------------------
# header: u32 head (VMM writes), u32 tail (guest writes), u32 entries, u32 pad
NOTIFY_HEADER = struct.Struct("<IIII")
# entry: u64 first gpa, u64 npages, u32 cause, u32 flags, u64 ar_gpa
# NOTIFY_F_AR: the access at ar_gpa by whatever vCPU (flags >> NOTIFY_AR_VCPU_SHIFT) was
# running when it faulted did not complete. On this host a load from a truncated page exits
# as MMIO, and KVM completes that load on re-entry whatever userspace does, so the guest
# must kill the interrupted task before its next instruction uses the value: the VMM sends
# the interrupt to that vCPU and the guest's handler delivers SIGBUS BUS_MCEERR_AR to the
# task it interrupted (the paravirtual twin of an SRAR machine check).
NOTIFY_ENTRY = struct.Struct("<QQIIQ")
NOTIFY_F_AR = 1 << 0
NOTIFY_AR_VCPU_SHIFT = 8
# The interrupt cannot carry an action-required failure into *kernel* code that runs with
# interrupts off (the guest's own `kread` copy): on this host no IRQ-window exit happens
# inside a short sti window. So the VMM also writes the failed access's gpa into a per-vCPU
# mailbox at REPORT_BUF_GPA + vcpu * REPORT_BUF_STRIDE + AR_MAILBOX_OFFSET before it
# re-enters; the kernel checks it right after its copy (and clears it), synchronously.
AR_MAILBOX_OFFSET = 0xF8
NOTIFY_ENTRIES = 64
CAUSE_BEYOND_EOF = 1
CAUSE_HOLE = 2
CAUSE_POISONED = 3
CAUSE_READONLY = 4
CAUSES = {
    CAUSE_BEYOND_EOF: "beyond-eof",
    CAUSE_HOLE: "hole",
    CAUSE_POISONED: "poisoned",
    CAUSE_READONLY: "read-only",
}

# --- Pattern written into backing files ----------------------------------------
PATTERN_TAG = 0xFA17_0000_0000_0000


def pattern_value(file_index: int, offset: int) -> int:
    """The u64 the 'offset' pattern stores at a file offset (so reads are checkable)."""
    return PATTERN_TAG | (file_index << 40) | offset


def c_header() -> str:
    """The C view of this module, written to abi_gen.h by the guest build."""
    lines = ["/* Generated from faultline/abi.py by faultline.guest.build: do not edit. */",
             "#pragma once"]
    for name, value in sorted(globals().items()):
        if name.isupper() and isinstance(value, int) and not isinstance(value, bool):
            lines.append(f"#define {name} {value:#x}ULL")
        elif name.isupper() and isinstance(value, struct.Struct):
            # The C structs _Static_assert their sizes against these.
            lines.append(f"#define {name}_SIZE {value.size}")
    return "\n".join(lines) + "\n"
