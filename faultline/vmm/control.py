"""The control interface of a kvm run, for a monitor (e.g. a QMP server) driving it from
its own thread.

Get one with ``KvmRun.control`` (it exists from the KvmRun's construction on; the calls
that act on vCPUs take effect once the run has started). Every call is thread-safe and
may be made from any thread *other than a vCPU thread* (a vCPU thread must never wait
for the other vCPUs to stop: that is how two host events would deadlock); none of them
blocks for longer than stopping the vCPUs takes (bounded: see :meth:`pause`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from faultline.vmm.hostevents import PAUSE_TIMEOUT_S, HostEvents
from faultline.vmm.machine import Machine

RunState = Literal["setup", "running", "paused", "stopped"]


class RunControl:
    """Pause, resume, stop, fire a host event, follow the event log, query the state."""

    def __init__(self, m: Machine, events: HostEvents) -> None:
        self._m = m
        self._events = events
        self._started = False
        self._lock = threading.Lock()  # serialises pause / resume / fire_event

    def _vcpu_thread_check(self, what: str) -> None:
        me = threading.current_thread()
        if any(v.thread is me for v in self._m.vcpus):
            raise RuntimeError(f"RunControl.{what}() called from a vCPU thread")

    def state(self) -> RunState:
        """``setup`` (the VM is being built, no vCPU runs yet), ``running``, ``paused``
        (by :meth:`pause`, until :meth:`resume`) or ``stopped`` (the run is over or
        ending: :meth:`request_stop`, completion, an abort, the watchdog). Any thread."""
        m = self._m
        if m.stopping:
            return "stopped"
        if not self._started:
            return "setup"
        return "paused" if m.monitor_paused else "running"

    def pause(self) -> bool:
        """Stop every vCPU at the top of its exit loop (each is kicked out of KVM_RUN and
        parks) and return once all are stopped: True, or False if some vCPU did not stop
        within PAUSE_TIMEOUT_S (it will park at its next exit). Idempotent. While paused
        the watchdog does not count; host events due on a vCPU wait with it. Paused
        before the run starts, the vCPUs park before their first KVM_RUN. Emits
        ``vm_pause``. Any thread but a vCPU thread."""
        self._vcpu_thread_check("pause")
        m = self._m
        with self._lock:
            with m.cond:
                if m.stopping or m.monitor_paused:
                    return not m.stopping
                m.set_pause(monitor=True)
                m.log.emit("vm_pause", by="control")
            return m.pause_all(None, PAUSE_TIMEOUT_S)

    def resume(self) -> None:
        """Let the vCPUs run again after :meth:`pause` (no-op when not paused). Emits
        ``vm_resume``. Any thread but a vCPU thread."""
        self._vcpu_thread_check("resume")
        m = self._m
        with self._lock, m.cond:
            if not m.monitor_paused:
                return
            m.set_pause(monitor=False)
            now = time.monotonic()
            for v in m.vcpus:  # the pause does not count as lack of progress
                v.last_progress = now
            m.log.emit("vm_resume", by="control")

    def request_stop(self, reason: str, vm_state: str = "aborted") -> None:
        """End the run now: the outcome's vm becomes `vm_state` (``aborted`` by default,
        or ``hung``/``completed``) with `reason`, unless the run already ended (the first
        end wins). Every vCPU is kicked; the run's thread then finishes the outcome and
        the event log. Returns at once. Any thread."""
        self._m.stop(vm_state, reason)

    def fire_event(self, index: int) -> None:
        """Apply the scenario's host event number `index` (``[[events]]`` in file order)
        now, with every vCPU stopped, whatever its trigger; the policy reacts as it does
        to a triggered event. Returns when the event is done. IndexError for a bad index.
        Any thread but a vCPU thread."""
        self._vcpu_thread_check("fire_event")
        ev = self._m.sc.events[index]
        with self._lock:
            self._events.fire(ev, None)

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call `callback(event)` with every event the run's log records from now on (the
        same dicts the JSON lines hold), in order. It is called on the log's writer thread,
        never on a vCPU thread: it must return quickly and must not call back into this
        interface's blocking calls (queue the event and return). An exception in it is
        logged once and unsubscribes it. Returns the function that unsubscribes. Any
        thread."""
        return self._m.log.subscribe(callback)

    def _mark_started(self) -> None:
        self._started = True

