"""The model's configuration: named parameters, each one behaviour of the modelled
kernel, VMM or guest (not a design: designs are faultline/model/designs/)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from faultline.model import kvm as K
from faultline.scenario import GUEST_CPUS

# The guest-CPU parameters: QEMU + Linux behaviours, so for the linux-qemu profile only
# (a scenario's [vm] cpu / amd_succor / mcg_ser_p, the CLI's --cpu, --no-succor,
# --no-mcg-ser-p).
CPU_PARAMS = ("guest_cpu", "amd_succor", "mcg_ser_p")


@dataclass(frozen=True)
class Params:
    # File pages start in the page cache (False: a cold DAX window).
    cached_at_start: bool = False
    # Max queued async work per vCPU (ASYNC_PF_PER_VCPU).
    async_pf_per_vcpu: int = K.ASYNC_PF_PER_VCPU
    # Slots of the outstanding-gfn hash (a power of 2).
    hash_size: int = K.ASYNC_PF_PER_VCPU
    # "lowest-free" (finite state space) or "counter" (upstream's apf.id++, never 0).
    token_alloc: str = "lowest-free"
    # kvm_arch_interrupt_allowed() during a kernel-mode (kread) access. faultline's guest
    # enters its syscalls through an interrupt gate (IF=0): False -> synchronous path.
    # True: KVM sets up an async PF with an artificial halt (KVM_REQ_APF_HALT).
    kernel_irqs_on: bool = False
    # Upstream also does async PF + artificial halt for a guest that never enabled PV APF
    # (kvm_can_do_async_pf() does not look at the APF MSR). False: a scenario's
    # `vm.apf = false` means no async PF at all (every fault synchronous), as on the kvm
    # backend here.
    async_without_pv: bool = False
    # Task.fails saturates here (a label, not a behaviour).
    fail_cap: int = 3
    # Per-page exit counts saturate here.
    exit_cap: int = 7
    # The VMM registers every file window with userfaultfd (MISSING + UFFD_FEATURE_SIGBUS)
    # over tmpfs, as faultline's real VMM does: the host fault on a hole (punched, or the
    # sparse range of a re-extended file) is VM_FAULT_SIGBUS, exactly like a page beyond
    # EOF. False: a hole is allocated on first touch and reads zeros (plain shmem/DAX).
    uffd_sigbus_holes: bool = True
    # The VMM decodes the faulting instruction (as the real VMM does for every fault it
    # catches), so it knows the exact byte the access touched, not only the gfn that
    # KVM_EXIT_MEMORY_FAULT names: the fault record and an SRAR's MCi_ADDR carry it, and
    # the guest's SIGBUS address is exact. False: page granularity (the gfn only).
    vmm_exact_gpa: bool = True
    # proactive: the VMM's file watcher sees every host change before the guest runs on
    # (the real runner waits for its watcher after each change it makes: _sync_watch).
    # False: the watcher is a separate actor that may be late (races explored).
    proactive_sync: bool = True
    # The notification interrupt goes to one vCPU (the faulting one; for proactive, the
    # one whose step changed the file), as the real VMM's KVM_INTERRUPT does; the other
    # vCPUs run on until it is taken (conformance sets this). False: every vCPU takes
    # the pending notification before running anything (the checker's default).
    notify_one_vcpu: bool = False
    # Symmetry reduction for the checker: offer ``canonical(state)`` (see
    # System._symmetry_groups) when the scenario has interchangeable tasks. Off by
    # default: a canonical state may have its tasks rotated, so action names along a path
    # only replay with canonical states (replay(..., canonical=True)); the checker's
    # matrix turns it on.
    symmetry: bool = False

    # --- Linux + QEMU behaviours (docs/linux-qemu.md; the profile sets them) -----------
    # Difference 2: a timer interrupt ends an artificial halt (vcpu_block():
    # kvm_vcpu_has_events()) and the guest may schedule another task: always from user
    # mode, from a kernel-mode access only with full preemption (``preempt``).
    timer_ends_halt: bool = False
    # The guest's preemption model: "none" | "voluntary" (PREEMPT_NONE / _VOLUNTARY: no
    # preemption on return from an interrupt to kernel mode) | "full" (CONFIG_PREEMPT).
    preempt: str = "voluntary"
    # Difference 3: the page-ready prefetch meeting a poisoned page sends SIGBUS
    # BUS_MCEERR_AR to the vCPU thread (kvm_handle_error_pfn() ->
    # kvm_send_hwpoison_signal()), whatever the guest runs. False: its failure is dropped
    # like -EFAULT.
    prefetch_hwpoison_sigbus: bool = False
    # Difference 4: an SRAO is logged in #MC context and memory_failure() runs later from
    # a workqueue (mce_gen_pool_process() -> uc_decode_notifier()). False: inside the #MC
    # handler.
    srao_workqueue: bool = False
    # Difference 5: a store to a read-only window. "sigsegv": faultline's VMM refuses it
    # (one exit, SIGSEGV SEGV_ACCERR to the writer); "mmio-discard": KVM emulates it into
    # a KVM_EXIT_MMIO write that QEMU drops (the writer runs on).
    readonly_store: str = "sigsegv"
    # Difference 6: how apf-error-to-guest reports. "faultline": the page-ready prefetch's
    # failure, SIGBUS BUS_ADRERR at the task's address; "vivek-2020": the worker's gup
    # result, SIGBUS SI_KERNEL with no address, and an error that could not be injected
    # is remembered (one gfn per vCPU) so its next fault is synchronous.
    apf_error_report: str = "faultline"
    # Difference 7: a task woken by page-ready (kvm_async_pf_task_wake() ->
    # apf_task_wake_one() -> swake_up_one() -> try_to_wake_up()) is placed by
    # select_task_rq(): select_task_rq_fair()'s select_idle_sibling() takes an idle
    # CPU when the waking one is busy, and an idle CPU's newidle balance can pull the task
    # before it runs. So it may retry its access on any vCPU its affinity allows
    # (`[[tasks]] cpus`, default all). False: tasks run on their own vCPU only
    # (faultline's guest).
    wake_migrate: bool = False
    # Difference 8: the address an SRAR-driven SIGBUS reports. "exact": MCi_ADDR's byte
    # (faultline's guest); "page": the page (Linux's kill_proc(), page_address_in_vma()).
    srar_kill_vaddr: str = "exact"
    # Difference 9: QEMU's kvm_mce_inject() passes MCE_INJECT_BROADCAST (Intel guest CPU,
    # cpu_x86_support_mca_broadcast()) unless the guest set MCG_EXT_CTL.LMCE_EN, and
    # cpu_x86_inject_mce() then also injects bank 1 VAL|UC, MCG_STATUS MCIP|RIPV into
    # every other vCPU. QEMU's `lmce` CPU property is off by default, so Linux's
    # intel_init_lmce() finds no MCG_LMCE_P and never enables LMCE: broadcast.
    # False: the SRAR reaches the faulting vCPU only (faultline's VMM; `-cpu ...,lmce=on`).
    mce_broadcast: bool = False
    # Difference 9: an MCE for a vCPU whose MCG_STATUS.MCIP is still set (injected, its
    # #MC handler not finished). "queue": faultline's model delivers it after the first;
    # "qemu": do_inject_x86_mce() drops an SRAO or the broadcast record (not AR), and
    # for an SRAR calls qemu_system_reset_request() ("Previous MCE still in progress,
    # raising triple fault"): the guest is reset, i.e. the run stops.
    mce_while_mcip: str = "queue"
    # Difference 9, the guest CPU QEMU presents (linux-qemu only; faultline's VMM injects
    # Intel's encoding). "intel": as above. "amd" (IS_AMD_CPU(env)), as QEMU >= 9.1 does it
    # (John Allen's "i386: Fix MCE support for AMD hosts", June 2024): kvm_mce_inject()
    # encodes an SRAR as UC|POISON (MCG_STATUS MCIP|RIPV|EIPV) and an SRAO as a deferred
    # error, DEFERRED|POISON; cpu_x86_support_mca_broadcast() returns 0 (no broadcast);
    # and the guest grades the record with Linux's mce_severity_amd(): a deferred error is
    # left to machine_check_poll() -> uc_decode_notifier() -> memory_failure() later.
    guest_cpu: str = "intel"
    # AMD only: CPUID 0x80000007 EBX bit 1 (SUCCOR) in the guest. Linux's
    # mce_severity_amd() panics on any uncorrected error without it ("Uncorrected error
    # without MCA Recovery"). QEMU >= 9.1 offers it (kvm_arch_get_supported_cpuid(); the
    # same June 2024 series), e.g. `-cpu host`, EPYC-Genoa; QEMU <= 9.0 (7.2 here) never
    # does. False: such a QEMU, or a CPU model without `succor`.
    amd_succor: bool = True
    # MCG_SER_P in the guest's MCG_CAP (QEMU's MCE_CAP_DEF where KVM supports it). False:
    # a CPU model without MCA recovery: kvm_arch_on_sigbus_vcpu() injects nothing; an AR
    # SIGBUS ends QEMU (hardware_memory_error(): "QEMU got Hardware memory error",
    # exit(1)), an AO one is ignored (MEMORY_FAILURE_ACTION_IGNORE).
    mcg_ser_p: bool = True

    @classmethod
    def make(cls, **params: Any) -> Params:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(params) - names
        if unknown:
            raise ValueError(f"unknown model parameters: {', '.join(sorted(unknown))}")
        p = cls(**params)
        if p.hash_size & (p.hash_size - 1) or p.hash_size < 1:
            raise ValueError("hash_size must be a power of two")
        if p.async_pf_per_vcpu > p.hash_size:
            raise ValueError("async_pf_per_vcpu must not exceed hash_size")
        if p.token_alloc not in ("lowest-free", "counter"):
            raise ValueError("token_alloc must be 'lowest-free' or 'counter'")
        for name, choices in (("preempt", ("none", "voluntary", "full")),
                              ("readonly_store", ("sigsegv", "mmio-discard")),
                              ("apf_error_report", ("faultline", "vivek-2020")),
                              ("srar_kill_vaddr", ("exact", "page")),
                              ("mce_while_mcip", ("queue", "qemu")),
                              ("guest_cpu", GUEST_CPUS)):
            if getattr(p, name) not in choices:
                raise ValueError(f"{name} must be one of: {', '.join(choices)}")
        return p

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cpu_label(self) -> str:
        """The guest CPU's machine-check set-up in a few words, "" for the default (an
        Intel guest with MCG_SER_P): shown next to the profile's name."""
        parts = []
        if self.guest_cpu != "intel":
            parts.append(f"cpu {self.guest_cpu}"
                         + ("" if self.amd_succor else " without SUCCOR"))
        if not self.mcg_ser_p:
            parts.append("no MCG_SER_P")
        return ", ".join(parts)


DEFAULT_PARAMS: dict[str, Any] = Params().as_dict()


# What each profile sets (docs/linux-qemu.md); explicit parameters override it. The
# dataclass defaults above are faultline-vmm: faultline's own VMM and guest.
PROFILE_PARAMS: dict[str, dict[str, Any]] = {
    "linux-qemu": {
        # 1: QEMU's in-kernel LAPIC and Linux's IF=1 system calls: kvm_can_do_async_pf()
        # holds for kernel-mode accesses and for a guest without PV APF.
        "kernel_irqs_on": True,
        "async_without_pv": True,
        "timer_ends_halt": True,
        "wake_migrate": True,
        "prefetch_hwpoison_sigbus": True,
        "srao_workqueue": True,
        "readonly_store": "mmio-discard",
        "apf_error_report": "vivek-2020",
        "srar_kill_vaddr": "page",
        "mce_broadcast": True,
        "mce_while_mcip": "qemu",
    },
    "faultline-vmm": {},
}
DEFAULT_PROFILE = "linux-qemu"
