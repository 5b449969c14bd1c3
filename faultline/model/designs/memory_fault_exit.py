"""memory-fault-exit: upstream plus KVM_EXIT_MEMORY_FAULT on the synchronous path
(kvm_handle_error_pfn() calls kvm_mmu_prepare_memory_fault_exit() before -EFAULT, as
KVM_CAP_MEMORY_FAULT_INFO does). The async path is unchanged, so a guest with PV async
PF still loops: the exit is never reached.
"""

from faultline.model.design import Design
from faultline.model.state import EXIT_MEMORY_FAULT, State
from faultline.model.system import System


class MemoryFaultExit(Design):
    name = "memory-fault-exit"
    summary = "the synchronous -EFAULT annotated with KVM_EXIT_MEMORY_FAULT (gpa, size)"

    def kvm_handle_error_pfn(self, m: System, s: State, v: int, t: int, gpa: int) -> int:
        return EXIT_MEMORY_FAULT


DESIGN = MemoryFaultExit()
