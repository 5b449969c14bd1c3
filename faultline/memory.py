"""Guest memory map (after rust-vmm vm-memory): regions, GPA <-> HVA, GPA -> file/offset.

Region kinds:
- "anon":  MAP_SHARED|MAP_ANONYMOUS RAM.
- "memfd": RAM backed by a memfd (sealed against shrink/grow, so it cannot be truncated).
- "file":  a "DAX window": a host file mapped MAP_SHARED (possibly read-only), which the
           host may truncate or punch while the guest has it mapped.

Mappings are made with libc mmap via ctypes rather than Python's mmap module: it yields the
host virtual address (hva) for KVM_SET_USER_MEMORY_REGION for every protection (ctypes'
from_buffer refuses PROT_READ mmaps), and no buffer export pins the mapping at close().

Safety: RAM that cannot shrink (anon, sealed memfd) is accessed directly at its hva; file
windows are only ever reached with os.pread/os.pwrite after a size check, because touching a
truncated MAP_SHARED page from Python raises SIGBUS, which the interpreter cannot survive.

Lookups (find_region) bisect a sorted start list: O(log n) for any region count.
"""

from __future__ import annotations

import bisect
import ctypes
import errno as _errno
import mmap
import os
from collections.abc import Iterator
from types import TracebackType
from typing import Literal, NamedTuple, Self

from faultline.abi import PAGE_SIZE
from faultline.pages import PageRanges

__all__ = ["PAGE_SIZE", "GuestMemory", "GuestMemoryError", "PageRanges", "Region", "Resolution"]


_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
F_ADD_SEALS = getattr(__import__("fcntl"), "F_ADD_SEALS", 1033)
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004

RegionKind = Literal["anon", "memfd", "file"]
Cause = Literal["ok", "beyond-eof", "hole", "unmapped"]


class GuestMemoryError(Exception):
    """An access to guest memory that cannot be done safely; carries the gpa."""

    def __init__(self, gpa: int, reason: str, detail: str = "") -> None:
        super().__init__(f"gpa {gpa:#x}: {reason}" + (f" ({detail})" if detail else ""))
        self.gpa = gpa
        self.reason = reason


