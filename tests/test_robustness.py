"""Robustness: hostile guests, hangs, bad input, interruption, leaks, and only what was
declared being reachable."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultline import abi
from faultline.outcome import check
from faultline.scenario import loads
from faultline.vmm import boot
from faultline.vmm.runner import BackendError, KvmRun, run_kvm

from .conftest import ROOT

FUZZ_EXAMPLES = int(os.environ.get("FAULTLINE_FUZZ_EXAMPLES", "12"))
HANG = """
name = "hang"
[[files]]
name = "code0"
size = "8KiB"
pattern = "zero"
[[tasks]]
name = "spinner"
program = ["write code0[1] 0xfeebfeebfeebfeeb", "exec code0[1]", "exit 0"]   # eb fe: jmp .
[[tasks]]
name = "other"
vcpu = 1
program = ["write anon[0] 1", "read anon[0] expect=1", "exit 0"]
[vm]
vcpus = 2
"""


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faultline.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


# --- hangs ------------------------------------------------------------------------------

@pytest.mark.kvm
def test_watchdog_ends_a_guest_spinning_in_kvm_run(tmp_path: Path) -> None:
    sc = loads(HANG, source="hang.toml")
    events = tmp_path / "ev.jsonl"
    out = run_kvm(sc, "mce", events_path=events, watchdog_s=1.0)
    assert out.vm == "hung" and "watchdog" in out.reason
    assert out.tasks["spinner"].fate == "hung"
    assert out.tasks["other"].fate == "exited"  # the other vCPU finished its task
    evs = _events(events)
    regs = [e for e in evs if e["kind"] == "vcpu_regs"]
    assert {e["vcpu"] for e in regs} >= {0} and all("rip" in e for e in regs)
    assert evs[-1]["kind"] == "outcome" and evs[-1]["outcome"]["vm"] == "hung"


@pytest.mark.kvm
@pytest.mark.parametrize("signo", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_keeps_outcome_and_log(tmp_path: Path, signo: int) -> None:
    path = tmp_path / "hang.toml"
    path.write_text(HANG)
    events = tmp_path / "ev.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "faultline.cli", "run", str(path), "--backend",
                          "kvm", "--json", "--events", str(events)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the guest is running its tasks
        if events.exists() and "task_start" in events.read_text():
            break
        time.sleep(0.05)
    p.send_signal(signo)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    outcome = json.loads(stdout)
    assert outcome["vm"] == "aborted"
    evs = _events(events)
    assert any(e["kind"] == "vm_abort" and e["reason"] == "interrupted" for e in evs)
    assert evs[-1]["kind"] == "outcome" and evs[-1]["outcome"]["vm"] == "aborted"


# --- bad input: one line, exit 2, no log (more in test_hardening.py) ---------------------

BASE = """
[[files]]
name = "dax0"
size = "16KiB"
[[tasks]]
name = "a"
program = ["read dax0[1] expect=@", "exit 0"]
"""
BAD_INPUT: list[tuple[str, str, list[str], str]] = [
    ("malformed TOML", "[[tasks]\n", [], "malformed TOML"),
    ("unknown key", BASE + "colour = 1\n", [], "colour: unknown key"),
    ("size overflows", BASE.replace('"16KiB"', '"99999999TiB"'), [], "files[0].size: size"),
    ("windows overlap", BASE + '[[files]]\nname = "b"\nwindow_gpa = 0x100002000\n', [],
     "overlaps file 'dax0'"),
    ("gpa beyond the physical address width",
     BASE.replace('"16KiB"', '"16KiB"\nwindow_gpa = 0xffff_0000_0000'), [],
     "beyond the guest's 46-bit physical address space"),
    ("path outside the run directory", BASE.replace('"16KiB"', '"16KiB"\npath = "/etc/x"'),
     [], "must be a relative path inside the run directory"),
    ("jump out of bounds", BASE.replace('"exit 0"]', '"loop 2 9", "exit 0"]'), [],
     "jump target 9 is outside the program (3 instructions)"),
    ("unknown design", BASE, ["--backend", "model", "--design", "magic"],
     "unknown design 'magic'"),
    ("unknown policy", BASE, ["--policy", "pray"], "unknown policy 'pray'"),
    ("unknown backend", BASE, ["--backend", "bochs"], "unknown backend 'bochs'"),
    ("poison on real KVM", BASE + '[[events]]\naction = "poison"\nfile = "dax0"\n',
     ["--backend", "kvm"], "'poison' needs real hardware poison"),
    ("not a scenario file", "\x00\x01binary", [], "malformed TOML"),
]


@pytest.mark.parametrize(("text", "extra", "message"),
                         [(t, e, m) for _, t, e, m in BAD_INPUT],
                         ids=[n for n, *_ in BAD_INPUT])
def test_bad_input_one_line_exit_2_and_no_log(tmp_path: Path, text: str, extra: list[str],
                                           message: str) -> None:
    if "kvm" in extra and not Path("/dev/kvm").exists():
        pytest.skip("/dev/kvm absent")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    events = tmp_path / "ev.jsonl"
    p = _cli("run", str(path), "--events", str(events), *(extra or ["--backend", "model"]))
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not events.exists()  # refused (even once the kvm run had begun): no log


@pytest.mark.kvm
def test_file_reached_through_a_symlink_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "dax0").symlink_to("/etc/hostname")
    sc = loads(BASE, source="s.toml")
    with pytest.raises(BackendError, match="leaves the run directory"):
        run_kvm(sc, "mce", events_path=tmp_path / "ev.jsonl", run_dir=run_dir)
    assert Path("/etc/hostname").exists()


# --- hostile guests --------------------------------------------------------------------------

_insn = st.builds(abi.INSN.pack, st.integers(0, 12), st.integers(0, 70), st.integers(0, 3),
                  st.one_of(st.integers(0, 4200), st.integers(0, 2**32 - 1)),
                  st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)))


@pytest.mark.kvm
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(progs=st.lists(st.lists(_insn, min_size=1, max_size=12), min_size=2, max_size=2))
def test_random_bytecode_never_breaks_the_vmm(tmp_path: Path, progs: list[list[bytes]]) -> None:
    sc = loads(BASE + '[[tasks]]\nname = "b"\nprogram = ["read dax0[2]", "exit 0"]\n',
               source="fuzz.toml")
    events = tmp_path / f"ev-{random.random()}.jsonl"
    out = run_kvm(sc, "mce", events_path=events, watchdog_s=1.0,
                  programs={i: b"".join(p) for i, p in enumerate(progs)})
    assert out.vm in ("completed", "aborted", "hung")
    assert out.vm != "aborted" or out.reason
    assert _events(events)[-1]["kind"] == "outcome"


@pytest.mark.kvm
@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.binary(min_size=1, max_size=256))
def test_random_guest_code_never_breaks_the_vmm(tmp_path: Path, code: bytes) -> None:
    """The guest 'kernel' is random bytes: whatever it does to ports, MSRs, memory or its
    own exception state, the VMM ends with an outcome and a log."""
    sc = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="random.toml")
    image = boot.KernelImage("random", abi.KERNEL_LOAD_GPA,
                             (boot.Segment(abi.KERNEL_LOAD_GPA, code, len(code)),))
    events = tmp_path / f"ev-{random.random()}.jsonl"
    # max_seconds: the backstop should random code keep "booting" (BOOT_PROGRESS_PORT outs)
    out = run_kvm(sc, "mce", events_path=events, watchdog_s=0.5, max_seconds=30, image=image)
    # random code may triple-fault (reset) or write a panic report (panic)
    assert out.vm in ("completed", "aborted", "hung", "reset", "panic")
    assert out.vm == "completed" or out.reason
    assert _events(events)[-1]["kind"] == "outcome"


@pytest.mark.kvm
def test_a_guest_that_never_boots_is_hung_after_the_watchdog(tmp_path: Path) -> None:
    """Before R_BOOT the watchdog watches vCPU 0's boot progress (BOOT_PROGRESS_PORT):
    a kernel spinning in place (jmp .) is hung after watchdog_s, not after --max-seconds."""
    sc = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="spin.toml")
    image = boot.KernelImage("spin", abi.KERNEL_LOAD_GPA,
                             (boot.Segment(abi.KERNEL_LOAD_GPA, b"\xeb\xfe", 2),))
    events = tmp_path / "ev.jsonl"
    out = run_kvm(sc, "mce", events_path=events, watchdog_s=0.5, max_seconds=60, image=image)
    assert out.vm == "hung" and "did not boot" in out.reason  # the watchdog, not the budget
    assert _events(events)[-1]["kind"] == "outcome"


@pytest.mark.kvm
def test_garbage_on_the_report_port_is_reported_not_raised(tmp_path: Path) -> None:
    # mov $0xdeadbeef, %eax; out %eax, $0xf0 (x3); mov $0x1000, %eax; out %eax, $0xf0; hlt
    code = (bytes.fromhex("b8efbeadde") + bytes.fromhex("e7f0") * 3
            + bytes.fromhex("b800100000e7f0") + b"\xf4")
    sc = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="garbage.toml")
    image = boot.KernelImage("garbage", abi.KERNEL_LOAD_GPA,
                             (boot.Segment(abi.KERNEL_LOAD_GPA, code, len(code)),))
    events = tmp_path / "ev.jsonl"
    out = run_kvm(sc, "mce", events_path=events, watchdog_s=1.0, image=image)
    bad = [e for e in _events(events) if e["kind"] == "guest_bad_report"]
    assert len(bad) == 4
    assert "outside RAM" in bad[0]["error"] and "magic" in bad[3]["error"]
    assert out.vm == "hung"  # halted with its task never run


# --- only what was declared is reachable -------------------------------------------------------

@pytest.mark.kvm
def test_read_only_window_refuses_stores_and_reports_them(tmp_path: Path) -> None:
    sc = loads("""
