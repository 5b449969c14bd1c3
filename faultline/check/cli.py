"""``faultline check [SCENARIO ...] [--design D ...] [--policy P ...] [--json] [--workers N]
[--max-states N] [--timeout S] [--trace PROPERTY]``.

Exit codes: 0 the matrix was checked (failing properties are results, not errors), 2 bad
input, 3 an internal error. Incomplete cells (a bound was hit) are shown as "?".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from faultline.scenario import DESIGNS, POLICIES, ScenarioError, load

DEFAULT_SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "check-standard.toml"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help="exhaustively check the model (design x policy)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"scenario TOML files (default: {DEFAULT_SCENARIO.name})")
    p.add_argument("--design", action="append", choices=DESIGNS, help="repeatable")
    p.add_argument("--policy", action="append", choices=POLICIES, help="repeatable")
    p.add_argument("--json", action="store_true", help="print the matrix as JSON")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--max-states", type=int, default=5_000_000)
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    p.add_argument("--trace", action="append", default=[], metavar="PROPERTY",
                   help="print the counterexample of PROPERTY for every failing cell")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from faultline.check.matrix import check_matrix, render
    from faultline.check.properties import format_counterexample

    paths = [Path(s) for s in args.scenarios] or [DEFAULT_SCENARIO]
    try:
        for p in paths:
            load(p)  # bad input: one line, exit 2, before any process starts
    except (ScenarioError, OSError) as e:
        print(f"faultline: error: {e}", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print("faultline: error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        result = check_matrix([str(p) for p in paths], args.design, args.policy, args.workers,
                              max_states=args.max_states, timeout_s=args.timeout)
    except KeyboardInterrupt:
        print("faultline: error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    render(result)
    for c in result["cells"]:
        for name in args.trace:
            prop = c["properties"].get(name)
            if prop and prop["holds"] is False:
                print(f"\n{c['scenario']} {c['design']} {c['policy']}: {name} fails "
                      f"({prop.get('kind', '')}: {prop.get('note', '')})")
                print(format_counterexample(prop["counterexample"]))
    return 0
