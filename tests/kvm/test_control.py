"""The run's control interface (faultline.vmm.control), driven from another thread as a
monitor drives it, on a real VM."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from faultline import abi
from faultline.scenario import loads
from faultline.vmm.runner import KvmRun

pytestmark = pytest.mark.kvm

LOOPING = """
name = "control"
[[files]]
name = "dax0"
size = "16KiB"
pattern = "offset"
[[tasks]]
name = "t"
program = ["label top", "yield", "loop {n} top", "read dax0[2]", "exit 0"]
[[events]]
action = "truncate"
file = "dax0"
size = "8KiB"
after = "t:{after}"
"""


def _scenario(n: int) -> Any:
    return loads(LOOPING.format(n=n, after=2 * n + 2), source="control.toml")


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


def _drive(r: KvmRun, body: Callable[[], None]) -> list[BaseException]:
    """Run `body` on a monitor thread while the main thread runs the VM."""
    errors: list[BaseException] = []

    def monitor() -> None:
        try:
            body()
        except BaseException as e:  # reported by the test, on the main thread
            errors.append(e)
            r.control.request_stop("monitor failed")

    t = threading.Thread(target=monitor, name="monitor")
    t.start()
    r.run()
    t.join()
    return errors


def test_pause_resume_fire_event_and_subscribe() -> None:
    r = KvmRun(_scenario(3000), "mce", events_path=None)
    seen: list[dict[str, Any]] = []
    r.control.subscribe(seen.append)
    assert r.control.state() == "setup"
    dax0 = r.run_dir / "dax0"

    def steps() -> int:
        return sum(1 for e in list(r.log.events) if e["kind"] == "task_step")

    def body() -> None:
        _wait(lambda: steps() > 10, "task steps")
        assert r.control.state() == "running"
        assert r.control.pause() is True
        assert r.control.state() == "paused"
        assert all(v.parked for v in r.vcpus)
        before = steps()
        time.sleep(0.2)  # paused: the guest must not report a single step meanwhile
        assert steps() == before
        r.control.resume()
        assert r.control.state() == "running"
        _wait(lambda: steps() > before, "steps after resume")
        r.control.fire_event(0)  # truncate now, while the task still loops
        assert os.stat(dax0).st_size == 0x2000

    assert _drive(r, body) == []
    assert r.control.state() == "stopped"
    out = r.outcome
    assert out.vm == "completed", out.reason
    sig = out.tasks["t"].signal
    assert out.tasks["t"].fate == "sigbus" and sig is not None
    assert sig.vaddr == abi.window_vaddr(0, 2)
    kinds = [e["kind"] for e in r.log.events]
    assert kinds.index("vm_pause") < kinds.index("vm_resume") < kinds.index("host_event")
    # the subscriber saw every event from its subscription on, in order, fields complete
    assert [e["seq"] for e in seen] == [e["seq"] for e in r.log.events]
    assert seen[-1]["kind"] == "outcome"
    [res] = [e for e in seen if e["kind"] == "vmm_resolve"]
    assert res["cause"] == "beyond-eof"


def test_request_stop_ends_the_run_with_the_reason() -> None:
    r = KvmRun(_scenario(1_000_000), "mce", events_path=None)

    def body() -> None:
        _wait(lambda: any(e["kind"] == "task_step" for e in list(r.log.events)), "a step")
        r.control.request_stop("stopped by the monitor")
        assert r.control.state() == "stopped"

    assert _drive(r, body) == []
    assert (r.outcome.vm, r.outcome.reason) == ("aborted", "stopped by the monitor")
    assert r.outcome.tasks["t"].fate == "killed"
    assert [e["kind"] for e in r.log.events][-2:] == ["vm_stop", "outcome"]


def test_control_calls_that_wait_refuse_a_vcpu_thread() -> None:
    r = KvmRun(_scenario(1), "mce", events_path=None)
    errors: list[BaseException] = []
    on_report = r.exit_loop.on_report

    def report(v: Any, gpa: int) -> None:
        if not errors:
            try:
                r.control.pause()
            except RuntimeError as e:
                errors.append(e)
        on_report(v, gpa)

    r._setup = _after(r._setup, lambda: setattr(r.exit_loop, "on_report", report))  # type: ignore[method-assign]
    r.run()
    assert errors and "vCPU thread" in str(errors[0])
    assert r.outcome.vm == "completed"


def _after(f: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def g() -> None:
        f()
        then()
    return g
