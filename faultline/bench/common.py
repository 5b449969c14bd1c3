"""What the benchmarks share: results, the C baselines' build, guest images for them, and a
KvmRun that timestamps report exits (never the hot loop itself)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultline import abi
from faultline.kvm import uapi
from faultline.memory import GuestMemory
from faultline.scenario import Scenario, file_contents
from faultline.vmm import policy as pol
from faultline.vmm.runner import KvmRun

_ioctl = fcntl.ioctl
_KVM_RUN = uapi.KVM_RUN
ROOT = Path(__file__).resolve().parents[2]
C_DIR = ROOT / "bench"
BUILD_DIR = Path(os.environ.get("FAULTLINE_BENCH_BUILD", ROOT / "build" / "bench"))
CC = os.environ.get("FAULTLINE_CC", "gcc")
C_FLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]


class BenchError(Exception):
    """A benchmark could not run (one line for the CLI)."""


@dataclass
class Result:
    name: str
    unit: str
    faultline: float | None
    baseline: float | None
    runs: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.faultline is None or not self.baseline:
            return None
        return self.faultline / self.baseline

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {"name": self.name, "unit": self.unit, "faultline": _round(self.faultline),
                "baseline": _round(self.baseline),
                "ratio": None if ratio is None else round(ratio, 3), "runs": self.runs,
                **self.extra}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def shm_dir() -> str | None:
    """tmpfs for backing files, as KvmRun uses by default (holes are caught only there)."""
    from faultline.vmm.uffd import on_tmpfs

    return "/dev/shm" if os.path.isdir("/dev/shm") and on_tmpfs("/dev/shm") else None


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=shm_dir()))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- C baselines -----------------------------------------------------------------------------
def build_c(name: str) -> Path:
    """bench/<name>.c -> BUILD_DIR/<name>-<hash>, rebuilt only when an input changed."""
    src = C_DIR / f"{name}.c"
    hdr = C_DIR / "bench.h"
    if not src.exists() or not hdr.exists():
        raise BenchError(f"C baseline sources not found: {src}")
    abi_h = abi.c_header()
    h = hashlib.sha256()
    for part in (src.read_bytes(), hdr.read_bytes(), abi_h.encode(), repr(C_FLAGS).encode(),
                 CC.encode()):
        h.update(part + b"\0")
    out = BUILD_DIR / f"{name}-{h.hexdigest()[:16]}"
    if out.exists():
        return out
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    inc = BUILD_DIR / f"include-{h.hexdigest()[:16]}"
    inc.mkdir(exist_ok=True)
    (inc / "abi_gen.h").write_text(abi_h)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [CC, *C_FLAGS, f"-I{inc}", f"-I{C_DIR}", "-o", str(tmp), str(src)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise BenchError(f"cannot run {CC}: {e}") from None
    if res.returncode != 0:
        raise BenchError(f"C baseline build failed: {' '.join(cmd)}\n{res.stderr}")
    tmp.replace(out)  # atomic: concurrent builders both end with a complete binary
    return out


def run_c(binary: Path, image_dir: Path, timeout_s: float = 300) -> dict[str, Any]:
    res = subprocess.run([str(binary), str(image_dir)], capture_output=True, text=True,
                         check=False, timeout=timeout_s)
    if res.returncode != 0:
        raise BenchError(f"{binary.name} failed ({res.returncode}): {res.stderr.strip()}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


# --- guest images for the C side -----------------------------------------------------------
class _Recorder:
    """Stands in for a Vcpu during boot.setup_vcpu: forwards, and keeps the raw state."""

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu
        self.blobs: dict[str, bytes] = {}

    def set_cpuid2(self, entries: Any) -> None:
        from faultline.kvm import uapi

        cpuid = uapi.make_cpuid2(entries) if isinstance(entries, list) else entries
        self.blobs["cpuid.bin"] = bytes(cpuid)
        self.vcpu.set_cpuid2(cpuid)

    def get_sregs(self) -> Any:
        return self.vcpu.get_sregs()

    def set_sregs(self, sregs: Any) -> None:
        self.blobs["sregs.bin"] = bytes(sregs)
        self.vcpu.set_sregs(sregs)

    def set_regs(self, regs: Any) -> None:
        self.blobs["regs.bin"] = bytes(regs)
        self.vcpu.set_regs(regs)


def write_files(sc: Scenario, run_dir: Path) -> dict[str, Path]:
    """The backing files as KvmRun creates them, with the 'start' host events applied."""
    paths = {}
    for f in sc.files:
        p = run_dir / f.path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(file_contents(f))
        paths[f.name] = p
    for ev in sc.events:
        if ev.trigger.task is not None:
            continue
        if ev.action in ("truncate", "extend") and ev.size is not None:
            os.truncate(paths[ev.file], ev.size)
        else:
            raise BenchError(f"bench scenarios only truncate at start (got {ev.action})")
    return paths


def prepare_image(sc: Scenario, out: Path, *, bench_exits: int = 0,
                  files: dict[str, Path] | None = None, uffd: bool = True) -> Path:
    """Guest RAM exactly as KvmRun prepares it (boot.write_boot), vCPU 0's regs/sregs/CPUID
    as boot.setup_vcpu sets them, MCE set-up and the windows: what bench.h's setup() reads."""
    from faultline.guest.build import kernel_path
    from faultline.kvm import Kvm
    from faultline.vmm import boot

    out.mkdir(parents=True, exist_ok=True)
    image = boot.load_kernel(kernel_path())
    with GuestMemory() as mem:
        ram = mem.add_anonymous("ram", 0, sc.ram_bytes)
        info = boot.build_boot_info(sc, bench_exits=bench_exits)
        boot.write_boot(mem.write, sc, image, boot_info=info)
        (out / "ram.bin").write_bytes(ctypes.string_at(ram.hva, sc.ram_bytes))
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            rec = _Recorder(vm.create_vcpu(0))
            boot.setup_vcpu(rec, 0, image, kvm)
        finally:
            vm.close()
        mcg_cap = pol.mcg_cap(kvm.mce_cap_supported())
    for name, blob in rec.blobs.items():
        (out / name).write_bytes(blob)
    status, _addr, misc, mcg_status = pol.mce_encoding(0, True)
    lines = [f"ram_bytes {sc.ram_bytes}", f"mcg_cap {mcg_cap}", f"uffd {int(uffd)}",
             f"mce {status} {misc} {mcg_status} {pol.MCE_BANK}"]
    for f in sorted(sc.files, key=lambda f: f.window_gpa):
        if files is None or f.name not in files:
            raise BenchError(f"no backing file for window {f.name}")
        lines.append(f"window {f.window_gpa} {f.window_bytes} 0 {files[f.name]}")
    (out / "vm.conf").write_text("\n".join(lines) + "\n")
    return out


