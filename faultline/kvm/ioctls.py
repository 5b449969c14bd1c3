"""KVM file descriptors, one type per level (after rust-vmm kvm-ioctls): Kvm -> Vm -> Vcpu.

Every ioctl failure is raised as KvmError(op, errno); every object owns its fd (and the
vCPU its kvm_run mmap), has close() and is a context manager.  Closing a Vm closes its
vCPUs.  Closing the Kvm object does not close VMs (a VM fd lives independently of
/dev/kvm's fd, as in the kernel).

fcntl.ioctl is used throughout because it releases the GIL during KVM_RUN.  Its integer
argument is a C int, so the few ioctls taking an unsigned long by value above 2**31
(KVM_SET_TSS_ADDR) go through libc's ioctl via ctypes instead.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

from . import uapi
from .exits import (
    Exit,
    IoIn,
    Mmio,
    complete_hypercall,
    complete_io_in,
    complete_mmio_read,
    decode_error,
    decode_ok,
)

_ioctl = fcntl.ioctl
_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int
_U64 = struct.Struct("<Q")
_KVM_RUN = uapi.KVM_RUN
_KVM_GET_SREGS = uapi.KVM_GET_SREGS
_KVM_X86_SET_MCE = uapi.KVM_X86_SET_MCE


class KvmError(OSError):
    """A KVM ioctl (or /dev/kvm open/mmap) failed: `op` names it, `errno` says why."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        msg = f"{op}: {os.strerror(errno)}" + (f" ({detail})" if detail else "")
        super().__init__(errno, msg)
        self.op = op

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.op, self.errno))


def _call(op: str, fd: int, request: int, arg: Any = 0, mutate: bool = True) -> Any:
    if fd < 0:
        raise KvmError(op, _errno.EBADF, "closed")
    try:
        if isinstance(arg, int):
            return _ioctl(fd, request, arg)
        return _ioctl(fd, request, arg, mutate)
    except OSError as e:
        raise KvmError(op, e.errno or _errno.EIO) from None


def _call_ulong(op: str, fd: int, request: int, value: int) -> int:
    if fd < 0:
        raise KvmError(op, _errno.EBADF, "closed")
    ret = _libc_ioctl(fd, request, value)
    if ret < 0:
        raise KvmError(op, ctypes.get_errno())
    return int(ret)


