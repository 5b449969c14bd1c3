"""``faultline check [SCENARIO ...] [--design D ...] [--policy P ...] [--profile P ...]
[--cpu intel|amd] [--no-succor] [--no-mcg-ser-p] [--json] [--workers N] [--max-states N]
[--timeout S] [--counterexample PROPERTY]``.

With no scenario: the standard configurations (CONFIGURATIONS: the seed's race, a
kernel-mode access, a guest without PV APF, poison racing an async PF, a task that may
be woken on another vCPU, a hole punched and refilled), one matrix each.

Exit codes: 0 the matrix was checked (failing properties are results, not errors), 2 bad
input, 3 an internal error, 130 interrupted (the cells finished so far are printed).
A cell where a bound was hit is "incomplete", never "ok".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from faultline.scenario import DESIGNS, POLICIES, PROFILES, ScenarioError, load

_SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
DEFAULT_SCENARIO = _SCENARIOS / "check-standard.toml"
# The standard configurations (docs/checker.md), in the order they are printed.
CONFIGURATIONS = (DEFAULT_SCENARIO, _SCENARIOS / "check-kernel.toml",
                  _SCENARIOS / "check-nopv.toml", _SCENARIOS / "model" / "check-poison.toml",
                  _SCENARIOS / "check-migrate.toml", _SCENARIOS / "check-hole.toml")


class _Several(argparse.Action):
    """``--design upstream request`` and ``--design upstream,request`` and a repeated
    ``--design``: all the same. A value that is a scenario file (the option swallowed it)
    goes back to the scenarios."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        chosen = list(getattr(namespace, self.dest) or [])
        extra = list(getattr(namespace, "more_scenarios", None) or [])
        what = self.dest
        names = {"design": DESIGNS, "policy": POLICIES, "profile": PROFILES}[what]
        for v in values:
            for item in str(v).split(","):
                if item in names:
                    chosen.append(item)
                elif item.endswith(".toml") or Path(item).is_file():
                    extra.append(item)
                else:
                    parser.error(f"unknown {what} {item!r} (one of: {', '.join(names)})")
        setattr(namespace, self.dest, chosen)
        namespace.more_scenarios = extra


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from faultline.cli import add_cpu_args, positive_float, positive_int

    p = subparsers.add_parser(
        "check", help="exhaustively check the model (design x policy)",
        description="Explore every schedule of the model for each design x policy cell and "
        "print the properties that fail. Exit 0 when the matrix was checked, 2 for bad "
        "input, 130 when interrupted. A cell where a bound (--max-states, --timeout) was "
        "hit is shown as incomplete.")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="scenario TOML files (default: the standard configurations, "
                        + ", ".join(c.stem for c in CONFIGURATIONS) + ")")
    p.add_argument("--design", nargs="+", action=_Several, metavar="DESIGN",
                   help=f"one or more of: {', '.join(DESIGNS)} "
                                         "(default: all)")
    p.add_argument("--design-file", action="append", default=[], metavar="PATH.py",
                   help="also check the design defined in this Python file (repeatable; "
                        "docs/designs.md); alone, it replaces the default designs")
    p.add_argument("--policy", nargs="+", action=_Several, metavar="POLICY",
                   help=f"one or more of: {', '.join(POLICIES)} "
                                          "(default: all)")
    p.add_argument("--profile", nargs="+", action=_Several, metavar="PROFILE",
                   help=f"one or more of: {', '.join(PROFILES)} (docs/linux-qemu.md; "
                        "default: a scenario's own [vm] profile, else linux-qemu)")
    add_cpu_args(p)
    p.add_argument("--json", action="store_true",
                   help="print the matrix as JSON (run --replay takes this file)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes (default: all CPUs)")
    p.add_argument("--max-states", type=positive_int, default=5_000_000, metavar="N",
                   help="stop exploring a cell after N states (default 5000000)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop exploring a cell after this long (default: no limit)")
    p.add_argument("--counterexample", action="append", default=[], metavar="PROPERTY",
                   help="print the shortest counterexample of PROPERTY in every cell where "
                        "it fails (repeatable)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from faultline.check.matrix import check_matrix, render
    from faultline.check.properties import format_counterexample
    from faultline.model.designs import DesignError, load_design_file
    from faultline.model.properties import PROPERTIES as DECLARED

    properties = [p.name for p in DECLARED]  # the model declares them

    paths = [Path(s) for s in [*args.scenarios, *(getattr(args, "more_scenarios", None) or [])]]
    paths = paths or list(CONFIGURATIONS)
    unknown = [n for n in args.counterexample if n not in properties]
    if unknown:
        print(f"faultline: error: --counterexample: unknown property {unknown[0]!r} "
              f"(one of: {', '.join(properties)})", file=sys.stderr)
        return 2
    try:
        for p in paths:
            load(p)  # bad input: one line, exit 2, before any process starts
        for f in args.design_file:
            load_design_file(f)  # the same for a design file that cannot be used
    except (ScenarioError, DesignError) as e:
        print(f"faultline: error: {e}", file=sys.stderr)
        return 2
    designs = [*(args.design or []), *args.design_file] if args.design_file else args.design
    from faultline.backends import UsageError
    from faultline.cli import cpu_params

    try:
        # (cells of a scenario pinned to faultline-vmm run without them: check_cell)
        cpu = cpu_params(args, args.profile or [None])
    except UsageError as e:
        print(f"faultline: error: {e}", file=sys.stderr)
        return 2
    try:
        result = check_matrix([str(p) for p in paths], designs, args.policy,
                              args.workers, max_states=args.max_states,
                              timeout_s=args.timeout,
                              progress=not args.json and sys.stderr.isatty(),
                              profiles=args.profile, params=cpu or None)
    except DesignError as e:  # a design file's hook failed in a cell: the user's input
        print(f"faultline: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a cell failed in its worker: a bug, said in one line
        print(f"faultline: internal error: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        render(result)
        for c in result["cells"]:
            for name in args.counterexample:
                prop = c["properties"].get(name)
                if prop and prop["holds"] is False:
                    print(f"\n{c['scenario']} ({c['profile']}) {c['design']} {c['policy']}: "
                          f"{name} fails "
                          f"({prop.get('kind', '')}: {prop.get('note', '')})")
                    print(format_counterexample(prop["counterexample"]))
    if result.get("interrupted"):
        print(f"faultline: error: interrupted: {len(result['cells'])} of "
              f"{result['cells_total']} cells checked", file=sys.stderr)
        return 130
    return 0
