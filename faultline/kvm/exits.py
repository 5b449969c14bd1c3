"""The one KVM exit decoder: kvm_run (+ KVM_RUN's return value and errno) -> a typed exit.

This runs once per guest exit, so it reads kvm_run with precompiled struct.Struct objects
(no ctypes attribute access) and builds exits as tuple subclasses via tuple.__new__ (the
cheapest immutable object CPython can make).  Offsets are checked against the ctypes layout
in uapi.py at import time.

Trust rules (Documentation/virt/kvm/api.rst):
- KVM_RUN == 0: exit_reason is valid.
- KVM_RUN == -1, errno EFAULT/EHWPOISON and exit_reason == KVM_EXIT_MEMORY_FAULT: the
  memory_fault member is valid -> MemoryFault.
- KVM_RUN == -1 otherwise: exit_reason is stale and never decoded (BareEfault, Intr,
  RunError).
"""

from __future__ import annotations

import errno as _errno
import struct
from operator import itemgetter
from typing import Any, ClassVar

from . import uapi

EHWPOISON = getattr(_errno, "EHWPOISON", 133)
EFAULT = _errno.EFAULT
EINTR = _errno.EINTR

_U = uapi.KVM_RUN_EXIT_UNION_OFFSET
_REASON = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_HEAD = struct.Struct("<I20x" + _IO.format[1:])  # exit_reason at 8, then the io header at _U
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_MEMORY_FAULT = struct.Struct("<QQQ")  # flags, gpa, size
_FAIL_ENTRY = struct.Struct("<QI")
_INTERNAL_HDR = struct.Struct("<II")
_SYSTEM_EVENT_HDR = struct.Struct("<II")
_U64X16 = struct.Struct("<16Q")
_HYPERCALL = struct.Struct("<Q6QQI")
_EX = struct.Struct("<II")
_HW = struct.Struct("<Q")

assert uapi.KVM_RUN_EXIT_REASON_OFFSET == 8 and _U == 8 + 4 + 20
assert uapi.kvm_run_io.data_offset.offset == 8
assert uapi.kvm_run_mmio.len.offset == 16 and uapi.kvm_run_mmio.is_write.offset == 20
assert uapi.kvm_run_internal.data.offset == 8
assert uapi.kvm_run_system_event.data.offset == 8
assert uapi.kvm_run_hypercall.longmode.offset == 64

MMIO_DATA_OFFSET = _U + uapi.kvm_run_mmio.data.offset


def _field(index: int, doc: str) -> Any:
    return property(itemgetter(index), doc=doc)


class Exit(tuple):
    """Base of every decoded exit: immutable, slotted, compares by type and fields."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Exit:
        # Convenience constructor (tests, model); the decoder uses tuple.__new__ directly.
        if kwargs:
            args = args + tuple(kwargs.pop(f) for f in cls._fields[len(args) :] if f in kwargs)
            if kwargs:
                raise TypeError(f"{cls.__name__}: unexpected fields {sorted(kwargs)}")
        if len(args) != len(cls._fields):
            raise TypeError(f"{cls.__name__} takes fields {cls._fields}, got {len(args)}")
        return tuple.__new__(cls, args)

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickle/copy through __new__(*fields)
        return tuple(self)

    def __bool__(self) -> bool:  # an exit with no fields must still be truthy
        return True

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, other)  # type: ignore[arg-type]

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self)))

    def __repr__(self) -> str:
        parts = []
        for name, value in zip(self._fields, self, strict=True):
            text = hex(value) if isinstance(value, int) and name in _HEX_FIELDS else repr(value)
            parts.append(f"{name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(self._fields, self, strict=True))

    @property
    def kind(self) -> str:
        return type(self).__name__


_HEX_FIELDS = frozenset({"phys_addr", "gpa", "port", "flags", "reason", "status"})


class IoIn(Exit):
    """KVM_EXIT_IO, direction in: complete with complete_io_in() before re-entering."""

    __slots__ = ()
    _fields = ("port", "size", "count", "data_offset")
    __match_args__ = _fields
    port: int = _field(0, "I/O port")
    size: int = _field(1, "bytes per element")
    count: int = _field(2, "elements (rep ins)")  # type: ignore[assignment]  # kvm_run.io.count
    data_offset: int = _field(3, "offset of the data area from the start of kvm_run")


class IoOut(Exit):
    """KVM_EXIT_IO, direction out; `data` is a copy of size*count bytes."""

    __slots__ = ()
    _fields = ("port", "size", "count", "data_offset", "data")
    __match_args__ = _fields
    port: int = _field(0, "I/O port")
    size: int = _field(1, "bytes per element")
    count: int = _field(2, "elements (rep outs)")  # type: ignore[assignment]  # shadows tuple.count
    data_offset: int = _field(3, "offset of the data area from the start of kvm_run")
    data: bytes = _field(4, "the bytes written by the guest")


class Mmio(Exit):
    """KVM_EXIT_MMIO; for a read, `data` is whatever the buffer held (meaningless)."""

    __slots__ = ()
    _fields = ("phys_addr", "data", "len", "is_write")
    __match_args__ = _fields
    phys_addr: int = _field(0, "guest physical address")
    data: bytes = _field(1, "len bytes (written data for a write)")
    len: int = _field(2, "access size in bytes")
    is_write: bool = _field(3, "True for a store")


class Hlt(Exit):
    __slots__ = ()


class Shutdown(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault (or #MC with MCG_STATUS.MCIP already set)."""

    __slots__ = ()


