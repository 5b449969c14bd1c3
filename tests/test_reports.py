"""The report port on records written into a RAM buffer by hand: decoded into named
fields, applied to the outcome, panic codes in words, bad records counted."""

from __future__ import annotations

from typing import Any

from faultline import abi
from faultline.outcome import EventLog, Outcome, TaskOutcome
from faultline.scenario import loads
from faultline.vmm.machine import Machine, VcpuState
from faultline.vmm.reports import ReportPort


class _Vcpu:  # what stop() touches of a vCPU: the kick
    immediate_exit = False


SC = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="reports.toml")


def _port() -> tuple[ReportPort, Machine, VcpuState, list[Any]]:
    m = Machine(SC, EventLog(None), Outcome(SC.name, "kvm", "host", "mce"))
    m.outcome.tasks["t"] = TaskOutcome()
    m.ram_view = memoryview(bytearray(0x2000))
    v = VcpuState(0, _Vcpu())  # type: ignore[arg-type]
    m.vcpus.append(v)
    taken: list[Any] = []
    port = ReportPort(m, on_step=lambda *a: None, on_taken=lambda *a: taken.append(a))
    return port, m, v, taken


def _write(m: Machine, kind: int, task: int, *words: int, gpa: int = 0x1000) -> int:
    assert m.ram_view is not None
    a, b, c, d = (*words, 0, 0, 0, 0)[:4]
    abi.REPORT_STRUCT.pack_into(m.ram_view, gpa, kind, abi.REPORT_MAGIC, 0, task, a, b, c, d)
    return gpa


def test_a_panic_is_named_in_words() -> None:
    port, m, v, _ = _port()
    port.on_report(v, _write(m, abi.R_PANIC, abi.NO_TASK, abi.PANIC_NO_MEMORY, 1, 2, 3))
    assert m.stopping and m.outcome.vm == "panic"
    assert m.outcome.reason == "guest panic on vCPU 0: out of guest kernel memory"
    assert "vm_abort" not in [e["kind"] for e in m.log.events]  # the guest ended it
    [ev] = [e for e in m.log.events if e["kind"] == "guest_panic"]
    assert ev["what"] == "out of guest kernel memory" and ev["detail"] == ["0x1", "0x2", "0x3"]


def test_sigsegv_segv_accerr_is_its_own_fate() -> None:
    port, m, v, taken = _port()
    gpa = 0x1_0000_1008
    port.on_report(v, _write(m, abi.R_SIGNAL, 0, abi.SIGSEGV, abi.SEGV_ACCERR,
                             abi.window_vaddr(0, 1) + 8, gpa))
    t = m.outcome.tasks["t"]
    assert t.fate == "sigsegv" and t.signal is not None
    assert (t.signal.code, t.signal.vaddr) == ("SEGV_ACCERR", abi.window_vaddr(0, 1) + 8)
    assert taken == [(0, 0x1_0000_1000, 1)]  # the refusal reached its writer


def test_bad_records_are_reported_not_raised() -> None:
    port, m, v, _ = _port()
    port.on_report(v, 0x10_0000)  # outside RAM
    assert m.ram_view is not None
    abi.REPORT_STRUCT.pack_into(m.ram_view, 0x1000, abi.R_STEP, 0xBAD, 0, 0, 0, 0, 0, 0)
    port.on_report(v, 0x1000)  # bad magic
    port.on_report(v, _write(m, abi.R_EXIT, 7, 0))  # no task 7
    errors = [e["error"] for e in m.log.events if e["kind"] == "guest_bad_report"]
    assert len(errors) == 3 and "outside RAM" in errors[0] and "magic" in errors[1]
    assert "task 7" in errors[2] and not m.stopping
