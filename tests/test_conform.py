"""Conformance: the real backend (this host's KVM) and the model (memory-fault-exit, guest
APF off) must give the same outcome, on the whole scenario corpus and on random small
scenarios (differential testing). Every difference is a bug in one of the two.

The random part runs FAULTLINE_CONFORM_EXAMPLES examples (default 15, derandomized so the
default run is stable); ``make conform-long`` sets it to 300 with a random seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultline import conform
from faultline.backends import run_scenario
from faultline.conform import MODEL_PARAMS
from faultline.model.params import PROFILE_PARAMS
from faultline.outcome import check
from faultline.scenario import Scenario, from_dict, load

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
CORPUS = conform.corpus()
CONF = [p for p in CORPUS if p.name.startswith("conf-")]
EXAMPLES = int(os.environ.get("FAULTLINE_CONFORM_EXAMPLES", "15"))
LONG = "FAULTLINE_CONFORM_EXAMPLES" in os.environ


def _explain(c: conform.Comparison) -> str:
    return "\n".join([d.line() for d in c.differences]
                     + [f"kvm:   {json.dumps(c.kvm)}", f"model: {json.dumps(c.model)}",
                        f"events: {c.events}"])


# --- the corpus -------------------------------------------------------------------------

def test_corpus_is_large_enough_and_covers_the_issue() -> None:
    assert len(CORPUS) >= 12
    text = "\n".join(p.read_text() for p in CORPUS)
    for needle in ('after = "start"', "punch-hole", "write dax0", "exec ", "vcpus = 2",
                   "read_span", "size = 0\n", 'action = "extend"', "0x40_0000_0000",
                   "early_kill = true", "kread"):
        assert needle in text, needle
    assert any("memory_fault = 0" in p.read_text() and "faults = []" in p.read_text()
               for p in CONF)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_same_outcome_on_both_backends(path: Path, tmp_path: Path) -> None:
    sc = load(path)
    for c in conform.conform([sc], events_dir=tmp_path):
        assert not c.skipped, c.skipped
        assert c.ok, f"{sc.name} [{c.policy}]\n{_explain(c)}"


@pytest.mark.parametrize("path", CONF, ids=lambda p: p.stem)
@pytest.mark.parametrize("backend", ["kvm", "model"])
def test_conf_scenarios_meet_their_expectations(path: Path, backend: str) -> None:
    # conf-* scenarios set vm.apf = false and design memory-fault-exit: their [[expect]]
    # blocks hold on both backends as they stand.
    sc = load(path)
    for policy in sc.policies:
        o = run_scenario(sc, backend=backend, policy=policy)
        assert check(o, sc) == [], (policy, o.reason)


def test_smp_shared_holds_however_late_vcpu0_handles_its_fault(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """conf-smp-shared orders its vCPUs itself (no spin count can: a starved vCPU thread
    loses any race). Here vCPU 0 handles near's fault only once far is about to touch the
    bad page, and far still meets it offlined, with no second exit."""
    from faultline.vmm.fault_handler import FaultHandler
    from faultline.vmm.hostevents import HostEvents

    far_at_exec = threading.Event()
    on_step, apply = HostEvents.on_step, FaultHandler.apply

    def step(self: HostEvents, v: Any, task: str, steps: int) -> None:
        if task == "far" and steps == 13 * 2 + 2:  # 13 spin + loop rounds, its two writes
            far_at_exec.set()
        on_step(self, v, task, steps)

    def late_apply(self: FaultHandler, v: Any, fault: Any, d: Any) -> None:
        if v.index == 0:
            far_at_exec.wait(10)
        apply(self, v, fault, d)

    monkeypatch.setattr(HostEvents, "on_step", step)
    monkeypatch.setattr(FaultHandler, "apply", late_apply)
    sc = load(ROOT / "scenarios" / "conf-smp-shared.toml")
    for policy in sc.policies:
        far_at_exec.clear()
        o = run_scenario(sc, backend="kvm", policy=policy)
        assert far_at_exec.is_set()
        assert check(o, sc) == [], (policy, o.reason)


# --- the comparison itself ------------------------------------------------------------------

def _view(**kw: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"vm": "completed", "tasks": {"t": {"fate": "exited", "code": 0,
                                                            "signal": None, "vaddr": None}},
                         "offlined": [], "memory_fault_exits": 0, "faults": []}
    v.update(kw)
    return v


def test_diff_names_each_field() -> None:
    rec = {"gpa": "0x100002000", "path": "dax0", "offset": "0x2000", "file_size": "0x2000",
           "cause": "beyond-eof"}
    a = _view(faults=[rec], memory_fault_exits=1)
    b = _view(faults=[{**rec, "cause": "hole"}], memory_fault_exits=1,
              tasks={"t": {"fate": "sigbus", "code": None, "signal": "BUS_MCEERR_AR",
                           "vaddr": "0x80002000"}})
    fields = [d.field for d in conform.diff(a, b)]
    assert fields == ["tasks.t.fate", "tasks.t.code", "tasks.t.signal", "tasks.t.vaddr",
                      "faults[0x100002000].cause"]
    assert conform.diff(a, a) == []
    extra = conform.diff(a, _view(memory_fault_exits=1))
    assert [d.field for d in extra] == ["faults.count", "faults[0x100002000]"]


def test_fault_path_is_compared_relative_to_the_run_directory() -> None:
    from faultline.outcome import FaultRecord, Outcome

    o = Outcome("s", "kvm", "host", "mce")
    o.faults.append(FaultRecord(0x1_0000_2008, 0x7F00_0000_2008, "/dev/shm/faultline-x/d/f0",
                                0x2008, 0x2000, "beyond-eof", "mmio"))
    v = conform.view(o, "/dev/shm/faultline-x")
    assert v["faults"] == [{"gpa": "0x100002008", "path": "d/f0", "offset": "0x2008",
                            "file_size": "0x2000", "cause": "beyond-eof"}]


def test_cli_conform_table_and_json(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULTLINE_RUNS": str(tmp_path),
           "NO_COLOR": "1"}
    sc = str(ROOT / "scenarios" / "dax-truncate.toml")
    r = subprocess.run([sys.executable, "-m", "faultline.cli", "conform", sc], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dax-truncate" in r.stdout and "4 same, 0 different" in r.stdout
    r = subprocess.run([sys.executable, "-m", "faultline.cli", "conform", sc, "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {d["policy"] for d in data} == {"mce", "abort", "notify", "proactive"}
    assert all(d["ok"] for d in data)


def test_cli_conform_exits_1_on_a_difference(tmp_path: Path, monkeypatch) -> None:
    from faultline import cli

    real = conform.view

    def skewed(outcome: Any, run_dir: str | None = None) -> dict[str, Any]:
        v = real(outcome, run_dir)
        if outcome.backend == "model":
            v["memory_fault_exits"] += 1
        return v

    monkeypatch.setattr(conform, "view", skewed)
    monkeypatch.setenv("FAULTLINE_RUNS", str(tmp_path))
    rc = cli.main(["conform", str(ROOT / "scenarios" / "hello.toml")])
    assert rc == 1


# --- differential testing ----------------------------------------------------------------------

PAGES = 4


@st.composite
def random_scenarios(draw: st.DrawFn) -> tuple[Scenario, str]:
    """Small scenarios, valid by construction: one vCPU (two vCPUs race on real KVM, so
    their interleaving is not a property of either backend), one data file and maybe a
    code file, 1-3 tasks of 1-5 steps, 0-3 host events."""
    # The file fills its window at first: a window page beyond the *initial* EOF is
    # offlined by the real proactive watcher at the first change of the file, while the
    # shared policy (file_change_notify, both sides) offlines only pages that became bad (see
    # the report); truncations below make every other shape.
    files: list[dict[str, Any]] = [{"name": "dax0", "size": PAGES * 0x1000}]
    with_code = draw(st.booleans())
    if with_code:
        files.append({"name": "code0", "size": 0x2000, "pattern": "ret"})
    ntasks = draw(st.integers(1, 3))
    tasks = []
    lengths = []
    for i in range(ntasks):
        prog = []
        for _ in range(draw(st.integers(1, 5))):
            op = draw(st.sampled_from(["read", "read", "write", "kread", "span", "yield",
                                       "anon", "exec"]))
            page = draw(st.integers(0, PAGES - 1))
            off = draw(st.sampled_from([0, 0x8, 0x7F8, 0xFF8]))
            if op == "read":
                prog.append(f"read dax0[{page}]+{off:#x} expect=@")
            elif op == "write":
                prog.append(f"write dax0[{page}]+{off:#x} {draw(st.integers(1, 0xFFFF)):#x}")
            elif op == "kread":
                prog.append(f"kread dax0[{page}]+{off:#x}")
            elif op == "span":
                end = draw(st.integers(page + 1, PAGES))
                prog.append(f"read_span dax0[{page}:{end}]+{off:#x}")
            elif op == "anon":
                prog.append("write anon[0] 0x77")
            elif op == "exec" and with_code:
                prog.append(f"exec code0[{draw(st.integers(0, 1))}]")
            else:
                prog.append("yield")
        prog.append(f"exit {draw(st.integers(0, 2))}")
        lengths.append(len(prog))
        tasks.append({"name": f"t{i}", "program": prog, "early_kill": draw(st.booleans())})
    events = []
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["truncate", "truncate", "punch-hole", "extend",
                                       "write"]))
        target = "dax0" if not with_code or draw(st.integers(0, 3)) else "code0"
        t = draw(st.integers(0, ntasks - 1))
        # Not after the exit step: the real guest reports no step for `exit` (a trigger
        # there never fires on kvm; test_trigger_after_exit_step_fires documents it).
        after = draw(st.sampled_from(["start",
                                      f"t{t}:{draw(st.integers(1, lengths[t] - 1 or 1))}"]))
        ev: dict[str, Any] = {"action": action, "file": target, "after": after}
        if action == "truncate":
            ev["size"] = draw(st.sampled_from([0, 0x800, 0x1000, 0x2000, 0x2800, 0x4000]))
        elif action == "extend":
            # Never below the file's size at that point (0x4000 bounds every size here):
            # an "extend" that would shrink is ambiguous (see the report).
            ev["size"] = 0x4000
        elif action == "punch-hole":
            ev["offset"] = draw(st.integers(0, PAGES - 1)) * 0x1000
            ev["length"] = draw(st.sampled_from([0x1000, 0x2000]))
        else:
            ev["offset"] = draw(st.integers(0, PAGES * 0x200 - 1)) * 8
            ev["value"] = draw(st.integers(0, 0xFFFF))
        events.append(ev)
    raw = {"name": "diff", "vm": {"vcpus": 1, "apf": False}, "files": files, "tasks": tasks,
           "events": events, "policies": ["mce", "notify", "abort", "proactive"]}
    policy = draw(st.sampled_from(["mce", "notify", "abort", "proactive"]))
    return from_dict(raw, source="differential"), policy


_DIFF_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
                          database=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])


@_DIFF_SETTINGS
@given(random_scenarios())
def test_differential_random_scenarios(case: tuple[Scenario, str]) -> None:
    sc, policy = case
    c = conform.compare_pair(sc, policy)
    assert c.ok, f"policy {policy}\n{json.dumps(sc.raw, indent=1)}\n{_explain(c)}"


# --- real-backend bugs found by differential testing ----------------------------------------

EXIT_TRIGGER = {
    "name": "exit-trigger", "vm": {"vcpus": 1, "apf": False},
    "files": [{"name": "dax0", "size": 0x4000}],
    "tasks": [{"name": "early", "program": ["read dax0[0]", "exit 0"]},
              {"name": "later", "program": ["yield", "yield", "yield", "read dax0[3]",
                                            "exit 0"]}],
    # docs/scenarios.md: every instruction is one step, "exit" included; this fires when
    # `early` has finished its 2nd step (its exit), before `later` reads page 3.
    "events": [{"action": "truncate", "file": "dax0", "size": 0x2000, "after": "early:2"}],
}


@pytest.mark.kvm
def test_trigger_after_exit_step_fires() -> None:
    """The guest reports `exit` with R_EXIT, not R_STEP; a trigger on that step must still
    fire on kvm, as it does on the model (found by this suite; fixed in KvmRun._r_exit)."""
    sc = from_dict(EXIT_TRIGGER, source="exit-trigger")
    # (faultline-vmm: what the kvm backend is; docs/linux-qemu.md)
    model = run_scenario(sc, backend="model", policy="mce", profile="faultline-vmm")
    assert model.tasks["later"].fate == "sigbus"  # the model fires it
    kvm = run_scenario(sc, backend="kvm", policy="mce")
    assert kvm.tasks["later"].fate == "sigbus", kvm.tasks["later"]


def test_model_params_under_linux_qemu_keep_the_kernels_async_setting() -> None:
    assert conform.model_params() == MODEL_PARAMS
    lq = conform.model_params("linux-qemu")
    assert lq["profile"] == "linux-qemu" and "async_without_pv" not in lq
    assert PROFILE_PARAMS["linux-qemu"]["async_without_pv"] is True  # what applies instead
