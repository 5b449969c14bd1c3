"""faultline's guest kernel: a small x86-64 kernel (C + asm) run on /dev/kvm.

``python -m faultline.guest.build`` builds ``out/kernel.elf``; ``kernel_path()`` builds it on
demand and returns its path.
"""

from __future__ import annotations

from pathlib import Path


def kernel_path() -> Path:
    from faultline.guest.build import kernel_path as _kernel_path

    return _kernel_path()
