"""faultline's command line.

Exit codes: 0 the outcome matches the scenario's expectation, 1 it does not, 2 bad input
(one line, no traceback), 3 an internal error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faultline.outcome import EventLog, Outcome, check
from faultline.scenario import DESIGNS, POLICIES, ScenarioError, load

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def _default_events(name: str, backend: str, design: str, policy: str) -> Path:
    root = Path(os.environ.get("FAULTLINE_RUNS", "runs"))
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{name}-{backend}-{design}-{policy}.jsonl"


def _err(msg: str) -> None:
    print(f"faultline: error: {msg}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from faultline.backends import UsageError, resolve_backend, run_scenario
    from faultline.model.simulate import ReplayError
    from faultline.vmm.runner import BackendError, Interrupted

    stem = Path(args.scenario).stem
    bad_backend: UsageError | None = None
    try:
        backend = resolve_backend(args.backend)
    except UsageError as e:
        backend, bad_backend = args.backend, e
    events_path = Path(args.events) if args.events else _default_events(
        stem, backend, args.design or ("host" if backend == "kvm" else "default"),
        args.policy or "default")
    # The log exists before anything can fail: every run leaves one, bad input included.
    log = EventLog(events_path, clock="us" if backend == "kvm" else "step")
    try:
        try:
            if bad_backend is not None:
                raise bad_backend
            sc = load(args.scenario)
            kvm_kw: dict[str, Any] = (
                {"watchdog_s": args.watchdog, "keep": args.keep} if backend == "kvm" else {})
            if args.replay:
                if backend != "model":
                    raise UsageError("--replay runs a checker trace through the model: "
                                     "add --backend model")
                kvm_kw["schedule"] = _load_replay(args.replay)
            outcome = run_scenario(sc, backend=backend, design=args.design,
                                   policy=args.policy, log=log, seed=args.seed, **kvm_kw)
        except (ScenarioError, UsageError, BackendError, ReplayError) as e:
            log.emit("error", error=str(e))
            _err(str(e))
            return EXIT_USAGE
        except Interrupted as e:
            # The outcome so far (vm aborted, reason interrupted) is in the log already.
            e.outcome.events_path = str(events_path)
            _print_outcome(e.outcome, log, args, [])
            _err("interrupted")
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            log.emit("error", error="interrupted")
            _err("interrupted")
            return EXIT_INTERRUPTED
    finally:
        log.close()
        if log.write_error:  # the run went on; its log file is incomplete
            print(f"faultline: warning: event log not fully written: {log.write_error}",
                  file=sys.stderr)
    outcome.events_path = str(events_path)
    problems = check(outcome, sc)
    _print_outcome(outcome, log, args, problems)
    if getattr(args, "trace", None):
        from faultline import trace

        trace.write(args.trace, log.events, [t.name for t in sc.tasks])
    return EXIT_MISMATCH if problems else EXIT_OK


def cmd_conform(args: argparse.Namespace) -> int:
    """Run scenarios on kvm and on the model (memory-fault-exit, APF off); exit 1 on any
    difference."""
    from faultline import conform

    try:
        scenarios = conform.load_all(args.scenarios)
    except ScenarioError as e:
        _err(str(e))
        return EXIT_USAGE
    root = Path(os.environ.get("FAULTLINE_RUNS", "runs"))
    try:
        results = conform.conform(scenarios, events_dir=root)
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    if args.json:
        print(conform.dumps(results))
    else:
        conform.render(results)
    return EXIT_MISMATCH if any(not c.ok for c in results) else EXIT_OK


def _load_replay(path: str) -> list[str]:
    """Action names from a checker counterexample (a step list, or a property/cell dict
    holding one); anything else is bad input."""
    from faultline.backends import UsageError
    from faultline.check.replay import load_trace

    try:
        steps = load_trace(Path(path))
        return [str(st["action"]) for st in steps]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a faultline trace ({e})") from None


def _print_outcome(outcome: Outcome, log: EventLog, args: argparse.Namespace,
                   problems: list[str]) -> None:
    if args.json:
        print(outcome.dumps())
    else:
        from faultline.timeline import render

        render(log.events, outcome, verbose=args.verbose)
    for p in problems:
        print(f"faultline: expectation not met: {p}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    from faultline.kvm import Kvm, KvmError, uapi

    info: dict[str, object] = {}
    try:
        with Kvm() as k:
            caps = {name: k.check_extension(getattr(uapi, name)) for name in (
                "KVM_CAP_MCE", "KVM_CAP_MEMORY_FAULT_INFO", "KVM_CAP_USER_MEMORY2",
                "KVM_CAP_GUEST_MEMFD", "KVM_CAP_READONLY_MEM", "KVM_CAP_ASYNC_PF",
                "KVM_CAP_IMMEDIATE_EXIT")
                if hasattr(uapi, name)}
            info = {"kvm": True, "api_version": k.api_version(), "caps": caps,
                    "mce_cap_supported": hex(k.mce_cap_supported())}
    except (KvmError, OSError) as e:
        info = {"kvm": False, "error": str(e)}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    hw = " vmx" in cpuinfo or " svm" in cpuinfo
    modules = Path("/proc/modules").read_text() if Path("/proc/modules").exists() else ""
    info["vendor_module"] = next((m for m in ("kvm_intel", "kvm_amd", "kvm_pvm")
                                  if m in modules), "unknown")
    info["guests_emulated"] = not hw
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, val in info.items():
            print(f"{key:<18} {val}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from faultline.backends import resolve_backend

    backend = resolve_backend("auto")
    ns = argparse.Namespace(scenario=str(SCENARIOS / "dax-truncate.toml"), backend=backend,
                            design=None if backend == "kvm" else "error-gfn", policy="mce",
                            json=False, events=args.events, seed=None, verbose=False,
                            watchdog=10.0, keep=False, replay=None)
    print(f"faultline demo: scenarios/dax-truncate.toml on {backend}"
          + (" (design error-gfn: /dev/kvm is not usable here)" if backend == "model" else "")
          + ", policy mce\n")
    return cmd_run(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faultline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a scenario on kvm or on the model")
    r.add_argument("scenario")
    r.add_argument("--backend", default="auto", help="kvm | model | auto (default)")
    r.add_argument("--design", help=f"model only: {' | '.join(DESIGNS)}")
    r.add_argument("--policy", help=f"{' | '.join(POLICIES)} (default: the scenario's first)")
    r.add_argument("--json", action="store_true", help="print the outcome as JSON")
    r.add_argument("--events", help="where to write the JSON-lines event log")
    r.add_argument("--seed", type=int, help="model: a seeded random schedule")
    r.add_argument("--watchdog", type=float, default=10.0,
                   help="kvm: seconds without progress before the run is declared hung")
    r.add_argument("--replay", metavar="TRACE.json",
                   help="model: follow a checker counterexample, then finish the run")
    r.add_argument("--keep", action="store_true",
                   help="kvm: keep the run directory (backing files) after the run")
    r.add_argument("-v", "--verbose", action="store_true", help="show every event")
    r.add_argument("--trace", metavar="FILE",
                   help="also write a Chrome/Perfetto trace (JSON trace-event format)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("conform", help="same scenarios on kvm and on the model: compare")
    c.add_argument("scenarios", nargs="*", help="scenario files (default: the whole corpus)")
    c.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    c.set_defaults(func=cmd_conform)

    i = sub.add_parser("info", help="what KVM offers on this host")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    from faultline.check.cli import add_parser as add_check_parser

    add_check_parser(sub)

    d = sub.add_parser("demo", help="the DAX-truncation scenario, end to end")
    d.add_argument("--events", help="where to write the event log")
    d.set_defaults(func=cmd_demo)

    __import__("faultline.bench.cli", fromlist=["add_parser"]).add_parser(sub)
    return p


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a run the way SIGINT does: outcome + log kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
