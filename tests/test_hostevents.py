"""Host events stop the world first; a vCPU that will not stop ends the run, said so."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from faultline.outcome import EventLog, Outcome
from faultline.scenario import loads
from faultline.vmm import hostevents
from faultline.vmm.hostevents import HostEvents
from faultline.vmm.machine import Machine, VcpuState

SC = """
[[files]]
name = "dax0"
size = "8KiB"
[[tasks]]
name = "t"
program = ["read dax0[0]", "exit 0"]
[[events]]
action = "truncate"
file = "dax0"
size = "4KiB"
after = "t:1"
"""


class _Vcpu:
    immediate_exit = False


def test_a_vcpu_that_does_not_stop_aborts_the_run(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(hostevents, "PAUSE_TIMEOUT_S", 0.05)
    sc = loads(SC, source="pause.toml")
    log = EventLog(None)
    m = Machine(sc, log, Outcome(sc.name, "kvm", "host", "mce"))
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, daemon=True)  # a vCPU deaf to kicks
    v = VcpuState(0, _Vcpu(), thread=stuck)  # type: ignore[arg-type]
    m.vcpus.append(v)
    stuck.start()
    applied: list[Any] = []
    events = HostEvents(m, tmp_path, lambda v, r: applied.append(r))
    try:
        events.fire(sc.events[0], None)
    finally:
        release.set()
    assert m.stopping and m.outcome.vm == "aborted"
    assert "vCPU 0 did not stop within 0.05 s" in m.outcome.reason
    assert [e["kind"] for e in log.events] == ["vmm_pause_timeout", "vm_abort"]
    assert applied == [] and not m.hold  # never applied beside a running vCPU; pause lifted
