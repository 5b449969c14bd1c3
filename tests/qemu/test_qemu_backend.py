"""The qemu backend: our guest under the system's QEMU, its outcomes next to faultline's, and
every way a QEMU run can fail (each leaves an event log, no QEMU process, no temp files)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from faultline import conform
from faultline.outcome import EventLog, Outcome, check
from faultline.qemu.run import QemuRun, run_qemu
from faultline.scenario import VM_STATES, load
from faultline.vmm.runner import BackendError, run_kvm

ROOT = Path(__file__).resolve().parent.parent.parent
SCENARIOS = ROOT / "scenarios"
qemu = [pytest.mark.kvm, pytest.mark.qemu]


def _gone(run: QemuRun) -> None:
    """No QEMU process and no run directory outlive a run."""
    assert run.run_dir is not None and not run.run_dir.exists()
    assert run.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(run.pid, 0)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.kvm
@pytest.mark.qemu
def test_hello_completes_and_agrees_with_kvm(tmp_path: Path) -> None:
    sc = load(SCENARIOS / "hello.toml")
    with EventLog(tmp_path / "q.jsonl") as log:
        run = QemuRun(sc, log=log)
        out = run.run()
    _gone(run)
    assert out.backend == "qemu" and out.policy == "qemu" and out.vm == "completed"
    assert all(t.fate == "exited" and t.code == 0 for t in out.tasks.values())
    assert out.qemu is not None and out.qemu["version"][0].isdigit()
    assert check(out, sc) == []  # hello's [[expect]], files_match_writes included
    fc = next(e for e in _events(tmp_path / "q.jsonl") if e["kind"] == "file_check")
    assert fc["writes"] > 0 and fc["mismatches"] == []
    kvm = run_kvm(sc, sc.policies[0])
    assert conform.diff(conform.view(kvm), conform.view(out)) == []


@pytest.mark.kvm
@pytest.mark.qemu
def test_dax_truncate_loses_the_vm() -> None:
    """Today's stack on this host: the user-mode read of the truncated page never returns
    (KVM retries the fault in its async page-fault path: page faults taken, no exit to QEMU)
    and no task is told. The class asserted: the VM is lost, nobody gets a signal."""
    sc = load(SCENARIOS / "dax-truncate.toml")
    out = run_qemu(sc, watchdog_s=2)
    assert out.vm in ("hung", "crashed"), out.reason
    assert out.tasks["toucher"].fate in ("hung", "lost")
    assert not any(t.signal for t in out.tasks.values())
    assert check(out, sc) == []  # the scenario's [[expect]] for backend qemu
    if out.vm == "hung":
        assert out.qemu is not None
        stats = out.qemu["kvm_stats_per_s"][0]
        assert stats["pf_taken"] > 0 and stats["mmio_exits"] + stats["io_exits"] == 0


@pytest.mark.kvm
@pytest.mark.qemu
def test_kernel_mode_read_of_truncated_page_kills_qemu(tmp_path: Path) -> None:
    """The same truncation read by the guest kernel (interrupts off: no async page fault):
    QEMU's own access to the page raises SIGBUS and the process dies with every task."""
    res = _cli(["run", str(SCENARIOS / "dax-truncate-kernel.toml"), "--backend", "qemu",
                "--json"], tmp_path)
    assert res.returncode == 0, res.stderr  # the scenario's [[expect]] for backend qemu
    assert res.stderr == ""  # the monitor's EOF is an outcome, not a traceback
    out = json.loads(res.stdout)
    assert out["vm"] == "crashed"
    assert out["qemu"]["signal"] == "SIGBUS" and out["qemu"]["exit_status"] == -signal.SIGBUS
    assert {t["fate"] for t in out["tasks"].values()} == {"lost"}


