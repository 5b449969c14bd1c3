"""apf-error-to-guest: Vivek Goyal's June 2020 proposal, the guest half: the page-ready
event carries an error flag (kvm_arch_async_page_present()); the guest's page-ready
handler sends SIGBUS (BUS_ADRERR) to the task that slept on the token. Userspace is never
told: there is no exit.
"""

from faultline.model.design import Design
from faultline.model.state import ApfDone, State
from faultline.model.system import System


class ApfErrorToGuest(Design):
    name = "apf-error-to-guest"
    summary = "page-ready carries the error: the guest SIGBUSes the waiting task"

    def kvm_arch_async_page_present(self, m: System, s: State, v: int, work: ApfDone,
                                    failed: bool) -> bool:
        return failed


DESIGN = ApfErrorToGuest()
