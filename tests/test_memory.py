"""Guest memory map: lookups, resolution causes, /proc/self/maps agreement, safe access."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultline.memory import (
    PAGE_SIZE,
    GuestAddress,
    GuestMemory,
    GuestMemoryError,
    Region,
    proc_maps_entry,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            pytest.skip(f"fallocate(PUNCH_HOLE) unsupported here: {os.strerror(err)}")
    finally:
        os.close(fd)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        yield m


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    p = tmp_path / "window.img"
    p.write_bytes(bytes(range(256)) * (4 * PAGE_SIZE // 256))  # 4 pages of data
    return p


def test_find_region_and_translation(mem: GuestMemory) -> None:
    a = mem.add_anonymous("low", 0, 0x10000)
    b = mem.add_memfd("high", 0x100000, 0x4000)
    assert mem.find_region(0) is a and mem.find_region(0xFFFF) is a
    assert mem.find_region(0x10000) is None
    assert mem.find_region(0x100000 + 0x3FFF) is b
    assert mem.find_region(0x104000) is None
    hva = mem.gpa_to_hva(0x100123)
    assert hva == b.hva + 0x123
    assert isinstance(b.gpa, GuestAddress) and repr(b.gpa) == "GuestAddress(0x100000)"
    assert mem.gpa_to_hva(0x50000) is None
    assert list(mem.memslots()) == [
        (0, 0, 0x10000, a.hva, False),
        (1, 0x100000, 0x4000, b.hva, False),
    ]


def test_overlaps_rejected(mem: GuestMemory) -> None:
    mem.add_anonymous("a", 0x10000, 0x10000)
    for gpa, size in [(0x10000, 0x1000), (0x1F000, 0x2000), (0x8000, 0x9000), (0, 0x40000)]:
        r = Region.anonymous(f"x{gpa:x}", gpa, size)
        with pytest.raises(ValueError, match="overlaps"):
            mem.add(r)
        r.close()
    mem.add_anonymous("below", 0, 0x10000)  # adjacent is fine
    mem.add_anonymous("above", 0x20000, 0x1000)
    assert [r.name for r in mem] == ["below", "a", "above"]


def test_ram_read_write_spans_regions(mem: GuestMemory) -> None:
    mem.add_anonymous("a", 0, 0x1000)
    mem.add_memfd("b", 0x1000, 0x1000)
    mem.write(0xFFE, b"wxyz")
    assert mem.read(0xFFE, 4) == b"wxyz"
    with pytest.raises(GuestMemoryError) as info:
        mem.read(0x1FFE, 4)
    assert info.value.gpa == 0x2000 and info.value.reason == "unmapped"


def test_file_window_read_write_via_pread(mem: GuestMemory, backing: Path) -> None:
    win = mem.add_file("dax", 0x200000, backing)
    assert win.size == 4 * PAGE_SIZE
    assert mem.read(0x200000 + 5, 3) == bytes([5, 6, 7])
    mem.write(0x200000 + 0x1000, b"hello")
    assert backing.read_bytes()[0x1000:0x1005] == b"hello"


def test_read_beyond_eof_raises(mem: GuestMemory, backing: Path) -> None:
    mem.add_file("dax", 0x200000, backing)
    os.truncate(backing, PAGE_SIZE + 100)
    # tail of EOF's page reads as zeros (as the mapping would)
    assert mem.read(0x200000 + PAGE_SIZE + 100, 4) == b"\0\0\0\0"
    with pytest.raises(GuestMemoryError) as info:
        mem.read(0x200000 + 2 * PAGE_SIZE, 8)
    assert info.value.gpa == 0x200000 + 2 * PAGE_SIZE and info.value.reason == "beyond-eof"
    with pytest.raises(GuestMemoryError) as info:
        mem.read(0x200000 + 2 * PAGE_SIZE - 4, 8)  # straddles into the missing page
    assert info.value.gpa == 0x200000 + 2 * PAGE_SIZE
    with pytest.raises(GuestMemoryError):
        mem.write(0x200000 + PAGE_SIZE + 98, b"abcd")  # would extend the file
    assert os.path.getsize(backing) == PAGE_SIZE + 100


def test_readonly_window(mem: GuestMemory, backing: Path) -> None:
    win = mem.add_file("ro", 0, backing, readonly=True)
    assert win.readonly and next(iter(mem.memslots()))[4] is True
    assert mem.read(1, 1) == b"\x01"
    with pytest.raises(GuestMemoryError) as info:
        mem.write(0, b"x")
    assert info.value.reason == "readonly"
    entry = proc_maps_entry(win.hva)
    assert entry is not None and entry.perms.startswith("r-")


def test_resolve_causes(mem: GuestMemory, backing: Path) -> None:
    mem.add_anonymous("ram", 0, 0x10000)
    mem.add_file("dax", 0x200000, backing, file_offset=PAGE_SIZE, size=3 * PAGE_SIZE)
    r = mem.resolve(0x200010)
    assert r.cause == "ok" and r.region == "dax" and r.path == str(backing.resolve())
    assert r.file_offset == PAGE_SIZE + 0x10 and r.file_size == 4 * PAGE_SIZE
    assert r.hva == mem.gpa_to_hva(0x200010)
    assert mem.resolve(0x100).cause == "ok"
    u = mem.resolve(0x300000)
    assert u.cause == "unmapped" and u.hva is None and u.region is None

    punch_hole(backing, 2 * PAGE_SIZE, PAGE_SIZE)  # window page 1
    assert mem.resolve(0x200000 + PAGE_SIZE + 8).cause == "hole"
    assert mem.resolve(0x200000).cause == "ok"
    assert mem.read(0x200000 + PAGE_SIZE, 4) == b"\0\0\0\0"  # a hole reads as zeros

    os.truncate(backing, 3 * PAGE_SIZE)  # window page 2 is now beyond EOF
    b = mem.resolve(0x200000 + 2 * PAGE_SIZE + 4)
    assert b.cause == "beyond-eof" and b.file_size == 3 * PAGE_SIZE
    assert b.file_offset == 3 * PAGE_SIZE + 4


def test_proc_maps_cross_check(mem: GuestMemory, backing: Path) -> None:
    mem.add_file("dax", 0x200000, backing, file_offset=PAGE_SIZE, size=2 * PAGE_SIZE)
    r = mem.resolve(0x200000 + PAGE_SIZE + 0x20)
    assert r.mapping is not None
    m = r.mapping
    assert m.start <= r.hva < m.end  # type: ignore[operator]
    assert m.path == str(backing.resolve())
    assert m.inode == os.stat(backing).st_ino
    assert m.offset + (r.hva - m.start) == r.file_offset  # type: ignore[operator]
    assert m.perms.startswith("rw") and m.perms[3] == "s"
    assert r.cross_check() == []

    ram = mem.add_memfd("guest-ram", 0, 0x4000)
    mr = mem.resolve(0x1000)
    assert mr.mapping is not None and mr.mapping.path.startswith("/memfd:guest-ram")
    assert mr.cross_check() == []
    assert ram.file_offset_of(0x1000) == 0x1000


def test_ten_thousand_regions() -> None:
    n = 10_000
    with GuestMemory() as mem:
        # added in a scrambled order: the map keeps them sorted
        for i in sorted(range(n), key=lambda i: (i * 7919) % n):
            mem.add_anonymous(f"r{i}", i * 2 * PAGE_SIZE, PAGE_SIZE)  # gaps between regions
        assert len(mem) == n
        for i in (0, 1, 4999, 9998, 9999):
            gpa = i * 2 * PAGE_SIZE + 0x10
            r = mem.find_region(gpa)
            assert r is not None and r.name == f"r{i}"
            assert mem.find_region(gpa + PAGE_SIZE) is None  # in the gap
            hva = mem.gpa_to_hva(gpa)
            assert hva == r.hva + 0x10
        starts = [int(r.gpa) for r in mem]
        assert starts == sorted(starts)


def test_close_releases_everything(backing: Path) -> None:
    fds = set(os.listdir("/proc/self/fd"))
    mem = GuestMemory()
    win = mem.add_file("dax", 0, backing)
    mem.add_memfd("ram", 0x100000, 0x1000)
    hva = win.hva
    mem.close()
    assert win.closed and len(mem) == 0
    assert set(os.listdir("/proc/self/fd")) == fds
    entry = proc_maps_entry(hva)
    assert entry is None or entry.path != str(backing.resolve())
