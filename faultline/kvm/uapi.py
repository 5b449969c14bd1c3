"""KVM uapi for x86-64: constants, ctypes layouts and ioctl numbers.

Layouts follow include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.  The ctypes
structs are the layout truth (tests/kvm/test_layout.py compares them with the system
header via gcc); ioctl numbers are computed from the struct sizes with the _IOC helpers,
never copied as hex.  Constants newer than the machine's 6.1-era header (memory_fault,
guest_memfd caps, ...) are defined here from Documentation/virt/kvm/api.rst.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable, Sequence

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

# --- ioctl encoding (include/uapi/asm-generic/ioctl.h) -----------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _size(t: int | type[ctypes._CData]) -> int:
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, t: int | type[ctypes._CData]) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(t))


def _IOW(type_: int, nr: int, t: int | type[ctypes._CData]) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(t))


def _IOWR(type_: int, nr: int, t: int | type[ctypes._CData]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(t))


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- exit reasons ---------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37
KVM_EXIT_LOONGARCH_IOCSR = 38
KVM_EXIT_MEMORY_FAULT = 39  # newer than the system header

EXIT_REASON_NAMES: dict[int, str] = {
    v: k for k, v in list(globals().items()) if k.startswith("KVM_EXIT_") and isinstance(v, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# --- memslot flags --------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# --- capabilities ---------------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MCE = 31
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_ASYNC_PF = 59
KVM_CAP_SYNC_REGS = 74
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_ASYNC_PF_INT = 183
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_GUEST_MEMFD = 234

# --- x86 machine check: architecture facts, shared with the pure policy module --------------
from faultline.x86mce import (  # noqa: E402, F401 - re-exported as part of the uapi surface
    MCG_CAP_COUNT_MASK,
    MCG_CTL_P,
    MCG_SER_P,
    MCG_STATUS_EIPV,
    MCG_STATUS_MCIP,
    MCG_STATUS_RIPV,
    MCI_STATUS_ADDRV,
    MCI_STATUS_AR,
    MCI_STATUS_EN,
    MCI_STATUS_MISCV,
    MCI_STATUS_OVER,
    MCI_STATUS_PCC,
    MCI_STATUS_S,
    MCI_STATUS_UC,
    MCI_STATUS_VAL,
    MCM_ADDR_LINEAR,
    MCM_ADDR_PHYS,
    MCM_ADDR_SEGOFF,
    MSR_IA32_MC0_ADDR,
    MSR_IA32_MC0_CTL,
    MSR_IA32_MC0_MISC,
    MSR_IA32_MC0_STATUS,
    MSR_IA32_MCG_CAP,
    MSR_IA32_MCG_CTL,
    MSR_IA32_MCG_STATUS,
    MSR_IA32_MCx_ADDR,
    MSR_IA32_MCx_CTL,
    MSR_IA32_MCx_MISC,
    MSR_IA32_MCx_STATUS,
)

# --- misc x86 ------------------------------------------------------------------------------
KVM_NR_INTERRUPTS = 256
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MAX_CPUID_ENTRIES = 256


# --- structs --------------------------------------------------------------------------------
class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


class kvm_regs(_Struct):
    _fields_ = [
        (name, u64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_Struct):
    _fields_ = [
        *[(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_userspace_memory_region(_Struct):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(_Struct):
    """Header only (flexible array `entries` follows); see make_cpuid2()."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header only (flexible array `entries` follows); see make_msrs()."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_x86_mce(_Struct):
    _fields_ = [
        ("status", u64),
        ("addr", u64),
        ("misc", u64),
        ("mcg_status", u64),
        ("bank", u8),
        ("pad1", u8 * 7),
        ("pad2", u64 * 3),
    ]


class kvm_interrupt(_Struct):
    _fields_ = [("irq", u32)]


class kvm_translation(_Struct):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class _vcpu_events_exception(_Struct):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _vcpu_events_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _vcpu_events_triple_fault(_Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _vcpu_events_exception),
        ("interrupt", _vcpu_events_interrupt),
        ("nmi", _vcpu_events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _vcpu_events_smi),
        ("triple_fault", _vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


# kvm_run exit union members ------------------------------------------------------------
class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_io(_Struct):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),  # relative to the start of kvm_run
    ]


class kvm_run_debug(_Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hypercall(_Struct):
    _fields_ = [
        ("nr", u64),
        ("args", u64 * 6),
        ("ret", u64),
        ("longmode", u32),  # newer headers: union { u32 longmode; u64 flags; }
        ("pad", u32),
    ]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]  # data[0] aliases flags


