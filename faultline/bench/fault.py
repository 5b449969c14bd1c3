"""fault: from the guest's load from a truncated DAX page to its #MC handler running (the
R_MCE report exit), with the mce policy: faultline's detection, resolution, policy and
injection vs a C program doing detection, a minimal resolution (region lookup + fstat) and
KVM_X86_SET_MCE with the same encoding.

Both sides time from the end of handling the task's R_TASK_START report (its next
instruction is the load) to the arrival of the R_MCE report, so the guest's own work
(interpreter, #MC delivery and handler) is in both. The exit the fault arrives as (a bare
-EFAULT or an MMIO exit, depending on the host) is reported per side.
"""

from __future__ import annotations

from pathlib import Path

from faultline import abi
from faultline.bench.common import (
    BenchError,
    MarkedRun,
    Result,
    build_c,
    median,
    prepare_image,
    run_c,
    scratch,
    write_files,
)
from faultline.scenario import loads

SCENARIO = """
name = "bench-fault"
policies = ["mce"]
[vm]
vcpus = 1
[[files]]
name = "dax0"
size = "16KiB"
pattern = "offset"
[[tasks]]
name = "toucher"
program = ["read dax0[2]", "exit 0"]
[[events]]
action = "truncate"
file = "dax0"
size = "8KiB"
"""


def _faultline() -> tuple[float, str]:
    r = MarkedRun(loads(SCENARIO, source="<bench fault>"), "mce")
    outcome = r.run_checked()
    if not outcome.faults:
        raise BenchError("faultline saw no memory fault")
    return (r.arrival(abi.R_MCE) - r.after(abi.R_TASK_START)) / 1000, outcome.faults[0].source


def _c(binary: Path, work: Path, i: int) -> tuple[float, str]:
    sc = loads(SCENARIO, source="<bench fault>")
    d = work / f"c{i}"
    img = prepare_image(sc, d / "img", files=write_files(sc, d))
    out = run_c(binary, img)
    return int(out["fault_to_mce_ns"]) / 1000, str(out["source"])


def run(runs: int = 7) -> Result:
    binary = build_c("fault")
    fl_us: list[float] = []
    c_us: list[float] = []
    sources: dict[str, set[str]] = {"faultline": set(), "baseline": set()}
    with scratch("faultline-bench-") as work:
        for i in range(runs):
            order = ["c", "fl"] if i % 2 == 0 else ["fl", "c"]
            for side in order:
                if side == "c":
                    us, src = _c(binary, work, i)
                    c_us.append(us)
                    sources["baseline"].add(src)
                else:
                    us, src = _faultline()
                    fl_us.append(us)
                    sources["faultline"].add(src)
    fl, c = median(fl_us), median(c_us)
    return Result("fault", "us", fl, c, runs, {
        "faultline_us": round(fl, 1), "baseline_us": round(c, 1),
        "exit_faultline": sorted(sources["faultline"]),
        "exit_baseline": sorted(sources["baseline"]),
        "faultline_runs_us": [round(x, 1) for x in fl_us],
        "baseline_runs_us": [round(x, 1) for x in c_us], "target_ratio": 1.3})
