"""exit-loop: the per-exit cost of faultline's vCPU loop (the real ExitLoop.loop) vs a
C KVM_RUN loop, on the same guest image.

With BOOT_OPT_BENCH_EXITS the guest's vCPU 0 does N `outl`s to BENCH_PORT right after its
R_BOOT report (and boot banner). Both sides time the interval from the end of handling R_BOOT
to the arrival of the next report, once with N exits and once with 0; per exit =
(I(N) - I(0)) / N, so what else lies between the markers (the banner's serial exits, guest
code) cancels out.
"""

from __future__ import annotations

from pathlib import Path

from faultline import abi
from faultline.bench.common import MarkedRun, Result, build_c, median, prepare_image, run_c, scratch
from faultline.scenario import loads

SCENARIO = """
name = "bench-exit-loop"
policies = ["mce"]
[vm]
vcpus = 1
[[tasks]]
name = "t"
program = ["exit 0"]
"""


def _faultline_interval_ns(n: int) -> int:
    r = MarkedRun(loads(SCENARIO, source="<bench exit-loop>"), "mce", bench_exits=n)
    outcome = r.run_checked()
    if outcome.exits.get("io", 0) < n:
        raise RuntimeError(f"faultline saw {outcome.exits.get('io')} io exits, expected >= {n}")
    return r.next_arrival_after(abi.R_BOOT) - r.after(abi.R_BOOT)


def _c_interval_ns(binary: Path, image: Path) -> int:
    return int(run_c(binary, image)["interval_ns"])


def run(exits: int = 20_000, runs: int = 5) -> Result:
    binary = build_c("exit_loop")
    sc = loads(SCENARIO, source="<bench exit-loop>")
    fl_us: list[float] = []
    c_us: list[float] = []
    with scratch("faultline-bench-") as d:
        img0 = prepare_image(sc, d / "img0", bench_exits=0)
        img_n = prepare_image(sc, d / "imgN", bench_exits=exits)
        for i in range(runs):
            # Alternate which side goes first, so drift affects both alike.
            order = ["c", "fl"] if i % 2 == 0 else ["fl", "c"]
            for side in order:
                if side == "c":
                    a, b = _c_interval_ns(binary, img_n), _c_interval_ns(binary, img0)
                    c_us.append((a - b) / exits / 1000)
                else:
                    a, b = _faultline_interval_ns(exits), _faultline_interval_ns(0)
                    fl_us.append((a - b) / exits / 1000)
    fl, c = median(fl_us), median(c_us)
    extra = {"exits": exits, "min_ratio": round(min(fl_us) / min(c_us), 3),
             "faultline_runs_us": [round(x, 3) for x in fl_us],
             "baseline_runs_us": [round(x, 3) for x in c_us], "target_ratio": 1.15}
    return Result("exit-loop", "us/exit", fl, c, runs, extra)
