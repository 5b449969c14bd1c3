"""faultline's command line.

Exit codes: 0 the outcome matches the scenario's expectation, 1 it does not, 2 bad input
(one line, no traceback), 3 an internal error, 130 interrupted.
"""

from __future__ import annotations

if __name__ == "__main__":
    # python -m faultline.cli: Ctrl-C handling first, then this module's imports (it is
    # imported again, as faultline.cli, whose main() runs)
    from faultline.__main__ import run_as_main

    run_as_main()

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from faultline.interrupt import handled
from faultline.outcome import EventLog, Outcome, check
from faultline.scenario import (
    DESIGNS,
    GUEST_CPUS,
    POLICIES,
    PREEMPTS,
    PROFILES,
    ScenarioError,
    load,
    read_text,
)
from faultline.vmm import DEFAULT_MAX_SECONDS, DEFAULT_MAX_STEPS

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
# A default log name keeps this much of the scenario's file name (NAME_MAX is 255).
_STEM_CHARS = 64


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage dump), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"faultline: error: {message} (see: {self.prog} --help)\n")


def add_cpu_args(p: argparse.ArgumentParser) -> None:
    """--cpu, --no-succor, --no-mcg-ser-p: the linux-qemu guest CPU's machine-check set-up
    (docs/linux-qemu.md, section 9), for run --backend model, check and conform."""
    p.add_argument("--cpu", choices=GUEST_CPUS,
                   help="model, linux-qemu: the guest CPU QEMU presents, its machine-check "
                        "encoding and broadcast (default: the scenario's [vm] cpu, else "
                        "intel)")
    p.add_argument("--no-succor", dest="succor", action="store_false", default=None,
                   help="model, linux-qemu, --cpu amd: no SUCCOR in the guest's CPUID "
                        "(QEMU <= 9.0; Linux then panics on an SRAR)")
    p.add_argument("--no-mcg-ser-p", dest="mcg_ser_p", action="store_false", default=None,
                   help="model, linux-qemu: a guest CPU without MCG_SER_P (QEMU injects no "
                        "machine check: it exits on an action-required one)")


def cpu_params(args: argparse.Namespace, profiles: Sequence[str | None]) -> dict[str, Any]:
    """The model parameters --cpu / --no-succor / --no-mcg-ser-p ask for ({} for none).
    ``profiles``: the profiles the model runs under (None: a scenario's own, else
    linux-qemu); raises UsageError (one line, exit 2) when they do not fit."""
    from faultline.backends import UsageError

    out: dict[str, Any] = {}
    if getattr(args, "cpu", None) is not None:
        out["guest_cpu"] = args.cpu
    if getattr(args, "succor", None) is False:
        if out.get("guest_cpu") != "amd":
            raise UsageError("--no-succor is for an AMD guest CPU: add --cpu amd")
        out["amd_succor"] = False
    if getattr(args, "mcg_ser_p", None) is False:
        out["mcg_ser_p"] = False
    if out and "faultline-vmm" in profiles:
        flag = "--cpu" if "guest_cpu" in out else "--no-mcg-ser-p"
        raise UsageError(f"{flag} is for the model's linux-qemu profile (faultline's VMM "
                         "injects Intel's encoding)")
    return out


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type): rejects 0, negatives, nan and inf."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return v


def _default_events(stem: str, backend: str, design: str, policy: str) -> Path:
    """A new file under runs/ (or $FAULTLINE_RUNS) named after the run and unique to it:
    two runs of one scenario at once never share a log."""
    root = Path(os.environ.get("FAULTLINE_RUNS", "runs"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the event log directory {root}: "
                          f"{e.strerror or e}") from None
    stem = re.sub(r"[^\w.-]", "_", stem)[:_STEM_CHARS] or "scenario"
    base = f"{stem}-{backend}-{design}-{policy}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        path = root / (f"{base}.jsonl" if n == 0 else f"{base}-{n}.jsonl")
        try:  # claim the name atomically; the run's EventLog then writes it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create an event log in {root}: "
                              f"{e.strerror or e}") from None
    raise OutputError(f"cannot create an event log in {root}: too many runs this second")


