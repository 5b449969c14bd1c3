"""The scenario format: what loads, what it compiles to, and every malformed case with
the one line it must produce."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from faultline import abi
from faultline.scenario import ScenarioError, load, loads

BASE = """
name = "t"
[[files]]
name = "dax0"
size = "16KiB"
[[tasks]]
name = "a"
program = ["read dax0[1] expect=@", "exit 0"]
"""


def test_shipped_scenarios_load(scenarios_dir: Path) -> None:
    names = sorted(p.name for p in scenarios_dir.glob("*.toml"))
    assert "hello.toml" in names and "dax-truncate.toml" in names
    for p in scenarios_dir.glob("*.toml"):
        sc = load(p)
        assert sc.tasks, p


def test_compile_layout_and_expectations(scenarios_dir: Path) -> None:
    sc = load(scenarios_dir / "dax-truncate.toml")
    toucher = sc.task("toucher")
    assert [i.op for i in toucher.program] == [abi.OP_READ, abi.OP_READ, abi.OP_EXIT]
    m = toucher.maps[toucher.program[1].slot]
    assert (m.ref, m.vaddr, m.gpa) == ("dax0[2]", abi.window_vaddr(0, 2), 0x1_0000_2000)
    assert toucher.program[1].imm == abi.pattern_value(0, 0x2000)
    # The per-backend expectation blocks merge: the model's upstream hang overrides faults.
    e = sc.expectation("model", "upstream", "mce")
    assert e is not None and e.vm == "hung" and e.faults == ()
    e = sc.expectation("kvm", "host", "mce")
    assert e is not None and e.vm == "completed" and e.offlined == (0x1_0000_2000,)
    assert sc.events[0].trigger.task == "toucher" and sc.events[0].trigger.step == 1


def test_anon_pages_are_per_task_and_distinct(scenarios_dir: Path) -> None:
    sc = load(scenarios_dir / "hello.toml")
    gpas = [m.gpa for t in sc.tasks for m in t.maps if m.region == "anon"]
    assert len(gpas) == len(set(gpas)) and min(gpas) == abi.ANON_POOL_GPA


def test_loop_compiles_to_label_index() -> None:
    sc = loads(BASE.replace('program = ["read dax0[1] expect=@", "exit 0"]',
                            'program = ["yield", "label top", "write anon[0] 1", '
                            '"loop 3 top", "exit 0"]'))
    loop = sc.tasks[0].program[2]
    assert (loop.op, loop.arg, loop.imm) == (abi.OP_LOOP, 1, 3)


BAD: list[tuple[str, str, str]] = [
    ("malformed TOML", "name = ", "malformed TOML"),
    ("unknown top-level key", BASE + "\nbogus = 1\n", "bogus: unknown key"),
    ("unknown task key", BASE.replace('name = "a"', 'name = "a"\ncolour = "red"'),
     "tasks[0].colour: unknown key"),
    ("bad size", BASE.replace('"16KiB"', '"sixteen"'), "files[0].size: not a size"),
    ("size overflows", BASE.replace('"16KiB"', "0x1_0000_0000_0000_0000"),
     "files[0].size: size"),
    ("task on a missing vCPU", BASE.replace('name = "a"', 'name = "a"\nvcpu = 3'),
     "tasks[0].vcpu: vCPU 3 does not exist (vm.vcpus = 1)"),
    ("window overlaps RAM", BASE.replace('size = "16KiB"', 'size = "16KiB"\nwindow_gpa = 0x1000'),
     "files[0].window_gpa: window at 0x1000 overlaps guest RAM"),
    ("windows overlap", BASE + '[[files]]\nname = "dax1"\nwindow_gpa = 0x100001000\n',
     "files[1].window_gpa: window 0x100001000+0x1000 overlaps file 'dax0'"),
    ("gpa beyond the physical address width",
     BASE.replace('size = "16KiB"', 'size = "16KiB"\nwindow_gpa = 0x4000_0000_0000'),
     "beyond the guest's 46-bit physical address space"),
    ("trigger names a missing task",
     BASE + '[[events]]\naction = "truncate"\nfile = "dax0"\nsize = 0\nafter = "ghost:1"\n',
     "events[0].after: trigger names unknown task 'ghost'"),
    ("unknown instruction", BASE.replace('"exit 0"]', '"jump 7", "exit 0"]'),
     "tasks[0].program[1]: unknown instruction 'jump'"),
    ("loop to a missing label", BASE.replace('"exit 0"]', '"loop 2 nowhere", "exit 0"]'),
     "tasks[0].program[1]: unknown label 'nowhere'"),
    ("page outside the window", BASE.replace("dax0[1]", "dax0[9]"),
     "dax0[9] is outside the 4-page window"),
    ("path leaves the run directory",
     BASE.replace('size = "16KiB"', 'size = "16KiB"\npath = "../../etc/passwd"'),
     "files[0].path: '../../etc/passwd' must be a relative path inside the run directory"),
    ("unknown policy", 'policies = ["panic"]\n' + BASE, "policies: unknown value 'panic'"),
    ("program must end", BASE.replace(', "exit 0"]', "]"),
     "the program must end with 'exit CODE'"),
    ("misaligned access", BASE.replace("dax0[1]", "dax0[1]+0x3"),
     "offset 0x3 must be < 0x1000 and 8-byte aligned"),
    ("unknown event action",
     BASE + '[[events]]\naction = "explode"\nfile = "dax0"\n',
     "events[0].action: unknown value 'explode'"),
    ("unknown profile",
     BASE + '[vm]\nprofile = "windows"\n',
     "vm.profile: unknown value 'windows' (one of: linux-qemu, faultline-vmm)"),
    ("unknown preemption model",
     BASE + '[vm]\npreempt = "rt"\n',
     "vm.preempt: unknown value 'rt'"),
    ("unknown guest CPU",
     BASE + '[vm]\ncpu = "arm"\n',
     "vm.cpu: unknown value 'arm' (one of: intel, amd)"),
    ("MCG_SER_P not a boolean",
     BASE + '[vm]\nmcg_ser_p = 1\n',
     "vm.mcg_ser_p"),
    ("affinity on a missing vCPU", BASE.replace('name = "a"', 'name = "a"\ncpus = [0, 2]'),
     "tasks[0].cpus[1]: 2 out of range (0 .. 0)"),
    ("affinity without the task's vCPU",
     BASE.replace('name = "a"', 'name = "a"\nvcpu = 1\ncpus = [0]') + "[vm]\nvcpus = 2\n",
     "tasks[0].cpus: must include the task's vcpu (1)"),
    ("affinity not an array", BASE.replace('name = "a"', 'name = "a"\ncpus = 0'),
     "tasks[0].cpus: expected an array"),
    ("unknown expectation profile",
     BASE + '[[expect]]\nprofile = "qemu"\nvm = "completed"\n',
     "expect[0].profile: unknown value 'qemu'"),
    ("unknown vm end",
     BASE + '[[expect]]\nvm = "rebooted"\n',
     "expect[0].vm: unknown value 'rebooted' (one of: completed, aborted, hung, crashed, "
     "reset, panic)"),
]


@pytest.mark.parametrize(("text", "message"), [(t, m) for _, t, m in BAD],
                         ids=[n for n, _, _ in BAD])
def test_malformed_scenarios_give_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        loads(text, source="bad.toml")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("bad.toml: ")
    assert message in line


def test_cli_bad_scenario_exit_2_one_line_and_no_event_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD[5][1])
    events = tmp_path / "events.jsonl"
    p = subprocess.run([sys.executable, "-m", "faultline.cli", "run", str(bad),
                        "--backend", "model", "--events", str(events)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "tasks[0].vcpu: vCPU 3 does not exist" in lines[0]
    assert not events.exists()  # input refused before the run: no log named after it


@pytest.mark.parametrize("vm", ["completed", "aborted", "hung", "crashed", "reset", "panic"])
def test_every_vm_end_is_an_expectation(vm: str) -> None:
    e = loads(BASE + f'[[expect]]\nvm = "{vm}"\n').expectation("model", "upstream", "mce")
    assert e is not None and e.vm == vm


def test_cli_bad_vm_expectation_exit_2_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + '[[expect]]\nvm = "rebooted"\n')
    p = subprocess.run([sys.executable, "-m", "faultline.cli", "run", str(bad),
                        "--backend", "model"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "expect[0].vm: unknown value 'rebooted'" in lines[0]


def test_expectations_select_by_profile() -> None:
    sc = loads(BASE + '[vm]\nprofile = "faultline-vmm"\npreempt = "full"\n'
               '[[expect]]\nvm = "completed"\n'
               '[[expect]]\nprofile = "linux-qemu"\nvm = "hung"\n')
    assert (sc.profile, sc.preempt) == ("faultline-vmm", "full")
    e = sc.expectation("model", "upstream", "mce", "linux-qemu")
    assert e is not None and e.vm == "hung"
    e = sc.expectation("model", "upstream", "mce", "faultline-vmm")
    assert e is not None and e.vm == "completed"
    # Without a profile, each backend's own: the kvm backend is faultline's VMM.
    e = sc.expectation("kvm", "host", "mce")
    assert e is not None and e.vm == "completed"
    e = sc.expectation("model", "upstream", "mce")
    assert e is not None and e.vm == "hung"
