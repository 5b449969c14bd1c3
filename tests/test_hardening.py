"""What a new (or careless, or hostile) user tried: bad input of every kind gets one line
and exit 2 before anything runs, with no traceback, no stray file and bounded memory;
output paths are checked first; runs never share a log; Ctrl-C stops `check` and
`conform` with what they have; output through a pipe is not cut to 80 columns."""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from faultline.cli import vendor_module
from faultline.outcome import EventLog, Outcome
from faultline.timeline import MAX_LINES, render

from .conftest import ROOT, SCENARIOS
from .test_robustness import BASE

# A child that reads without limit hits this (MemoryError: a traceback, the test fails)
# long before it can hurt the machine.
MEMORY_LIMIT = 2 << 30
OK = BASE  # a scenario that runs: one file, one task


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _cli(cwd: Path, *args: str, timeout: float = 120,
         preexec: Callable[[], None] | None = _limit_memory) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FAULTLINE_RUNS=str(cwd / "runs"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "faultline.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env, preexec_fn=preexec)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# Each case: files to create in the test directory (name -> text, or a callable making it),
# the command line ({d} is the test directory), the message the one line must contain.
def _big(p: Path) -> None:
    p.write_text("# " + "x" * (2 << 20) + "\n" + OK)


def _fifo(p: Path) -> None:
    os.mkfifo(p)


Setup = dict[str, "str | Callable[[Path], None]"]
BAD: list[tuple[str, Setup, list[str], str]] = [
    ("/dev/zero", {}, ["run", "/dev/zero"], "/dev/zero: cannot read: not a regular file"),
    ("/dev/urandom", {}, ["run", "/dev/urandom"], "not a regular file"),
    ("/dev/null", {}, ["run", "/dev/null"], "not a regular file"),
    ("a directory", {}, ["run", "{d}"], "cannot read: a directory"),
    ("missing file", {}, ["run", "{d}/nope.toml"], "cannot read: No such file"),
    ("over 1 MiB", {"big.toml": _big}, ["run", "{d}/big.toml"], "a scenario file is at most"),
    ("endless FIFO", {"fifo.toml": _fifo}, ["run", "{d}/fifo.toml"], "more than 1048576"),
    ("empty scenario", {"e.toml": ""}, ["run", "{d}/e.toml"], "tasks: no task"),
    ("trigger never fires",
     {"t.toml": OK + '[[events]]\naction = "truncate"\nfile = "dax0"\nsize = 0\n'
                     'after = "a:99"\n'},
     ["run", "{d}/t.toml"], "'a:99' never fires: task 'a' has 2 instructions and no loop"),
    ("size too big for a window",
     {"w.toml": OK.replace('"16KiB"', '"2GiB"')}, ["run", "{d}/w.toml"],
     "files[0].size: 0x80000000 bytes is more than a window maps"),
    ("watchdog 0", {"s.toml": OK}, ["run", "{d}/s.toml", "--watchdog", "0"],
     "--watchdog: must be a finite number > 0"),
    ("watchdog -1", {"s.toml": OK}, ["run", "{d}/s.toml", "--watchdog=-1"], "> 0"),
    ("watchdog nan", {"s.toml": OK}, ["run", "{d}/s.toml", "--watchdog", "nan"], "> 0"),
    ("empty design", {"s.toml": OK}, ["run", "{d}/s.toml", "--design", ""],
     "unknown design ''"),
    ("empty policy", {"s.toml": OK}, ["run", "{d}/s.toml", "--policy", ""],
     "unknown policy ''"),
    ("seed on kvm", {"s.toml": OK}, ["run", "{d}/s.toml", "--backend", "kvm", "--seed", "1"],
     "--seed is for the model"),
    ("design on kvm", {"s.toml": OK},
     ["run", "{d}/s.toml", "--backend", "kvm", "--design", "error-gfn"],
     "--design is for the model"),
    ("unknown backend", {"s.toml": OK}, ["run", "{d}/s.toml", "--backend", "bogus"],
     "unknown backend 'bogus'"),
    ("events: missing directory", {"s.toml": OK},
     ["run", "{d}/s.toml", "--events", "{d}/no/such/ev.jsonl"], "no such directory"),
    ("events: a directory", {"s.toml": OK}, ["run", "{d}/s.toml", "--events", "{d}"],
     "is a directory"),
    ("events: /proc", {"s.toml": OK}, ["run", "{d}/s.toml", "--events", "/proc/1/ev.jsonl"],
     "--events /proc/1/ev.jsonl:"),
    # (a file of the child itself: were the check to regress, it renames only the child)
    ("events: a procfs knob", {"s.toml": OK},
     ["run", "{d}/s.toml", "--events", "/proc/self/comm"],
     "--events /proc/self/comm: on the kernel's proc filesystem, not for logs"),
    ("events: sysfs", {"s.toml": OK},
     ["run", "{d}/s.toml", "--events", "/sys/kernel/new.jsonl"], "sysfs filesystem"),
    ("events: name too long", {"s.toml": OK},
     ["run", "{d}/s.toml", "--events", "{d}/" + "e" * 300], "File name too long"),
    ("events: the scenario itself", {"s.toml": OK},
     ["run", "{d}/s.toml", "--events", "{d}/s.toml"], "names the scenario file itself"),
    ("trace: /dev/full", {"s.toml": OK}, ["run", "{d}/s.toml", "--trace", "/dev/full"],
     "--trace /dev/full: not a regular file"),
    ("trace: a directory", {"s.toml": OK}, ["run", "{d}/s.toml", "--trace", "{d}"],
     "is a directory"),
    ("trace and events the same", {"s.toml": OK},
     ["run", "{d}/s.toml", "--trace", "{d}/x.json", "--events", "{d}/x.json"],
     "--events and --trace name the same file"),
    ("replay: no such file", {"s.toml": OK},
     ["run", "{d}/s.toml", "--replay", "{d}/none.json"], "--replay"),
    ("replay: no matching cell", {"s.toml": OK, "m.json": '{"cells": []}'},
     ["run", "{d}/s.toml", "--replay", "{d}/m.json"], "no cell for scenario s"),
    ("replay: not JSON", {"s.toml": OK, "m.json": "[[["},
     ["run", "{d}/s.toml", "--replay", "{d}/m.json"], "not JSON"),
    ("check: --max-states 0", {}, ["check", "--max-states", "0"], "must be at least 1"),
    ("check: --max-states -5", {}, ["check", "--max-states=-5"], "must be at least 1"),
    ("check: --timeout 0", {}, ["check", "--timeout", "0"], "> 0"),
    ("check: --workers 0", {}, ["check", "--workers", "0"], "must be at least 1"),
    ("check: unknown property", {}, ["check", "--counterexample", "nonsense"],
     "unknown property 'nonsense'"),
    ("check: empty design", {}, ["check", "--design", ""], "unknown design ''"),
    ("check: /dev/zero", {}, ["check", "/dev/zero"], "not a regular file"),
    ("unknown option", {"s.toml": OK}, ["run", "{d}/s.toml", "--frobnicate"],
     "unrecognized arguments: --frobnicate"),
    ("no scenario", {}, ["run"], "the following arguments are required: scenario"),
]


@pytest.mark.parametrize(("setup", "argv", "message"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input_one_line_exit_2(tmp_path: Path, setup: Setup, argv: list[str],
                                   message: str) -> None:
    for name, make in setup.items():
        if callable(make):
            make(tmp_path / name)
        else:
            (tmp_path / name).write_text(make)
    feeder = None
    if (tmp_path / "fifo.toml").exists():  # an endless writer on the FIFO
        feeder = subprocess.Popen(["sh", "-c", f"cat /dev/zero > {tmp_path / 'fifo.toml'}"],
                                  stderr=subprocess.DEVNULL)
    before = _tree(tmp_path)
    try:
        p = _cli(tmp_path, *[a.replace("{d}", str(tmp_path)) for a in argv])
    finally:
        if feeder is not None:
            feeder.kill()
            feeder.wait()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faultline: error: "), lines
    assert message in lines[0], lines
    assert _tree(tmp_path) == before  # no log, no trace, no runs/ directory


# --- output paths and logs ------------------------------------------------------------

def test_default_logs_are_unique_per_run_and_name_design_and_policy(tmp_path: Path) -> None:
    """Two runs of one scenario at once: two logs, each whole."""
    env = dict(os.environ, FAULTLINE_RUNS=str(tmp_path / "runs"))
    argv = [sys.executable, "-m", "faultline.cli", "run", str(SCENARIOS / "hello.toml"),
            "--backend", "model", "--json"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = sorted((tmp_path / "runs").iterdir())
    assert len(logs) == 2
    assert {json.loads(o)["events_path"] for o, _ in outs} == {str(p) for p in logs}
    for log in logs:
        assert log.name.startswith("hello-model-memory-fault-exit-mce-"), log.name
        kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
        assert kinds[0] == "model_start" and kinds[-1] == "model_end"


def test_a_long_scenario_file_name_gets_a_short_log_name(tmp_path: Path) -> None:
    scen = tmp_path / ("s" * 240 + ".toml")
    scen.write_text(OK)
    p = _cli(tmp_path, "run", str(scen), "--backend", "model", "--json")
    assert p.returncode == 0, p.stderr
    [log] = (tmp_path / "runs").iterdir()
    assert len(log.name) < 150 and log.name.startswith("s" * 64 + "-model-")


def test_an_event_log_in_use_by_another_run_is_refused(tmp_path: Path) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text(OK)
    events = tmp_path / "ev.jsonl"
    with open(events, "w") as held:
        held.write("the other run's line\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        p = _cli(tmp_path, "run", str(scen), "--backend", "model", "--events", str(events))
    assert p.returncode == 2
    assert p.stderr.strip().endswith("another faultline run is writing it")
    assert events.read_text() == "the other run's line\n"  # not truncated, not interleaved


def test_design_without_backend_runs_the_model(tmp_path: Path) -> None:
    p = _cli(tmp_path, "run", str(SCENARIOS / "dax-truncate.toml"), "--design", "error-gfn",
             "--json")
    assert p.returncode in (0, 1), p.stderr
    out = json.loads(p.stdout)
    assert (out["backend"], out["design"]) == ("model", "error-gfn")


def test_a_trigger_inside_a_loop_that_is_never_reached_is_reported(tmp_path: Path) -> None:
    scen = tmp_path / "loop.toml"
    scen.write_text(OK.replace('program = ["read dax0[1] expect=@", "exit 0"]',
                               'program = ["label top", "read dax0[1] expect=@", '
                               '"loop 2 top", "exit 0"]')
                    + '[[events]]\naction = "truncate"\nfile = "dax0"\nsize = 0\n'
                      'after = "a:99"\n')
    p = _cli(tmp_path, "run", str(scen), "--backend", "model", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == ("faultline: warning: 1 of 1 host events never fired (their "
                                "trigger was not reached; triggers: events[0] after a:99)")


def test_piped_output_is_not_cut_to_80_columns(tmp_path: Path) -> None:
    p = _cli(tmp_path, "run", str(SCENARIOS / "dax-truncate.toml"), "--backend", "model",
             "--design", "upstream", "--policy", "mce")
    assert p.returncode in (0, 1), p.stderr
    lines = p.stdout.splitlines()
    assert max(map(len, lines)) > 100  # long details stay on their line
    [vm] = [line for line in lines if line.startswith("vm: ")]
    assert vm.endswith("backend model, profile linux-qemu, design upstream, policy mce")
    c = _cli(tmp_path, "check", str(SCENARIOS / "check-standard.toml"), "--design",
             "memory-fault-exit", "--policy", "abort")
    assert c.returncode == 0, c.stderr
    assert "memory-fault-exit" in c.stdout  # not "memory-fault-…"
    assert "1 cell," in c.stdout and "1 cells" not in c.stdout


def test_check_takes_several_values_after_one_option(tmp_path: Path) -> None:
    p = _cli(tmp_path, "check", "--design", "upstream", "request", "--policy", "mce,notify",
             "--json")
    assert p.returncode == 0, p.stderr
    cells = {(c["design"], c["policy"]) for c in json.loads(p.stdout)["cells"]}
    assert cells == {(d, q) for d in ("upstream", "request") for q in ("mce", "notify")}
    # a scenario after the values is a scenario, not a design
    q = _cli(tmp_path, "check", "--design", "upstream", str(SCENARIOS / "check-standard.toml"),
             "--policy", "abort", "--json")
    assert q.returncode == 0, q.stderr
    assert len(json.loads(q.stdout)["cells"]) == 1


def test_a_bounded_cell_is_incomplete_never_ok(tmp_path: Path) -> None:
    p = _cli(tmp_path, "check", "--design", "error-gfn", "--policy", "mce", "--max-states",
             "10")
    assert p.returncode == 0, p.stderr
    assert "incomplete" in p.stdout and " ok" not in p.stdout
    assert "None" not in p.stdout


def test_replay_takes_the_check_json_output(tmp_path: Path) -> None:
    scen = SCENARIOS / "check-standard.toml"
    c = _cli(tmp_path, "check", str(scen), "--design", "upstream", "--policy", "mce",
             "--json")
    assert c.returncode == 0, c.stderr
    matrix = tmp_path / "matrix.json"
    matrix.write_text(c.stdout)
    [cell] = json.loads(c.stdout)["cells"]
    failing = sorted(n for n, x in cell["properties"].items() if x["holds"] is False)
    assert "no_hang" in failing
    base = ["run", str(scen), "--replay", str(matrix), "--design", "upstream",
            "--policy", "mce", "--events", str(tmp_path / "ev.jsonl")]
    if len(failing) > 1:  # which one must be said
        amb = _cli(tmp_path, *base)
        assert amb.returncode == 2 and "--property" in amb.stderr
    p = _cli(tmp_path, *base, "--property", "no_hang", "--json")
    assert p.returncode in (0, 1), p.stderr
    assert json.loads(p.stdout)["vm"] == "hung"
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "ev.jsonl").read_text()
             .splitlines()]
    assert "replay_end" in kinds


# --- interruption ---------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.parametrize("parent_ignores_sigint", [False, True],
                         ids=["sigint", "sigint-ignored-by-parent"])
def test_ctrl_c_stops_check_with_partial_results(tmp_path: Path,
                                                 parent_ignores_sigint: bool) -> None:
    """The large check takes 10-25 s; SIGINT once the workers run ends it (the test waits at
    most 30 s), exit 130, the matrix so far on stdout, one line on stderr, no worker left."""
    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    p = subprocess.Popen([sys.executable, "-m", "faultline.cli", "check",
                          str(SCENARIOS / "check-large.toml"), "--workers", "2", "--json"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=ignore if parent_ignores_sigint else None)
    workers: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(workers) < 2 and p.poll() is None:
        workers = _children(p.pid)
        time.sleep(0.05)
    assert len(workers) == 2, "the pool never started"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"faultline: error: interrupted: {len(json.loads(out)['cells'])} of 20 cells checked"]
    assert json.loads(out)["interrupted"] is True
    for w in workers:  # terminated and reaped
        assert not Path(f"/proc/{w}").exists() or "Z" in Path(f"/proc/{w}/stat").read_text()


def test_ctrl_c_caught_after_an_exec_still_exits_130_under_python_m(tmp_path: Path) -> None:
    """A KeyboardInterrupt that passed out of an exec() of source text (a lazy import
    creating a dataclass) and was caught: `python -m faultline.cli` still exits 130, not by
    SIGINT (-2). Here a design file's exec'd code takes the SIGINT, deterministically."""
    design = tmp_path / "interrupted.py"
    design.write_text("import os, signal\n"
                      "exec('os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(9): pass')\n")
    r = subprocess.run([sys.executable, "-m", "faultline.cli", "run",
                        str(SCENARIOS / "hello.toml"), "--backend", "model",
                        "--design-file", str(design)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr.strip()) == (130, "faultline: error: interrupted")


# Sends SIGINT to its own process when the module STOP_AT is looked for, then steps aside:
# a Ctrl-C landing at that exact import, deterministically.
_SIGINT_AT_IMPORT = """\
import os, signal, sys

class _SigintAt:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["STOP_AT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _SigintAt())
"""
_CONSOLE_SCRIPT = Path(sys.executable).with_name("faultline")


@pytest.mark.parametrize("entry", ["console-script", "python-m"])
@pytest.mark.parametrize("stop_at", ["faultline.outcome", "faultline.model.simulate"],
                         ids=["start-up-import", "lazy-import"])
def test_ctrl_c_during_an_import_is_one_line_and_exit_130(tmp_path: Path, entry: str,
                                                          stop_at: str) -> None:
    """A Ctrl-C during faultline.cli's own imports (before main() runs) and during a
    command's lazy import: one line, exit 130, no traceback."""
    if entry == "console-script" and not _CONSOLE_SCRIPT.exists():
        pytest.skip("no faultline console script next to this python (make test installs it)")
    (tmp_path / "sitecustomize.py").write_text(_SIGINT_AT_IMPORT)
    argv = [str(_CONSOLE_SCRIPT)] if entry == "console-script" else [
        sys.executable, "-m", "faultline.cli"]
    r = subprocess.run([*argv, "run", str(SCENARIOS / "hello.toml"), "--backend", "model",
                        "--events", str(tmp_path / "ev.jsonl")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path), STOP_AT=stop_at))
    assert (r.returncode, r.stderr.strip()) == (130, "faultline: error: interrupted")


def test_ctrl_c_inside_a_class_creation_during_an_import_waits_for_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython 3.11 turns a KeyboardInterrupt raised in __set_name__ into `RuntimeError:
    Error calling __set_name__` (seen in pyelftools' lazy import, exit 1). Held until the
    import is done, it is a KeyboardInterrupt, and the module is whole."""
    from faultline.interrupt import handled

    (tmp_path / "setname_sigint.py").write_text(
        "import os, signal\n"
        "class Field:\n"
        "    def __set_name__(self, owner, name):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        for _ in range(9): pass\n"
        "class Record:\n"
        "    f = Field()\n"
        "WHOLE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "setname_sigint", raising=False)
    with pytest.raises(KeyboardInterrupt), handled():
        import setname_sigint  # noqa: F401
    assert sys.modules["setname_sigint"].WHOLE
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_kvm_run_interrupted_in_set_up_ends_its_log_with_vm_stop_and_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the VM is set up (here: as /dev/kvm is opened, so no KVM needed), and
    a second one while the run's end is written: the log still ends with vm_stop and the
    outcome, vm aborted, reason interrupted."""
    from faultline.scenario import load
    from faultline.vmm import runner

    def interrupted() -> None:
        raise KeyboardInterrupt

    check_files = runner.KvmRun._check_files

    def ctrl_c_again(run: runner.KvmRun) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # pytest's handler: KeyboardInterrupt if not held
        check_files(run)

    monkeypatch.setattr(runner, "Kvm", interrupted)
    monkeypatch.setattr(runner.KvmRun, "_check_files", ctrl_c_again)
    events = tmp_path / "ev.jsonl"
    try:
        runner.run_kvm(load(SCENARIOS / "hello.toml"), "mce", events_path=events)
    except runner.Interrupted as e:
        outcome = e.outcome
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt passed out of the run")
    else:
        pytest.fail("the run was not interrupted")
    assert (outcome.vm, outcome.reason) == ("aborted", "interrupted")
    log = [json.loads(line) for line in events.read_text().splitlines()]
    assert [ev["kind"] for ev in log[-2:]] == ["vm_stop", "outcome"]
    assert (log[-2]["vm"], log[-2]["reason"]) == ("aborted", "interrupted")
    assert log[-1]["outcome"]["vm"] == "aborted"


@pytest.mark.kvm
def test_ctrl_c_stops_conform_with_partial_results(tmp_path: Path) -> None:
    env = dict(os.environ, FAULTLINE_RUNS=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "faultline.cli", "conform", "--json"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if len(list(tmp_path.glob("conform-*/conform-*-model-*.jsonl"))) >= 1:
            break  # one pair compared, the next under way
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("faultline: error: interrupted: ") and "pairs compared" in line
    assert isinstance(json.loads(out), list)


# --- bounded logs and timelines ---------------------------------------------------------------

def test_event_log_drops_repeats_with_a_count(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    log = EventLog(path, max_repeats=5)
    for i in range(1000):
        log.emit("task_step", vcpu=0, task="t", pc=i % 3)
    log.emit("task_step", vcpu=0, task="other", pc=0)  # another task: its own count
    log.emit("outcome", outcome={"vm": "hung"})
    log.close()
    evs = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["kind"] for e in evs]
    assert kinds == ["task_step"] * 5 + ["log_capped", "task_step", "log_dropped", "outcome"]
    assert evs[5]["dropping"] == "task_step" and evs[5]["task_of"] == "t"
    assert evs[-2]["counts"] == {"task_step": 995}
    assert log.dropped == {"task_step": 995}


def test_event_log_total_is_bounded_memory() -> None:
    log = EventLog(None, max_repeats=10**9, max_events=1000)
    for i in range(50_000):
        log.emit("kvm_exit", vcpu=0, n=i)
    log.emit("vm_stop")  # what ends a run is always kept
    log.close()
    assert len(log.events) <= 1003 and log.events[-1]["kind"] == "log_dropped"
    assert log.events[-2]["kind"] == "vm_stop"


def test_timeline_of_an_endless_run_is_bounded() -> None:
    events = [{"seq": i, "t_us": i, "vcpu": 0, "task": "t", "kind": "task_step", "pc": i}
              for i in range(100_000)]
    buf = io.StringIO()
    render(events, Outcome("s", "kvm", "host", "mce", vm="hung"),
           console=Console(file=buf, width=200))
    lines = buf.getvalue().splitlines()
    assert len(lines) < MAX_LINES + 20
    assert any("98000 events not shown" in line for line in lines)
    assert any("pc=99999" in line for line in lines[-10:])  # the last events are shown


# --- info and help --------------------------------------------------------------------------

def test_vendor_module_is_read_from_sys_module(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    assert vendor_module(tmp_path) == "none found"
    (tmp_path / "kvm_pvm").mkdir()
    assert vendor_module(tmp_path) == "kvm_pvm"


@pytest.mark.parametrize("cmd", ["run", "check", "conform", "info", "demo", "bench"])
def test_help_is_plain_text_and_every_option_has_some(cmd: str) -> None:
    from faultline.cli import build_parser

    [subs] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    sub = subs.choices[cmd]
    text = sub.format_help()
    assert "``" not in text and "{'" not in text
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{cmd} {action.option_strings[0]} has no help"



# --- scenarios that validate must fit the guest ------------------------------------------------

def test_the_guest_heap_budget_holds_for_the_built_kernel() -> None:
    """The validator budgets the guest's page allocator from abi.KERNEL_END_MAX: the kernel
    image + bss must end below it (a kernel that grows must raise it)."""
    from faultline import abi
    from faultline.guest.build import kernel_path
    from faultline.vmm import boot

    assert boot.load_kernel(kernel_path()).end <= abi.KERNEL_END_MAX


def _many_tasks(n: int, windows: int) -> str:
    files = "".join(f'[[files]]\nname = "dax{w}"\nsize = "16KiB"\n' for w in range(windows))
    reads = "".join(f'"read dax{w}[0]", ' for w in range(windows))
    return files + "".join(f'[[tasks]]\nname = "t{i}"\nprogram = ["write anon[63] 1", '
                           f'{reads}"exit 0"]\n' for i in range(n))


def test_a_scenario_too_big_for_the_guest_kernel_is_refused() -> None:
    from faultline.scenario import ScenarioError, loads

    loads(_many_tasks(64, 0))  # 64 tasks, 648 pages: fits
    with pytest.raises(ScenarioError, match=r"tasks: the guest kernel needs about 681 pages"):
        loads(_many_tasks(48, 2))


@pytest.mark.kvm
@pytest.mark.parametrize(("n", "windows"), [(46, 2), (54, 1)])
def test_the_largest_scenarios_that_validate_run(tmp_path: Path, n: int, windows: int) -> None:
    """At the edge of the budget (653 and 656 of 656 pages) the guest still boots them."""
    from faultline.scenario import loads
    from faultline.vmm.runner import run_kvm

    out = run_kvm(loads(_many_tasks(n, windows)), "mce", events_path=None, watchdog_s=60)
    assert out.vm == "completed", out.reason


@pytest.mark.kvm
def test_conform_table_through_a_pipe_is_whole(tmp_path: Path) -> None:
    p = _cli(tmp_path, "conform", str(SCENARIOS / "conf-touch-twice.toml"))
    assert p.returncode == 0, p.stderr
    table = [line for line in p.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(table) >= 5
    assert all(line[-1] in "┓┃┩│┘" for line in table)  # every row has its right border
    assert "…" not in p.stdout
    assert len(list((tmp_path / "runs").glob("conform-*/conform-*.jsonl"))) >= 2


@pytest.mark.kvm
def test_keep_says_where_the_run_directory_is(tmp_path: Path) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text(OK)
    p = _cli(tmp_path, "run", str(scen), "--backend", "kvm", "--keep", "--json")
    assert p.returncode == 0, p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("faultline: run directory kept: ")
    kept = Path(line.split(": ")[-1])
    try:
        assert (kept / "dax0").is_file()
    finally:
        for f in kept.glob("*"):
            f.unlink()
        kept.rmdir()


def test_an_event_emitted_after_close_is_in_the_file_too(tmp_path: Path) -> None:
    """A vCPU thread still tearing down after an interrupted run's log closed: the timeline
    (log.events) and the file must say the same."""
    path = tmp_path / "ev.jsonl"
    log = EventLog(path)
    log.emit("vm_stop", vm="aborted")
    log.close()
    log.emit("vmm_error", vcpu=0, error="late")
    written = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert written == [e["kind"] for e in log.events] == ["vm_stop", "vmm_error"]
