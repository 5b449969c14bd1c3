"""`faultline bench [exit-loop|fault|offline-range|lookup|check|all] [--json]`."""

from __future__ import annotations

import argparse
import json
import subprocess
from typing import Any

from faultline.bench.common import BenchError, Result

BENCHMARKS = ("exit-loop", "fault", "offline-range", "lookup", "check")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    b = subparsers.add_parser("bench", help="benchmarks: faultline vs C baselines")
    b.add_argument("which", nargs="?", default="all", choices=(*BENCHMARKS, "all"))
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--runs", type=int, help="alternated runs per side (default per benchmark)")
    b.add_argument("--exits", type=int, default=20_000, help="exit-loop: exits per run")
    b.add_argument("--window-mib", type=int, default=1024,
                   help="offline-range: DAX window size (the file is truncated to half)")
    b.add_argument("--workers", type=int, help="check: worker processes (default: nproc)")
    b.set_defaults(func=main)
    return b


def run_one(name: str, args: argparse.Namespace) -> Result:
    from faultline.bench import check, exit_loop, fault, lookup, offline_range

    runs = {"runs": args.runs} if args.runs else {}
    if name == "exit-loop":
        return exit_loop.run(exits=args.exits, **runs)
    if name == "fault":
        return fault.run(**runs)
    if name == "offline-range":
        return offline_range.run(window_bytes=args.window_mib << 20, **runs)
    if name == "lookup":
        return lookup.run()
    return check.run(args.workers)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def main(args: argparse.Namespace) -> int:
    names = BENCHMARKS if args.which == "all" else (args.which,)
    results: list[Result] = []
    failed = False
    for name in names:
        try:
            results.append(run_one(name, args))
        except (BenchError, OSError, subprocess.SubprocessError, RuntimeError) as e:
            failed = True
            results.append(Result(name, "", None, None, 0, {"error": str(e)}))
    out = [r.to_json() for r in results]
    if args.json:
        print(json.dumps({"benchmarks": out}, indent=2))
    else:
        print(f"{'benchmark':<14} {'unit':<10} {'faultline':>10} {'baseline':>10} "
              f"{'ratio':>7} {'runs':>5}")
        for r in out:
            print(f"{r['name']:<14} {r['unit']:<10} {_fmt(r['faultline']):>10} "
                  f"{_fmt(r['baseline']):>10} {_fmt(r['ratio']):>7} {r['runs']:>5}")
            skip = {"name", "unit", "faultline", "baseline", "ratio", "runs"}
            for k, v in r.items():
                if k not in skip and not k.endswith("_runs_us") and k != "vmm_runs_ms":
                    print(f"    {k}: {v}")
    return 1 if failed else 0
