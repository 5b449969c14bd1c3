"""faultline's event log, told as QMP events (QEMU's names and members where QEMU has the
event: qapi/run-state.json).

- ``MEMORY_FAILURE`` (QEMU since 5.2) per injection into the guest: ``recipient`` guest,
  ``action`` inject (a machine check or a notification-ring record), ``flags``
  ``action-required`` (true for an SRAR or a notification naming the faulting access,
  false for an SRAO or a proactive notification) and ``recursive`` (always false: the
  VMM defers an MCE while the guest is still in its handler instead of nesting it).
  ``action`` fatal when the policy stopped the VM instead (QEMU's answer today).
- ``FAULTLINE_FAULT`` per resolved fault: the resolution record (gpa, hva, path, offset,
  file-size, cause, source) and the decision taken (mce-srar, mce-srao, notify, abort,
  ignore, refuse-write: a store to a read-only window, which is no memory failure,
  in-flight: the page was already being dealt with; null if the run ended before one).
- ``FAULTLINE_HOST_EVENT`` per scenario host event applied (by its trigger or by
  ``faultline-fire-event``): action, file, trigger, size-before, size-after.
- ``SHUTDOWN`` when the run ends (``guest`` / ``reason`` as QEMU's ShutdownCause), then
  ``FAULTLINE_OUTCOME`` with the run's outcome (the object ``faultline run --json``
  prints).

``STOP`` and ``RESUME`` come from the monitor's own ``stop`` / ``cont`` (server.py), as
in QEMU, where the command that changes the run state sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The event-log kinds the monitor listens to (the rest is never queued).
KINDS = frozenset({"vmm_resolve", "vmm_queue_mce", "vmm_inject_mce", "vmm_notify",
                   "vmm_ignore", "vmm_in_flight", "vm_abort", "host_event", "vm_stop",
                   "outcome"})

QmpEvent = tuple[str, dict[str, Any]]


def filled(ev: Mapping[str, Any]) -> bool:
    """Whether an event's fields are all there: ``vmm_resolve`` is stamped on the fault
    path and filled in later by the event log (EventLog.emit_later)."""
    return ev.get("kind") != "vmm_resolve" or "cause" in ev or "fill_error" in ev


def _int(v: Any) -> int | None:
    """Addresses are hex strings in the log, integers in QMP (QAPI's uint64)."""
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            return None
    return v if isinstance(v, int) else None


def memory_failure(action: str, action_required: bool) -> dict[str, Any]:
    return {"recipient": "guest", "action": action,
            "flags": {"action-required": action_required, "recursive": False}}


def shutdown_cause(vm: str, reason: str) -> tuple[bool, str]:
    """(guest, ShutdownCause) for how a run ended."""
    if vm == "completed":
        return True, "guest-shutdown"  # every task ran to its end: the guest is done
    if vm == "panic" or reason.startswith("guest panic"):
        return True, "guest-panic"
    if vm == "reset":  # a triple fault: QEMU's kvm_cpu_exec() on KVM_EXIT_SHUTDOWN
        return True, "guest-reset"
    if reason == "interrupted":
        return False, "host-signal"
    return False, "host-error"


class Translator:
    """Event-log events in order -> QMP events. A fault's FAULTLINE_FAULT waits for its
    decision (the next decision event on the same vCPU, or the VM's abort)."""

    def __init__(self) -> None:
        self._resolved: dict[Any, list[dict[str, Any]]] = {}  # vcpu -> records waiting
        self.quit_requested = False  # set by the monitor's `quit`: reason host-qmp-quit

    def _fault(self, rec: Mapping[str, Any], decision: str | None) -> QmpEvent:
        return "FAULTLINE_FAULT", {
            "vcpu": rec.get("vcpu"), "gpa": _int(rec.get("gpa")), "hva": _int(rec.get("hva")),
            "path": rec.get("path"), "offset": rec.get("offset"),
            "file-size": rec.get("file_size"), "cause": rec.get("cause"),
            "source": rec.get("source"), "decision": decision}

    def _decide(self, vcpu: Any, decision: str | None) -> list[QmpEvent]:
        if vcpu is None:  # an abort names no vCPU: it ends every fault in flight
            recs = [r for rs in self._resolved.values() for r in rs]
            self._resolved.clear()
        else:
            recs = self._resolved.pop(vcpu, [])
        return [self._fault(r, decision) for r in recs]

    def translate(self, ev: Mapping[str, Any]) -> list[QmpEvent]:
        kind = ev.get("kind")
        if kind == "vmm_resolve":
            self._resolved.setdefault(ev.get("vcpu"), []).append(dict(ev))
            return []
        out: list[QmpEvent] = []
        vcpu = ev.get("vcpu")
        if kind == "vmm_queue_mce":
            out += self._decide(vcpu, "mce-srar" if ev.get("ar") else "mce-srao")
        elif kind == "vmm_inject_mce":
            out.append(("MEMORY_FAILURE", memory_failure("inject", ev.get("mce") == "SRAR")))
        elif kind == "vmm_notify" and ev.get("cause") == "read-only":
            # a store refused by a read-only memslot: the writer gets SIGSEGV, nothing
            # failed (no MEMORY_FAILURE)
            out += self._decide(vcpu, "refuse-write")
        elif kind == "vmm_notify":
            out += self._decide(vcpu, "notify")
            out.append(("MEMORY_FAILURE",
                        memory_failure("inject", ev.get("ar_gpa") is not None)))
        elif kind == "vmm_ignore":
            out += self._decide(vcpu, "ignore")
            out.append(("MEMORY_FAILURE", memory_failure("ignore", False)))
        elif kind == "vmm_in_flight":
            out += self._decide(vcpu, "in-flight")
        elif kind == "host_event":
            out.append(("FAULTLINE_HOST_EVENT", {
                "action": ev.get("action"), "file": ev.get("file"),
                "trigger": ev.get("trigger"), "size-before": ev.get("size_before"),
                "size-after": ev.get("size_after")}))
        elif kind == "vm_abort":
            faults = self._decide(None, "abort")
            out += faults
            # the policy stopped the VM on a fault: QEMU's "fatal" (an AR access failed)
            out += [("MEMORY_FAILURE", memory_failure("fatal", True)) for _ in faults]
        elif kind == "vm_stop":
            out += self._decide(None, None)
            guest, reason = shutdown_cause(str(ev.get("vm")), str(ev.get("reason") or ""))
            if self.quit_requested:
                guest, reason = False, "host-qmp-quit"
            out.append(("SHUTDOWN", {"guest": guest, "reason": reason}))
        elif kind == "outcome":
            outcome = ev.get("outcome")
            out.append(("FAULTLINE_OUTCOME", dict(outcome) if isinstance(outcome, Mapping)
                        else {}))
        return out
