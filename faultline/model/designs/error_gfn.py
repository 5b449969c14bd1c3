"""error-gfn: Vivek Goyal's v4 ("kvm: Add capability to be able to report async pf
error to guest", 2020, the error-gfn half). kvm_arch_async_page_ready() records a gfn
whose prefetch failed in a per-vCPU hash (kvm_add_error_gfn: one slot per hash key, a
collision overwrites: it is a hint); the next fault on that gfn finds it
(kvm_find_and_remove_error_gfn) and takes the synchronous path, whose gup fails and
exits to userspace in the faulting context.

Per-vCPU state (Vcpu.design): the error hash, a sorted ((slot, gfn), ...).
"""

from faultline.model import kvm as K
from faultline.model.design import Design
from faultline.model.state import ApfDone, State
from faultline.model.system import System


class ErrorGfn(Design):
    name = "error-gfn"
    summary = "remember the failed gfn; its next fault goes synchronous and exits"
    vcpu_state_name = "error_gfns"
    vcpu_init = ()

    def kvm_mmu_faultin_pfn(self, m: System, s: State, v: int, t: int, gfn: int
                            ) -> tuple[bool, State]:
        vc = s.vcpus[v]
        if vc.design:
            found, rest = K.error_find_and_remove(vc.design, gfn, m.hash_size)
            if found:
                m.emit("kvm_find_and_remove_error_gfn", vcpu=v, task=t, gfn=hex(gfn))
                return False, m.set_vcpu(s, v, vc._replace(design=rest))
        return True, s

    def kvm_arch_async_page_ready(self, m: System, s: State, v: int, work: ApfDone,
                                  failed: bool) -> State:
        if not failed:
            return s
        vc = s.vcpus[v]
        m.emit("kvm_add_error_gfn", vcpu=v, gfn=hex(work.gfn))
        return m.set_vcpu(s, v, vc._replace(design=K.error_add(vc.design, work.gfn,
                                                               m.hash_size)))


DESIGN = ErrorGfn()