def _new_run_dir(prefix: str) -> Path:
    """A new directory under runs/ (or $FAULTLINE_RUNS) for one command's logs: two
    commands at once never write the same files."""
    root = Path(os.environ.get("FAULTLINE_RUNS", "runs"))
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = root / (base if n == 0 else f"{base}-{n}")
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                return path
    except OSError as e:
        raise OutputError(f"cannot create a directory in {root}: {e.strerror or e}") from None
    raise OutputError(f"cannot create a directory in {root}: too many runs this second")


class OutputError(Exception):
    """An output path that cannot be written: one line, exit 2, before the run starts."""


# Kernel pseudo filesystems (statfs f_type, include/uapi/linux/magic.h): their files are
# kernel knobs, not logs. As root, "--events /proc/sys/kernel/hostname" would rename the
# host, so nothing is ever written there.
_PSEUDO_FS = {0x9FA0: "proc", 0x62656572: "sysfs", 0x64626720: "debugfs",
              0x74726163: "tracefs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2",
              0x73636673: "securityfs", 0x62656570: "configfs", 0xCAFE4A11: "bpf",
              0xDE5E81E4: "efivarfs", 0x6165676C: "pstore"}


def _fs_type(path: str) -> int | None:
    """statfs(2)'s f_type (the first field, a long), or None when it cannot be read."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def open_output(path: str, what: str, *, regular: bool = False) -> IO[str]:
    """Open an output file for a run before the run starts, so a bad path costs nothing.
    The file is locked (flock) and only then truncated: a second run naming the same file
    is refused instead of interleaving its lines into the first run's."""
    p = Path(path)
    try:
        if p.is_dir():
            raise OutputError(f"{what} {path}: is a directory")
        if not p.parent.is_dir():
            raise OutputError(f"{what} {path}: no such directory {str(p.parent)!r}")
        if regular and p.exists() and not p.is_file():
            raise OutputError(f"{what} {path}: not a regular file")
        fs = _PSEUDO_FS.get(_fs_type(str(p if p.exists() else p.parent)) or 0)
        if fs is not None:
            raise OutputError(f"{what} {path}: on the kernel's {fs} filesystem, not for logs")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # a name too long, a read-only mount, /proc, no permission
        raise OutputError(f"{what} {path}: {e.strerror or e}") from None
    fh = os.fdopen(fd, "w", buffering=1)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise OutputError(f"{what} {path}: another faultline run is writing it") from None
        os.ftruncate(fd, 0)
    return fh


