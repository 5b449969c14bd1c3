"""Against the host's /dev/kvm: a few hand-assembled real-mode guests."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultline.kvm import Hlt, Intr, IoOut, Kvm, KvmError, Mmio, Vcpu, Vm, uapi
from faultline.memory import GuestMemory

pytestmark = pytest.mark.kvm

RAM_SIZE = 0x10000
CODE_GPA = 0x1000
WINDOW_GPA = 0x100000


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _maps() -> int:
    return len(Path("/proc/self/maps").read_text().splitlines())


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    try:
        k = Kvm()
    except KvmError as e:
        print(f"skipping: cannot open /dev/kvm: {e}")
        pytest.skip(f"cannot open /dev/kvm: {e}")
    with k:
        yield k


def _real_mode_vcpu(vm: Vm, rip: int) -> Vcpu:
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = rip, 0x2
    vcpu.set_regs(regs)
    return vcpu


def test_api_and_caps(kvm: Kvm) -> None:
    caps = {
        name: kvm.check_extension(getattr(uapi, name))
        for name in (
            "KVM_CAP_MCE",
            "KVM_CAP_READONLY_MEM",
            "KVM_CAP_IMMEDIATE_EXIT",
            "KVM_CAP_MEMORY_FAULT_INFO",
            "KVM_CAP_USER_MEMORY2",
            "KVM_CAP_GUEST_MEMFD",
            "KVM_CAP_ASYNC_PF",
            "KVM_CAP_EXIT_ON_EMULATION_FAILURE",
        )
    }
    print(f"api={kvm.api_version()} mmap={kvm.vcpu_mmap_size()} caps={caps}")
    print(f"mce_cap_supported={kvm.mce_cap_supported():#x}")
    assert kvm.api_version() == uapi.KVM_API_VERSION == 12
    assert kvm.vcpu_mmap_size() >= 4096
    cpuid = kvm.supported_cpuid()
    assert cpuid.nent > 0 and any(e.function == 0 for e in cpuid.entries)


def test_out_then_hlt_and_leaks(kvm: Kvm) -> None:
    fds_before, maps_before = _fds(), _maps()
    for _ in range(3):  # repeated create/close must not accumulate fds or mappings
        with GuestMemory() as mem, kvm.create_vm() as vm:
            ram = mem.add_anonymous("ram", 0, RAM_SIZE)
            # mov al, 0x42; out 0x10, al; hlt
            mem.write(CODE_GPA, bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4]))
            vm.set_tss_addr(0xFFFB_D000)
            vm.set_user_memory_region(0, ram.gpa, ram.size, ram.hva)
            vcpu = _real_mode_vcpu(vm, CODE_GPA)
            vcpu.set_cpuid2(kvm.supported_cpuid())
            e = vcpu.run()
            assert isinstance(e, IoOut)
            assert (e.port, e.size, e.count, e.data) == (0x10, 1, 1, b"\x42")
            assert 0 < e.data_offset < kvm.vcpu_mmap_size()
            assert vcpu.run() == Hlt()
            assert vcpu.get_regs().rip == CODE_GPA + 5
            tr = vcpu.translate(0x1234)  # real mode: identity
            assert tr.valid and tr.gpa == 0x1234
            vcpu.immediate_exit = True
            assert vcpu.immediate_exit
            assert vcpu.run() == Intr()
            vcpu.immediate_exit = False
        assert vcpu.closed and vm.closed
    assert _fds() == fds_before
    assert _maps() <= maps_before


def test_sync_regs_match_kvm_get_regs(kvm: Kvm) -> None:
    """With KVM_SYNC_X86_REGS, the GPRs KVM stores into kvm_run at each exit are the ones
    KVM_GET_REGS returns (the fault path reads them instead of the ioctl)."""
    if not kvm.check_extension(uapi.KVM_CAP_SYNC_REGS) & uapi.KVM_SYNC_X86_REGS:
        pytest.skip("KVM_CAP_SYNC_REGS without KVM_SYNC_X86_REGS")
    with GuestMemory() as mem, kvm.create_vm() as vm:
        ram = mem.add_anonymous("ram", 0, RAM_SIZE)
        # mov ebx, 0x11223344 (66-prefixed in real mode); inc si; out 0x10, al; hlt
        mem.write(CODE_GPA, bytes([0x66, 0xBB, 0x44, 0x33, 0x22, 0x11, 0x46, 0xE6, 0x10, 0xF4]))
        vm.set_tss_addr(0xFFFB_D000)
        vm.set_user_memory_region(0, ram.gpa, ram.size, ram.hva)
        vcpu = _real_mode_vcpu(vm, CODE_GPA)
        vcpu.sync_regs(uapi.KVM_SYNC_X86_REGS)
        for want in (IoOut, Hlt):
            assert isinstance(vcpu.run(), want)
            synced, regs = vcpu.synced_regs(), vcpu.get_regs()
            assert bytes(synced) == bytes(regs)
        assert (synced.rbx, synced.rsi, synced.rip) == (0x11223344, 1, CODE_GPA + 10)


def test_load_from_truncated_file_window_is_mmio(kvm: Kvm, tmp_path: Path) -> None:
    backing = tmp_path / "dax.img"
    backing.write_bytes(b"\x5a" * 0x2000)
    with GuestMemory() as mem, kvm.create_vm() as vm:
        ram = mem.add_anonymous("ram", 0, RAM_SIZE)
        win = mem.add_file("dax", WINDOW_GPA, backing)
        # ds.base = WINDOW_GPA: mov al, [0x1000]; out 0x10, al; hlt
        mem.write(CODE_GPA, bytes([0xA0, 0x00, 0x10, 0xE6, 0x10, 0xF4]))
        vm.set_user_memory_region(0, ram.gpa, ram.size, ram.hva)
        vm.set_user_memory_region(1, win.gpa, win.size, win.hva)
        vcpu = _real_mode_vcpu(vm, CODE_GPA)
        sregs = vcpu.get_sregs()
        sregs.ds.base, sregs.ds.selector = WINDOW_GPA, WINDOW_GPA >> 4
        vcpu.set_sregs(sregs)
        os.truncate(backing, 0x1000)  # the host truncates below the page the guest loads
        e = vcpu.run()
        print(f"load from truncated page -> {e!r}")
        assert isinstance(e, Mmio)
        assert e.phys_addr == WINDOW_GPA + 0x1000 and not e.is_write and e.len == 1
        # The VMM must not complete this read with made-up data; just tear down.


def test_set_mce_without_val_is_einval(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        banks = kvm.check_extension(uapi.KVM_CAP_MCE)
        assert banks >= 10
        supported = kvm.mce_cap_supported()
        vcpu.setup_mce((supported & (uapi.MCG_CTL_P | uapi.MCG_SER_P)) | 10)
        mce = uapi.kvm_x86_mce(
            status=uapi.MCI_STATUS_UC | uapi.MCI_STATUS_EN,  # VAL missing
            addr=0x5000,
            mcg_status=uapi.MCG_STATUS_MCIP | uapi.MCG_STATUS_RIPV,
            bank=9,
        )
        with pytest.raises(KvmError) as info:
            vcpu.set_mce(mce)
        assert info.value.errno == errno.EINVAL and info.value.op == "KVM_X86_SET_MCE"
        msrs = vcpu.get_msrs([uapi.MSR_IA32_MCG_STATUS])
        assert msrs[uapi.MSR_IA32_MCG_STATUS] == 0


def test_errors_are_typed(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(0, 0x1001, 0x1000, 0)  # unaligned gpa
    assert info.value.errno == errno.EINVAL
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.closed
    with pytest.raises(KvmError):
        vcpu.get_regs()
    with pytest.raises(KvmError):
        vcpu.run()
