"""Host events (truncate, extend, punch-hole, write on a backing file) with every other
vCPU stopped, as QEMU pauses all vCPUs for such work.

A trigger ``after T:N`` then means the same on SMP as in the model: nothing else runs
between T's step N, the host change and the VMM's reaction to it (the proactive
watcher's notification)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from faultline.memory import Region
from faultline.outcome import EventLog
from faultline.scenario import HostEvent, Scenario
from faultline.vmm.machine import Machine, VcpuState

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAUSE_TIMEOUT_S = 2.0  # a vCPU that does not leave KVM_RUN within this is stuck

WRITE_SNIPPET = ("import os,sys;fd=os.open(sys.argv[1],os.O_WRONLY);"
                  "os.pwrite(fd,int(sys.argv[3]).to_bytes(8,'little'),int(sys.argv[2]))")


def needs_real_poison(scenario: Scenario) -> str | None:
    """Why a scenario cannot run against this host's KVM (a real backend), or None: a
    'poison' event needs real hardware poison, and CONFIG_MEMORY_FAILURE is off here."""
    for ev in scenario.events:
        if ev.action == "poison":
            return (f"{scenario.source}: events[{ev.index}]: 'poison' needs real hardware "
                    "poison (CONFIG_MEMORY_FAILURE is off on this host); use --backend model")
    return None


def punch_hole(fd: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class HostEvents:
    """``after_change(v, region)``: called with the world still stopped after the file
    behind ``region`` changed (the policy's reaction, e.g. the watcher's look)."""

    def __init__(self, m: Machine, run_dir: Path,
                 after_change: Callable[[VcpuState | None, Region], None] | None) -> None:
        self.m = m
        self.run_dir = run_dir
        self.after_change = after_change

    def on_step(self, v: VcpuState, task: str, steps: int) -> None:
        """Task `task` on vCPU v finished step `steps`: fire the events triggered there."""
        for ev in self.m.sc.events:
            if ev.trigger.task == task and ev.trigger.step == steps:
                self.fire(ev, v)

    def fire(self, ev: HostEvent, v: VcpuState | None) -> None:
        """Apply host event `ev` with the world stopped. `v`: the vCPU whose step triggered
        it (its own thread, which keeps running the event); None from any other thread
        (every vCPU is stopped)."""
        with self.world_stopped(v):
            if not self.m.stopping:
                self._apply(ev, v)

    @contextlib.contextmanager
    def world_stopped(self, v: VcpuState | None) -> Iterator[None]:
        """Stop every vCPU but v (kick it out of KVM_RUN, park it) for the duration. A
        vCPU that does not stop within PAUSE_TIMEOUT_S stops the run as aborted, with the
        reason: the event never runs beside a vCPU that is still running."""
        m = self.m
        with m.cond:
            # Another host event may be running: wait for it (parked, as it expects).
            while m.host_pauses and not m.stopping:
                if v is not None:
                    v.parked = True
                    m.cond.notify_all()
                m.cond.wait(0.1)
            if v is not None:
                v.parked = False
            m.set_pause(host=1)
        try:
            if not m.pause_all(v, PAUSE_TIMEOUT_S):
                stuck = [o.index for o in m.vcpus if o is not v and not o.stopped()]
                reason = (f"host event: vCPU {', '.join(map(str, stuck))} did not stop within "
                          f"{PAUSE_TIMEOUT_S:g} s")
                m.log.emit("vmm_pause_timeout", vcpus=stuck, timeout_s=PAUSE_TIMEOUT_S)
                m.stop("aborted", reason)
            yield
        finally:
            with m.cond:
                m.set_pause(host=-1)

    def _apply(self, ev: HostEvent, v: VcpuState | None) -> None:
        m = self.m
        region = m.memory.region(ev.file)
        apply_host_event(ev, region.fd, str(self.run_dir / m.sc.file(ev.file).path), m.log,
                         v.index if v else None)
        if self.after_change is not None:
            self.after_change(v, region)


def apply_host_event(ev: HostEvent, fd: int, path: str, log: EventLog,
                     vcpu: int | None) -> None:
    """Change the backing file (open as `fd` at `path`) as `ev` says, by this process or
    (``by = "subprocess"``) by another one, and log it as ``host_event``. Shared by the
    kvm and qemu backends."""
    before = os.fstat(fd).st_size
    common: dict[str, Any] = dict(vcpu=vcpu, action=ev.action, file=ev.file, path=path,
                                  by=ev.by, trigger=str(ev.trigger), size_before=before)
    if ev.action == "extend" and ev.size is not None and ev.size <= before:
        log.emit("host_event", **common, size_after=before, skipped="already larger")
        return
    argv: list[str] | None = None
    if ev.action in ("truncate", "extend"):
        assert ev.size is not None
        argv = ["truncate", "-s", str(ev.size), path]
        if ev.by == "runner":
            os.truncate(path, ev.size)
    elif ev.action == "punch-hole":
        argv = ["fallocate", "-p", "-o", str(ev.offset), "-l", str(ev.length), path]
        if ev.by == "runner":
            punch_hole(fd, ev.offset, ev.length)
    elif ev.action == "write":
        argv = ["python3", "-c", WRITE_SNIPPET, path, str(ev.offset), str(ev.value)]
        if ev.by == "runner":
            os.pwrite(fd, ev.value.to_bytes(8, "little"), ev.offset)
    if ev.by == "subprocess" and argv is not None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    log.emit("host_event", **common, size_after=os.fstat(fd).st_size, offset=ev.offset,
             length=ev.length)