class GuestAddress(int):
    """A guest physical address (an int that prints in hex)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"


def _page_align_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def _libc_mmap(size: int, prot: int, flags: int, fd: int, offset: int) -> int:
    addr = _mmap(None, size, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(addr)


class Region:
    """One contiguous guest-physical range backed by one host mapping."""

    __slots__ = (
        "_closed",
        "_direct",
        "_maps",
        "fd",
        "file_offset",
        "gpa",
        "hva",
        "inode",
        "kind",
        "name",
        "path",
        "readonly",
        "size",
    )

    def __init__(
        self,
        name: str,
        kind: RegionKind,
        gpa: int,
        size: int,
        *,
        fd: int = -1,
        path: str | None = None,
        file_offset: int = 0,
        readonly: bool = False,
        direct: bool = False,
    ) -> None:
        if gpa % PAGE_SIZE or size <= 0 or size % PAGE_SIZE or file_offset % PAGE_SIZE:
            raise ValueError(f"region {name!r}: gpa/size/file_offset must be page-aligned")
        self.name = name
        self.kind: RegionKind = kind
        self.gpa = GuestAddress(gpa)
        self.size = size
        self.fd = fd
        self.path = path
        self.file_offset = file_offset
        self.readonly = readonly
        self._direct = direct
        self._closed = False
        self._maps: MapsEntry | None = None
        self.inode: int | None = os.fstat(fd).st_ino if fd >= 0 else None
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        if kind == "anon":
            flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        else:
            flags = mmap.MAP_SHARED
        try:
            self.hva = _libc_mmap(size, prot, flags, fd, file_offset)
        except OSError:
            if fd >= 0:
                os.close(fd)
            self._closed = True
            raise

    # --- constructors --------------------------------------------------------------------
    @classmethod
    def anonymous(cls, name: str, gpa: int, size: int) -> Region:
        return cls(name, "anon", gpa, size, direct=True)

    @classmethod
    def memfd(cls, name: str, gpa: int, size: int, *, seal: bool = True) -> Region:
        """memfd RAM; sealed (the default) it cannot shrink, so direct access is safe."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
        try:
            os.ftruncate(fd, size)
            if seal:
                import fcntl

                fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        except OSError:
            os.close(fd)
            raise
        return cls(name, "memfd", gpa, size, fd=fd, path=f"/memfd:{name}", direct=seal)

    @classmethod
    def file(
        cls,
        name: str,
        gpa: int,
        path: str | os.PathLike[str],
        *,
        file_offset: int = 0,
        size: int | None = None,
        readonly: bool = False,
    ) -> Region:
        """A DAX window: `size` bytes of `path` from `file_offset` (default: the rest of the
        file, rounded up to a page).  The window may extend beyond EOF."""
        path = os.fspath(path)
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            if size is None:
                size = _page_align_up(max(os.fstat(fd).st_size - file_offset, PAGE_SIZE))
        except OSError:
            os.close(fd)
            raise
        return cls(
            name, "file", gpa, size, fd=fd, path=os.path.realpath(path),
            file_offset=file_offset, readonly=readonly,
        )  # fmt: skip

    # --- geometry ------------------------------------------------------------------------
    @property
    def end(self) -> int:
        """One past the last gpa."""
        return self.gpa + self.size

    @property
    def closed(self) -> bool:
        return self._closed

    def maps_entry(self, hva: int) -> MapsEntry | None:
        """This region's line of /proc/self/maps. Read once (a full read costs ~0.1-0.2 ms,
        and grows with the process's mappings); after that each call re-verifies it with one
        readlink of /proc/self/map_files/<start>-<end> (the kernel's view of what is mapped
        there now) and re-reads the maps only if that no longer names the same file."""
        m = self._maps
        if m is not None and m.start <= hva < m.end:
            try:
                now = os.readlink(f"/proc/self/map_files/{m.start:x}-{m.end:x}")
            except OSError:
                now = None
            if now is not None and now == m.path:
                return m
        m = proc_maps_entry(hva)
        self._maps = m
        return m

    def file_offset_of(self, gpa: int) -> int | None:
        """Offset in the backing file of `gpa` (None for anonymous RAM)."""
        if self.kind == "anon":
            return None
        return self.file_offset + (gpa - self.gpa)

    def file_size(self) -> int | None:
        """Current size of the backing file (fstat now)."""
        if self.fd < 0:
            return None
        return os.fstat(self.fd).st_size

    # --- access --------------------------------------------------------------------------
    def _read(self, gpa: int, n: int) -> bytes:
        off = gpa - self.gpa
        if self._direct:
            return ctypes.string_at(self.hva + off, n)
        foff = self.file_offset + off
        size = os.fstat(self.fd).st_size
        # Bytes past EOF inside EOF's page read as zeros through the mapping; further pages
        # would SIGBUS the guest's access, so they are an error here.
        if foff + n > _page_align_up(size):
            bad = self.gpa + max(off, _page_align_up(size) - self.file_offset)
            raise GuestMemoryError(bad, "beyond-eof", f"{self.path} size {size}")
        data = os.pread(self.fd, n, foff)
        return data + bytes(n - len(data))

    def _write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = gpa - self.gpa
        if self.readonly:
            raise GuestMemoryError(gpa, "readonly", self.name)
        if self._direct:
            ctypes.memmove(self.hva + off, bytes(data), len(data))
            return
        foff = self.file_offset + off
        size = os.fstat(self.fd).st_size
        if foff + len(data) > size:  # pwrite would extend the file: the mapping never does
            bad = self.gpa + max(off, size - self.file_offset)
            raise GuestMemoryError(bad, "beyond-eof", f"{self.path} size {size}")
        written = os.pwrite(self.fd, data, foff)
        if written != len(data):
            raise GuestMemoryError(gpa + written, "short-write", self.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _munmap(self.hva, self.size)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"Region({self.name!r}, {self.kind}, gpa={int(self.gpa):#x}, size={self.size:#x}, "
            f"hva={self.hva:#x}{', path=' + repr(self.path) if self.path else ''})"
        )


class MapsEntry(NamedTuple):
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str


def file_holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the holes of an open file within [start, end), from
    SEEK_HOLE/SEEK_DATA (no page-by-page reads). A hole running to EOF ends at `end`."""
    out: list[tuple[int, int]] = []
    off = start
    while off < end:
        try:
            hole = os.lseek(fd, off, SEEK_HOLE)
        except OSError:
            break
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, SEEK_DATA)
        except OSError:  # ENXIO: no data after the hole
            data = end
        out.append((hole, min(data, end) - hole))
        off = max(data, hole + 1)
    return out


def proc_maps_entry(hva: int, pid: int | str = "self") -> MapsEntry | None:
    """The /proc/<pid>/maps mapping containing `hva`, or None."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            addrs, _, rest = line.partition(b" ")
            lo, _, hi = addrs.partition(b"-")
            start, end = int(lo, 16), int(hi, 16)
            if start <= hva < end:
                fields = rest.decode(errors="surrogateescape").split(None, 4)
                perms, offset, dev, inode = fields[:4]
                path = fields[4].rstrip("\n") if len(fields) > 4 else ""
                return MapsEntry(start, end, perms, int(offset, 16), dev, int(inode), path)
    return None


class Resolution(NamedTuple):
    """Where a gpa lands on the host, and why an access there would fail (`cause`).
    A NamedTuple, not a frozen dataclass: it is built on the fault path, and a frozen
    dataclass's __init__ (object.__setattr__ per field) costs several times more."""

    gpa: int
    hva: int | None
    region: str | None
    path: str | None
    file_offset: int | None
    file_size: int | None
    cause: Cause
    inode: int | None = None
    mapping: MapsEntry | None = None

    def checked(self, memory: GuestMemory) -> Resolution:
        """This resolution with the /proc/self/maps line its hva lies in (for cross_check)."""
        if self.hva is None or (r := memory.find_region(self.gpa)) is None:
            return self
        return self._replace(mapping=r.maps_entry(self.hva))

    def cross_check(self) -> list[str]:
        """Disagreements between this resolution and /proc/self/maps (empty: agree)."""
        problems: list[str] = []
        if self.hva is None:
            return problems
        m = self.mapping
        if m is None:
            return [f"hva {self.hva:#x} not in /proc/self/maps"]
        if self.file_offset is not None:
            maps_off = m.offset + (self.hva - m.start)
            if maps_off != self.file_offset:
                problems.append(f"offset {maps_off:#x} in maps != {self.file_offset:#x}")
            if self.inode is not None and m.inode != self.inode:
                problems.append(f"inode {m.inode} in maps != {self.inode}")
            path = m.path.removesuffix(" (deleted)")
            if self.path is not None and path != self.path:
                problems.append(f"path {m.path!r} in maps != {self.path!r}")
        return problems


_tuple_new = tuple.__new__