def _err(msg: str) -> None:
    print(f"faultline: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"faultline: warning: {msg}", file=sys.stderr)


def _pick_backend(args: argparse.Namespace) -> str:
    """``--backend auto`` is kvm where /dev/kvm works, except when an option only the
    model has (a --design other than host, a --profile other than faultline's own VMM,
    --seed, --replay) asks for the model."""
    from faultline.backends import UsageError, resolve_backend

    model_only = [o for o, v in (("--design", args.design not in (None, "host")),
                                 ("--design-file", getattr(args, "design_file", None)
                                  is not None),
                                 ("--profile", getattr(args, "profile", None)
                                  not in (None, "faultline-vmm")),
                                 ("--cpu", getattr(args, "cpu", None) is not None),
                                 ("--no-succor", getattr(args, "succor", None) is False),
                                 ("--no-mcg-ser-p", getattr(args, "mcg_ser_p", None)
                                  is False),
                                 ("--seed", args.seed is not None),
                                 ("--replay", args.replay is not None)) if v]
    if args.backend == "auto" and model_only:
        return "model"
    backend = resolve_backend(args.backend)
    if backend in ("kvm", "qemu") and model_only:
        raise UsageError(f"{model_only[0]} is for the model; the {backend} backend runs "
                         "this host's KVM (use --backend model)")
    return backend


def cmd_run(args: argparse.Namespace) -> int:
    """Exit 2 (bad input, one line) is decided before the run starts and leaves no event
    log; every run that starts writes one (also when it is interrupted)."""
    from faultline.backends import UsageError, run_scenario
    from faultline.model.designs import DesignError, load_design_file
    from faultline.model.simulate import ReplayError
    from faultline.qemu.run import QemuFailed
    from faultline.qmp.server import QmpSetupError
    from faultline.vmm.runner import BackendError, Interrupted

    monitor: Any = None  # the QMP monitor (--qmp), closed after the run whatever its end
    interrupted = False
    try:
        backend = _pick_backend(args)
        sc = load(args.scenario)
        policy = args.policy if args.policy is not None else sc.policies[0]
        if backend == "qemu":  # QEMU has no policy: it does what it does
            if args.policy not in (None, "qemu"):
                raise UsageError("--policy is for faultline's VMM; QEMU has none "
                                 "(faultline compare shows both)")
            policy = "qemu"
        elif policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r} (one of: {', '.join(POLICIES)})")
        design = "host" if backend in ("kvm", "qemu") else (
            args.design if args.design is not None else sc.design)
        if backend == "model" and args.design_file is not None:
            if args.design is not None:
                raise UsageError("--design and --design-file: give one of them")
            design_obj: Any = load_design_file(args.design_file)
            design = design_obj.name
        elif backend == "model" and design not in DESIGNS:
            raise UsageError(f"unknown design {design!r} (one of: {', '.join(DESIGNS)})")
        else:
            design_obj = design
        kw: dict[str, Any] = ({"watchdog_s": args.watchdog, "keep": args.keep}
                              if backend in ("kvm", "qemu") else {})
        if backend == "kvm":
            kw.update(max_steps=args.max_steps, max_seconds=args.max_seconds)
        if args.preempt is not None:
            if backend != "model":
                raise UsageError("--preempt is for the model's linux-qemu profile "
                                 "(use --backend model)")
            kw["preempt"] = args.preempt
        cpu = cpu_params(args, [args.profile or sc.profile])
        if cpu and backend != "model":
            raise UsageError("--cpu, --no-succor and --no-mcg-ser-p are for the model's "
                             "linux-qemu profile (use --backend model)")
        kw.update(cpu)
        if args.replay:
            kw["schedule"] = _load_replay(args.replay, sc.name, design, policy, args.property)
        if args.qmp_wait and not args.qmp:
            raise UsageError("--qmp-wait holds the VM for a QMP client: add --qmp PATH")
        if args.qmp:
            if backend != "kvm":
                raise UsageError("--qmp serves the kvm backend's VMM: add --backend kvm")
            from faultline.qmp.kvm import KvmMonitor

            kw["monitor"] = monitor = KvmMonitor(args.qmp, wait=args.qmp_wait)  # binds
        if args.trace and _same_file(args.trace, args.scenario):
            raise OutputError("--trace names the scenario file itself")
        trace_fh = open_output(args.trace, "--trace", regular=True) if args.trace else None
        try:
            if args.events:
                if args.trace and _same_file(args.events, args.trace):
                    raise OutputError("--events and --trace name the same file")
                if _same_file(args.events, args.scenario):
                    raise OutputError("--events names the scenario file itself")
                events_path = Path(args.events)
                events_fh = open_output(args.events, "--events")
            else:
                events_path = _default_events(Path(args.scenario).stem, backend, design,
                                              policy)
                events_fh = open_output(str(events_path), "--events")
        except OutputError:
            if trace_fh is not None:
                _discard(trace_fh, args.trace)
            raise
    except (ScenarioError, UsageError, OutputError, QmpSetupError, DesignError) as e:
        if monitor is not None:
            monitor.close()
        _err(str(e))
        return EXIT_USAGE
    log = EventLog(events_path, clock="us" if backend in ("kvm", "qemu") else "step",
                   fh=events_fh)
    try:
        try:
            outcome = run_scenario(sc, backend=backend, design=design_obj, policy=policy,
                                   log=log, seed=args.seed, profile=args.profile, **kw)
        except QemuFailed as e:  # not bad input: QEMU missing or not starting; logged
            log.emit("error", error=str(e))
            _err(str(e))
            return EXIT_USAGE
        except (UsageError, BackendError, ReplayError, DesignError) as e:
            # refused once the run had begun (e.g. poison on this host, a design file's
            # hook failing): still bad input
            log.close()
            _discard(events_fh, str(events_path))
            if trace_fh is not None:
                _discard(trace_fh, args.trace)
            _err(str(e))
            return EXIT_USAGE
        except Interrupted as e:
            # The outcome so far (vm aborted, reason interrupted) is in the log already.
            e.outcome.events_path = str(events_path)
            log.close()
            _print_outcome(e.outcome, log, args, [])
            _write_trace(trace_fh, args.trace, log, sc)
            _err("interrupted")
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            interrupted = True
            log.emit("error", error="interrupted")
            log.close()
            _write_trace(trace_fh, args.trace, log, sc)
            _err("interrupted")
            return EXIT_INTERRUPTED
    finally:
        log.close()
        if monitor is not None:  # after the log: its last events (SHUTDOWN) go out first
            monitor.close(interrupted=interrupted)
        if log.write_error:  # the run went on; its log file is incomplete
            _warn(f"event log not fully written: {log.write_error}")
    outcome.events_path = str(events_path)
    problems = check(outcome, sc)
    _print_outcome(outcome, log, args, problems)
    _after_run(sc, outcome, log, args)
    if not _write_trace(trace_fh, args.trace, log, sc):
        return EXIT_USAGE
    return EXIT_MISMATCH if problems else EXIT_OK