class IrqWindowOpen(Exit):
    __slots__ = ()


class Intr(Exit):
    """KVM_RUN -1/EINTR (signal or immediate_exit) or KVM_EXIT_INTR."""

    __slots__ = ()


class FailEntry(Exit):
    __slots__ = ()
    _fields = ("reason", "cpu")
    __match_args__ = _fields
    reason: int = _field(0, "hardware_entry_failure_reason")
    cpu: int = _field(1, "host cpu")


class InternalError(Exit):
    __slots__ = ()
    _fields = ("suberror", "data")
    __match_args__ = _fields
    suberror: int = _field(0, "KVM_INTERNAL_ERROR_*")
    data: tuple[int, ...] = _field(1, "ndata u64 words (ndata clamped to 16)")


class SystemEvent(Exit):
    __slots__ = ()
    _fields = ("type", "data")
    __match_args__ = _fields
    type: int = _field(0, "KVM_SYSTEM_EVENT_*")
    data: tuple[int, ...] = _field(1, "ndata u64 words (data[0] aliases flags)")


class GuestException(Exit):
    """KVM_EXIT_EXCEPTION."""

    __slots__ = ()
    _fields = ("exception", "error_code")
    __match_args__ = _fields
    exception: int = _field(0, "vector")
    error_code: int = _field(1, "error code")


class Hypercall(Exit):
    """KVM_EXIT_HYPERCALL; `ret` is written back by complete_hypercall()."""

    __slots__ = ()
    _fields = ("nr", "args", "longmode")
    __match_args__ = _fields
    nr: int = _field(0, "hypercall number")
    args: tuple[int, ...] = _field(1, "six arguments")
    longmode: int = _field(2, "longmode (newer kernels: flags)")


class MemoryFault(Exit):
    """KVM_RUN -1 with EFAULT/EHWPOISON *and* exit_reason KVM_EXIT_MEMORY_FAULT."""

    __slots__ = ()
    _fields = ("gpa", "size", "flags", "errno")
    __match_args__ = _fields
    gpa: int = _field(0, "guest physical address")
    size: int = _field(1, "bytes")
    flags: int = _field(2, "KVM_MEMORY_EXIT_FLAG_*")
    errno: int = _field(3, "EFAULT or EHWPOISON")


class BareEfault(Exit):
    """KVM_RUN -1 with EFAULT/EHWPOISON and no memory_fault annotation (no GPA given)."""

    __slots__ = ()
    _fields = ("errno",)
    __match_args__ = _fields
    errno: int = _field(0, "EFAULT or EHWPOISON")


class RunError(Exit):
    """KVM_RUN -1 with any other errno."""

    __slots__ = ()
    _fields = ("errno",)
    __match_args__ = _fields
    errno: int = _field(0, "errno")


class Unknown(Exit):
    __slots__ = ()
    _fields = ("reason",)
    __match_args__ = _fields
    reason: int = _field(0, "exit_reason")


_new = tuple.__new__
HLT = _new(Hlt, ())
SHUTDOWN = _new(Shutdown, ())
INTR = _new(Intr, ())
IRQ_WINDOW_OPEN = _new(IrqWindowOpen, ())

_KVM_EXIT_IO = uapi.KVM_EXIT_IO
_KVM_EXIT_MMIO = uapi.KVM_EXIT_MMIO
_KVM_EXIT_HLT = uapi.KVM_EXIT_HLT
_KVM_EXIT_MEMORY_FAULT = uapi.KVM_EXIT_MEMORY_FAULT


