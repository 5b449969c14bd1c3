"""request: kvm_arch_async_page_ready() that fails records the gfn and raises a new
request, KVM_REQ_MEMORY_FAULT; vcpu_enter_guest() sees it before entering the guest and
exits to userspace with KVM_EXIT_MEMORY_FAULT for that gfn, whatever task the vCPU runs
then (the exit is not in the faulting context: the VMM cannot send an SRAR to the right
task). One pending gfn per vCPU: a second failure before the exit is not recorded.

Per-vCPU state (Vcpu.design): the pending gfn, or -1.
"""

from faultline import abi
from faultline.model import kvm as K
from faultline.model.design import Design
from faultline.model.state import EXIT_REQUEST, ApfDone, Exit, State
from faultline.model.system import System


class Request(Design):
    name = "request"
    summary = "a failed prefetch raises KVM_REQ_MEMORY_FAULT: exit at the next entry"
    vcpu_state_name = "pending_gfn"
    vcpu_init = -1
    entry_requests = K.REQ_MEMORY_FAULT
    entry_action = "kvm_exit memory_fault (request)"

    def kvm_arch_async_page_ready(self, m: System, s: State, v: int, work: ApfDone,
                                  failed: bool) -> State:
        if not failed:
            return s
        vc = s.vcpus[v]
        if vc.design != -1:
            m.emit("kvm_apf_error_not_recorded", vcpu=v, gfn=hex(work.gfn),
                   pending=hex(vc.design))
            return s
        m.emit("kvm_make_request", vcpu=v, request="KVM_REQ_MEMORY_FAULT", gfn=hex(work.gfn))
        return m.set_vcpu(s, v, vc._replace(design=work.gfn,
                                            requests=vc.requests | K.REQ_MEMORY_FAULT))

    def vcpu_enter_guest(self, m: System, s: State, v: int) -> State:
        vc = s.vcpus[v]
        gpa = vc.design << abi.PAGE_SHIFT
        t = m.current_task(s, v)
        m.emit("kvm_exit", vcpu=v, task=t, reason="KVM_EXIT_MEMORY_FAULT", gpa=hex(gpa),
               size=abi.PAGE_SIZE, source="request")
        s = m.set_vcpu(s, v, vc._replace(requests=vc.requests & ~K.REQ_MEMORY_FAULT,
                                         design=-1))
        return m.exit_to_userspace(s, v, Exit(EXIT_REQUEST, gpa, t, 0), gpa)


DESIGN = Request()
