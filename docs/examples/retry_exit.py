"""retry-exit: a design written outside faultline (docs/designs.md walks through it).

The idea: kvm_arch_async_page_ready() already re-runs the fault as a blocking prefetch.
When that gup fails too, the page is not coming back: make the vCPU exit to userspace
right there with KVM_EXIT_MEMORY_FAULT for the gfn, instead of dropping the error (as
upstream does) or remembering it for later (error-gfn, request). Page-ready is still
delivered, so the task that slept on the token retries after the VMM has acted.

    faultline check --design-file docs/examples/retry_exit.py
"""

from faultline import abi
from faultline.model.design import Design
from faultline.model.state import EXIT_REQUEST, ApfDone, Exit, State
from faultline.model.system import System


class RetryExit(Design):
    name = "retry-exit"
    summary = "a failed prefetch at page-ready exits to userspace at once, with the gfn"

    def kvm_arch_async_page_ready(self, m: System, s: State, v: int, work: ApfDone,
                                  failed: bool) -> State:
        if not failed:
            return s
        gpa = work.gfn << abi.PAGE_SHIFT
        # Not in the faulting context: the vCPU is completing async work, whatever task
        # it runs now (EXIT_REQUEST tells the VMM so: no SRAR to that task).
        t = m.current_task(s, v)
        m.emit("kvm_exit", vcpu=v, task=t, reason="KVM_EXIT_MEMORY_FAULT", gpa=hex(gpa),
               size=abi.PAGE_SIZE, source="request")
        return m.exit_to_userspace(s, v, Exit(EXIT_REQUEST, gpa, t, 0), gpa)


DESIGN = RetryExit()
