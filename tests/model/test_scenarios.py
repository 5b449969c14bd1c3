from pathlib import Path

import pytest

from faultline import scenario
from faultline.model import simulate
from faultline.outcome import check

ROOT = Path(__file__).resolve().parents[2]
DAX = scenario.load(ROOT / "scenarios" / "dax-truncate.toml")
KERNEL = scenario.load(ROOT / "scenarios" / "dax-truncate-kernel.toml")


@pytest.mark.parametrize("design", ["upstream", "memory-fault-exit"])
@pytest.mark.parametrize("policy", ["abort", "mce", "notify"])
def test_apf_loop_hangs_the_toucher(design, policy):
    o = simulate(DAX, design, policy)
    assert check(o, DAX) == []
    assert o.vm == "hung" and o.tasks["toucher"].fate == "hung"
    assert o.tasks["bystander"].fate == "exited" and o.tasks["bystander"].code == 0
    assert o.exits.get("memory_fault", 0) == 0
    kinds = [e["kind"] for e in o.events]
    cycle = next(e for e in o.events if e["kind"] == "livelock")["cycle"]
    assert any(n.startswith("async_pf_execute") for n in cycle)
    # not-present -> completed (failed) -> ready -> retry
    i = max(j for j, k in enumerate(kinds) if k == "kvm_async_pf_not_present")
    tail = [e for e in o.events[: i + 1]]
    seq = [e["kind"] for e in tail if e["kind"] in (
        "kvm_async_pf_not_present", "kvm_async_pf_completed", "kvm_async_pf_ready")]
    assert seq[-4:] == ["kvm_async_pf_not_present", "kvm_async_pf_completed",
                        "kvm_async_pf_ready", "kvm_async_pf_not_present"]
    failed = [e for e in o.events if e["kind"] == "kvm_async_pf_completed"][-1]
    assert failed["result"] == "-EFAULT"


def test_proactive_avoids_the_loop_even_upstream():
    # The proactive VMM offlines the truncated range before the access: no KVM change
    # needed. (The scenario's model block says "hung" for every policy: see the report.)
    o = simulate(DAX, "upstream", "proactive")
    assert o.vm == "completed" and o.tasks["toucher"].fate == "sigbus"
    assert o.exits["memory_fault"] == 0


@pytest.mark.parametrize("design", ["error-gfn", "request"])
@pytest.mark.parametrize("policy", ["mce", "abort", "notify", "proactive"])
def test_fixed_designs(design, policy):
    o = simulate(DAX, design, policy)
    assert check(o, DAX) == [], o.reason
    if policy == "mce":
        assert o.vm == "completed"
        assert o.tasks["toucher"].fate == "sigbus"
        assert o.tasks["toucher"].signal.code == "BUS_MCEERR_AR"
        assert o.exits["memory_fault"] == 1
        assert o.offlined == {DAX.page_gpa("dax0[2]")}
    if policy == "abort":
        assert o.vm == "aborted"


@pytest.mark.parametrize("design", ["upstream", "memory-fault-exit", "error-gfn", "request"])
@pytest.mark.parametrize("policy", ["abort", "mce", "notify", "proactive"])
def test_kernel_mode_access_is_synchronous(design, policy):
    # faultline's guest enters system calls with IF=0 (docs/linux-qemu.md, difference 1)
    o = simulate(KERNEL, design, policy, profile="faultline-vmm")
    assert check(o, KERNEL) == [], o.reason


def test_kernel_upstream_abort_is_qemu_today():
    o = simulate(KERNEL, "upstream", "abort", profile="faultline-vmm")
    assert o.vm == "aborted" and o.exits["memory_fault"] == 1
    assert [f.source for f in o.faults] == ["bare-efault"]
    assert "kvm run failed Bad address" in o.reason


def test_kernel_with_irqs_on_takes_the_artificial_halt_loop():
    o = simulate(KERNEL, "upstream", "abort", kernel_irqs_on=True)
    assert o.vm == "hung" and o.tasks["toucher"].fate == "hung"
    assert any(e["kind"] == "kvm_apf_halt" for e in o.events)


def _no_apf(sc):
    raw = dict(sc.raw)
    raw["vm"] = {**raw.get("vm", {}), "apf": False}
    raw.pop("expect", None)
    return scenario.from_dict(raw, source="no-apf")


def test_apf_off_memory_fault_exit_mce_like_the_real_backend():
    sc = _no_apf(DAX)
    o = simulate(sc, "memory-fault-exit", "mce", profile="faultline-vmm")
    assert o.vm == "completed"
    assert o.tasks["toucher"].fate == "sigbus"
    assert o.tasks["toucher"].signal.code == "BUS_MCEERR_AR"
    assert o.tasks["toucher"].signal.vaddr == DAX.task("toucher").maps[1].vaddr
    assert o.tasks["late"].fate == "sigbus"
    assert o.tasks["bystander"].fate == "exited"
    assert o.exits["memory_fault"] == 1
    assert [(f.cause, f.source, f.offset, f.file_size) for f in o.faults] == \
        [("beyond-eof", "memory-fault-exit", 0x2000, 0x2000)]


def test_apf_off_upstream_bare_efault_recovered_by_scan():
    o = simulate(_no_apf(DAX), "upstream", "mce", profile="faultline-vmm")
    assert o.vm == "completed" and o.tasks["toucher"].fate == "sigbus"
    assert [f.source for f in o.faults] == ["bare-efault"]


def test_hello_completes():
    sc = scenario.load(ROOT / "scenarios" / "hello.toml")
    o = simulate(sc, "memory-fault-exit", "mce")
    assert check(o, sc) == []


def test_event_log_written(tmp_path):
    p = tmp_path / "ev.jsonl"
    o = simulate(DAX, "request", "mce", events_path=p)
    lines = p.read_text().splitlines()
    assert len(lines) == len(o.events) and '"step"' in lines[0]
    assert o.to_json()["backend"] == "model" and o.to_json()["design"] == "request"


@pytest.mark.parametrize("seed", range(5))
def test_seeded_runs_of_fixed_designs_never_hang(seed):
    for design in ("error-gfn", "request"):
        o = simulate(DAX, design, "mce", seed=seed)
        assert o.vm == "completed", (design, seed, o.reason)
        assert not o.bad_values
