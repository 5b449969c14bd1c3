"""x86 machine-check architecture: MSRs and bits (arch/x86/include/asm/msr-index.h,
mce.h). Architecture facts, neither KVM uapi nor VMM policy: the KVM bindings and the pure
policy module (which the model uses, and which must never import the bindings) both take
them from here."""

from __future__ import annotations

MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_MCG_CTL = 0x17B
MSR_IA32_MC0_CTL = 0x400


def MSR_IA32_MCx_CTL(bank: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * bank


def MSR_IA32_MCx_STATUS(bank: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * bank + 1


def MSR_IA32_MCx_ADDR(bank: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * bank + 2


def MSR_IA32_MCx_MISC(bank: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * bank + 3


MSR_IA32_MC0_STATUS = MSR_IA32_MCx_STATUS(0)  # 0x401
MSR_IA32_MC0_ADDR = MSR_IA32_MCx_ADDR(0)
MSR_IA32_MC0_MISC = MSR_IA32_MCx_MISC(0)

MCI_STATUS_VAL = 1 << 63
MCI_STATUS_OVER = 1 << 62
MCI_STATUS_UC = 1 << 61
MCI_STATUS_EN = 1 << 60
MCI_STATUS_MISCV = 1 << 59
MCI_STATUS_ADDRV = 1 << 58
MCI_STATUS_PCC = 1 << 57
MCI_STATUS_S = 1 << 56
MCI_STATUS_AR = 1 << 55
# AMD (QEMU target/i386/cpu.h, Linux asm/mce.h): a deferred error, and poisoned data
# consumed (the address is usable: Linux's amd_mce_usable_address()).
MCI_STATUS_DEFERRED = 1 << 44
MCI_STATUS_POISON = 1 << 43

MCG_STATUS_RIPV = 1 << 0
MCG_STATUS_EIPV = 1 << 1
MCG_STATUS_MCIP = 1 << 2

MCG_CTL_P = 1 << 8
MCG_SER_P = 1 << 24
MCG_CAP_COUNT_MASK = 0xFF

MCM_ADDR_SEGOFF = 0
MCM_ADDR_LINEAR = 1
MCM_ADDR_PHYS = 2
