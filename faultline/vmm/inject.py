"""Events for the guest: machine checks (QEMU's SRAR/SRAO encoding) and the paravirtual
notification (ring records + an interrupt).

Any thread may *queue* an event for a vCPU (:meth:`Injector.queue_mce`,
:meth:`Injector.notify`); only the vCPU's own thread delivers it, right before it
re-enters KVM_RUN (:meth:`Injector.deliver`), since vCPU ioctls belong to that thread.
"""

from __future__ import annotations

import threading
from typing import Any

from faultline import abi
from faultline.kvm import uapi
from faultline.vmm import policy as pol
from faultline.vmm.machine import Machine, VcpuState

_OFF_REQ_IRQ_WINDOW = uapi.kvm_run.request_interrupt_window.offset
_OFF_READY_FOR_IRQ = uapi.kvm_run.ready_for_interrupt_injection.offset
_OFF_IF_FLAG = uapi.kvm_run.if_flag.offset


class Injector:
    def __init__(self, m: Machine) -> None:
        self.m = m

    def queue_mce(self, v: VcpuState, gpa: int, action_required: bool) -> None:
        """An #MC for vCPU v at its next entry (SRAR when it is in the faulting context)."""
        with self.m.lock:
            v.pending_mce.append((gpa, action_required))
            if action_required:
                v.ar_pages.add(gpa & ~(abi.PAGE_SIZE - 1))
        self.m.log.emit("vmm_queue_mce", vcpu=v.index, gpa=hex(gpa), ar=action_required)

    def notify(self, v: VcpuState, ranges: tuple[tuple[int, int, str], ...],
               ar_gpa: int | None) -> None:
        """Post ring records and queue the interrupt for vCPU v (v runs the handler).
        ``ar_gpa``: the access of v's that did not complete (the first record carries it);
        None for a notification nobody's access caused (the watcher's)."""
        m = self.m
        ram = m.ram_view
        assert ram is not None
        ring = abi.NOTIFY_RING_GPA
        with m.lock:
            head, tail, entries, _ = abi.NOTIFY_HEADER.unpack_from(ram, ring)
            entries = entries or abi.NOTIFY_ENTRIES
            for i, (first, npages, cause) in enumerate(ranges):
                if (head - tail) & 0xFFFF_FFFF >= entries:
                    m.log.emit("vmm_notify_ring_full", vcpu=v.index, first=hex(first))
                    break
                flags, ar = 0, 0
                if ar_gpa is not None and i == 0:
                    flags = abi.NOTIFY_F_AR | (v.index << abi.NOTIFY_AR_VCPU_SHIFT)
                    ar = ar_gpa
                    v.ar_pages.add(ar_gpa & ~(abi.PAGE_SIZE - 1))
                slot = ring + abi.NOTIFY_HEADER.size + (head % entries) * abi.NOTIFY_ENTRY.size
                abi.NOTIFY_ENTRY.pack_into(ram, slot, first, npages,
                                           pol.CAUSE_CODES.get(cause, 0), flags, ar)
                head = (head + 1) & 0xFFFF_FFFF
                if cause != "read-only":  # a refused store names a page that stays good
                    m.notified.add(first, npages)
                m.log.emit("vmm_notify", vcpu=v.index, first=hex(first), npages=npages,
                           cause=cause, ar_gpa=hex(ar) if flags else None)
            abi.NOTIFY_HEADER.pack_into(ram, ring, head, tail, entries, 0)
            if ar_gpa is not None:
                mbox = abi.REPORT_BUF_GPA + v.index * abi.REPORT_BUF_STRIDE + abi.AR_MAILBOX_OFFSET
                ram[mbox:mbox + 8] = ar_gpa.to_bytes(8, "little")
            v.pending_irq = True
            m.cond.notify_all()
        if v.thread is not threading.current_thread():
            m.kick(v)

    def deliver(self, v: VcpuState, kvm_run: Any) -> None:
        """Deliver what is queued for vCPU v. Called by v's own thread before KVM_RUN."""
        vcpu = v.vcpu
        log = self.m.log
        if v.pending_mce:
            # MCG_STATUS.MCIP is set only by an #MC we injected, so the first one needs no
            # MSR read; after that, check it (a guest still in its handler would be shut down).
            mcg = vcpu.get_msrs([uapi.MSR_IA32_MCG_STATUS]).get(uapi.MSR_IA32_MCG_STATUS, 0) \
                if v.mce_injected else 0
            if mcg & uapi.MCG_STATUS_MCIP:
                # A second #MC while MCIP is set shuts the VM down: wait for the guest to
                # finish its handler (it clears MCIP).
                log.emit("vmm_mce_deferred", vcpu=v.index, mcg_status=hex(mcg))
            else:
                gpa, ar = v.pending_mce.pop(0)
                status, misc, mcg_status = pol.MCE_FIELDS[ar]  # = pol.mce_encoding, no call
                mce = uapi.kvm_x86_mce(status=status, addr=gpa, misc=misc,
                                       mcg_status=mcg_status, bank=pol.MCE_BANK)
                vcpu.set_mce(mce)
                v.mce_injected = True
                log.emit("vmm_inject_mce", vcpu=v.index, gpa=hex(gpa),
                         mce="SRAR" if ar else "SRAO", status=hex(status),
                         mcg_status=hex(mcg_status), bank=pol.MCE_BANK)
        if v.pending_irq:
            if kvm_run[_OFF_READY_FOR_IRQ] and kvm_run[_OFF_IF_FLAG]:
                vcpu.interrupt(abi.NOTIFY_VECTOR)
                v.pending_irq = False
                kvm_run[_OFF_REQ_IRQ_WINDOW] = 0
                log.emit("vmm_inject_irq", vcpu=v.index, vector=abi.NOTIFY_VECTOR)
            else:
                kvm_run[_OFF_REQ_IRQ_WINDOW] = 1  # exit when the guest can take it
