"""QEMU tests (marker `qemu`) need qemu-system-x86_64 and a usable /dev/kvm; where either is
missing they are skipped with the reason (`make test` installs QEMU when run as root)."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def _qemu_status() -> tuple[bool, str]:
    from faultline.qemu.run import qemu_available
    from faultline.vmm.runner import kvm_available

    ok, why = kvm_available()
    if not ok:
        return False, why
    ok, version = qemu_available()
    return (True, version) if ok else (False, f"{version}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "qemu" in item.keywords:
        ok, why = _qemu_status()
        if not ok:
            pytest.skip(why)
