"""Finding QEMU and building its command line for a scenario (no process is started here).

The guest-physical layout is the one our VMM builds (faultline/abi.py):

- RAM: ``-machine pc,memory-backend=ram0`` with a ``memory-backend-file`` (share=on) on a
  tmpfs file, so faultline reads the guest's reports from, and acknowledges them in, the
  same pages the guest uses.
- each DAX window: a ``memory-backend-file`` (share=on) on the scenario's file, plugged as a
  ``pc-dimm`` at the window's GPA. A pc-dimm is plain guest RAM at a chosen address in
  QEMU's device-memory region (from 4 GiB up); our guest learns its windows from the boot
  info, so nvdimm's ACPI NFIT, label area and ``-machine nvdimm=on`` would add nothing.
- boot: ``-kernel`` loads the guest ELF through its multiboot v1 header (entry.S), the boot
  info is the multiboot module (``-initrd``).
- reports: ``isa-debugcon`` at DOORBELL_PORT on a unix socket faultline listens on; QMP on
  another. Serial (COM1) goes to a file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from faultline import abi
from faultline.scenario import Scenario

QEMU_ENV = "FAULTLINE_QEMU"  # the QEMU binary (name or path)
CPU_ENV = "FAULTLINE_QEMU_CPU"  # the -cpu model
ARGS_ENV = "FAULTLINE_QEMU_ARGS"  # extra arguments, shell-quoted
DEFAULT_BINARY = "qemu-system-x86_64"
# `-cpu host` and `-cpu max` abort at start on this host ("failed to set MSR 0x10a"): its
# KVM refuses IA32_ARCH_CAPABILITIES. max without it works.
DEFAULT_CPU = "max,-arch-capabilities"
DEVICE_MEMORY_BASE = 1 << 32  # pc: device memory starts at 4 GiB (RAM here stays below)
DIMM_SLOT_ALIGN = 1 << 30  # pc reserves 1 GiB of device memory per slot (aligned DIMMs)


class QemuUnavailable(Exception):
    """No usable QEMU binary (one line for the user)."""


class QemuLayoutError(Exception):
    """The scenario's layout cannot be built with QEMU's devices."""


def find_qemu(binary: str | None = None) -> str:
    """The QEMU binary's path: `binary`, else $FAULTLINE_QEMU, else qemu-system-x86_64."""
    name = binary or os.environ.get(QEMU_ENV) or DEFAULT_BINARY
    path = shutil.which(name)
    if path is None:
        where = f"${QEMU_ENV}={name}" if binary is None and os.environ.get(QEMU_ENV) else name
        raise QemuUnavailable(f"QEMU not found: {where} (install the qemu-system-x86 package, "
                              f"or point ${QEMU_ENV} at a qemu-system-x86_64)")
    return path


def qemu_version(binary: str) -> str:
    """`X.Y.Z (package)` from `binary --version`."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuUnavailable(f"cannot run {binary} --version: {e}") from None
    m = re.search(r"version (\S+)(?: \(([^)]*)\))?", out.stdout)
    if out.returncode != 0 or m is None:
        line = (out.stderr or out.stdout).strip().splitlines()
        raise QemuUnavailable(f"{binary} --version failed: "
                              f"{line[-1] if line else f'exit status {out.returncode}'}")
    return m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")


@dataclass(frozen=True, slots=True)
class RunPaths:
    ram: Path
    boot_info: Path
    doorbell: Path
    qmp: Path
    serial: Path
    windows: tuple[Path, ...]  # one per scenario file, in order


def maxmem(sc: Scenario) -> int:
    """The smallest `maxmem` whose device-memory region holds every window's GPA range."""
    top = max((f.window_gpa + f.window_bytes for f in sc.files), default=0)
    for f in sc.files:
        if f.window_gpa < DEVICE_MEMORY_BASE:
            raise QemuLayoutError(
                f"{sc.source}: files.{f.name}.window_gpa {f.window_gpa:#x} is below 4 GiB: "
                "QEMU's pc-dimm windows live in its device-memory region, from 4 GiB up")
    # region size = maxmem - ram + one aligned GiB per slot: ask for the whole span
    need = max(top - DEVICE_MEMORY_BASE, 0)
    return sc.ram_bytes + -(-need // DIMM_SLOT_ALIGN) * DIMM_SLOT_ALIGN


def command(binary: str, sc: Scenario, kernel: Path, paths: RunPaths,
            cpu: str | None = None, extra: list[str] | None = None) -> list[str]:
    """QEMU's argv for `sc`: started paused (-S); faultline sends `cont` over QMP."""
    cpu = cpu or os.environ.get(CPU_ENV) or DEFAULT_CPU
    ram_k = sc.ram_bytes // 1024
    mem = f"{ram_k}K"
    if sc.files:
        mem += f",slots={len(sc.files)},maxmem={maxmem(sc) // 1024}K"
    argv = [
        binary, "-S", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", "kvm", "-cpu", cpu, "-smp", str(sc.vcpus),
        "-machine", "pc,memory-backend=ram0", "-m", mem,
        "-object", f"memory-backend-file,id=ram0,size={ram_k}K,mem-path={paths.ram},share=on",
    ]
    for i, (f, path) in enumerate(zip(sc.files, paths.windows, strict=True)):
        ro = ",readonly=on" if f.readonly else ""
        argv += ["-object", f"memory-backend-file,id=win{i},size={f.window_bytes // 1024}K,"
                            f"mem-path={path},share=on{ro}",
                 "-device", f"pc-dimm,id=dimm{i},memdev=win{i},addr={f.window_gpa:#x}"]
    argv += [
        "-kernel", str(kernel), "-initrd", str(paths.boot_info),
        "-chardev", f"socket,id=doorbell,path={paths.doorbell}",
        "-device", f"isa-debugcon,iobase={abi.DOORBELL_PORT:#x},chardev=doorbell",
        "-chardev", f"socket,id=qmp,path={paths.qmp}", "-mon", "chardev=qmp,mode=control",
        "-serial", f"file:{paths.serial}",
    ]
    extra = extra if extra is not None else shlex.split(os.environ.get(ARGS_ENV, ""))
    return argv + extra
