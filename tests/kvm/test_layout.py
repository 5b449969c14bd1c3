"""ctypes layouts and computed ioctl numbers vs. the system's <linux/kvm.h>, via gcc."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from faultline.kvm import uapi

# (C struct, ctypes struct, fields); a field "a.b" is a nested member.
STRUCTS: list[tuple[str, type[ctypes.Structure] | type[ctypes.Union], list[str]]] = [
    ("struct kvm_regs", uapi.kvm_regs, [f for f, _ in uapi.kvm_regs._fields_]),
    ("struct kvm_segment", uapi.kvm_segment, [f for f, *_ in uapi.kvm_segment._fields_]),
    ("struct kvm_dtable", uapi.kvm_dtable, ["base", "limit", "padding"]),
    (
        "struct kvm_sregs",
        uapi.kvm_sregs,
        "cs ds es fs gs ss tr ldt gdt idt cr0 cr2 cr3 cr4 cr8 efer apic_base "
        "interrupt_bitmap".split(),
    ),
    (
        "struct kvm_userspace_memory_region",
        uapi.kvm_userspace_memory_region,
        ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"],
    ),
    (
        "struct kvm_cpuid_entry2",
        uapi.kvm_cpuid_entry2,
        "function index flags eax ebx ecx edx padding".split(),
    ),
    ("struct kvm_cpuid2", uapi.kvm_cpuid2, ["nent", "padding"]),
    ("struct kvm_msr_entry", uapi.kvm_msr_entry, ["index", "reserved", "data"]),
    ("struct kvm_msrs", uapi.kvm_msrs, ["nmsrs", "pad"]),
    (
        "struct kvm_x86_mce",
        uapi.kvm_x86_mce,
        "status addr misc mcg_status bank pad1 pad2".split(),
    ),
    ("struct kvm_interrupt", uapi.kvm_interrupt, ["irq"]),
    (
        "struct kvm_translation",
        uapi.kvm_translation,
        "linear_address physical_address valid writeable usermode pad".split(),
    ),
    (
        "struct kvm_vcpu_events",
        uapi.kvm_vcpu_events,
        "exception interrupt nmi sipi_vector flags smi triple_fault reserved "
        "exception_has_payload exception_payload exception.error_code interrupt.shadow "
        "nmi.masked smi.latched_init".split(),
    ),
    (
        "struct kvm_run",
        uapi.kvm_run,
        "request_interrupt_window immediate_exit padding1 exit_reason "
        "ready_for_interrupt_injection if_flag flags cr8 apic_base "
        "hw.hardware_exit_reason fail_entry.hardware_entry_failure_reason fail_entry.cpu "
        "ex.exception ex.error_code io.direction io.size io.port io.count io.data_offset "
        "mmio.phys_addr mmio.data mmio.len mmio.is_write hypercall.nr "
        "hypercall.args hypercall.ret hypercall.longmode internal.suberror internal.ndata "
        "internal.data system_event.type system_event.ndata system_event.data "
        "kvm_valid_regs kvm_dirty_regs s".split(),
    ),
]

IOCTLS = list(uapi.IOCTLS)

CONSTANTS = [
    "KVM_API_VERSION",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    *[
        n
        for n in uapi.EXIT_REASON_NAMES.values()
        if n not in ("KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_LOONGARCH_IOCSR")
    ],
    *[
        n
        for n in dir(uapi)
        if n.startswith("KVM_CAP_")
        and n not in ("KVM_CAP_USER_MEMORY2", "KVM_CAP_MEMORY_FAULT_INFO", "KVM_CAP_GUEST_MEMFD")
    ],
    "KVM_INTERNAL_ERROR_EMULATION",
    "KVM_INTERNAL_ERROR_SIMUL_EX",
    "KVM_INTERNAL_ERROR_DELIVERY_EV",
    "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
    "KVM_SYSTEM_EVENT_SHUTDOWN",
    "KVM_SYSTEM_EVENT_RESET",
    "KVM_SYSTEM_EVENT_CRASH",
]


def _kvm_run_member_type(name: str) -> type[ctypes.Structure]:
    return dict((f[0], f[1]) for f in uapi.kvm_run_exit._fields_)[name]


def _expected_offset(cls: type[ctypes.Structure], field: str) -> int:
    parts = field.split(".")
    if cls is uapi.kvm_run and len(parts) == 2:
        member = _kvm_run_member_type(parts[0])
        return uapi.kvm_run.u.offset + getattr(member, parts[1]).offset
    off = getattr(cls, parts[0]).offset
    if len(parts) == 2:
        inner = dict((f[0], f[1]) for f in cls._fields_)[parts[0]]
        off += getattr(inner, parts[1]).offset
    return off


def _c_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for cname, _cls, fields in STRUCTS:
        key = cname.replace("struct ", "")
        lines.append(f'  printf("sizeof {key} %zu\\n", sizeof({cname}));')
        for f in fields:
            lines.append(f'  printf("offsetof {key}.{f} %zu\\n", offsetof({cname}, {f}));')
    for name in IOCTLS:
        lines.append(f'  printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    for name in CONSTANTS:
        lines.append(f'  printf("const {name} %lld\\n", (long long)({name}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or /usr/include/linux/kvm.h not available")
    d = tmp_path_factory.mktemp("layout")
    src, exe = d / "layout.c", d / "layout"
    src.write_text(_c_source())
    subprocess.run([gcc, "-O0", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts: dict[str, int] = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        facts[f"{kind} {name}"] = int(value)
    return facts


@pytest.mark.parametrize(("cname", "cls", "fields"), STRUCTS, ids=[s[0][7:] for s in STRUCTS])
def test_struct_layout(
    header_facts: dict[str, int],
    cname: str,
    cls: type[ctypes.Structure],
    fields: list[str],
) -> None:
    key = cname.replace("struct ", "")
    assert ctypes.sizeof(cls) == header_facts[f"sizeof {key}"], cname
    for f in fields:
        assert _expected_offset(cls, f) == header_facts[f"offsetof {key}.{f}"], f"{cname}.{f}"


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(header_facts: dict[str, int], name: str) -> None:
    assert uapi.IOCTLS[name] == header_facts[f"ioctl {name}"], f"{name}: {uapi.IOCTLS[name]:#x}"


def test_constants(header_facts: dict[str, int]) -> None:
    mismatched = {
        n: (getattr(uapi, n), header_facts[f"const {n}"])
        for n in CONSTANTS
        if getattr(uapi, n) != header_facts[f"const {n}"]
    }
    assert not mismatched


def test_newer_than_header_constants() -> None:
    # Documentation/virt/kvm/api.rst; the 6.1-era system header lacks these.
    assert uapi.KVM_EXIT_MEMORY_FAULT == 39
    assert uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE == 1 << 3
    assert uapi.KVM_CAP_USER_MEMORY2 == 231
    assert uapi.KVM_CAP_MEMORY_FAULT_INFO == 232
    assert uapi.KVM_CAP_GUEST_MEMFD == 234


def test_memory_fault_documented_layout() -> None:
    # struct { __u64 flags; __u64 gpa; __u64 size; } memory_fault; at the kvm_run union (32)
    assert uapi.kvm_run.u.offset == 32
    mf = _kvm_run_member_type("memory_fault")
    assert (mf.flags.offset, mf.gpa.offset, mf.size.offset) == (0, 8, 16)
    assert ctypes.sizeof(mf) == 24
    assert ctypes.sizeof(uapi.kvm_run_exit) == 256


def test_mce_constants() -> None:
    assert uapi.MSR_IA32_MCG_STATUS == 0x17A
    assert uapi.MSR_IA32_MCx_STATUS(0) == 0x401
    assert uapi.MSR_IA32_MCx_STATUS(9) == 0x425
    assert uapi.MSR_IA32_MCx_ADDR(9) == 0x426
    assert uapi.MSR_IA32_MCx_MISC(9) == 0x427
    bits = {
        "VAL": 63, "OVER": 62, "UC": 61, "EN": 60, "MISCV": 59, "ADDRV": 58, "PCC": 57,
        "S": 56, "AR": 55,
    }  # fmt: skip
    for name, bit in bits.items():
        assert getattr(uapi, f"MCI_STATUS_{name}") == 1 << bit
    assert (uapi.MCG_STATUS_RIPV, uapi.MCG_STATUS_EIPV, uapi.MCG_STATUS_MCIP) == (1, 2, 4)
    assert (uapi.MCG_CTL_P, uapi.MCG_SER_P) == (1 << 8, 1 << 24)
    assert uapi.MCM_ADDR_PHYS == 2


def test_variable_length_helpers() -> None:
    c = uapi.make_cpuid2(3)
    assert c.nent == 3 and ctypes.sizeof(c) == 8 + 3 * 40
    m = uapi.make_msrs([(0x17A, 5), (0x401, 7)])
    assert m.nmsrs == 2 and m.entries[1].index == 0x401 and m.entries[1].data == 7
    assert ctypes.sizeof(m) == 8 + 2 * 16


def test_ioc_rejects_oversized() -> None:
    with pytest.raises(ValueError):
        uapi._IOW(uapi.KVMIO, 1, 1 << 14)