policies = ["mce"]
[[files]]
name = "ro0"
size = "8KiB"
access = "ro"
[[tasks]]
name = "writer"
program = ["read ro0[0] expect=@", "write ro0[1] 0x42", "exit 0"]
[[expect]]
vm = "completed"
exits = { memory_fault = 1 }
offlined = []
[expect.tasks]
writer = { fate = "sigsegv", signal = "SEGV_ACCERR", vaddr = "ro0[1]" }
[[expect.faults]]
page = "ro0[1]"
cause = "read-only"
""", source="ro.toml")
    events = tmp_path / "ev.jsonl"
    run_dir = Path("/dev/shm") / f"faultline-ro-{os.getpid()}"
    try:
        out = run_kvm(sc, "mce", events_path=events, run_dir=run_dir, keep=True)
        assert check(out, sc) == []
        # the store never reached the file
        data = (run_dir / "ro0").read_bytes()
        assert int.from_bytes(data[0x1000:0x1008], "little") == abi.pattern_value(0, 0x1000)
    finally:
        for p in run_dir.glob("*"):
            p.unlink()
        run_dir.rmdir()
    slots = [e for e in _events(events) if e["kind"] == "memslot"]
    assert [(e["gpa"], e["readonly"]) for e in slots] == [("0x0", False),
                                                         ("0x100000000", True)]


# --- nothing leaked ------------------------------------------------------------------------------

def _resources() -> tuple[int, list[str], int]:
    """fds, the mappings a VMM can leak, threads. Guest RAM is a shared mapping (rw-s), a
    window has a path, kvm_run is anon_inode:kvm-vcpu: all are listed. Private anonymous
    mappings are the allocator's (CPython grows by 1 MiB arenas, [heap] moves) and are
    not ours to hold constant; tracemalloc shows no object growth across runs. Collected
    first: an earlier test's unreachable objects (an asyncio loop's fds after the QEMU
    tests) would otherwise be freed mid-measurement and count as a difference."""
    gc.collect()
    mine = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        perms, inode = parts[1], parts[4]
        path = parts[5] if len(parts) > 5 else ""
        if perms.endswith("p") and inode == "0" and path in ("", "[heap]"):
            continue
        mine.append(f"{perms} {path}")
    return len(os.listdir("/proc/self/fd")), sorted(mine), threading.active_count()


@pytest.mark.kvm
def test_200_runs_leak_nothing(tmp_path: Path) -> None:
    sc = loads("""
[[files]]
name = "dax0"
size = "8KiB"
[[tasks]]
name = "t"
program = ["read dax0[1] expect=@", "exit 0"]
[[events]]
action = "truncate"
file = "dax0"
size = "4KiB"
after = "start"
""", source="leak.toml")
    run_kvm(sc, "mce", events_path=None)  # warm up: imports, the guest build, caches
    before = _resources()
    run_dirs = []
    for i in range(200):
        r = KvmRun(sc, "notify" if i % 2 else "mce", events_path=None)
        out = r.run()
        run_dirs.append(r.run_dir)
        assert out.vm == "completed" and out.tasks["t"].fate == "sigbus"
    assert _resources() == before
    assert not [d for d in run_dirs if d.exists()]  # run directories removed (no --keep)


@pytest.mark.kvm
def test_keep_leaves_the_run_directory(tmp_path: Path) -> None:
    sc = loads(BASE, source="keep.toml")
    r = KvmRun(sc, "mce", events_path=None, keep=True)
    r.run()
    try:
        assert (r.run_dir / "dax0").exists()
    finally:
        for p in r.run_dir.glob("*"):
            p.unlink()
        r.run_dir.rmdir()
