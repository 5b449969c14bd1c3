"""A KVM design: named hooks at the KVM code points where the designs differ.

A design is a subclass of :class:`Design` that overrides only the hooks its patch
changes; every default body here is what upstream KVM does (faultline/model/designs/
upstream.py overrides nothing). The shared model (``faultline.model.system``) calls the
hooks and never asks which design it runs.

Every hook gets ``m``, the running model (:class:`faultline.model.system.System`: its
parameters, ``m.emit`` for events, helpers such as ``m.set_vcpu`` and
``m.memory_fault_exit``), and the current :class:`~faultline.model.state.State`, and
returns what it documents. States are immutable: a hook returns a new state (or the same
one). A hook that runs inside a vCPU action may read and change that vCPU, its tasks and
the shared records (files, mem, guest, vmm) but never another vCPU or another vCPU's
tasks: the checker memoises those actions on exactly that footprint
(``FAULTLINE_CHECK_MEMO=1`` asserts it; docs/designs.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from faultline.model.state import EXIT_BARE_EFAULT, ApfDone, State

if TYPE_CHECKING:
    from faultline.model.system import System


class Design:
    name: str = ""  # as on the command line: --design NAME
    summary: str = ""  # one line for listings
    # The design's own per-vCPU state (``Vcpu.design``) at vCPU creation.
    vcpu_init: Any = ()
    vcpu_state_name = "design"  # how counterexamples name it: vcpus[N].<vcpu_state_name>
    # Request bits (kvm.REQ_*) this design handles in vcpu_enter_guest(): when one is set
    # the vCPU's next action is ``vcpu_enter_guest``, named ``vcpuN <entry_action>``.
    entry_requests: int = 0
    entry_action: str = ""

    def kvm_mmu_faultin_pfn(self, m: System, s: State, v: int, t: int, gfn: int
                            ) -> tuple[bool, State]:
        """__kvm_mmu_faultin_pfn(): the gfn needs I/O (FOLL_NOWAIT failed) and
        kvm_can_do_async_pf() allows async: may this fault go async (True), or must it
        take the synchronous gup (False)? Upstream: always async."""
        return True, s

    def kvm_handle_error_pfn(self, m: System, s: State, v: int, t: int, gpa: int) -> int:
        """kvm_handle_error_pfn() for KVM_PFN_ERR_FAULT (the synchronous gup failed): the
        exit KVM_RUN returns (``state.EXIT_*``). Upstream x86 as modelled: a bare -EFAULT
        with no exit information (EXIT_BARE_EFAULT)."""
        return EXIT_BARE_EFAULT

    def kvm_arch_async_page_ready(self, m: System, s: State, v: int, work: ApfDone,
                                  failed: bool) -> State:
        """kvm_arch_async_page_ready(): the prefetch re-ran the fault for the completed
        ``work``; ``failed`` if it could not map the page. Upstream: the result is not
        looked at, so an error is dropped here."""
        if failed:
            m.emit("kvm_async_pf_error_discarded", vcpu=v, gfn=hex(work.gfn))
        return s

    def kvm_arch_async_page_present(self, m: System, s: State, v: int, work: ApfDone,
                                    failed: bool) -> bool:
        """kvm_arch_async_page_present(): does the page-ready event tell the guest that
        the page is in error (the guest then sends SIGBUS BUS_ADRERR to the woken task)?
        Upstream: no, it carries the token only."""
        return False

    def vcpu_enter_guest(self, m: System, s: State, v: int) -> State:
        """vcpu_enter_guest() with one of ``entry_requests`` pending on vCPU v (the
        action runs before anything else the vCPU would do). Upstream: no such request."""
        raise NotImplementedError(f"design {self.name!r} sets entry_requests but does not "
                                  "handle them in vcpu_enter_guest")


HOOKS = ("kvm_mmu_faultin_pfn", "kvm_handle_error_pfn", "kvm_arch_async_page_ready",
         "kvm_arch_async_page_present", "vcpu_enter_guest")
