"""EventLog: events stamped in order, fields supplied later (emit_later), nothing lost."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from faultline.outcome import EventLog


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("to_file", [True, False], ids=["file", "memory"])
def test_emit_later_keeps_its_place_and_gets_its_fields(tmp_path: Path, to_file: bool) -> None:
    path = tmp_path / "ev.jsonl"
    calls: list[str] = []
    gate = threading.Event()

    def fill() -> dict[str, object]:
        gate.wait(5)  # the writer waits for it; later events are not written before it
        calls.append(threading.current_thread().name)
        return {"line": "resolved"}

    log = EventLog(path if to_file else None)
    log.emit("kvm_exit", vcpu=0)
    ev = log.emit_later("vmm_resolve", fill, vcpu=0)
    log.emit("vmm_queue_mce", vcpu=0)
    assert "line" not in ev  # stamped, not filled yet
    gate.set()
    log.flush()
    assert ev["line"] == "resolved" and len(calls) == 1
    # filled on the writer thread when there is a file, by flush() when there is none
    assert calls == ["eventlog" if to_file else threading.current_thread().name]
    log.close()
    assert len(calls) == 1  # close() does not fill twice
    assert [e["kind"] for e in log.events] == ["kvm_exit", "vmm_resolve", "vmm_queue_mce"]
    if to_file:
        written = _lines(path)
        assert [e["kind"] for e in written] == ["kvm_exit", "vmm_resolve", "vmm_queue_mce"]
        assert [e["seq"] for e in written] == [0, 1, 2] and written[1]["line"] == "resolved"


def test_a_failing_fill_is_logged_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"

    def fill() -> dict[str, object]:
        raise OSError("readlink: gone")

    with EventLog(path) as log:
        log.emit_later("vmm_resolve", fill, vcpu=1)
        log.emit("vm_stop")
    written = _lines(path)
    assert [e["kind"] for e in written] == ["vmm_resolve", "vm_stop"]
    assert written[0]["fill_error"] == "OSError: readlink: gone"


def test_close_fills_what_is_still_owed() -> None:
    log = EventLog(None)
    ev = log.emit_later("vmm_resolve", lambda: {"cause": "beyond-eof"})
    log.close()
    assert ev["cause"] == "beyond-eof"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_full_disk_stops_the_file_not_the_run() -> None:
    """A write error (here /dev/full: ENOSPC) stops the file, not the run: later events
    still get their fields, flush() and close() return, and the error is kept."""
    log = EventLog("/dev/full")
    log.emit("kvm_exit", vcpu=0)
    ev = log.emit_later("vmm_resolve", lambda: {"cause": "hole"}, vcpu=0)
    log.emit("vmm_queue_mce", vcpu=0)
    log.flush()
    assert ev["cause"] == "hole"
    assert log.write_error is not None and "No space left" in log.write_error
    log.close()
    assert [e["kind"] for e in log.events] == ["kvm_exit", "vmm_resolve", "vmm_queue_mce"]