class _Fd:
    """fd ownership + context management shared by the three levels."""

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Kvm(_Fd):
    """/dev/kvm (system ioctls)."""

    __slots__ = ("_mmap_size",)

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open {path}", e.errno or _errno.ENODEV) from None
        super().__init__(fd)
        self._mmap_size = 0

    def api_version(self) -> int:
        return int(_call("KVM_GET_API_VERSION", self._fd, uapi.KVM_GET_API_VERSION))

    def check_extension(self, cap: int) -> int:
        return int(_call("KVM_CHECK_EXTENSION", self._fd, uapi.KVM_CHECK_EXTENSION, cap))

    def vcpu_mmap_size(self) -> int:
        if not self._mmap_size:
            self._mmap_size = int(
                _call("KVM_GET_VCPU_MMAP_SIZE", self._fd, uapi.KVM_GET_VCPU_MMAP_SIZE)
            )
        return self._mmap_size

    def supported_cpuid(self, max_entries: int = uapi.KVM_MAX_CPUID_ENTRIES) -> Any:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 with `nent` filled entries (grows the
        buffer on E2BIG)."""
        while True:
            cpuid = uapi.make_cpuid2(max_entries)
            try:
                _call("KVM_GET_SUPPORTED_CPUID", self._fd, uapi.KVM_GET_SUPPORTED_CPUID, cpuid)
            except KvmError as e:
                if e.errno == _errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise
            return uapi.make_cpuid2(list(cpuid.entries[: cpuid.nent]))

    def mce_cap_supported(self) -> int:
        out = _call(
            "KVM_X86_GET_MCE_CAP_SUPPORTED",
            self._fd,
            uapi.KVM_X86_GET_MCE_CAP_SUPPORTED,
            bytes(8),
            False,
        )
        return int(_U64.unpack(out)[0])

    def create_vm(self, machine_type: int = 0) -> Vm:
        vm_fd = int(_call("KVM_CREATE_VM", self._fd, uapi.KVM_CREATE_VM, machine_type))
        return Vm(vm_fd, self.vcpu_mmap_size())


class Vm(_Fd):
    """A VM fd.  Owns its vCPUs: close() closes them first."""

    __slots__ = ("_mmap_size", "_vcpus")

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self._mmap_size = vcpu_mmap_size
        self._vcpus: list[Vcpu] = []

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        return tuple(self._vcpus)

    def check_extension(self, cap: int) -> int:
        return int(_call("KVM_CHECK_EXTENSION", self._fd, uapi.KVM_CHECK_EXTENSION, cap))

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, hva: int, flags: int = 0
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION; size 0 deletes the memslot."""
        region = uapi.kvm_userspace_memory_region(slot, flags, gpa, size, hva)
        _call("KVM_SET_USER_MEMORY_REGION", self._fd, uapi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        _call_ulong("KVM_SET_TSS_ADDR", self._fd, uapi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _call(
            "KVM_SET_IDENTITY_MAP_ADDR",
            self._fd,
            uapi.KVM_SET_IDENTITY_MAP_ADDR,
            _U64.pack(addr),
            False,
        )

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        vcpu_fd = int(_call("KVM_CREATE_VCPU", self._fd, uapi.KVM_CREATE_VCPU, vcpu_id))
        try:
            run = mmap.mmap(
                vcpu_fd, self._mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as e:
            os.close(vcpu_fd)
            raise KvmError("mmap kvm_run", e.errno or _errno.ENOMEM) from None
        vcpu = Vcpu(vcpu_fd, run, vcpu_id, self)
        self._vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in list(self._vcpus):
            vcpu.close()
        self._vcpus.clear()
        super().close()


class Translation(NamedTuple):
    gpa: int
    valid: bool
    writeable: bool
    usermode: bool


class Vcpu(_Fd):
    """A vCPU fd plus its kvm_run mmap."""

    __slots__ = ("_run", "_vm", "id")

    def __init__(self, fd: int, run: mmap.mmap, vcpu_id: int, vm: Vm | None = None) -> None:
        super().__init__(fd)
        self._run: mmap.mmap | None = run
        self.id = vcpu_id
        self._vm = vm

    # --- the hot path ----------------------------------------------------------------------
    def run(self) -> Exit:
        """KVM_RUN, then decode kvm_run.  Never raises for a failed KVM_RUN: errors are
        exits too (MemoryFault, BareEfault, Intr, RunError)."""
        try:
            # No arg: with an explicit 0, Python 3.11's fcntl.ioctl first tries the int as a
            # buffer and builds (and drops) two exceptions per call: ~0.6 us of a ~9 us exit.
            _ioctl(self._fd, _KVM_RUN)
        except OSError as e:
            if self._run is None:
                raise KvmError("KVM_RUN", _errno.EBADF, "closed") from None
            return decode_error(self._run, e.errno or _errno.EIO)
        except (ValueError, TypeError):  # fd -1: closed
            raise KvmError("KVM_RUN", _errno.EBADF, "closed") from None
        return decode_ok(self._run)

    @property
    def kvm_run(self) -> mmap.mmap:
        """The raw kvm_run mmap (for decode_exit and the complete_* helpers)."""
        if self._run is None:
            raise KvmError("kvm_run", _errno.EBADF, "closed")
        return self._run

    @property
    def immediate_exit(self) -> bool:
        return bool(self.kvm_run[uapi.KVM_RUN_IMMEDIATE_EXIT_OFFSET])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        # A single byte store: safe from another thread while this vCPU is in KVM_RUN.
        self.kvm_run[uapi.KVM_RUN_IMMEDIATE_EXIT_OFFSET] = 1 if value else 0

    def complete_io_in(self, exit: IoIn, data: bytes) -> None:
        complete_io_in(self.kvm_run, exit, data)

    def complete_mmio_read(self, exit: Mmio, data: bytes) -> None:
        complete_mmio_read(self.kvm_run, exit, data)

    def complete_hypercall(self, ret: int) -> None:
        complete_hypercall(self.kvm_run, ret)

    # --- KVM_CAP_SYNC_REGS ------------------------------------------------------------------
    def sync_regs(self, mask: int) -> None:
        """Ask KVM to store these kvm_sync_regs parts (KVM_SYNC_X86_*) into kvm_run at every
        exit, so reading them needs no ioctl. kvm_dirty_regs stays 0: never loaded back."""
        _U64.pack_into(self.kvm_run, uapi.KVM_RUN_VALID_REGS_OFFSET, mask)

    def synced_regs(self) -> uapi.kvm_regs:
        """The GPRs KVM stored at the last exit (after sync_regs(KVM_SYNC_X86_REGS)); a copy."""
        run = self._run
        if run is None:
            raise KvmError("kvm_run", _errno.EBADF, "closed")
        return uapi.kvm_regs.from_buffer_copy(run, uapi.KVM_RUN_SYNC_REGS_OFFSET)

    # --- cold ioctls -----------------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        _call("KVM_GET_REGS", self._fd, uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        _call("KVM_SET_REGS", self._fd, uapi.KVM_SET_REGS, regs)

    def get_sregs(self, into: uapi.kvm_sregs | None = None) -> uapi.kvm_sregs:
        """`into`: a kvm_sregs to fill and return (no allocation, for the fault path)."""
        sregs = uapi.kvm_sregs() if into is None else into
        try:  # _call inlined: on the fault path (a bare -EFAULT's decode)
            _ioctl(self._fd, _KVM_GET_SREGS, sregs, True)
        except (OSError, ValueError) as e:
            raise KvmError("KVM_GET_SREGS", getattr(e, "errno", None) or _errno.EBADF) from None
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        _call("KVM_SET_SREGS", self._fd, uapi.KVM_SET_SREGS, sregs)

    def set_cpuid2(self, cpuid: Any) -> None:
        """`cpuid`: a kvm_cpuid2 from make_cpuid2()/Kvm.supported_cpuid(), or a sequence of
        kvm_cpuid_entry2."""
        if isinstance(cpuid, Sequence):
            cpuid = uapi.make_cpuid2(cpuid)
        _call("KVM_SET_CPUID2", self._fd, uapi.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; KvmError(EINVAL) names the first one KVM refused."""
        msrs = uapi.make_msrs((i, 0) for i in indices)
        n = int(_call("KVM_GET_MSRS", self._fd, uapi.KVM_GET_MSRS, msrs))
        if n < msrs.nmsrs:
            bad = msrs.entries[n].index
            raise KvmError("KVM_GET_MSRS", _errno.EINVAL, f"MSR {bad:#x} not readable")
        return {e.index: e.data for e in msrs.entries}

    def set_msrs(self, values: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """Write MSRs; KvmError(EINVAL) names the first one KVM refused."""
        pairs = values.items() if isinstance(values, Mapping) else values
        msrs = uapi.make_msrs(pairs)
        n = int(_call("KVM_SET_MSRS", self._fd, uapi.KVM_SET_MSRS, msrs))
        if n < msrs.nmsrs:
            bad = msrs.entries[n].index
            raise KvmError("KVM_SET_MSRS", _errno.EINVAL, f"MSR {bad:#x} not writable")

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: mcg_cap low byte = number of banks (<= KVM_CAP_MCE)."""
        _call("KVM_X86_SETUP_MCE", self._fd, uapi.KVM_X86_SETUP_MCE, _U64.pack(mcg_cap), False)

    def set_mce(self, mce: uapi.kvm_x86_mce) -> None:
        """KVM_X86_SET_MCE: EINVAL without MCi_STATUS.VAL or with a bad bank."""
        try:  # _call inlined: on the fault path
            _ioctl(self._fd, _KVM_X86_SET_MCE, mce, True)
        except (OSError, ValueError) as e:
            raise KvmError("KVM_X86_SET_MCE",
                           getattr(e, "errno", None) or _errno.EBADF) from None

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT (userspace irqchip only)."""
        _call("KVM_INTERRUPT", self._fd, uapi.KVM_INTERRUPT, uapi.kvm_interrupt(vector))

    def translate(self, gva: int) -> Translation:
        tr = uapi.kvm_translation(linear_address=gva)
        _call("KVM_TRANSLATE", self._fd, uapi.KVM_TRANSLATE, tr)
        return Translation(
            tr.physical_address, bool(tr.valid), bool(tr.writeable), bool(tr.usermode)
        )

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        events = uapi.kvm_vcpu_events()
        _call("KVM_GET_VCPU_EVENTS", self._fd, uapi.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        _call("KVM_SET_VCPU_EVENTS", self._fd, uapi.KVM_SET_VCPU_EVENTS, events)

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.close()
        vm, self._vm = self._vm, None
        if vm is not None and self in vm._vcpus:
            vm._vcpus.remove(self)
        super().close()
