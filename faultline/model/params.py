"""The model's configuration: named parameters, each one behaviour of the modelled
kernel, VMM or guest (not a design: designs are faultline/model/designs/)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from faultline.model import kvm as K
from faultline.vmm import policy as P


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
    # Exits for an already-handled page before the VMM gives up.
    max_repeats: int = P.MAX_REPEATS
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
        return p

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_PARAMS: dict[str, Any] = Params().as_dict()