class kvm_run_memory_fault(_Struct):
    _fields_ = [("flags", u64), ("gpa", u64), ("size", u64)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", ctypes.c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048
# kvm_run.kvm_valid_regs bits (x86): which of struct kvm_sync_regs { kvm_regs regs;
# kvm_sregs sregs; kvm_vcpu_events events; } KVM stores into kvm_run.s at every exit.
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2


class kvm_run(_Struct):
    """The fixed part of the vCPU mmap; the mmap itself is KVM_GET_VCPU_MMAP_SIZE bytes
    (the pio data page and the coalesced-MMIO ring follow)."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("u", kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES),
    ]


# Offsets the hot-path decoder uses with struct.unpack_from (asserted against ctypes here
# and against gcc in the layout test).
KVM_RUN_IMMEDIATE_EXIT_OFFSET = kvm_run.immediate_exit.offset
KVM_RUN_EXIT_REASON_OFFSET = kvm_run.exit_reason.offset
KVM_RUN_EXIT_UNION_OFFSET = kvm_run.u.offset
KVM_RUN_VALID_REGS_OFFSET = kvm_run.kvm_valid_regs.offset
KVM_RUN_SYNC_REGS_OFFSET = kvm_run.s.offset  # kvm_sync_regs.regs is its first member
assert KVM_RUN_IMMEDIATE_EXIT_OFFSET == 1
assert KVM_RUN_EXIT_REASON_OFFSET == 8
assert KVM_RUN_EXIT_UNION_OFFSET == 32
assert KVM_RUN_VALID_REGS_OFFSET == 288 and KVM_RUN_SYNC_REGS_OFFSET == 304
assert ctypes.sizeof(kvm_run_exit) == 256
assert ctypes.sizeof(kvm_run) == 32 + 256 + 16 + SYNC_REGS_SIZE_BYTES
assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_segment) == 24
assert ctypes.sizeof(kvm_sregs) == 312
assert ctypes.sizeof(kvm_x86_mce) == 64
assert ctypes.sizeof(kvm_cpuid_entry2) == 40
assert ctypes.sizeof(kvm_vcpu_events) == 64


# --- variable-length helpers -----------------------------------------------------------------
def make_cpuid2(entries: int | Sequence[kvm_cpuid_entry2]) -> ctypes.Structure:
    """A kvm_cpuid2 with room for `entries` (a count, or entries to copy in)."""
    n = entries if isinstance(entries, int) else len(entries)

    class kvm_cpuid2_n(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    obj = kvm_cpuid2_n()
    obj.nent = n
    if not isinstance(entries, int):
        for i, e in enumerate(entries):
            obj.entries[i] = e
    return obj


@functools.cache
def _msrs_type(n: int) -> type[ctypes.Structure]:
    # Built once per size: creating a ctypes class costs tens of microseconds, and the VMM
    # reads MCG_STATUS on its fault path.
    class kvm_msrs_n(_Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return kvm_msrs_n


def make_msrs(entries: int | Iterable[tuple[int, int]]) -> ctypes.Structure:
    """A kvm_msrs with room for `entries` (a count, or (index, data) pairs to copy in)."""
    pairs = [] if isinstance(entries, int) else list(entries)
    n = entries if isinstance(entries, int) else len(pairs)
    obj = _msrs_type(n)()
    obj.nmsrs = n
    for i, (index, data) in enumerate(pairs):
        obj.entries[i].index = index
        obj.entries[i].data = data
    return obj


# --- ioctl numbers ---------------------------------------------------------------------------
# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_X86_GET_MCE_CAP_SUPPORTED = _IOR(KVMIO, 0x9D, u64)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, kvm_interrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_X86_SETUP_MCE = _IOW(KVMIO, 0x9C, u64)
KVM_X86_SET_MCE = _IOW(KVMIO, 0x9E, kvm_x86_mce)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)

_IOCTL_NAMES = (
    "KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE "
    "KVM_GET_SUPPORTED_CPUID KVM_X86_GET_MCE_CAP_SUPPORTED KVM_CREATE_VCPU "
    "KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_RUN "
    "KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_TRANSLATE KVM_INTERRUPT "
    "KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_X86_SETUP_MCE KVM_X86_SET_MCE "
    "KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS"
).split()
IOCTLS: dict[str, int] = {name: globals()[name] for name in _IOCTL_NAMES}
