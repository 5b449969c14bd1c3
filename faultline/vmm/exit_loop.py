"""The vCPU exit loop: KVM_RUN, then dispatch the exit to whoever handles it. It owns
dispatch only (as rust-vmm VMMs do): the report port, the serial port, the fault path and
event injection are objects behind small interfaces that the loop calls.

One thread per vCPU runs :meth:`ExitLoop.thread` for its vCPU. Port I/O exits are the
hot path (``faultline bench exit-loop``): the loop keeps what it needs in locals.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from faultline import abi
from faultline.kvm import KvmError, exits, uapi
from faultline.vmm.fault_handler import FAULT_EXITS, FaultHandler
from faultline.vmm.inject import Injector
from faultline.vmm.machine import Machine, VcpuState

SERIAL_LINE_MAX = 200


class ExitLoop:
    def __init__(self, m: Machine, *, on_report: Callable[[VcpuState, int], None],
                 faults: FaultHandler, injector: Injector) -> None:
        self.m = m
        self.on_report = on_report
        self.faults = faults
        self.injector = injector

    def thread(self, v: VcpuState) -> None:
        """The body of vCPU v's thread: run it until the VM stops or the vCPU is done."""
        m = self.m
        try:
            self.loop(v)
        except Exception as e:  # a VMM bug must still end the run with an outcome
            if not m.stopping:  # at teardown, a vCPU torn down under a kick is no bug
                m.log.emit("vmm_error", vcpu=v.index, error=f"{type(e).__name__}: {e}")
                m.stop("aborted", f"VMM error on vCPU {v.index}: {type(e).__name__}: {e}")
        finally:
            if m.outcome.vm == "hung" or (m.stopping and m.outcome.reason
                                          and m.outcome.reason != "completed"):
                self._dump_regs(v)
            with m.lock:
                v.halted = True
                m.cond.notify_all()
            v.done.set()

    def loop(self, v: VcpuState) -> None:
        m = self.m
        vcpu = v.vcpu
        run = vcpu.run
        kvm_run = vcpu.kvm_run
        on_report = self.on_report
        deliver = self.injector.deliver
        faults = self.faults
        io_out, mmio_t, hlt_t = exits.IoOut, exits.Mmio, exits.Hlt
        fault_exits = FAULT_EXITS
        report_port, serial_port = abi.REPORT_PORT, abi.SERIAL_PORT
        boot_port = abi.BOOT_PROGRESS_PORT
        serial = bytearray()
        # Port I/O exits are counted in a local, added to the outcome when the loop ends:
        # a locked dict update per exit is ~1% of an exit's cost.
        n_io = 0
        try:
            while not m.stopping:
                if m.hold:
                    m.park(v)
                    continue
                if v.pending_mce or v.pending_irq:
                    deliver(v, kvm_run)
                ex = run()
                t = type(ex)
                if t is io_out:
                    n_io += 1
                    port = ex[0]
                    if port == report_port:
                        on_report(v, int.from_bytes(ex[4], "little"))
                    elif port == serial_port:
                        serial += ex[4]
                        if serial.endswith(b"\n") or len(serial) > SERIAL_LINE_MAX:
                            m.log.emit("serial", vcpu=v.index,
                                       text=serial.decode("ascii", "replace").rstrip("\n"))
                            serial.clear()
                    elif port == boot_port:
                        v.last_progress = time.monotonic()
                elif t is hlt_t:
                    if not self._on_hlt(v):
                        return
                elif t is mmio_t:
                    faults.on_mmio(v, ex)  # type: ignore[arg-type]  # narrowed by `t is`
                elif t in fault_exits:  # straight to the fault path (no dispatch frames)
                    if not faults.on_fault_exit(v, ex):
                        return
                elif not self._on_other(v, ex):
                    return
        finally:
            if n_io:
                m.count_exit("io", n_io)

    def _on_hlt(self, v: VcpuState) -> bool:
        """An idle vCPU parks here until the VM is done or something is queued for it."""
        m = self.m
        with m.lock:
            m.outcome.count_exit("hlt")
            if not v.idle:
                # hlt outside the idle loop (cli; hlt after a panic, or a hostile guest)
                m.log.emit("vcpu_halted", vcpu=v.index)
                v.waiting = True
                m.cond.notify_all()
                return False
            v.waiting = True
            m.cond.notify_all()
            while not m.stopping and not m.all_done() and not (v.pending_irq or v.pending_mce):
                m.cond.wait(0.5)
            v.waiting = False
            v.last_progress = time.monotonic()
            if m.stopping:
                return False
            return bool(v.pending_irq or v.pending_mce) or not m.all_done()

    def _on_other(self, v: VcpuState, ex: exits.Exit) -> bool:
        """The exits that are neither port output, hlt, MMIO nor a fault."""
        m = self.m
        if isinstance(ex, exits.Intr):
            m.count_exit("intr")
            v.vcpu.immediate_exit = False
            return not m.stopping
        if isinstance(ex, exits.IrqWindowOpen):
            m.count_exit("irq_window")
            return True
        if isinstance(ex, exits.IoIn):
            m.count_exit("io")
            v.vcpu.complete_io_in(ex, b"\xff" * (ex.size * ex.count))
            return True
        return self.faults.unhandled(v, ex)

    def _dump_regs(self, v: VcpuState) -> None:
        with contextlib.suppress(KvmError, ValueError, OSError):
            r = v.vcpu.get_regs()
            regs: dict[str, Any] = {f[0]: hex(getattr(r, f[0])) for f in uapi.kvm_regs._fields_}
            self.m.log.emit("vcpu_regs", vcpu=v.index, **regs)