@pytest.mark.kvm
@pytest.mark.qemu
def test_compare_prints_qemu_next_to_each_policy(tmp_path: Path) -> None:
    res = _cli(["compare", str(SCENARIOS / "hello.toml"), "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [(r["vmm"], r["policy"]) for r in doc["rows"]] == [("qemu", "qemu"),
                                                             ("faultline", "mce")]
    assert {r["outcome"]["vm"] for r in doc["rows"]} == {"completed"}
    table = _cli(["compare", str(SCENARIOS / "hello.toml")], tmp_path)
    assert "qemu" in table.stdout and "faultline" in table.stdout and "exit 0" in table.stdout


# --- failure: one line each, the log written, nothing left behind ---------------------------

def _cli(argv: list[str], tmp_path: Path, env: dict[str, str] | None = None,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "FAULTLINE_RUNS": str(tmp_path / "runs"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "faultline.cli", *argv], capture_output=True,
                          text=True, env=e, timeout=120, **kw)


def _one_error_line(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("faultline: error: ")
    assert all(w in lines[0] for w in words), lines[0]


def test_qemu_missing(tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    res = _cli(["run", str(SCENARIOS / "hello.toml"), "--backend", "qemu", "--events",
                str(events)], tmp_path, env={"FAULTLINE_QEMU": "/nonexistent/qemu-system"})
    _one_error_line(res, "QEMU not found", "FAULTLINE_QEMU")
    kinds = [e["kind"] for e in _events(events)]
    assert "error" in kinds and "vm_create" not in kinds  # no run directory was made


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.parametrize(("env", "words"), [
    ({"FAULTLINE_QEMU_CPU": "no-such-cpu"}, ("QEMU failed to start", "no-such-cpu")),
    ({"FAULTLINE_QEMU_ARGS": "-no-such-option"}, ("QEMU failed to start",
                                                  "-no-such-option")),
])
def test_qemu_fails_to_start(tmp_path: Path, env: dict[str, str],
                             words: tuple[str, ...]) -> None:
    events = tmp_path / "ev.jsonl"
    res = _cli(["run", str(SCENARIOS / "hello.toml"), "--backend", "qemu", "--events",
                str(events)], tmp_path, env=env)
    _one_error_line(res, *words)
    evs = _events(events)
    assert any(e["kind"] == "error" for e in evs)
    pid = next(e["pid"] for e in evs if e["kind"] == "qemu_start")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(next(e["run_dir"] for e in evs if e["kind"] == "vm_create"))


def _spinning_kernel(path: Path) -> Path:
    """A multiboot image that boots and never reports: `jmp .` at its entry."""
    load = 0x100000
    flags = 0x00010000  # address fields
    magic = 0x1BADB002
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, load, load, 0,
                         0, load + 32)
    path.write_bytes(header + b"\xeb\xfe")
    return path


@pytest.mark.kvm
@pytest.mark.qemu
def test_guest_that_never_reports_is_hung(tmp_path: Path) -> None:
    sc = load(SCENARIOS / "hello.toml")
    with EventLog(tmp_path / "q.jsonl") as log:
        run = QemuRun(sc, log=log, watchdog_s=1, boot_allowance_s=1,
                      kernel=_spinning_kernel(tmp_path / "spin.bin"))
        out = run.run()
    _gone(run)
    assert out.vm == "hung" and "watchdog" in out.reason
    assert {t.fate for t in out.tasks.values()} == {"hung"}
    kinds = [e["kind"] for e in _events(tmp_path / "q.jsonl")]
    assert "vm_hung" in kinds and kinds[-1] == "outcome"


class _FakeQmp:
    """QMP events as QEMU sends them, and query-status's answer for a STOP."""

    def __init__(self, events: list[dict[str, Any]], status: str = "running") -> None:
        self._events = events
        self._status = status

    @property
    def events(self) -> Any:
        async def gen() -> Any:
            for ev in self._events:
                yield ev
        return gen()

    async def execute(self, cmd: str) -> dict[str, Any]:
        assert cmd == "query-status"
        return {"status": self._status}


@pytest.mark.parametrize(("event", "status", "vm"), [
    ({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"}}, "", "reset"),
    ({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-panic"}}, "", "panic"),
    ({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-error"}}, "", "aborted"),
    ({"event": "GUEST_PANICKED", "data": {"action": "pause"}}, "", "panic"),
    ({"event": "STOP"}, "guest-panicked", "panic"),
    ({"event": "STOP"}, "internal-error", "aborted"),
])
def test_qemu_ending_the_vm_by_itself_names_how(event: dict[str, Any], status: str,
                                                vm: str) -> None:
    """QEMU's own end of a run, in the model's words (no QEMU needed: its QMP events)."""
    import asyncio

    run = QemuRun(load(SCENARIOS / "hello.toml"), log=EventLog(None))
    asyncio.run(run._qmp_events(_FakeQmp([event], status)))
    assert run.outcome.vm == vm and run.outcome.reason


class _KillOnBoot(EventLog):
    """Kills QEMU while the guest waits for its first report to be acknowledged."""

    run: QemuRun | None = None

    def emit(self, kind: str, **kw: Any) -> dict[str, Any]:
        ev = super().emit(kind, **kw)
        if kind == "guest_boot" and self.run is not None and self.run.pid is not None:
            os.kill(self.run.pid, signal.SIGKILL)
        return ev


@pytest.mark.kvm
@pytest.mark.qemu
def test_qemu_dying_mid_run_is_crashed(tmp_path: Path) -> None:
    sc = load(SCENARIOS / "hello.toml")
    with _KillOnBoot(tmp_path / "q.jsonl") as log:
        run = QemuRun(sc, log=log)
        log.run = run
        out = run.run()
    _gone(run)
    assert out.vm == "crashed" and "SIGKILL" in out.reason
    assert out.qemu is not None and out.qemu["signal"] == "SIGKILL"
    assert {t.fate for t in out.tasks.values()} == {"lost"}
    assert any(e["kind"] == "qemu_crash" for e in _events(tmp_path / "q.jsonl"))


@pytest.mark.kvm
@pytest.mark.qemu
def test_sigint_leaves_nothing_behind(tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    e = {**os.environ, "FAULTLINE_RUNS": str(tmp_path / "runs")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "faultline.cli", "run", str(SCENARIOS / "dax-truncate.toml"),
         "--backend", "qemu", "--watchdog", "60", "--events", str(events)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        deadline = time.monotonic() + 60
        # after the truncation the guest is stuck in KVM: interrupt it there
        while time.monotonic() < deadline and (
                not events.exists() or '"host_event"' not in events.read_text()):
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "faultline: error: " \
        "interrupted"
    evs = _events(events)
    pid = next(ev["pid"] for ev in evs if ev["kind"] == "qemu_start")
    run_dir = next(ev["run_dir"] for ev in evs if ev["kind"] == "vm_create")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(run_dir)
    assert evs[-1]["kind"] == "outcome" and evs[-1]["outcome"]["vm"] == "aborted"


def test_bad_layout_is_one_line() -> None:
    """A window below 4 GiB cannot be a pc-dimm: refused before QEMU starts."""
    import dataclasses

    sc = load(SCENARIOS / "hello.toml")
    low = dataclasses.replace(sc, files=(dataclasses.replace(sc.files[0],
                                                             window_gpa=0x8000_0000),))
    with pytest.raises(BackendError, match="below 4 GiB"):
        run_qemu(low)


# --- the corpus (slow: every scenario boots QEMU) -------------------------------------------

@pytest.mark.slow
@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.parametrize("path", [p for p in conform.corpus(SCENARIOS)
                                  if not p.name.startswith("check-")], ids=lambda p: p.stem)
def test_corpus_runs_on_qemu(path: Path) -> None:
    """Every scenario runs on QEMU without a faultline error; where nothing goes wrong on the
    kvm backend (no fault, nothing offlined, no signal), QEMU agrees with it field by field."""
    sc = load(path)
    out = run_qemu(sc, watchdog_s=3)
    assert out.vm in VM_STATES
    assert set(out.tasks) == {t.name for t in sc.tasks}
    kvm = run_kvm(sc, sc.policies[0])
    if no_fault(kvm):
        assert conform.diff(conform.view(kvm), conform.view(out)) == []


def no_fault(o: Outcome) -> bool:
    return not o.faults and not o.offlined and not any(t.signal for t in o.tasks.values())