def decode_ok(run: Any) -> Exit:
    """Decode kvm_run after KVM_RUN returned 0 (exit_reason valid).  Hot path: the reason
    and the io header come in one unpack (port I/O is the common exit)."""
    reason, direction, size, port, count, data_offset = _HEAD.unpack_from(run, 8)
    if reason == _KVM_EXIT_IO:
        if direction:
            data = run[data_offset : data_offset + size * count]  # bytes from an mmap
            if type(data) is not bytes:  # a memoryview or bytearray given to decode_exit
                data = bytes(data)
            return _new(IoOut, (port, size, count, data_offset, data))
        return _new(IoIn, (port, size, count, data_offset))
    if reason == _KVM_EXIT_MMIO:
        phys_addr, data, length, is_write = _MMIO.unpack_from(run, _U)
        length = min(length, 8)
        return _new(Mmio, (phys_addr, data[:length], length, bool(is_write)))
    if reason == _KVM_EXIT_HLT:
        return HLT
    return _decode_cold(run, reason)


def _decode_cold(run: Any, reason: int) -> Exit:
    if reason == uapi.KVM_EXIT_INTR:
        return INTR
    if reason == uapi.KVM_EXIT_SHUTDOWN:
        return SHUTDOWN
    if reason == uapi.KVM_EXIT_IRQ_WINDOW_OPEN:
        return IRQ_WINDOW_OPEN
    if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = _INTERNAL_HDR.unpack_from(run, _U)
        words = _U64X16.unpack_from(run, _U + 8)
        return _new(InternalError, (suberror, words[: min(ndata, 16)]))
    if reason == uapi.KVM_EXIT_FAIL_ENTRY:
        return _new(FailEntry, _FAIL_ENTRY.unpack_from(run, _U))
    if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
        type_, ndata = _SYSTEM_EVENT_HDR.unpack_from(run, _U)
        words = _U64X16.unpack_from(run, _U + 8)
        return _new(SystemEvent, (type_, words[: min(ndata, 16)]))
    if reason == uapi.KVM_EXIT_EXCEPTION:
        return _new(GuestException, _EX.unpack_from(run, _U))
    if reason == uapi.KVM_EXIT_HYPERCALL:
        nr, *rest = _HYPERCALL.unpack_from(run, _U)
        return _new(Hypercall, (nr, tuple(rest[:6]), rest[7]))
    return _new(Unknown, (reason,))


def decode_error(run: Any, errno: int) -> Exit:
    """Decode after KVM_RUN returned -1 with `errno`; exit_reason is trusted only for the
    memory_fault annotation."""
    if errno == EINTR:
        return INTR
    if errno == EFAULT or errno == EHWPOISON:
        if _REASON.unpack_from(run, 8)[0] == _KVM_EXIT_MEMORY_FAULT:
            flags, gpa, size = _MEMORY_FAULT.unpack_from(run, _U)
            return _new(MemoryFault, (gpa, size, flags, errno))
        return _new(BareEfault, (errno,))
    return _new(RunError, (errno,))


def decode_exit(run: Any, ret: int, errno: int = 0) -> Exit:
    """Decode kvm_run (mmap, memoryview, bytes, bytearray) given KVM_RUN's `ret`/`errno`."""
    if ret < 0:
        return decode_error(run, errno)
    return decode_ok(run)


def complete_io_in(run: Any, exit: IoIn, data: bytes) -> None:
    """Write the value(s) an IN reads into kvm_run's data area (size*count bytes)."""
    n = exit.size * exit.count
    if len(data) != n:
        raise ValueError(f"IN port {exit.port:#x} needs {n} bytes, got {len(data)}")
    run[exit.data_offset : exit.data_offset + n] = data


def complete_mmio_read(run: Any, exit: Mmio, data: bytes) -> None:
    """Write the value an MMIO load returns into kvm_run.mmio.data."""
    if exit.is_write:
        raise ValueError("complete_mmio_read on an MMIO write")
    if len(data) != exit.len:
        raise ValueError(f"MMIO read of {exit.len} bytes, got {len(data)}")
    run[MMIO_DATA_OFFSET : MMIO_DATA_OFFSET + exit.len] = data


def complete_hypercall(run: Any, ret: int) -> None:
    """Write kvm_run.hypercall.ret."""
    off = _U + uapi.kvm_run_hypercall.ret.offset
    run[off : off + 8] = struct.pack("<Q", ret & 0xFFFF_FFFF_FFFF_FFFF)
