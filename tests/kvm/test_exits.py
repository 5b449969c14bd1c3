"""The exit decoder on synthetic kvm_run buffers (paths this host's KVM cannot produce)."""

from __future__ import annotations

import ctypes
import errno
import pickle

import pytest

from faultline.kvm import (
    EHWPOISON,
    BareEfault,
    FailEntry,
    GuestException,
    Hlt,
    Hypercall,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    IrqWindowOpen,
    MemoryFault,
    Mmio,
    RunError,
    Shutdown,
    SystemEvent,
    Unknown,
    complete_hypercall,
    complete_io_in,
    complete_mmio_read,
    decode_exit,
    uapi,
)

MMAP_SIZE = 3 * 4096
PIO_OFFSET = 4096


def make_run(reason: int) -> tuple[bytearray, uapi.kvm_run]:
    buf = bytearray(MMAP_SIZE)
    run = uapi.kvm_run.from_buffer(buf)
    run.exit_reason = reason
    return buf, run


def test_io_out() -> None:
    buf, run = make_run(uapi.KVM_EXIT_IO)
    run.io.direction, run.io.size, run.io.port = uapi.KVM_EXIT_IO_OUT, 2, 0x3F8
    run.io.count, run.io.data_offset = 3, PIO_OFFSET
    buf[PIO_OFFSET : PIO_OFFSET + 6] = b"abcdef"
    e = decode_exit(buf, 0, 0)
    assert e == IoOut(0x3F8, 2, 3, PIO_OFFSET, b"abcdef")
    assert isinstance(e.data, bytes)
    match e:
        case IoOut(port, size, count, _, data):
            assert (port, size, count, data) == (0x3F8, 2, 3, b"abcdef")
        case _:
            pytest.fail("no match")


def test_io_out_from_memoryview_gives_bytes() -> None:
    buf, run = make_run(uapi.KVM_EXIT_IO)
    run.io.direction, run.io.size, run.io.port = 1, 1, 0x80
    run.io.count, run.io.data_offset = 1, PIO_OFFSET
    buf[PIO_OFFSET] = 7
    e = decode_exit(memoryview(buf), 0, 0)
    assert e == IoOut(port=0x80, size=1, count=1, data_offset=PIO_OFFSET, data=b"\x07")
    assert type(e.data) is bytes


def test_io_in_and_completion() -> None:
    buf, run = make_run(uapi.KVM_EXIT_IO)
    run.io.direction, run.io.size, run.io.port = uapi.KVM_EXIT_IO_IN, 4, 0x510
    run.io.count, run.io.data_offset = 1, PIO_OFFSET
    e = decode_exit(buf, 0, 0)
    assert e == IoIn(0x510, 4, 1, PIO_OFFSET)
    assert isinstance(e, IoIn)
    complete_io_in(buf, e, b"\x01\x02\x03\x04")
    assert buf[PIO_OFFSET : PIO_OFFSET + 4] == b"\x01\x02\x03\x04"
    with pytest.raises(ValueError):
        complete_io_in(buf, e, b"\x01")


@pytest.mark.parametrize("is_write", [False, True])
def test_mmio(is_write: bool) -> None:
    buf, run = make_run(uapi.KVM_EXIT_MMIO)
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEE0_0030, 4, int(is_write)
    run.mmio.data[:4] = [1, 2, 3, 4]
    e = decode_exit(buf, 0, 0)
    assert e == Mmio(0xFEE0_0030, b"\x01\x02\x03\x04", 4, is_write)
    if not is_write:
        assert isinstance(e, Mmio)
        complete_mmio_read(buf, e, b"\xaa\xbb\xcc\xdd")
        assert bytes(run.mmio.data[:4]) == b"\xaa\xbb\xcc\xdd"
    else:
        with pytest.raises(ValueError):
            complete_mmio_read(buf, e, b"\0\0\0\0")  # type: ignore[arg-type]


def test_simple_exits() -> None:
    for reason, cls in [
        (uapi.KVM_EXIT_HLT, Hlt),
        (uapi.KVM_EXIT_SHUTDOWN, Shutdown),
        (uapi.KVM_EXIT_INTR, Intr),
        (uapi.KVM_EXIT_IRQ_WINDOW_OPEN, IrqWindowOpen),
    ]:
        buf, _ = make_run(reason)
        e = decode_exit(buf, 0, 0)
        assert type(e) is cls and e == cls() and bool(e)
    assert Hlt() != Shutdown()


def test_fail_entry() -> None:
    buf, run = make_run(uapi.KVM_EXIT_FAIL_ENTRY)
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x80000021, 3
    assert decode_exit(buf, 0, 0) == FailEntry(0x80000021, 3)


