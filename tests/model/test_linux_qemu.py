"""The two profiles (docs/linux-qemu.md): per difference, a small scenario whose outcome
under linux-qemu is what the upstream code does, and under faultline-vmm what faultline's
own VMM and guest do (today's model)."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from faultline.check.properties import check_system
from faultline.model import System
from faultline.model.simulate import simulate
from faultline.scenario import from_dict, load

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
PROFILES = ("linux-qemu", "faultline-vmm")
# (Every scenario, lq* included, meets its [[expect]] blocks under both profiles:
# tests/model/test_corpus.py.)


def _sim(name: str, design: str, policy: str, profile: str, **kw: object):
    path = SCENARIOS / f"{name}.toml"
    if not path.exists():
        path = SCENARIOS / "model" / f"{name}.toml"
    return simulate(load(path), design, policy, profile=profile, **kw)


# --- 1 + 2: who goes async, and what an artificial halt stops ----------------------------

def test_no_pv_apf_loops_under_linux_qemu_and_exits_under_faultline_vmm() -> None:
    lq = _sim("lq1-nopv", "upstream", "mce", "linux-qemu")
    assert (lq.vm, lq.tasks["toucher"].fate, lq.exits["memory_fault"]) == ("hung", "hung", 0)
    kinds = {e["kind"] for e in lq.events}
    assert {"kvm_apf_halt", "guest_timer_reschedule"} <= kinds
    assert lq.tasks["bystander"].fate == "exited"  # the halt does not freeze the guest
    fv = _sim("lq1-nopv", "upstream", "mce", "faultline-vmm")
    assert (fv.vm, fv.tasks["toucher"].fate, fv.exits["memory_fault"]) == \
        ("completed", "sigbus", 1)
    assert "kvm_apf_halt" not in {e["kind"] for e in fv.events}


@pytest.mark.parametrize(("preempt", "bystander"), [("none", "hung"), ("voluntary", "hung"),
                                                    ("full", "exited")])
def test_kernel_mode_halt_blocks_its_vcpu_unless_fully_preemptible(preempt: str,
                                                                   bystander: str) -> None:
    out = _sim("lq2-halt-kernel", "upstream", "mce", "linux-qemu", preempt=preempt)
    assert out.vm == "hung" and out.tasks["toucher"].fate == "hung"
    assert out.tasks["bystander"].fate == bystander


def test_kread_goes_async_only_under_linux_qemu() -> None:
    sc = load(SCENARIOS / "dax-truncate-kernel.toml")
    assert simulate(sc, "upstream", "abort", profile="linux-qemu").vm == "hung"
    assert simulate(sc, "upstream", "abort", profile="faultline-vmm").vm == "aborted"


# --- 3: poison while the async PF is in flight ---------------------------------------------

def test_poison_during_async_pf_kills_whoever_runs() -> None:
    lq = _sim("lq3-poison-apf", "upstream", "mce", "linux-qemu")
    assert lq.tasks["bystander"].fate == "sigbus"  # never touched the page
    sigbus = [e for e in lq.events if e["kind"] == "kvm_exit"]
    assert [e["source"] for e in sigbus] == ["sigbus-hwpoison"]
    assert sigbus[0]["task"] == "bystander"
    fv = _sim("lq3-poison-apf", "upstream", "mce", "faultline-vmm")
    assert fv.tasks["bystander"].fate == "exited" and fv.tasks["toucher"].fate == "sigbus"


def test_poison_during_async_pf_in_the_idle_context_panics_the_guest() -> None:
    raw = copy.deepcopy(load(SCENARIOS / "model" / "lq3-poison-apf.toml").raw)
    # toucher alone on vCPU 0: when the SIGBUS comes, vCPU 0 runs nothing (idle).
    raw["tasks"] = [t for t in raw["tasks"] if t["name"] in ("toucher", "poisoner")]
    del raw["expect"]
    out = simulate(from_dict(raw), "upstream", "mce", profile="linux-qemu")
    assert out.vm == "panic" and "guest panic" in out.reason
    assert set(out.tasks) == {"toucher", "poisoner"}
    assert all(t.fate in ("killed", "exited") for t in out.tasks.values())


@pytest.mark.parametrize("profile", PROFILES)
def test_right_victim_fails_only_under_linux_qemu(profile: str) -> None:
    sc = load(SCENARIOS / "model" / "check-poison.toml")
    r = check_system(System(sc, "error-gfn", "mce", profile=profile))
    assert r.complete
    assert r.properties["right_victim"].holds is (profile == "faultline-vmm")


def test_poison_during_async_pf_with_toucher_unpinned_resets_the_guest() -> None:
    """Differences 3 + 7 + 9 together: lq3 pins toucher to vCPU 0. Unpinned, page-ready
    wakes it on the idle vCPU 1, where it faults synchronously on the poisoned page: a
    second SIGBUS exit, whose SRAR meets the MCIP that the broadcast of bystander's SRAR
    left on vCPU 1 (QEMU: "Previous MCE still in progress"): the guest is reset."""
    raw = copy.deepcopy(load(SCENARIOS / "model" / "lq3-poison-apf.toml").raw)
    for t in raw["tasks"]:
        t.pop("cpus", None)
    del raw["expect"]
    out = simulate(from_dict(raw), "upstream", "mce", profile="linux-qemu")
    assert out.vm == "reset" and "Previous MCE still in progress" in out.reason
    exits = [(e["vcpu"], e["task"]) for e in out.events if e["kind"] == "kvm_exit"]
    assert exits == [(0, "bystander"), (1, "toucher")]


# --- 7: tasks migrate ---------------------------------------------------------------------

def _apf_rounds(out: object) -> list[int]:
    return [e["vcpu"] for e in out.events  # type: ignore[attr-defined]
            if e["kind"] == "kvm_async_pf_not_present"]


def test_woken_task_retries_on_another_vcpu_only_under_linux_qemu() -> None:
    lq = _sim("lq7-migrate", "error-gfn", "mce", "linux-qemu")
    # vCPU 0's error-gfn table knows the page, vCPU 1's does not: one more round there.
    assert _apf_rounds(lq) == [0, 1]
    assert [e["vcpu"] for e in lq.events if e["kind"] == "kvm_add_error_gfn"] == [0, 1]
    woke = [e for e in lq.events if e["kind"] == "guest_apf_page_ready" and "wake_cpu" in e]
    assert [(e["vcpu"], e["task"], e["wake_cpu"]) for e in woke] == [(0, "toucher", 1)]
    assert lq.tasks["toucher"].fate == "sigbus" and lq.exits["memory_fault"] == 1
    fv = _sim("lq7-migrate", "error-gfn", "mce", "faultline-vmm")
    assert _apf_rounds(fv) == [0]
    assert fv.tasks["toucher"].fate == "sigbus" and fv.exits["memory_fault"] == 1


def test_pinned_task_stays_on_its_vcpu() -> None:
    raw = copy.deepcopy(load(SCENARIOS / "lq7-migrate.toml").raw)
    raw["tasks"][0]["cpus"] = [0]
    out = simulate(from_dict(raw), "error-gfn", "mce", profile="linux-qemu")
    assert _apf_rounds(out) == [0]


@pytest.mark.parametrize("profile", PROFILES)
def test_checker_finds_the_extra_round_only_under_linux_qemu(profile: str) -> None:
    """check-migrate: error-gfn's per-vCPU table costs a woken task that moved one more
    failed try (first_access_reported); the request design's exit repeats on the other
    vCPU (one_exit_per_bad_page). Pinned, or under faultline-vmm, both hold. The memo's
    footprint is asserted on every memoised edge (tasks now sit on several vCPUs' lists)."""
    sc = load(SCENARIOS / "check-migrate.toml")
    moves = profile == "linux-qemu"
    r = check_system(System(sc, "error-gfn", "notify", profile=profile), check_memo=True)
    assert r.complete and r.properties["first_access_reported"].holds is not moves
    r = check_system(System(sc, "request", "notify", profile=profile), check_memo=True)
    assert r.complete and r.properties["one_exit_per_bad_page"].holds is not moves
    raw = copy.deepcopy(sc.raw)
    for t in raw["tasks"]:
        t["cpus"] = [t["vcpu"]]
    r = check_system(System(from_dict(raw), "request", "notify", profile=profile))
    assert r.complete and r.properties["one_exit_per_bad_page"].holds


# --- 4: SRAO later ------------------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_deferred_srao_costs_a_second_exit_only_under_linux_qemu(profile: str) -> None:
    sc = load(SCENARIOS / "lq4-srao-later.toml")
    r = check_system(System(sc, "request", "mce", profile=profile))
    assert r.complete
    assert r.properties["one_exit_per_bad_page"].holds is (profile == "faultline-vmm")


def test_srao_is_offlined_by_the_guest_workqueue() -> None:
    out = _sim("lq4-srao-later", "request", "mce", "linux-qemu")
    mf = [e for e in out.events if e["kind"] == "guest_memory_failure"]
    assert [e.get("source") for e in mf] == ["workqueue"]
    assert any(e["kind"] == "guest_mce_log" for e in out.events)


# --- 5: read-only memslots ---------------------------------------------------------------

def test_read_only_store_is_refused_or_dropped_never_a_memory_failure() -> None:
    path = SCENARIOS / "ro-store-then-read.toml"
    fv = simulate(load(path), "memory-fault-exit", "mce", profile="faultline-vmm")
    sig = fv.tasks["writer"].signal
    assert fv.tasks["writer"].fate == "sigsegv" and sig is not None
    assert (sig.code, sig.vaddr) == ("SEGV_ACCERR", 0x8000_1000)
    assert [f.cause for f in fv.faults] == ["read-only"] and not fv.offlined
    lq = simulate(load(path), "memory-fault-exit", "mce", profile="linux-qemu")
    assert lq.tasks["writer"].fate == "exited" and lq.exits == {"memory_fault": 0, "mmio": 1}
    assert not lq.offlined and not lq.faults
    # the page stays readable for every task, with the file's bytes, on both
    for out in (fv, lq):
        assert out.tasks["reader"].fate == out.tasks["other"].fate == "exited"
        assert out.tasks["reader"].code == out.tasks["other"].code == 0


# --- 6: apf-error-to-guest as Vivek's series did it -----------------------------------------

def test_apf_error_is_si_kernel_without_address_under_linux_qemu() -> None:
    lq = _sim("lq6-apf-error", "apf-error-to-guest", "mce", "linux-qemu")
    sig = lq.tasks["toucher"].signal
    assert sig is not None and (sig.code, sig.vaddr) == ("SI_KERNEL", None)
    assert lq.tasks["reader"].code == 5  # not injectable at CPL 0: error_gfn, sync, -EIO
    assert any(e["kind"] == "kvm_apf_error_gfn_sync" for e in lq.events)
    fv = _sim("lq6-apf-error", "apf-error-to-guest", "mce", "faultline-vmm")
    sig = fv.tasks["toucher"].signal
    assert sig is not None and sig.code == "BUS_ADRERR" and sig.vaddr == 0x8000_2000


# --- 8: the SIGBUS address -------------------------------------------------------------------

def test_srar_kill_reports_the_page_under_linux_qemu() -> None:
    for profile, want in (("linux-qemu", 0x8000_2000), ("faultline-vmm", 0x8000_2010)):
        out = _sim("lq8-srar-address", "error-gfn", "mce", profile)
        sig, late = out.tasks["toucher"].signal, out.tasks["late"].signal
        assert sig is not None and sig.vaddr == want, profile
        assert late is not None and late.vaddr == 0x8000_2018, profile  # poisoned PTE


# --- 9: QEMU's machine-check broadcast --------------------------------------------------------

def test_second_srar_during_the_broadcast_resets_the_guest_only_under_linux_qemu() -> None:
    lq = _sim("lq9-mce-broadcast", "error-gfn", "mce", "linux-qemu")
    assert lq.vm == "reset" and "Previous MCE still in progress" in lq.reason
    bcast = [e for e in lq.events if e["kind"] == "vmm_inject_mce" and e["mce"] == "broadcast"]
    assert [e["vcpu"] for e in bcast] == [1] and bcast[0]["bank"] == 1
    assert lq.tasks["right"].fate == "killed"
    fv = _sim("lq9-mce-broadcast", "error-gfn", "mce", "faultline-vmm")
    assert fv.vm == "completed"
    assert {t.fate for t in fv.tasks.values()} == {"sigbus"}
    assert not any(e["kind"] == "vmm_inject_mce" and e["mce"] == "broadcast"
                   for e in fv.events)


def test_a_guest_with_lmce_gets_no_broadcast() -> None:
    # QEMU's `-cpu ...,lmce=on`: Linux enables LMCE, kvm_mce_inject() injects locally only.
    out = _sim("lq9-mce-broadcast", "error-gfn", "mce", "linux-qemu", mce_broadcast=False)
    assert out.vm == "completed"
    assert {t.fate for t in out.tasks.values()} == {"sigbus"}


def test_the_broadcast_record_is_harmless_on_its_own() -> None:
    # One SRAR: the other vCPU takes the bank-1 #MC (Linux: "Non signaled machine check",
    # KEEP) and runs on; nobody is killed for it.
    raw = copy.deepcopy(load(SCENARIOS / "model" / "lq9-mce-broadcast.toml").raw)
    raw["tasks"][1]["program"] = ["read dax0[1] expect=@", "exit 0"]
    del raw["expect"]
    out = simulate(from_dict(raw), "error-gfn", "mce", profile="linux-qemu")
    assert out.vm == "completed" and out.tasks["right"].fate == "exited"
    assert any(e["kind"] == "guest_mce" and e["mce"] == "broadcast" and e["vcpu"] == 1
               for e in out.events)


@pytest.mark.parametrize("profile", PROFILES)
def test_checker_finds_the_reset_only_under_linux_qemu(profile: str) -> None:
    sc = load(SCENARIOS / "model" / "lq9-mce-broadcast.toml")
    # check_memo: the broadcast makes the VMM's exit handling touch other vCPUs; the
    # declared memo footprint must say so.
    r = check_system(System(sc, "error-gfn", "mce", profile=profile), check_memo=True)
    assert r.complete
    assert r.properties["vm_survives"].holds is (profile == "faultline-vmm")


# --- 9: the guest CPU: AMD, SUCCOR, MCG_SER_P ------------------------------------------------

def _mce_events(out, kind: str) -> list[dict]:
    return [e for e in out.events if e["kind"] == kind]


def test_amd_guest_gets_no_broadcast_and_survives_where_intel_resets() -> None:
    amd = _sim("lq9-mce-amd", "error-gfn", "mce", "linux-qemu")  # [vm] cpu = "amd"
    assert amd.vm == "completed"
    assert {n: t.fate for n, t in amd.tasks.items()} == {"left": "sigbus", "right": "sigbus"}
    injected = _mce_events(amd, "vmm_inject_mce")
    assert [e["mce"] for e in injected] == ["SRAR", "SRAR"]  # no broadcast record
    # kvm_mce_inject() for AMD: UC|POISON, no S, no AR, no MCACOD; MCIP|RIPV|EIPV
    assert {(e["status"], e["mcg_status"]) for e in injected} == \
        {(hex(1 << 63 | 1 << 61 | 1 << 60 | 1 << 59 | 1 << 58 | 1 << 43), "0x7")}
    start = next(e for e in amd.events if e["kind"] == "model_start")
    assert start["guest_cpu"] == "cpu amd" and start["params"]["guest_cpu"] == "amd"
    # The same race on the Intel guest: QEMU's broadcast sets MCIP, the second SRAR resets.
    intel = _sim("lq9-mce-amd", "error-gfn", "mce", "linux-qemu", guest_cpu="intel")
    assert intel.vm == "reset" and "Previous MCE still in progress" in intel.reason
    assert "guest_cpu" not in next(e for e in intel.events if e["kind"] == "model_start")


def test_amd_without_succor_panics_on_an_srar() -> None:
    out = _sim("lq9-mce-amd", "error-gfn", "mce", "linux-qemu", amd_succor=False)
    assert out.vm == "panic" and "Uncorrected error without MCA Recovery" in out.reason
    assert [e["kind"] for e in out.events if e["kind"] in ("guest_panic", "guest_sigbus")] \
        == ["guest_panic"]  # mce_severity_amd(): panic before any kill
    # The poison race (difference 3) too: the prefetch's SRAR panics the guest.
    poison = _sim("lq3-poison-apf", "upstream", "mce", "linux-qemu", guest_cpu="amd",
                  amd_succor=False)
    assert poison.vm == "panic" and "without MCA Recovery" in poison.reason


def test_amd_deferred_error_is_handled_later_even_without_succor() -> None:
    # request exits outside the faulting context: the VMM injects SRAOs, which QEMU encodes
    # for AMD as deferred errors; mce_severity_amd() grades DEFERRED before it looks at
    # SUCCOR, and memory_failure() runs later (uc_decode_notifier()), whatever
    # srao_workqueue says (that is Intel's SRAO path).
    for succor in (True, False):
        out = _sim("lq9-mce-amd", "request", "mce", "linux-qemu", amd_succor=succor,
                   srao_workqueue=False)
        assert out.vm == "completed", out.reason
        srao = [e for e in _mce_events(out, "vmm_inject_mce") if e["mce"] == "SRAO"]
        assert srao and all(int(e["status"], 16) & (1 << 44 | 1 << 43) == 1 << 44 | 1 << 43
                            and not int(e["status"], 16) & (1 << 61) for e in srao)
        assert _mce_events(out, "guest_mce_log")
        assert any(e.get("source") == "workqueue"
                   for e in _mce_events(out, "guest_memory_failure"))


def test_without_mcg_ser_p_qemu_exits_on_an_srar_and_ignores_an_srao() -> None:
    out = _sim("lq9-mce-broadcast", "error-gfn", "mce", "linux-qemu", mcg_ser_p=False)
    # hardware_memory_error(): exit(1), the QEMU process is gone with the VM: the qemu
    # backend's words, crashed and lost.
    assert out.vm == "crashed" and "Hardware memory error" in out.reason
    assert {t.fate for n, t in out.tasks.items() if n != "left"} <= {"lost"}
    assert "lost" in {t.fate for t in out.tasks.values()}
    assert not _mce_events(out, "vmm_inject_mce")  # kvm_arch_on_sigbus_vcpu(): none
    # An action-optional one (request: outside the faulting context) is dropped.
    out = _sim("lq9-mce-broadcast", "request", "mce", "linux-qemu", mcg_ser_p=False)
    assert any(e["reason"] == "no MCG_SER_P" for e in _mce_events(out, "vmm_mce_ignored"))
    assert not _mce_events(out, "vmm_inject_mce")


@pytest.mark.parametrize(("cpu", "survives"), [({}, False), ({"guest_cpu": "amd"}, True),
                                               ({"guest_cpu": "amd", "amd_succor": False},
                                                False),
                                               ({"mcg_ser_p": False}, False)])
def test_checker_error_gfn_mce_survives_only_on_amd(cpu: dict, survives: bool) -> None:
    # check-standard's error-gfn x mce cell (docs/checker.md): Intel's broadcast resets the
    # guest on some schedule; AMD has no broadcast; without SUCCOR the guest panics,
    # without MCG_SER_P QEMU exits.
    sc = load(SCENARIOS / "check-standard.toml")
    r = check_system(System(sc, "error-gfn", "mce", symmetry=True, **cpu), check_memo=True)
    assert r.complete
    assert r.properties["vm_survives"].holds is survives
    assert r.properties["right_victim"].holds is (cpu.get("amd_succor", True))


def test_cpu_parameters_are_for_linux_qemu_only() -> None:
    sc = load(SCENARIOS / "model" / "lq9-mce-amd.toml")
    # faultline-vmm ignores the scenario's [vm] cpu and refuses the parameter.
    assert System(sc, "error-gfn", "mce", profile="faultline-vmm").params.guest_cpu == "intel"
    with pytest.raises(ValueError, match="linux-qemu"):
        System(sc, "error-gfn", "mce", profile="faultline-vmm", guest_cpu="amd")
    with pytest.raises(ValueError, match="guest_cpu must be one of"):
        System(sc, "error-gfn", "mce", guest_cpu="arm")


def test_cli_cpu_flags(tmp_path: Path) -> None:
    std = str(SCENARIOS / "check-standard.toml")
    p = _cli("check", std, "--design", "error-gfn", "--policy", "mce", "--cpu", "amd",
             "--workers", "1")
    assert p.returncode == 0, p.stderr
    assert "linux-qemu, cpu amd" in " ".join(p.stdout.split())  # the matrix title
    p = _cli("check", std, "--design", "error-gfn", "--policy", "mce", "--cpu", "amd",
             "--no-succor", "--json", "--workers", "1")
    cell = json.loads(p.stdout)["cells"][0]
    assert cell["cpu"] == "cpu amd without SUCCOR"
    assert cell["properties"]["vm_survives"]["holds"] is False
    p = _cli("run", str(SCENARIOS / "model" / "lq9-mce-broadcast.toml"), "--cpu", "amd",
             "--json", "--events", str(tmp_path / "ev.jsonl"))  # auto: the model
    assert p.returncode == 1 and json.loads(p.stdout)["vm"] == "completed"  # Intel expected
    for bad in (("check", std, "--cpu", "arm"), ("check", std, "--no-succor"),
                ("check", std, "--cpu", "amd", "--profile", "faultline-vmm"),
                ("run", std, "--backend", "kvm", "--cpu", "amd"),
                ("run", std, "--backend", "model", "--profile", "faultline-vmm",
                 "--no-mcg-ser-p"),
                ("conform", "--cpu", "amd", std)):  # conform: faultline-vmm by default
        p = _cli(*bad)
        assert p.returncode == 2 and "Traceback" not in p.stderr, bad
        assert len(p.stderr.strip().splitlines()) == 1, (bad, p.stderr)


# --- the plumbing ---------------------------------------------------------------------------

def test_profile_defaults_and_overrides() -> None:
    sc = load(SCENARIOS / "dax-truncate.toml")
    assert System(sc, "upstream", "mce").profile == "linux-qemu"
    assert System(sc, "upstream", "mce").params.kernel_irqs_on is True
    fv = System(sc, "upstream", "mce", profile="faultline-vmm")
    assert fv.params.kernel_irqs_on is False and fv.params.readonly_store == "sigsegv"
    # An explicit parameter beats the profile; a scenario's [vm] profile is its default.
    assert System(sc, "upstream", "mce", kernel_irqs_on=False).params.kernel_irqs_on is False
    pinned = dataclasses.replace(sc, profile="faultline-vmm")
    assert System(pinned, "upstream", "mce").profile == "faultline-vmm"
    with pytest.raises(ValueError, match="unknown profile"):
        System(sc, "upstream", "mce", profile="qemu")
    out = simulate(sc, "upstream", "mce")
    start = next(e for e in out.events if e["kind"] == "model_start")
    assert start["profile"] == out.profile == "linux-qemu"
    assert out.to_json()["profile"] == "linux-qemu"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faultline.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_cli_names_the_profile(tmp_path: Path) -> None:
    sc = str(SCENARIOS / "lq2-halt-kernel.toml")
    p = _cli("run", sc, "--backend", "model", "--profile", "faultline-vmm", "--json",
             "--events", str(tmp_path / "ev.jsonl"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["profile"] == "faultline-vmm"
    # --preempt full lets bystander run: an outcome the scenario (voluntary) does not expect
    p = _cli("run", sc, "--backend", "model", "--preempt", "full", "--json",
             "--events", str(tmp_path / "ev2.jsonl"))
    assert p.returncode == 1 and json.loads(p.stdout)["tasks"]["bystander"]["fate"] == "exited"
    p = _cli("check", str(SCENARIOS / "lq4-srao-later.toml"), "--design", "request",
             "--policy", "mce", "--profile", "linux-qemu", "faultline-vmm", "--json",
             "--workers", "1")
    assert p.returncode == 0, p.stderr
    cells = json.loads(p.stdout)["cells"]
    assert {c["profile"]: c["properties"]["one_exit_per_bad_page"]["holds"]
            for c in cells} == {"linux-qemu": False, "faultline-vmm": True}


def test_cli_profile_is_for_the_model() -> None:
    p = _cli("run", str(SCENARIOS / "hello.toml"), "--backend", "kvm", "--profile",
             "linux-qemu")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--profile" in p.stderr
    p = _cli("run", str(SCENARIOS / "hello.toml"), "--backend", "model", "--profile", "qemu")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


# --- how the VM ends: one word per way (Outcome.vm) ------------------------------------------

# (end, scenario, design, policy, params): one run that ends each way under linux-qemu.
VM_ENDS = [
    # QEMU's kvm_cpu_exec() on a bare -EFAULT: "kvm run failed Bad address", vm_stop()
    ("aborted", "lq1-nopv", "error-gfn", "abort", {}),
    # hardware_memory_error(): an SRAR on a guest CPU without MCG_SER_P, exit(1)
    ("crashed", "lq9-mce-broadcast", "error-gfn", "mce", {"mcg_ser_p": False}),
    # do_inject_x86_mce(): an SRAR while MCIP is set, qemu_system_reset_request()
    ("reset", "lq9-mce-broadcast", "error-gfn", "mce", {}),
    # mce_severity_amd(): an SRAR on an AMD guest without SUCCOR, mce_panic()
    ("panic", "lq9-mce-amd", "error-gfn", "mce", {"amd_succor": False}),
]


@pytest.mark.parametrize(("end", "name", "design", "policy", "params"), VM_ENDS,
                         ids=[c[0] for c in VM_ENDS])
def test_each_way_the_vm_ends_has_its_word(end: str, name: str, design: str, policy: str,
                                           params: dict[str, object]) -> None:
    out = _sim(name, design, policy, "linux-qemu", **params)
    assert out.vm == end and out.reason, out.reason
    assert out.to_json()["vm"] == end
    assert next(e for e in out.events if e["kind"] == "model_end")["vm"] == end
    unfinished = {t.fate for t in out.tasks.values()} - {"exited", "sigbus"}
    # the qemu backend's words: a task is lost with the QEMU process, else killed
    assert unfinished == {"lost" if end == "crashed" else "killed"}
    # vm_survives fails for every way, and its counterexample ends saying which
    path = SCENARIOS / f"{name}.toml"
    sc = load(path if path.exists() else SCENARIOS / "model" / f"{name}.toml")
    r = check_system(System(sc, design, policy, profile="linux-qemu", **params))
    cex = r.properties["vm_survives"]
    assert cex.holds is False
    assert cex.counterexample[-1]["changes"]["vmm.end"] == end


def test_conform_compares_a_model_panic_word_for_word() -> None:
    """The kvm backend says panic on its guest's panic report, as the model does."""
    from faultline.conform import view

    out = _sim("lq9-mce-amd", "error-gfn", "mce", "linux-qemu", amd_succor=False)
    assert out.vm == "panic" and view(out)["vm"] == "panic"
