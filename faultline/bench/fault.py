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
from typing import NamedTuple

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


class _Sample(NamedTuple):
    total_us: float  # R_TASK_START handled -> R_MCE arrives
    vmm_us: float  # fault exit seen -> KVM_X86_SET_MCE done
    exit_us: float  # fault exit seen -> R_MCE arrives (no guest time before the access)
    source: str


def _faultline() -> _Sample:
    r = MarkedRun(loads(SCENARIO, source="<bench fault>"), "mce")
    outcome = r.run_checked()
    if not outcome.faults or r.t_fault is None or r.t_mce is None:
        raise BenchError("faultline saw no memory fault")
    mce = r.arrival(abi.R_MCE)
    return _Sample((mce - r.after(abi.R_TASK_START)) / 1000, (r.t_mce - r.t_fault) / 1000,
                   (mce - r.t_fault) / 1000, outcome.faults[0].source)


def _c_image(work: Path, i: int) -> Path:
    sc = loads(SCENARIO, source="<bench fault>")
    d = work / f"c{i}"
    return prepare_image(sc, d / "img", files=write_files(sc, d))


def _c(binary: Path, image: Path) -> _Sample:
    out = run_c(binary, image)
    return _Sample(int(out["fault_to_mce_ns"]) / 1000, int(out["vmm_ns"]) / 1000,
                   int(out["exit_to_mce_ns"]) / 1000, str(out["source"]))


def run(runs: int = 11) -> Result:
    """`runs` alternated pairs after one discarded warm-up pair (faultline's first run in a
    process also imports and builds what later runs reuse; it is reported, not counted)."""
    binary = build_c("fault")
    samples: dict[str, list[_Sample]] = {"faultline": [], "baseline": []}
    warmup: dict[str, float] = {}
    with scratch("faultline-bench-") as work:
        # The C side's images are made first: building one between two faultline runs
        # (8 MiB of RAM image, a VM to record the vCPU state) disturbs the next one.
        images = [_c_image(work, i) for i in range(runs + 1)]
        for i in range(runs + 1):
            order = ["baseline", "faultline"] if i % 2 == 0 else ["faultline", "baseline"]
            for side in order:
                s = _c(binary, images[i]) if side == "baseline" else _faultline()
                if i == 0:
                    warmup[side] = round(s.total_us, 1)
                else:
                    samples[side].append(s)
    fl, c = samples["faultline"], samples["baseline"]
    fl_us, c_us = median([s.total_us for s in fl]), median([s.total_us for s in c])
    return Result("fault", "us", fl_us, c_us, runs, {
        "faultline_us": round(fl_us, 1), "baseline_us": round(c_us, 1),
        "faultline_vmm_us": round(median([s.vmm_us for s in fl]), 1),
        "baseline_vmm_us": round(median([s.vmm_us for s in c]), 1),
        # fastest run against fastest run: what is left when the host's noise is taken out
        # of both sides (the target is judged on the medians)
        "min_ratio": round(min(s.total_us for s in fl) / min(s.total_us for s in c), 3),
        # the same, timed from the fault exit's arrival: no guest time before the access
        "exit_to_mce_ratio": round(median([s.exit_us for s in fl])
                                   / median([s.exit_us for s in c]), 3),
        "exit_faultline": sorted({s.source for s in fl}),
        "exit_baseline": sorted({s.source for s in c}),
        "faultline_runs_us": [round(s.total_us, 1) for s in fl],
        "baseline_runs_us": [round(s.total_us, 1) for s in c],
        "warmup_us": warmup, "target_ratio": 1.3})