def _write_trace(fh: IO[str] | None, path: str, log: EventLog, sc: Any) -> bool:
    """The Perfetto trace of what the log holds (also of an interrupted run); False, with
    one line said, when it cannot be written (a full disk)."""
    if fh is None:
        return True
    from faultline import trace

    try:
        with fh:
            trace.dump(fh, log.events, [t.name for t in sc.tasks])
    except OSError as e:
        _err(f"--trace {path}: {e.strerror or e}")
        return False
    return True


def _after_run(sc: Any, outcome: Outcome, log: EventLog, args: argparse.Namespace) -> None:
    """What a person must be told once the run is over: host events whose trigger was
    never reached, a capped log, where a kept run directory is."""
    from faultline.trace import HOST_CHANGES

    fired = sum(1 for ev in log.events if ev.get("kind") in HOST_CHANGES)
    # Only a run that completed: one that aborted or hung stopped before its triggers.
    if outcome.vm == "completed" and fired < len(sc.events) \
            and not any(k in log.dropped for k in HOST_CHANGES):
        missing = ", ".join(f"events[{e.index}] after {e.trigger}" for e in sc.events
                            if e.trigger.task is not None)
        _warn(f"{len(sc.events) - fired} of {len(sc.events)} host events never fired "
              f"(their trigger was not reached; triggers: {missing or 'start'})")
    if log.dropped:
        _warn(f"event log capped: {sum(log.dropped.values())} repeated events dropped "
              f"({', '.join(f'{k}={n}' for k, n in sorted(log.dropped.items()))})")
    if getattr(args, "keep", False) and outcome.backend == "kvm":
        run_dir = next((ev.get("run_dir") for ev in log.events
                        if ev.get("kind") == "vm_create"), None)
        if run_dir:
            print(f"faultline: run directory kept: {run_dir}", file=sys.stderr)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet), or cannot be looked at
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def _discard(fh: IO[str], path: str) -> None:
    """Close an output file of a run that never ran; remove it if it is a regular file
    (a run refused as bad input leaves no file named after it)."""
    with contextlib.suppress(OSError):
        fh.close()  # (the event log may have closed it already)
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