def test_internal_error() -> None:
    buf, run = make_run(uapi.KVM_EXIT_INTERNAL_ERROR)
    run.internal.suberror, run.internal.ndata = uapi.KVM_INTERNAL_ERROR_EMULATION, 3
    run.internal.data[0:3] = [0x11, 0x22, 0x33]
    assert decode_exit(buf, 0, 0) == InternalError(1, (0x11, 0x22, 0x33))
    run.internal.ndata = 99  # clamp to the 16 slots that exist
    assert len(decode_exit(buf, 0, 0).data) == 16  # type: ignore[attr-defined]


def test_system_event() -> None:
    buf, run = make_run(uapi.KVM_EXIT_SYSTEM_EVENT)
    run.system_event.type, run.system_event.ndata = uapi.KVM_SYSTEM_EVENT_RESET, 1
    run.system_event.data[0] = 5
    assert decode_exit(buf, 0, 0) == SystemEvent(uapi.KVM_SYSTEM_EVENT_RESET, (5,))


def test_exception_and_hypercall() -> None:
    buf, run = make_run(uapi.KVM_EXIT_EXCEPTION)
    run.ex.exception, run.ex.error_code = 14, 6
    assert decode_exit(buf, 0, 0) == GuestException(14, 6)
    buf, run = make_run(uapi.KVM_EXIT_HYPERCALL)
    run.hypercall.nr = 9
    run.hypercall.args[:] = [1, 2, 3, 4, 5, 6]
    run.hypercall.longmode = 1
    assert decode_exit(buf, 0, 0) == Hypercall(9, (1, 2, 3, 4, 5, 6), 1)
    complete_hypercall(buf, 0x1234)
    assert run.hypercall.ret == 0x1234


def test_unknown() -> None:
    buf, _ = make_run(uapi.KVM_EXIT_X86_BUS_LOCK)
    assert decode_exit(buf, 0, 0) == Unknown(uapi.KVM_EXIT_X86_BUS_LOCK)
    buf, _ = make_run(uapi.KVM_EXIT_MEMORY_FAULT)  # reason 39 with ret 0: not a fault
    assert decode_exit(buf, 0, 0) == Unknown(39)


@pytest.mark.parametrize("err", [errno.EFAULT, EHWPOISON])
def test_memory_fault(err: int) -> None:
    buf, run = make_run(uapi.KVM_EXIT_MEMORY_FAULT)
    run.memory_fault.flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
    run.memory_fault.gpa, run.memory_fault.size = 0x1_2345_6000, 4096
    e = decode_exit(buf, -1, err)
    assert e == MemoryFault(0x1_2345_6000, 4096, uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, err)
    assert EHWPOISON == 133


@pytest.mark.parametrize("err", [errno.EFAULT, EHWPOISON])
def test_bare_efault_ignores_stale_mmio_reason(err: int) -> None:
    buf, run = make_run(uapi.KVM_EXIT_MMIO)  # stale from the previous exit
    run.mmio.phys_addr, run.mmio.len = 0xD000_0000, 8
    e = decode_exit(buf, -1, err)
    assert e == BareEfault(err)
    assert not isinstance(e, Mmio)


def test_eintr_and_other_errors() -> None:
    buf, _ = make_run(uapi.KVM_EXIT_MEMORY_FAULT)
    assert decode_exit(buf, -1, errno.EINTR) == Intr()
    assert decode_exit(buf, -1, errno.EAGAIN) == RunError(errno.EAGAIN)  # reason not trusted
    assert decode_exit(buf, -1, errno.ENOEXEC) == RunError(errno.ENOEXEC)


def test_exits_are_immutable_values() -> None:
    e = MemoryFault(0x1000, 4096, 0, errno.EFAULT)
    with pytest.raises(AttributeError):
        e.gpa = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        e.extra = 1  # type: ignore[attr-defined]
    assert "gpa=0x1000" in repr(e)
    assert e._asdict() == {"gpa": 0x1000, "size": 4096, "flags": 0, "errno": errno.EFAULT}
    assert hash(e) == hash(MemoryFault(0x1000, 4096, 0, errno.EFAULT))
    assert BareEfault(errno.EFAULT) != RunError(errno.EFAULT)  # same fields, other kind
    assert pickle.loads(pickle.dumps(e)) == e
    with pytest.raises(TypeError):
        MemoryFault(1, 2)


def test_kvm_run_struct_agrees_with_decoder_offsets() -> None:
    assert uapi.kvm_run.exit_reason.offset == 8
    assert uapi.kvm_run.u.offset == 32
    assert ctypes.sizeof(uapi.kvm_run) <= MMAP_SIZE
