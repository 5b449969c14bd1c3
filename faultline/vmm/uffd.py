"""userfaultfd over the DAX windows, so that a *hole* fails like a truncated page.

A punched hole inside EOF is not an error to the host: the next fault maps a fresh zero
page, and the guest would read zeros nobody wrote (fabricated data). Registering a
shmem-backed window with userfaultfd in MISSING mode and ``UFFD_FEATURE_SIGBUS`` turns
every fault on a page that is not in the page cache into VM_FAULT_SIGBUS — including
KVM's gup — so a hole reaches the VMM the same way as a page beyond EOF (on this host an
MMIO exit, on hardware KVM an -EFAULT). No fault thread is needed: nothing ever waits.

No PyPI package wraps userfaultfd, and this needs two ioctls: plain ctypes.
MISSING mode works on anonymous, shmem and hugetlbfs mappings only, so the run directory
must be on tmpfs (/dev/shm) for holes to be caught; elsewhere :func:`register` says why
not and the run carries on without hole detection.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os

from faultline.kvm.uapi import _IO, _IOWR

SYS_userfaultfd = 323  # x86-64
UFFD_API = 0xAA
UFFDIO = 0xAA
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_SIGBUS = 1 << 7
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
TMPFS_MAGIC = 0x01021994


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


UFFDIO_API = _IOWR(UFFDIO, 0x3F, uffdio_api)
UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, uffdio_register)
USERFAULTFD_IOC_NEW = _IO(UFFDIO, 0x00)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UffdUnavailable(Exception):
    """Hole detection cannot be set up here (and why)."""


def on_tmpfs(path: str) -> bool:
    class statfs_t(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]

    buf = statfs_t()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return int(buf.f_type) & 0xFFFF_FFFF == TMPFS_MAGIC


class SigbusOnMissing:
    """One userfaultfd; every registered range raises SIGBUS on a missing page."""

    def __init__(self) -> None:
        fd = _libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            fd = self._from_dev(err)
        self.fd = int(fd)
        api = uffdio_api(UFFD_API, UFFD_FEATURE_SIGBUS | UFFD_FEATURE_MISSING_SHMEM, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_API, api)
        except OSError as e:
            os.close(self.fd)
            raise UffdUnavailable(f"UFFDIO_API: {os.strerror(e.errno or 0)}") from None

    @staticmethod
    def _from_dev(err: int) -> int:
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            raise UffdUnavailable(f"userfaultfd: {os.strerror(err)}") from None
        try:
            return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise UffdUnavailable(f"USERFAULTFD_IOC_NEW: {os.strerror(e.errno or 0)}") from None
        finally:
            os.close(dev)

    def register(self, hva: int, length: int) -> None:
        reg = uffdio_register(uffdio_range(hva, length), UFFDIO_REGISTER_MODE_MISSING, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, reg)
        except OSError as e:
            if e.errno == _errno.EINVAL:
                raise UffdUnavailable("UFFDIO_REGISTER: this mapping is not shmem "
                                      "(put the run directory on tmpfs)") from None
            raise UffdUnavailable(f"UFFDIO_REGISTER: {os.strerror(e.errno or 0)}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SigbusOnMissing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
