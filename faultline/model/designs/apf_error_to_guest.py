"""apf-error-to-guest: Vivek Goyal's June 2020 series ("kvm: Add capability to be able to
report async pf error to guest", PATCH 1/3 and 2/3, 16 Jun 2020): the page-ready event
carries an error flag (kvm_arch_async_page_present() writes KVM_PV_REASON_PAGE_ERROR) and
the guest sends SIGBUS to the task that slept on the token. Userspace is told only when the
error cannot be injected (Params.apf_error_report = "vivek-2020", the linux-qemu profile):
then the gfn is remembered (vcpu->arch.apf.error_gfn, one per vCPU) and
kvm_can_do_async_pf(vcpu, gfn) is false for it, so its next fault is synchronous and
-EFAULT reaches the VMM. With "faultline" (faultline-vmm) the error is the page-ready
prefetch's and nothing is remembered.

Per-vCPU state (Vcpu.design): the remembered error gfn, or -1.
"""

from faultline.model.design import Design
from faultline.model.state import ApfDone, State
from faultline.model.system import System


class ApfErrorToGuest(Design):
    name = "apf-error-to-guest"
    summary = "page-ready carries the error: the guest SIGBUSes the waiting task"
    vcpu_state_name = "error_gfn"
    vcpu_init = -1

    def kvm_mmu_faultin_pfn(self, m: System, s: State, v: int, t: int, gfn: int
                            ) -> tuple[bool, State]:
        # PATCH 1/3, kvm_can_do_async_pf(): "if (vcpu->arch.apf.error_gfn == gfn) return
        # false;" (never cleared: only overwritten by the next error).
        if s.vcpus[v].design == gfn:
            m.emit("kvm_apf_error_gfn_sync", vcpu=v, task=t, gfn=hex(gfn))
            return False, s
        return True, s

    def kvm_arch_async_page_ready(self, m: System, s: State, v: int, work: ApfDone,
                                  failed: bool) -> State:
        # PATCH 2/3, kvm_arch_async_page_present(): "if (work->error_code &&
        # (!present_injected || !vcpu->arch.apf.send_pf_error))" save the gfn. The error
        # is async_pf_execute()'s get_user_pages_remote() result (work.ok).
        if m.params.apf_error_report != "vivek-2020" or work.ok:
            return s
        if work.injected and m.pv_apf:
            return s  # reported to the guest with the page-ready event
        m.emit("kvm_apf_error_gfn", vcpu=v, gfn=hex(work.gfn))
        return m.set_vcpu(s, v, s.vcpus[v]._replace(design=work.gfn))

    def kvm_arch_async_page_present(self, m: System, s: State, v: int, work: ApfDone,
                                    failed: bool) -> bool:
        if m.params.apf_error_report == "vivek-2020":
            return not work.ok
        return failed


DESIGN = ApfErrorToGuest()