def cmd_conform(args: argparse.Namespace) -> int:
    """Run scenarios on kvm and on the model (memory-fault-exit, APF off); exit 1 on any
    difference, 130 when interrupted (the pairs compared so far are printed)."""
    from faultline import conform
    from faultline.backends import UsageError
    from faultline.model.params import Params

    try:
        scenarios = conform.load_all(args.scenarios)
        cpu = cpu_params(args, [args.profile])
    except (ScenarioError, UsageError) as e:
        _err(str(e))
        return EXIT_USAGE
    # The guest CPU's set-up, when not the default, next to the profile in the title.
    label = Params.make(**cpu).cpu_label()
    shown = f"{args.profile}, {label}" if label else args.profile
    try:
        events_dir = _new_run_dir("conform")
    except OutputError as e:
        _err(str(e))
        return EXIT_USAGE
    run = conform.conform_interruptible(scenarios, events_dir=events_dir,
                                        progress=not args.json and sys.stderr.isatty(),
                                        profile=args.profile, params=cpu)
    if args.json:
        print(conform.dumps(run.results))
    else:
        conform.render(run.results, profile=shown)
    if run.interrupted:
        _err(f"interrupted: {len(run.results)} of {run.total} scenario x policy pairs "
             "compared")
        return EXIT_INTERRUPTED
    return EXIT_MISMATCH if any(not c.ok for c in run.results) else EXIT_OK


def _load_replay(path: str, scenario: str, design: str, policy: str,
                 prop: str | None) -> list[str]:
    """Action names from a checker counterexample: a step list, a property or cell dict
    holding one, or a whole ``check --json`` matrix (the cell is the run's scenario,
    design and policy; the property is ``--property``, or the cell's only failing one)."""
    from faultline.backends import UsageError
    from faultline.check.replay import load_trace

    def bad(why: str) -> UsageError:
        return UsageError(f"--replay {path}: {why}")

    try:
        data: Any = json.loads(read_text(Path(path), path))
    except ValueError as e:
        raise bad(f"not JSON ({e})") from None
    except ScenarioError as e:
        raise bad(e.message) from None
    if isinstance(data, dict) and isinstance(data.get("cells"), list):
        cells = [c for c in data["cells"] if isinstance(c, dict)
                 and (c.get("scenario"), c.get("design"), c.get("policy"))
                 == (scenario, design, policy)]
        if not cells:
            raise bad(f"no cell for scenario {scenario}, design {design}, policy {policy} "
                      "(choose them with --design and --policy)")
        data = cells[0]
    if isinstance(data, dict) and isinstance(data.get("properties"), dict):
        props = data["properties"]
        failing = [n for n, p in props.items()
                   if isinstance(p, dict) and p.get("counterexample")]
        if prop is None:
            if len(failing) != 1:
                raise bad(f"say which counterexample with --property (failing: "
                          f"{', '.join(failing) or 'none'})")
            prop = failing[0]
        if prop not in failing:
            raise bad(f"property {prop!r} has no counterexample in this cell (failing: "
                      f"{', '.join(failing) or 'none'})")
        data = props[prop]
    if not isinstance(data, (list, dict)):
        raise bad("not a faultline trace (expected a list of steps)")
    try:
        return [str(st["action"]) for st in load_trace(data)]
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"not a faultline trace ({e})") from None


def _print_outcome(outcome: Outcome, log: EventLog, args: argparse.Namespace,
                   problems: list[str]) -> None:
    if args.json:
        print(outcome.dumps())
    else:
        from faultline.timeline import render

        render(log.events, outcome, verbose=args.verbose)
    for p in problems:
        print(f"faultline: expectation not met: {p}", file=sys.stderr)


VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")


def vendor_module(sys_module: Path = Path("/sys/module")) -> str:
    """Which vendor module provides /dev/kvm: /sys/module lists built-in modules too,
    where /proc/modules lists only loadable ones."""
    for m in VENDOR_MODULES:
        if (sys_module / m).is_dir():
            return m
    return "none found"


