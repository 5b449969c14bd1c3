"""Build the guest kernel: abi_gen.h from faultline.abi, then gcc + ld -> out/kernel.elf.

Skips all work when nothing changed (a hash of the sources, the generated header, the flags
and the tool versions is kept next to the ELF). Concurrent builders serialise on a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from faultline import abi

SRC_DIR = Path(__file__).resolve().parent
OUT_DIR = SRC_DIR / "out"
ELF_NAME = "kernel.elf"

CC = os.environ.get("FAULTLINE_CC", "gcc")
LD = os.environ.get("FAULTLINE_LD", "ld")
CFLAGS = [
    "-std=gnu11", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone", "-mno-sse",
    "-mno-mmx", "-mno-80387", "-mgeneral-regs-only", "-fno-stack-protector", "-nostdlib",
    "-static", "-O2", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
    "-fno-asynchronous-unwind-tables", "-fno-omit-frame-pointer", "-mcmodel=small",
    "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
]
# The user-mode interpreter (user.c) is linked into .utext/.urodata, the only kernel-image
# pages mapped user-accessible: no jump tables, nothing that would pull in kernel code.
USER_CFLAGS = ["-fno-jump-tables"]
LDFLAGS = ["-nostdlib", "-static", "-z", "max-page-size=4096", "-z", "noexecstack",
           "--no-warn-rwx-segments"]
# ABI numbers the linker script and entry.S (the multiboot path) use, as absolute symbols:
# abi_gen.h's ULL constants are C only.
LD_SYMBOLS = ("KERNEL_LOAD_GPA", "BOOT_INFO_GPA", "BOOT_INFO_MAX_BYTES")


class BuildError(Exception):
    """The guest kernel did not build; the message carries the compiler's output."""


def _sources() -> list[Path]:
    return sorted([*SRC_DIR.glob("*.c"), *SRC_DIR.glob("*.S")])


def _inputs() -> list[Path]:
    return sorted([*_sources(), *SRC_DIR.glob("*.h"), SRC_DIR / "kernel.ld"])


def _tool_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    except OSError as e:
        raise BuildError(f"cannot run {tool}: {e}") from None
    return out.stdout.splitlines()[0] if out.stdout else ""


def _digest(header: str) -> str:
    h = hashlib.sha256()
    for p in _inputs():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(header.encode())
    h.update(repr((CFLAGS, USER_CFLAGS, LDFLAGS,
                   [(n, getattr(abi, n)) for n in LD_SYMBOLS])).encode())
    h.update(_tool_version(CC).encode() + _tool_version(LD).encode())
    return h.hexdigest()


def _run(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise BuildError(f"cannot run {cmd[0]}: {e}") from None
    if res.returncode != 0:
        raise BuildError(f"guest build failed: {' '.join(cmd)}\n{res.stdout}{res.stderr}")


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build(force: bool = False, out_dir: Path | None = None) -> Path:
    """Build (if needed) and return the path of the kernel ELF."""
    out = OUT_DIR if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    elf = out / ELF_NAME
    stamp = out / "kernel.stamp"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        header = abi.c_header()
        digest = _digest(header)
        if not force and elf.exists() and stamp.exists() and stamp.read_text() == digest:
            return elf
        _write_if_changed(out / "abi_gen.h", header)
        objs = []
        for src in _sources():
            obj = out / (src.stem + ".o")
            flags = CFLAGS + (USER_CFLAGS if src.stem == "user" else [])
            _run([CC, *flags, "-I", str(out), "-I", str(SRC_DIR), "-c", str(src), "-o",
                  str(obj)])
            objs.append(str(obj))
        tmp = out / (ELF_NAME + ".tmp")
        _run([LD, *LDFLAGS, *(f"--defsym={name}={getattr(abi, name):#x}" for name in LD_SYMBOLS),
              "-T", str(SRC_DIR / "kernel.ld"), "-o", str(tmp), *objs])
        _check(tmp)
        tmp.replace(elf)
        stamp.write_text(digest)
        return elf


def _check(elf: Path) -> None:
    """The user-mode part must be self-contained: user.o may have no data or bss."""
    from elftools.elf.elffile import ELFFile

    with open(elf, "rb") as f:
        e = ELFFile(f)
        for seg in e.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            lo, hi = seg["p_paddr"], seg["p_paddr"] + seg["p_memsz"]
            if lo < abi.KERNEL_LOAD_GPA or hi > abi.KERNEL_LOAD_GPA + abi.KERNEL_MAX_BYTES:
                raise BuildError(f"kernel segment [{lo:#x}, {hi:#x}) is outside the load area")
    user_obj = elf.parent / "user.o"
    if user_obj.exists():
        with open(user_obj, "rb") as f:
            for sec in ELFFile(f).iter_sections():
                if sec.name.startswith((".data", ".bss")) and sec["sh_size"]:
                    raise BuildError(f"user.o has a {sec.name} section: the interpreter must "
                                     "not use globals (its pages are read-only to user mode)")


def kernel_path() -> Path:
    """The kernel ELF, built on demand."""
    return build()


def clean() -> None:
    shutil.rmtree(OUT_DIR, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        path = build(force="--force" in args)
    except BuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
