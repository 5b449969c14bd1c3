"""Trace export (Chrome / Perfetto JSON trace-event format) and the human timeline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from faultline import trace
from faultline.backends import run_scenario
from faultline.outcome import EventLog
from faultline.scenario import load
from faultline.timeline import RESOLVE_MARK, render

ROOT = Path(__file__).resolve().parent.parent
DAX = load(ROOT / "scenarios" / "dax-truncate.toml")
PHASES = {"X", "i", "s", "t", "f", "M"}


def validate(doc: dict[str, Any]) -> None:
    """Schema-level checks of every event (the subset of the trace-event format we use),
    and that every flow id has one start and one finish, each bound to a slice of its
    track (a span enclosing its timestamp on the same pid/tid)."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit") in (None, "ms", "ns")
    slices: dict[tuple[int, int], list[tuple[float, float]]] = {}
    flows: dict[Any, list[dict[str, Any]]] = {}
    named_threads = set()
    for ev in doc["traceEvents"]:
        assert ev["ph"] in PHASES, ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int), ev
        assert isinstance(ev["name"], str) and ev["name"], ev
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "thread_name", "thread_sort_index"), ev
            assert isinstance(ev["args"], dict)
            if ev["name"] == "thread_name":
                named_threads.add((ev["pid"], ev["tid"]))
            continue
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0, ev
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0, ev
            slices.setdefault((ev["pid"], ev["tid"]), []).append((ev["ts"],
                                                                  ev["ts"] + ev["dur"]))
        elif ev["ph"] == "i":
            assert ev.get("s") in ("t", "p", "g"), ev
        else:
            assert "id" in ev, ev
            flows.setdefault(ev["id"], []).append(ev)
        if "args" in ev:
            json.dumps(ev["args"])  # serialisable
        assert (ev["pid"], ev["tid"]) in named_threads or ev["ph"] == "M", \
            f"track {ev['tid']} has no thread_name"
    for fid, evs in flows.items():
        phs = [e["ph"] for e in sorted(evs, key=lambda e: e["ts"])]
        assert phs.count("s") == 1 and phs.count("f") == 1, (fid, phs)
        assert phs[0] == "s" and phs[-1] == "f", (fid, phs)
        for e in evs:
            spans = slices.get((e["pid"], e["tid"]), [])
            assert any(a <= e["ts"] <= b for a, b in spans), f"flow {fid} unbound: {e}"