def cmd_compare(args: argparse.Namespace) -> int:
    """The scenario on QEMU and on faultline's VMM per policy: one table."""
    from faultline import compare
    from faultline.vmm.runner import Interrupted

    try:
        sc = load(args.scenario)
        events_dir = _new_run_dir("compare")
    except (ScenarioError, OutputError) as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        rows = compare.compare(sc, events_dir=events_dir, watchdog_s=args.watchdog)
    except (KeyboardInterrupt, Interrupted):
        _err("interrupted")
        return EXIT_INTERRUPTED
    if args.json:
        print(compare.dumps(sc, rows))
    else:
        compare.render(sc, rows)
    for r in rows:
        if r.error:
            _err(f"{r.vmm} [{r.policy}]: {r.error}")
    return EXIT_USAGE if any(r.error for r in rows) else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from faultline.kvm import Kvm, KvmError, uapi

    info: dict[str, Any] = {}
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
    info["vendor_module"] = vendor_module()
    info["guests_emulated"] = not (" vmx" in cpuinfo or " svm" in cpuinfo)
    from faultline.qemu.run import qemu_available

    ok, qemu = qemu_available()
    info["qemu"] = qemu if ok else f"unavailable: {qemu}"
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    for key, val in info.items():
        if isinstance(val, dict):  # one line per capability, not a Python dict
            print(key)
            for k2, v2 in val.items():
                print(f"  {k2:<28} {v2}")
        else:
            print(f"{key:<18} {val}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from faultline.backends import resolve_backend

    backend = resolve_backend("auto")
    # Through the parser, so the demo gets every option `run` has, with its defaults.
    argv = ["run", str(SCENARIOS / "dax-truncate.toml"), "--backend", backend, "--policy", "mce"]
    if backend == "model":
        argv += ["--design", "error-gfn"]
    if args.events:
        argv += ["--events", str(args.events)]
    ns = build_parser().parse_args(argv)
    print(f"faultline demo: scenarios/dax-truncate.toml on {backend}"
          + (" (design error-gfn: /dev/kvm is not usable here)" if backend == "model" else "")
          + ", policy mce\n")
    return cmd_run(ns)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="faultline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a scenario on kvm or on the model",
                       description="Run one scenario and print its timeline and outcome. "
                       "Exit 0: the outcome matches the scenario's [[expect]]; 1: it does "
                       "not; 2: bad input (nothing ran, no event log); 130: interrupted.")
    r.add_argument("scenario", help="a scenario TOML file (docs/scenarios.md)")
    r.add_argument("--backend", default="auto",
                   help="kvm | model | qemu | auto (default: kvm where /dev/kvm works, the "
                        "model when --design, --seed or --replay ask for it)")
    r.add_argument("--design", help=f"model only: {' | '.join(DESIGNS)} (default: the "
                                    "scenario's)")
    r.add_argument("--design-file", metavar="PATH.py",
                   help="model only: the design defined in this Python file (docs/designs.md)")
    r.add_argument("--policy", help=f"{' | '.join(POLICIES)} (default: the scenario's first)")
    r.add_argument("--json", action="store_true",
                   help="print the outcome as JSON instead of the timeline")
    r.add_argument("--events", metavar="FILE",
                   help="write the JSON-lines event log here (default: a new file under "
                        "runs/ or $FAULTLINE_RUNS, named after scenario, backend, design, "
                        "policy and time)")
    r.add_argument("--seed", type=int,
                   help="model only: a seeded random schedule instead of round-robin")
    r.add_argument("--profile", choices=PROFILES,
                   help="model only: linux-qemu (Linux under QEMU) or faultline-vmm (this "
                        "VMM and guest, what the kvm backend is); default: the scenario's "
                        "[vm] profile, else linux-qemu (docs/linux-qemu.md)")
    r.add_argument("--preempt", choices=PREEMPTS,
                   help="model, linux-qemu: the guest's preemption model (default: the "
                        "scenario's [vm] preempt, else voluntary)")
    add_cpu_args(r)
    r.add_argument("--watchdog", type=positive_float, default=10.0, metavar="SECONDS",
                   help="kvm, qemu: seconds without progress before the run is declared hung "
                        "(default 10)")
    r.add_argument("--max-steps", type=positive_int, default=DEFAULT_MAX_STEPS, metavar="N",
                   help="kvm: the run's budget of guest steps (every task's together); past "
                        f"it the run ends as hung (default {DEFAULT_MAX_STEPS})")
    r.add_argument("--max-seconds", type=positive_float, default=DEFAULT_MAX_SECONDS,
                   metavar="SECONDS",
                   help="kvm: the run's wall-time budget; past it the run ends as hung "
                        f"(default {DEFAULT_MAX_SECONDS:g})")
    r.add_argument("--replay", metavar="TRACE.json",
                   help="model: follow a checker counterexample (a trace, or the whole "
                        "check --json output), then finish the run")
    r.add_argument("--property", metavar="NAME",
                   help="with --replay of a check result: whose counterexample (default: "
                        "the cell's only failing property)")
    r.add_argument("--keep", action="store_true",
                   help="kvm: keep the run directory with the backing files (its path is "
                        "printed on stderr)")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="show every event, also boot, memslots and serial output")
    r.add_argument("--trace", metavar="FILE",
                   help="also write a Chrome/Perfetto trace of the run (JSON trace-event "
                        "format)")
    r.add_argument("--qmp", metavar="PATH",
                   help="kvm: serve QMP (QEMU's monitor protocol) on this Unix socket")
    r.add_argument("--qmp-wait", action="store_true",
                   help="kvm: hold the VM until a QMP client sends 'cont' (QEMU's -S)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("conform", help="same scenarios on kvm and on the model: compare",
                       description="Run each scenario on kvm and on the model "
                       "(memory-fault-exit, APF off) and compare the outcomes field by "
                       "field. Exit 1 on any difference, 130 when interrupted.")
    c.add_argument("scenarios", nargs="*", help="scenario files (default: the whole corpus)")
    c.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    c.add_argument("--profile", choices=PROFILES, default="faultline-vmm",
                   help="the model's profile (default faultline-vmm: what the kvm backend "
                        "is; linux-qemu shows where Linux + QEMU would differ)")
    add_cpu_args(c)
    c.set_defaults(func=cmd_conform)

    cq = sub.add_parser("compare", help="the scenario on QEMU and on faultline's VMM per "
                                        "policy: one table",
                        description="Run the scenario under QEMU (docs/qemu.md) and on "
                        "faultline's VMM under each policy it lists; print vm state, each "
                        "task's fate and exits in one table. Exit 2 when a row could not run, "
                        "130 when interrupted.")
    cq.add_argument("scenario", help="a scenario TOML file (docs/scenarios.md)")
    cq.add_argument("--json", action="store_true", help="print the rows as JSON")
    cq.add_argument("--watchdog", type=positive_float, default=10.0, metavar="SECONDS",
                    help="seconds without progress before a run is declared hung (default 10)")
    cq.set_defaults(func=cmd_compare)

    i = sub.add_parser("info", help="what KVM offers on this host",
                       description="KVM availability, API version, capabilities, MCE "
                       "capabilities, vendor module, whether guests are emulated.")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)

    from faultline.check.cli import add_parser as add_check_parser

    add_check_parser(sub)

    d = sub.add_parser("demo", help="the DAX-truncation scenario, end to end",
                       description="scenarios/dax-truncate.toml with policy mce: on kvm "
                       "where /dev/kvm works, else on the model (design error-gfn).")
    d.add_argument("--events", metavar="FILE", help="where to write the event log")
    d.set_defaults(func=cmd_demo)

    __import__("faultline.bench.cli", fromlist=["add_parser"]).add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with handled():
            args = build_parser().parse_args(argv)
            return int(args.func(args))
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (| head): nothing more to say, and nothing to flush at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK

