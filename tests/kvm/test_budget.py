"""The run's budget (guest steps, wall time), the watchdog that measures lack of progress,
and an interrupted run whose timeline and event log end alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faultline.scenario import loads
from faultline.vmm.runner import Interrupted, KvmRun, run_kvm

ROOT = Path(__file__).resolve().parents[2]
FOREVER = """
name = "forever"
[[files]]
name = "dax0"
size = "8KiB"
[[tasks]]
name = "t"
program = ["label top", "read dax0[0]", "loop 100000000 top", "exit 0"]
"""
FOREVER_SMP = (FOREVER.replace('name = "t"', 'name = "t"\nvcpu = 0')
               + '[vm]\nvcpus = 2\n[[tasks]]\nname = "u"\nvcpu = 1\n'
                 'program = ["label top", "read dax0[1]", "loop 100000000 top"]\n')


@pytest.mark.kvm
def test_a_guest_making_progress_forever_ends_at_the_step_budget() -> None:
    out = run_kvm(loads(FOREVER, source="forever.toml"), "mce", max_steps=200)
    assert out.vm == "hung" and out.tasks["t"].fate == "hung"
    assert out.reason.startswith("budget: more than 200 guest steps (--max-steps)")


@pytest.mark.kvm
def test_a_guest_making_progress_forever_ends_at_the_time_budget() -> None:
    out = run_kvm(loads(FOREVER, source="forever.toml"), "mce", max_seconds=0.5)
    assert (out.vm, out.reason) == ("hung", "budget: still running after 0.5 s (--max-seconds)")


def test_the_watchdog_waits_for_the_guest_to_boot() -> None:
    """No report for longer than the watchdog: while the guest boots (vCPU 0 sets up every
    task, the others spin waiting) that is not lack of progress; once it is up, it is."""
    r = KvmRun(loads(FOREVER, source="forever.toml"), "mce", events_path=None,
               watchdog_s=1.0)
    try:
        r._t_start = now = time.monotonic()
        r.m.vcpus.append(_vcpu_state(now - 5))
        assert r._over_budget(now) is None  # booting
        r.reports.booted = True
        assert (r._over_budget(now) or "").startswith("watchdog: no vCPU made progress for 1 s")
        r.m.vcpus[0].waiting = True  # idle: nothing to make progress with
        assert r._over_budget(now) is None
    finally:
        r._teardown()


def _vcpu_state(last_progress: float):  # type: ignore[no-untyped-def]
    from faultline.vmm.machine import VcpuState

    return VcpuState(0, object(), last_progress=last_progress)  # type: ignore[arg-type]


@pytest.mark.kvm
def test_sigint_ends_the_run_with_timeline_and_log_alike(tmp_path: Path) -> None:
    scenario = tmp_path / "forever.toml"
    scenario.write_text(FOREVER_SMP)
    events = tmp_path / "ev.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "faultline.cli", "run", str(scenario),
                          "--backend", "kvm", "--policy", "proactive", "--events", str(events)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, COLUMNS="200"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if events.exists() and events.read_text().count('"task_step"') > 20:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["kind"] for e in evs]
    assert "vmm_error" not in kinds and "vmm_error" not in out
    assert kinds[-1] == "outcome" and kinds.index("vm_stop") == len(kinds) - 2
    assert evs[-2]["reason"] == "interrupted"


@pytest.mark.kvm
def test_sigint_while_the_vcpu_threads_start_is_raised_once_they_all_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held until every vCPU thread has started: raised inside Thread.start() it could leave
    a thread running that the teardown did not wait for (it logged after the outcome)."""
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("vcpu"):
            started.append(self)
            if self.name == "vcpu0":
                os.kill(os.getpid(), signal.SIGINT)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    events = tmp_path / "ev.jsonl"
    # SIGINT raises, as the CLI makes it: pytest run as a background job inherits SIG_IGN
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted):
            run_kvm(loads(FOREVER_SMP, source="forever.toml"), "mce", events_path=events)
    finally:
        signal.signal(signal.SIGINT, old)
    assert [t.name for t in started] == ["vcpu0", "vcpu1"]
    assert all(t.ident is not None and not t.is_alive() for t in started)
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["kind"] for e in evs][-2:] == ["vm_stop", "outcome"]
    assert evs[-2]["reason"] == "interrupted"