def _tracks(doc: dict[str, Any]) -> set[str]:
    return {e["args"]["name"] for e in doc["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


@pytest.mark.parametrize("backend,design", [
    pytest.param("kvm", None, marks=pytest.mark.kvm),
    ("model", "error-gfn"),
    ("model", "request"),
])
@pytest.mark.parametrize("policy", ["mce", "notify"])
def test_trace_of_a_run_is_valid_and_links_the_fault(backend: str, design: str | None,
                                                     policy: str) -> None:
    log = EventLog(None, clock="us" if backend == "kvm" else "step")
    o = run_scenario(DAX, backend=backend, design=design, policy=policy, log=log)
    assert o.tasks["toucher"].fate == "sigbus"
    doc = trace.build(log.events, [t.name for t in DAX.tasks])
    validate(doc)
    assert {"VMM", "host / KVM", "vCPU 0", "task toucher", "task bystander",
            "task late"} <= _tracks(doc)
    evs = doc["traceEvents"]
    # One arrow: fault -> exit -> resolution -> injection -> toucher's SIGBUS.
    flow = [e for e in evs if e["ph"] in "stf"]
    assert len({e["id"] for e in flow}) == 1 and len(flow) >= 4
    toucher_tid = next(e["tid"] for e in evs if e["ph"] == "M"
                       and e["args"].get("name") == "task toucher")
    assert flow[-1]["ph"] == "f" and flow[-1]["tid"] == toucher_tid
    names = {e["name"] for e in evs}
    assert "SIGBUS" in names and any(n.startswith("offline ") for n in names)
    assert any(e["ph"] == "i" and e["tid"] == trace.TID_HOST for e in evs)  # the truncation
    assert any(e["ph"] == "X" and e["cat"] == "exit" for e in evs)
    assert any(e["ph"] == "X" and e["cat"] == "inject" for e in evs)
    assert any(e["ph"] == "X" and e["cat"] == "step" and e["tid"] == toucher_tid for e in evs)


def test_trace_of_an_aborted_and_a_hung_run_is_valid() -> None:
    for design, policy in (("memory-fault-exit", "abort"), ("upstream", "mce")):
        log = EventLog(None, clock="step")
        run_scenario(DAX, backend="model", design=design, policy=policy, log=log)
        validate(trace.build(log.events, [t.name for t in DAX.tasks]))


@pytest.mark.parametrize(("scenario", "params", "vm"), [
    ("lq9-mce-broadcast", {}, "reset"),
    ("lq9-mce-broadcast", {"mcg_ser_p": False}, "crashed"),
    ("lq9-mce-amd", {"amd_succor": False}, "panic"),
])
def test_trace_names_how_the_vm_ended(scenario: str, params: dict[str, Any], vm: str) -> None:
    from faultline.model import simulate

    sc = load(ROOT / "scenarios" / "model" / f"{scenario}.toml")
    log = EventLog(None, clock="step")
    simulate(sc, "error-gfn", "mce", profile="linux-qemu", log=log, **params)
    doc = trace.build(log.events, [t.name for t in sc.tasks])
    validate(doc)
    assert doc["otherData"]["vm"] == vm
    assert [e["name"] for e in doc["traceEvents"] if e.get("cat") == "vm"
            and e["name"].startswith("vm ")] == [f"vm {vm}"]


def test_trace_of_a_run_without_fault_has_no_flow() -> None:
    sc = load(ROOT / "scenarios" / "hello.toml")
    log = EventLog(None, clock="step")
    run_scenario(sc, backend="model", policy="mce", log=log)
    doc = trace.build(log.events)
    validate(doc)
    assert not [e for e in doc["traceEvents"] if e["ph"] in "stf"]


def test_cli_run_trace_flag(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULTLINE_RUNS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "faultline.cli", "run",
                        str(ROOT / "scenarios" / "dax-truncate.toml"), "--backend", "model",
                        "--design", "error-gfn", "--policy", "mce", "--json",
                        "--trace", str(out)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    validate(json.loads(out.read_text()))
    # The trace can also be made later from the JSON-lines log.
    events = trace.load_events(json.loads(r.stdout)["events_path"])
    validate(trace.build(events))


# --- the human timeline -----------------------------------------------------------------------

def test_timeline_without_colour_is_aligned_and_marks_the_resolution(tmp_path: Path) -> None:
    log = EventLog(None, clock="step")
    o = run_scenario(DAX, backend="model", design="error-gfn", policy="mce", log=log)
    buf = io.StringIO()
    con = Console(file=buf, width=200, no_color=True, force_terminal=False, highlight=False)
    render(log.events, o, console=con)
    text = buf.getvalue()
    assert "\x1b[" not in text  # no escape sequences at all
    lines = [ln for ln in text.splitlines() if ln.startswith(("   step", f"{RESOLVE_MARK} step"))]
    assert len(lines) > 10
    # Columns line up: the event name starts at the same column on every line.
    kinds = {"task_step", "vmm_resolve", "guest_sigbus", "kvm_find_and_remove_error_gfn"}
    cols = {ln.index(k) for ln in lines for k in kinds if f" {k} " in ln}
    assert len(cols) == 1, cols
    resolve = [ln for ln in lines if ln.startswith(RESOLVE_MARK)]
    assert len(resolve) == 1
    assert "gpa 0x100002000 -> hva ? -> dax0 +0x2000 (file size 0x2000): beyond-eof" in resolve[0]


def test_timeline_no_color_env_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULTLINE_RUNS": str(tmp_path),
           "NO_COLOR": "1", "FORCE_COLOR": ""}
    env.pop("FORCE_COLOR")
    r = subprocess.run([sys.executable, "-m", "faultline.cli", "run",
                        str(ROOT / "scenarios" / "conf-span-hole.toml"), "--backend", "model"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\x1b[" not in r.stdout
    assert f"{RESOLVE_MARK} step" in r.stdout and ": hole" in r.stdout