class GuestMemory:
    """The set of regions of one VM, sorted by gpa."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self._names: dict[str, Region] = {}

    # --- building ------------------------------------------------------------------------
    def add(self, region: Region) -> Region:
        """Insert a region; overlapping gpa ranges and duplicate names are rejected."""
        if region.name in self._names:
            raise ValueError(f"duplicate region name {region.name!r}")
        i = bisect.bisect_right(self._starts, region.gpa)
        if i > 0 and self._regions[i - 1].end > region.gpa:
            raise ValueError(f"{region!r} overlaps {self._regions[i - 1]!r}")
        if i < len(self._regions) and self._regions[i].gpa < region.end:
            raise ValueError(f"{region!r} overlaps {self._regions[i]!r}")
        self._starts.insert(i, int(region.gpa))
        self._regions.insert(i, region)
        self._names[region.name] = region
        return region

    def add_anonymous(self, name: str, gpa: int, size: int) -> Region:
        return self.add(Region.anonymous(name, gpa, size))

    def add_memfd(self, name: str, gpa: int, size: int, *, seal: bool = True) -> Region:
        return self.add(Region.memfd(name, gpa, size, seal=seal))

    def add_file(
        self,
        name: str,
        gpa: int,
        path: str | os.PathLike[str],
        *,
        file_offset: int = 0,
        size: int | None = None,
        readonly: bool = False,
    ) -> Region:
        return self.add(
            Region.file(name, gpa, path, file_offset=file_offset, size=size, readonly=readonly)
        )

    # --- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def region(self, name: str) -> Region:
        return self._names[name]

    def find_region(self, gpa: int) -> Region | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa < r.gpa + r.size:
                return r
        return None

    def gpa_to_hva(self, gpa: int) -> int | None:
        r = self.find_region(gpa)
        return None if r is None else r.hva + (gpa - r.gpa)

    def memslots(self) -> Iterator[tuple[int, int, int, int, bool]]:
        """(slot, gpa, size, hva, readonly) per region in gpa order, for
        KVM_SET_USER_MEMORY_REGION (readonly -> KVM_MEM_READONLY)."""
        for slot, r in enumerate(self._regions):
            yield slot, int(r.gpa), r.size, r.hva, r.readonly

    # --- resolution ----------------------------------------------------------------------
    def resolve(self, gpa: int, *, cross_check: bool = True,
                region: Region | None = None) -> Resolution:
        """GPA -> memslot -> HVA -> file/offset, with the reason an access would fail.
        `region`: the region holding gpa, when the caller has already looked it up."""
        r = region
        if r is None:  # find_region, inline (one cold frame less on the fault path)
            i = bisect.bisect_right(self._starts, gpa) - 1
            r = self._regions[i] if i >= 0 else None
            if r is not None and gpa >= r.gpa + r.size:
                r = None
        if r is None:
            return Resolution(gpa, None, None, None, None, None, "unmapped")
        mapping = r.maps_entry(r.hva + (gpa - r.gpa)) if cross_check else None
        if r.kind == "anon":
            return Resolution(gpa, r.hva + (gpa - r.gpa), r.name, None, None, None, "ok", None,
                              mapping)
        delta = gpa - r.gpa
        foff = r.file_offset + delta
        # The size by lseek(SEEK_END), not fstat: no stat_result to build (with float
        # times) on the fault path; the inode of an open fd never changes (kept at open).
        # The fd's offset is free to move: region data goes through pread/pwrite only.
        size = os.lseek(r.fd, 0, os.SEEK_END)
        page = foff & ~(PAGE_SIZE - 1)
        cause: Cause = "ok"
        if page >= size:
            cause = "beyond-eof"
        else:
            try:
                data = os.lseek(r.fd, page, SEEK_DATA)
            except OSError as e:
                if e.errno != _errno.ENXIO:  # ENXIO: no data at or after `page`
                    raise
                data = size
            if data >= page + PAGE_SIZE or data >= size:
                cause = "hole"
        # tuple.__new__: every field given, and no NamedTuple __new__ frame (fault path)
        return _tuple_new(Resolution, (gpa, r.hva + delta, r.name, r.path, foff, size, cause,
                                       r.inode, mapping))

    # --- safe access ---------------------------------------------------------------------
    def _spans(self, gpa: int, n: int) -> Iterator[tuple[Region, int, int]]:
        while n > 0:
            r = self.find_region(gpa)
            if r is None:
                raise GuestMemoryError(gpa, "unmapped")
            chunk = min(n, r.gpa + r.size - gpa)
            yield r, gpa, chunk
            gpa += chunk
            n -= chunk

    def read(self, gpa: int, n: int) -> bytes:
        """Copy n bytes of guest memory (may span adjacent regions)."""
        parts = [r._read(g, c) for r, g, c in list(self._spans(gpa, n))]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store data into guest memory (may span adjacent regions)."""
        view = memoryview(data).cast("B")
        done = 0
        for r, g, c in list(self._spans(gpa, len(view))):  # no partial write into a gap
            r._write(g, view[done : done + c])
            done += c

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        for r in self._regions:
            r.close()
        self._starts.clear()
        self._regions.clear()
        self._names.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