# --- faultline side --------------------------------------------------------------------------
class MarkedRun(KvmRun):
    """The real KvmRun, its vCPU loop untouched; timestamps are taken where the loop calls
    out to a handler (a report, a fault exit, a notification, an injection), never per exit.

    ``marks``: (report kind, ns at arrival, ns after handling), in order."""

    def __init__(self, sc: Scenario, policy: str, *, bench_exits: int = 0,
                 events_path: str | Path | None = None, **kw: Any) -> None:
        kw.setdefault("watchdog_s", 60.0)
        # Always with an event log written, as `faultline run` does (its writer thread
        # shares the GIL); a temporary one unless a path is given.
        self._tmp_log: str | None = None
        if events_path is None:
            fd, self._tmp_log = tempfile.mkstemp(prefix="faultline-bench-", suffix=".jsonl",
                                                 dir=shm_dir())
            os.close(fd)
            events_path = self._tmp_log
        super().__init__(sc, policy, events_path=events_path, **kw)
        self.bench_exits = bench_exits
        self.marks: list[tuple[int, int, int]] = []
        self.t_fault: int | None = None
        self.t_notified: int | None = None
        self.t_irq: int | None = None
        self.t_mce: int | None = None

    def _setup(self) -> None:
        super()._setup()
        self._wrap_parts()
        if self.bench_exits:
            from faultline.vmm import boot

            # Same memory, same boot info, plus the benchmark option (before the first run).
            self.memory.write(abi.BOOT_INFO_GPA,
                              boot.build_boot_info(self.sc, bench_exits=self.bench_exits))

    def _wrap_parts(self) -> None:
        """Time stamps around the parts the exit loop calls (wrapped before it starts)."""
        on_report = self.exit_loop.on_report
        on_mmio, on_fault_exit = self.faults.on_mmio, self.faults.on_fault_exit
        notify, deliver = self.injector.notify, self.injector.deliver

        def timed_report(v: Any, gpa: int) -> None:
            t_in = time.perf_counter_ns()
            ram = self.ram_view
            kind = ram[gpa] | ram[gpa + 1] << 8 if ram is not None and 0 <= gpa < len(ram) - 1 \
                else 0
            on_report(v, gpa)
            self.marks.append((kind, t_in, time.perf_counter_ns()))

        def timed_mmio(v: Any, ex: Any) -> None:
            if self.t_fault is None:
                self.t_fault = time.perf_counter_ns()
            on_mmio(v, ex)

        def timed_fault_exit(v: Any, ex: Any) -> bool:
            if self.t_fault is None:
                self.t_fault = time.perf_counter_ns()
            return on_fault_exit(v, ex)

        def timed_notify(v: Any, ranges: Any, ar_gpa: int | None) -> None:
            notify(v, ranges, ar_gpa)
            if self.t_notified is None:
                self.t_notified = time.perf_counter_ns()

        def timed_deliver(v: Any, kvm_run: Any) -> None:
            had_irq, had_mce = v.pending_irq, v.mce_injected
            deliver(v, kvm_run)
            if had_irq and not v.pending_irq and self.t_irq is None:
                self.t_irq = time.perf_counter_ns()
            if not had_mce and v.mce_injected and self.t_mce is None:
                self.t_mce = time.perf_counter_ns()  # KVM_X86_SET_MCE done

        self.exit_loop.on_report = timed_report
        self.faults.on_mmio = timed_mmio  # type: ignore[method-assign]
        self.faults.on_fault_exit = timed_fault_exit  # type: ignore[method-assign]
        self.injector.notify = timed_notify  # type: ignore[method-assign]
        self.injector.deliver = timed_deliver  # type: ignore[method-assign]

    def _teardown(self) -> None:
        try:
            super()._teardown()
        finally:
            if self._tmp_log is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp_log)

    def run_checked(self) -> Any:
        outcome = self.run()
        if outcome.vm != "completed":
            raise BenchError(f"faultline run of {self.sc.name} ended {outcome.vm}: "
                             f"{outcome.reason}")
        return outcome

    def after(self, kind: int) -> int:
        """ns after the first report of `kind` was handled."""
        for k, _t_in, t_out in self.marks:
            if k == kind:
                return t_out
        raise BenchError(f"no report of kind {abi.REPORT_KINDS.get(kind, kind)} seen")

    def arrival(self, kind: int) -> int:
        for k, t_in, _t_out in self.marks:
            if k == kind:
                return t_in
        raise BenchError(f"no report of kind {abi.REPORT_KINDS.get(kind, kind)} seen")

    def next_arrival_after(self, kind: int) -> int:
        """Arrival of the first report after the first one of `kind`."""
        for i, (k, _t_in, _t_out) in enumerate(self.marks):
            if k == kind and i + 1 < len(self.marks):
                return self.marks[i + 1][1]
        raise BenchError(f"no report after {abi.REPORT_KINDS.get(kind, kind)}")
