"""What the monitor needs from a run: the interface a backend implements for it.

Every method is called from the monitor's own thread (never from a vCPU thread), one at a
time. A method may block while the run obeys (``pause`` until the vCPUs are parked), and
raises :class:`ControlError` with one line when the run cannot do it now.
"""

from __future__ import annotations

from typing import Any, Protocol

# QEMU's RunState names (qapi/run-state.json) that a faultline run goes through.
PRELAUNCH, RUNNING, PAUSED, SHUTDOWN = "prelaunch", "running", "paused", "shutdown"


class ControlError(Exception):
    """The run refused a monitor request (becomes a GenericError reply)."""


class VmControl(Protocol):
    def run_state(self) -> str:
        """``prelaunch`` (set up, vCPUs not started: --qmp-wait), ``running``, ``paused``
        (by the monitor) or ``shutdown`` (the run has ended)."""
        ...

    def pause(self) -> None:
        """Stop every vCPU (parked in userspace, out of KVM_RUN) until :meth:`resume`."""
        ...

    def resume(self) -> None:
        """Start the vCPUs (from prelaunch) or let the parked ones go on."""
        ...

    def request_stop(self, reason: str) -> None:
        """End the run (the VM aborted with ``reason``); returns at once."""
        ...

    def host_events(self) -> list[dict[str, Any]]:
        """The scenario's host events: index, action, file, trigger."""
        ...

    def fire_host_event(self, index: int) -> dict[str, Any]:
        """Apply host event ``index`` now, with every vCPU stopped while it runs and the
        VMM reacts; returns what happened (the ``host_event`` log record's fields)."""
        ...
