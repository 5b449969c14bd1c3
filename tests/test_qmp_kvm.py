"""The QMP monitor on real runs (`faultline run --qmp`), driven by QEMU's own client
(qemu.qmp's QMPClient) and by misbehaving raw clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.conftest import ROOT, SCENARIOS
from tests.qmp.raw import Raw

DAX = SCENARIOS / "dax-truncate.toml"
SPIN = Path(__file__).resolve().parent / "qmp" / "spin.toml"
GPA = 0x1_0000_2000  # dax0[2]
# Events a monitor's own commands add to the log (stop/cont and --qmp-wait): the rest of
# the log must be what a run without a monitor writes.
MONITOR_KINDS = {"vm_pause", "vm_resume"}
# The console script, as a user runs it (`python -m faultline.cli` exits alike: see the
# end of faultline/cli.py and tests/test_hardening.py).
_SCRIPT = Path(sys.executable).with_name("faultline")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "faultline.cli"]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fq-", dir="/tmp"))  # short: sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _wait_for(cond: Any, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"faultline exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


class Run:
    """`faultline run SCENARIO --backend kvm --qmp SOCK` in a subprocess."""

    def __init__(self, d: Path, scenario: Path, *extra: str, name: str = "run") -> None:
        self.sock = d / f"{name}.sock"
        self.events = d / f"{name}.jsonl"
        argv = [*CLI, "run", str(scenario), "--backend",
                "kvm", "--policy", "mce", "--json", "--events", str(self.events),
                "--qmp", str(self.sock), *extra]
        self.proc = subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        _wait_for(self.sock.exists, "the QMP socket exists", self.proc)

    def finish(self) -> tuple[int, dict[str, Any], str]:
        out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, json.loads(out), err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _baseline(d: Path, scenario: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same scenario run without a monitor: its outcome and its event log."""
    events = d / "base.jsonl"
    p = subprocess.run([*CLI, "run", str(scenario),
                        "--backend", "kvm", "--policy", "mce", "--json", "--events",
                        str(events)], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), _log(events)


# What differs between two runs of one scenario: when, and where the files and mappings
# were (the run directory is a fresh temporary one).
_VARYING = frozenset({"seq", "t_us", "hva", "path", "run_dir", "line", "maps",
                      "events_path"})


def _comparable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _comparable(v) for k, v in x.items() if k not in _VARYING}
    if isinstance(x, list):
        return [_comparable(v) for v in x]
    return x


def _log(events: Path) -> list[dict[str, Any]]:
    """The event log as two runs of the scenario share it, less the monitor's events."""
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    return [_comparable(e) for e in evs if e["kind"] not in MONITOR_KINDS]


async def _connect(path: Path) -> QMPClient:
    qmp = QMPClient("faultline-test")
    await qmp.connect(str(path))
    return qmp


async def _hang_up(qmp: QMPClient) -> None:
    """Disconnect; after the run's end the server may have hung up first (as QEMU does
    when it exits), which qemu.qmp reports as EOFError."""
    with contextlib.suppress(EOFError):
        await qmp.disconnect()


async def _events_until(qmp: QMPClient, last: str) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            ev = await qmp.events.get()
            out.append({"event": ev["event"], "data": ev.get("data")})
            if ev["event"] == last:
                return out
    return await asyncio.wait_for(collect(), 60)


def _named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["event"] == name]


