"""The command line end to end on real KVM: hello on one and two vCPUs, a guest that
triple-faults, one that panics, and `faultline info`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from faultline import abi
from faultline.outcome import check
from faultline.scenario import Scenario, from_dict, load, loads
from faultline.vmm import boot
from faultline.vmm.runner import run_kvm
from tests.conftest import ROOT, SCENARIOS


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faultline.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.kvm
def test_run_hello_json(tmp_path: Path) -> None:
    events = tmp_path / "ev.jsonl"
    p = _cli("run", str(SCENARIOS / "hello.toml"), "--backend", "kvm", "--json",
             "--events", str(events))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert list(out) == ["scenario", "backend", "profile", "design", "policy", "vm", "tasks",
                         "offlined", "exits", "faults", "events_path"]
    assert (out["backend"], out["design"], out["vm"]) == ("kvm", "host", "completed")
    assert out["profile"] == "faultline-vmm"  # the kvm backend is faultline's own VMM
    assert {t["fate"] for t in out["tasks"].values()} == {"exited"}
    assert {t["code"] for t in out["tasks"].values()} == {0}
    [fc] = [json.loads(line) for line in events.read_text().splitlines()
            if '"file_check"' in line]
    assert fc["writes"] >= 2 and fc["mismatches"] == []  # the DAX file holds what was written


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_hello_on_one_and_two_vcpus(vcpus: int, tmp_path: Path) -> None:
    raw = copy.deepcopy(load(SCENARIOS / "hello.toml").raw)
    raw["vm"]["vcpus"] = vcpus
    for t in raw["tasks"]:
        t["vcpu"] = min(t.get("vcpu", 0), vcpus - 1)
    sc = from_dict(raw, source=f"hello-{vcpus}")
    out = run_kvm(sc, "mce", events_path=tmp_path / "ev.jsonl")
    assert check(out, sc) == []
    assert out.vm == "completed" and all(t.code == 0 for t in out.tasks.values())


@pytest.mark.kvm
def test_triple_fault_is_reported_cleanly(tmp_path: Path) -> None:
    # ud2 with no IDT: #UD cannot be delivered, nor the #DF: KVM_EXIT_SHUTDOWN.
    sc = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="triple.toml")
    image = boot.KernelImage("ud2", abi.KERNEL_LOAD_GPA,
                             (boot.Segment(abi.KERNEL_LOAD_GPA, b"\x0f\x0b", 2),))
    events = tmp_path / "ev.jsonl"
    out = run_kvm(sc, "mce", events_path=events, image=image)
    # QEMU's kvm_cpu_exec() resets the guest on KVM_EXIT_SHUTDOWN: the model's word
    assert out.vm == "reset" and "triple fault" in out.reason
    assert out.tasks["t"].fate == "killed"
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["kind"] for e in evs]
    assert "vcpu_regs" in kinds and kinds[-1] == "outcome" and "vm_abort" not in kinds
    assert next(e for e in evs if e["kind"] == "vm_stop")["vm"] == "reset"


@pytest.mark.kvm
def test_guest_panic_ends_the_run_as_panic(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A boot info with a bad magic: the real guest reports PANIC_BAD_BOOT_INFO.
    def bad_boot_info(sc: Scenario, **kw: Any) -> bytes:
        info = bytearray(real(sc, **kw))
        info[0] ^= 0xFF
        return bytes(info)

    real = boot.build_boot_info
    monkeypatch.setattr(boot, "build_boot_info", bad_boot_info)
    sc = loads('[[tasks]]\nname = "t"\nprogram = ["exit 0"]\n', source="panic.toml")
    events = tmp_path / "ev.jsonl"
    out = run_kvm(sc, "mce", events_path=events)
    assert out.vm == "panic" and out.reason == "guest panic on vCPU 0: bad boot info"
    assert out.tasks["t"].fate == "killed"
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["kind"] for e in evs]
    assert "guest_panic" in kinds and "vm_abort" not in kinds
    assert next(e for e in evs if e["kind"] == "vm_stop")["vm"] == "panic"


@pytest.mark.kvm
def test_info_json() -> None:
    p = _cli("info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["kvm"] is True and info["api_version"] == 12
    assert info["caps"]["KVM_CAP_MCE"] > 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_an_unwritable_event_log_is_a_warning_not_a_lost_run() -> None:
    """The run completes and prints its outcome; one warning line says the log is short."""
    p = _cli("run", str(SCENARIOS / "hello.toml"), "--backend", "model", "--json",
             "--events", "/dev/full")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["vm"] == "completed"
    assert p.stderr.strip().splitlines() == [
        "faultline: warning: event log not fully written: /dev/full: No space left on device"]


@pytest.mark.kvm
def test_demo_runs_the_worked_example(tmp_path: Path) -> None:
    """`make demo`: dax-truncate under mce on real KVM, toucher killed, bystander unharmed."""
    events = tmp_path / "ev.jsonl"
    p = _cli("demo", "--events", str(events))
    assert p.returncode == 0, p.stderr
    assert "vm: completed" in p.stdout and "BUS_MCEERR_AR" in p.stdout
    assert json.loads(events.read_text().splitlines()[-1])["kind"] == "outcome"


def test_demo_on_the_model_where_kvm_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import faultline.backends
    from faultline import cli

    monkeypatch.setattr(faultline.backends, "resolve_backend", lambda backend: "model")
    events = tmp_path / "ev.jsonl"
    assert cli.main(["demo", "--events", str(events)]) == 0
    out = capsys.readouterr().out
    assert "design error-gfn" in out and "vm: completed" in out
    assert json.loads(events.read_text().splitlines()[-1])["kind"] == "model_end"