def test_a_cont_sent_as_soon_as_the_monitor_serves_lets_the_vm_run(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--qmp-wait: a client may connect and send `cont` the moment the server serves.
    That `cont` must release the hold, not come before it (the vCPUs then parked for
    good: a run that never went on)."""
    from faultline.qmp.kvm import KvmMonitor
    from faultline.qmp.server import QmpServer
    from faultline.scenario import load
    from faultline.vmm.runner import KvmRun

    start = QmpServer.start

    def start_then_cont(self: QmpServer) -> None:
        start(self)
        assert self.control is not None
        self.control.resume()  # what `cont` does in prelaunch

    monkeypatch.setattr(QmpServer, "start", start_then_cont)
    sc = load(DAX)
    run = KvmRun(sc, "mce", events_path=None)
    monitor = KvmMonitor(sockdir / "m.sock", wait=True)
    try:
        monitor.attach(run.control, sc)
        assert not run.m.hold and not run.m.monitor_paused
    finally:
        monitor.close()
        run._teardown()


@pytest.mark.kvm
def test_dax_truncate_mce_seen_through_qemus_client(sockdir: Path) -> None:
    base_outcome, base_log = _baseline(sockdir, DAX)
    run = Run(sockdir, DAX, "--qmp-wait")
    try:
        async def session() -> tuple[list[Any], list[dict[str, Any]]]:
            qmp = await _connect(run.sock)
            answers = [await qmp.execute("query-version"),
                       await qmp.execute("query-status")]
            answers.append(await qmp.execute("cont"))
            events = await _events_until(qmp, "FAULTLINE_OUTCOME")
            await _hang_up(qmp)
            return answers, events

        answers, events = asyncio.run(session())
        rc, outcome, err = run.finish()
    finally:
        run.kill()
    assert rc == 0, err
    assert answers == [{"qemu": {"major": 0, "minor": 1, "micro": 0},
                        "package": "faultline 0.1.0"},
                       {"running": False, "status": "prelaunch"}, {}]
    names = [e["event"] for e in events]
    assert names == ["RESUME", "FAULTLINE_HOST_EVENT", "FAULTLINE_FAULT", "MEMORY_FAILURE",
                     "SHUTDOWN", "FAULTLINE_OUTCOME"]
    [host] = _named(events, "FAULTLINE_HOST_EVENT")
    assert host == {"action": "truncate", "file": "dax0", "trigger": "toucher:1",
                    "size-before": 0x4000, "size-after": 0x2000}
    [fault] = _named(events, "FAULTLINE_FAULT")
    assert {k: fault[k] for k in ("gpa", "offset", "file-size", "cause", "decision")} == {
        "gpa": GPA, "offset": 0x2000, "file-size": 0x2000, "cause": "beyond-eof",
        "decision": "mce-srar"}
    assert fault["path"].endswith("/dax0") and isinstance(fault["hva"], int)
    assert _named(events, "MEMORY_FAILURE") == [
        {"recipient": "guest", "action": "inject",
         "flags": {"action-required": True, "recursive": False}}]
    assert _named(events, "SHUTDOWN") == [{"guest": True, "reason": "guest-shutdown"}]
    assert _named(events, "FAULTLINE_OUTCOME") == [outcome]
    # the monitor changed nothing in the run
    assert _comparable(outcome) == _comparable(base_outcome)
    assert _log(run.events) == base_log
    assert not run.sock.exists()


def _steps(events: Path) -> int:
    return events.read_text().count('"kind": "task_step"')


@pytest.mark.kvm
def test_fire_stop_cont_quit_mid_run(sockdir: Path) -> None:
    # a watchdog shorter than the pause below: a stopped VM is not a hung one
    run = Run(sockdir, SPIN, "--qmp-wait", "--watchdog", "0.3")
    try:
        async def session() -> dict[str, Any]:
            qmp = await _connect(run.sock)
            got: dict[str, Any] = {}
            got["host_events"] = await qmp.execute("faultline-query-host-events")
            got["fire"] = await qmp.execute("faultline-fire-event", {"index": 0})
            got["cont"] = await qmp.execute("cont")
            # toucher's read of the page the truncation took away
            got["fault"] = await _events_until(qmp, "MEMORY_FAILURE")
            await qmp.execute("stop")
            got["stop_event"] = (await qmp.events.get())["event"]
            got["paused"] = await qmp.execute("query-status")
            # paused for real: the spinner makes no step while the VM is stopped
            await asyncio.sleep(0.1)  # the log's writer catches up with the last steps
            before = _steps(run.events)
            await asyncio.sleep(0.5)
            got["steps_while_paused"] = _steps(run.events) - before
            await qmp.execute("cont")
            got["resume_event"] = (await qmp.events.get())["event"]
            got["running"] = await qmp.execute("query-status")
            await asyncio.sleep(0.3)
            got["steps_after"] = _steps(run.events) - before
            got["quit"] = await qmp.execute("quit")
            got["end"] = await _events_until(qmp, "FAULTLINE_OUTCOME")
            await _hang_up(qmp)
            return got

        got = asyncio.run(session())
        rc, outcome, err = run.finish()
    finally:
        run.kill()
    assert got["host_events"] == [{"index": 0, "action": "truncate", "file": "dax0",
                                   "trigger": "spinner:4000000000"}]
    assert got["fire"] == {} and got["cont"] == {}
    # (events from the run's log may follow the reply of the command that caused them)
    assert sorted(e["event"] for e in got["fault"]) == [
        "FAULTLINE_FAULT", "FAULTLINE_HOST_EVENT", "MEMORY_FAILURE", "RESUME"]
    assert _named(got["fault"], "FAULTLINE_FAULT")[0]["decision"] == "mce-srar"
    assert got["stop_event"] == "STOP"
    assert got["paused"] == {"running": False, "status": "paused"}
    assert got["steps_while_paused"] == 0
    assert got["resume_event"] == "RESUME"
    assert got["running"] == {"running": True, "status": "running"}
    assert got["steps_after"] > 0
    assert got["quit"] == {}
    assert _named(got["end"], "SHUTDOWN") == [{"guest": False, "reason": "host-qmp-quit"}]
    assert rc == 0, err  # the scenario expects toucher's SIGBUS only
    assert outcome["vm"] == "aborted"
    assert outcome["tasks"]["toucher"]["signal"] == {"code": "BUS_MCEERR_AR",
                                                     "vaddr": "0x80002000"}
    assert not run.sock.exists()


@pytest.mark.kvm
def test_bad_clients_change_nothing(sockdir: Path) -> None:
    base_outcome, base_log = _baseline(sockdir, DAX)
    run = Run(sockdir, DAX, "--qmp-wait")
    try:
        malformed = Raw(run.sock, greeted=True)
        assert malformed.cmd(b'{"execute": "qmp_capabilities"}}') == {"return": {}}
        assert malformed.recv() == {"error": {"class": "GenericError",
                                              "desc": "JSON parse error, expecting value"}}
        malformed.sock.sendall(b'{"execute": "stop"')  # unfinished, then gone
        malformed.close()
        big = Raw(run.sock, greeted=True)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            big.sock.sendall(b'{"execute": "' + b"x" * (2 << 20) + b'"}')  # cut off
        assert big.recv() == {"error": {"class": "GenericError",
                                        "desc": "JSON token size limit exceeded"}}
        assert big.file.readline() == b""  # hung up on
        big.close()
        half = Raw(run.sock, greeted=True)
        half.sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "qu')
        half.close()  # gone mid-command
        deaf = Raw(run.sock, greeted=True)
        assert deaf.cmd(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        # ... and never reads again

        async def two_clients() -> tuple[list[Any], list[Any]]:
            a, b = await _connect(run.sock), await _connect(run.sock)
            assert await b.execute("query-status") == {"running": False,
                                                       "status": "prelaunch"}
            await a.execute("cont")
            ea, eb = await asyncio.gather(_events_until(a, "FAULTLINE_OUTCOME"),
                                          _events_until(b, "FAULTLINE_OUTCOME"))
            await _hang_up(a)
            await _hang_up(b)
            return ea, eb

        ea, eb = asyncio.run(two_clients())
        rc, outcome, err = run.finish()
        deaf.close()
    finally:
        run.kill()
    assert rc == 0, err
    assert ea == eb and "MEMORY_FAILURE" in [e["event"] for e in ea]
    assert _comparable(outcome) == _comparable(base_outcome)
    assert _log(run.events) == base_log
    assert not run.sock.exists()


@pytest.mark.kvm
def test_sigint_ends_the_run_and_removes_the_socket(sockdir: Path) -> None:
    run = Run(sockdir, SPIN, "--qmp-wait")
    try:
        assert stat.S_IMODE(os.lstat(run.sock).st_mode) == 0o600

        async def session() -> list[dict[str, Any]]:
            qmp = await _connect(run.sock)
            await qmp.execute("faultline-fire-event", {"index": 0})  # returns once built
            await qmp.execute("cont")
            run.proc.send_signal(signal.SIGINT)
            events = await _events_until(qmp, "SHUTDOWN")
            await _hang_up(qmp)
            return events

        events = asyncio.run(session())
        _, err = run.proc.communicate(timeout=120)
    finally:
        run.kill()
    assert run.proc.returncode == 130, err
    assert err.endswith("faultline: error: interrupted\n")
    assert _named(events, "SHUTDOWN") == [{"guest": False, "reason": "host-signal"}]
    assert not run.sock.exists()
    # SIGINT while the VM waits for its first `cont`, nobody connected
    held = Run(sockdir, SPIN, "--qmp-wait", name="held")
    try:
        _wait_for(lambda: held.events.exists() and "vm_pause" in held.events.read_text(),
                  "the VM is held", held.proc)
        held.proc.send_signal(signal.SIGINT)
        _, err = held.proc.communicate(timeout=120)
    finally:
        held.kill()
    assert held.proc.returncode == 130, err
    assert err.endswith("faultline: error: interrupted\n")
    assert not held.sock.exists()


@pytest.mark.kvm
def test_quit_while_held(sockdir: Path) -> None:
    run = Run(sockdir, DAX, "--qmp-wait")
    try:
        async def session() -> tuple[Any, list[dict[str, Any]]]:
            qmp = await _connect(run.sock)
            answer = await qmp.execute("quit")
            events = await _events_until(qmp, "SHUTDOWN")
            await _hang_up(qmp)
            return answer, events

        answer, events = asyncio.run(session())
        rc, outcome, err = run.finish()
    finally:
        run.kill()
    assert answer == {}
    assert _named(events, "SHUTDOWN") == [{"guest": False, "reason": "host-qmp-quit"}]
    assert rc == 1, err  # the scenario's expectations were not met: nothing ran
    assert outcome["vm"] == "aborted"
    assert {t["fate"] for t in outcome["tasks"].values()} == {"killed"}
    assert "guest_boot" not in run.events.read_text()  # held: no vCPU ever entered the guest
    assert not run.sock.exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_qmp_usage_errors(sockdir: Path) -> None:
    for args, msg in [
        ((str(DAX), "--qmp-wait"), "--qmp-wait holds the VM for a QMP client: add --qmp PATH"),
        ((str(DAX), "--backend", "model", "--qmp", str(sockdir / "m.sock")),
         "--qmp serves the kvm backend's VMM: add --backend kvm"),
    ]:
        p = _cli(*args, "--events", str(sockdir / "e.jsonl"))
        assert (p.returncode, p.stderr) == (2, f"faultline: error: {msg}\n")
    regular = sockdir / "taken"
    regular.write_text("not a socket")
    p = _cli(str(DAX), "--backend", "kvm", "--qmp", str(regular), "--events",
             str(sockdir / "e.jsonl"))
    assert (p.returncode, p.stderr) == (
        2, f"faultline: error: --qmp {regular}: exists and is not a socket\n")
    assert regular.read_text() == "not a socket"
    assert not (sockdir / "m.sock").exists()
