"""Host mm: files (size, page cache, holes, poison), the VMM's VMAs, gup semantics.

Pure functions over a :class:`File` record. gup results follow hva_to_pfn():
- a cached page within EOF: success;
- an uncached page within EOF (including a hole): needs I/O (FOLL_NOWAIT fails, a
  blocking gup reads it into the page cache and succeeds);
- a page at or beyond EOF: -EFAULT (VM_FAULT_SIGBUS) while the VMA stays valid, so with
  FOLL_NOWAIT it is indistinguishable from "needs I/O";
- a poisoned page: -EHWPOISON;
- a hole, when the VMM registered the window with userfaultfd (MISSING +
  UFFD_FEATURE_SIGBUS, as faultline's real VMM does: ``holes_fail``): the fault on the
  missing page is VM_FAULT_SIGBUS, exactly like a page beyond EOF (FOLL_NOWAIT: "needs
  I/O" on a valid VMA; blocking: -EFAULT). Without uffd a hole is allocated on first
  touch and reads zeros.
"""

from __future__ import annotations

from faultline.abi import PAGE_SHIFT, PAGE_SIZE
from faultline.model.state import File

GUP_OK = 0
GUP_NEEDS_IO = 1  # KVM_PFN_ERR_NEEDS_IO (FOLL_NOWAIT on a valid VMA)
GUP_EFAULT = 2  # KVM_PFN_ERR_FAULT
GUP_HWPOISON = 3  # KVM_PFN_ERR_HWPOISON


def new_file(size: int, pages: int, cached: bool) -> File:
    eof_pages = min(pages, (size + PAGE_SIZE - 1) >> PAGE_SHIFT)
    mask = (1 << eof_pages) - 1 if cached else 0
    return File(size, mask, 0, 0, 0, size)


def gup_nowait(f: File, page: int, write_to_ro_vma: bool = False) -> int:
    if write_to_ro_vma:
        return GUP_EFAULT  # !vma_is_valid(): KVM_PFN_ERR_FAULT at once
    bit = 1 << page
    if f.poison & bit:
        return GUP_HWPOISON
    if (page << PAGE_SHIFT) >= f.size:
        return GUP_NEEDS_IO
    return GUP_OK if f.cached & bit else GUP_NEEDS_IO


def gup_blocking(f: File, page: int, holes_fail: bool = False) -> tuple[int, File]:
    """A gup without FOLL_NOWAIT (or the async worker's get_user_pages_remote)."""
    bit = 1 << page
    if f.poison & bit:
        return GUP_HWPOISON, f
    if (page << PAGE_SHIFT) >= f.size:
        return GUP_EFAULT, f
    if holes_fail and f.holes & bit:
        return GUP_EFAULT, f  # handle_userfault() -> VM_FAULT_SIGBUS
    if f.cached & bit and not f.holes & bit:
        return GUP_OK, f
    # Read in (or allocate the hole's page: it is no longer a hole, its data is zero).
    return GUP_OK, File(f.size, f.cached | bit, f.holes & ~bit, f.zeroed, f.poison, f.zero_from)


def truncate(f: File, new_size: int, pages: int) -> File:
    """truncate(2): pages at or beyond the new EOF leave the page cache (and the EPT via
    the MMU notifier)."""
    keep = min(pages, (new_size + PAGE_SIZE - 1) >> PAGE_SHIFT)
    mask = (1 << keep) - 1
    return File(new_size, f.cached & mask, f.holes & mask, f.zeroed, f.poison,
                min(f.zero_from, new_size))


def extend(f: File, new_size: int, pages: int) -> File:
    """ftruncate(2) to a larger size: the new range is sparse. Pages that start at or
    beyond the old EOF are holes (the page holding the old EOF keeps its data)."""
    old = f.size
    if new_size <= old:
        return f
    first = (old + PAGE_SIZE - 1) >> PAGE_SHIFT
    end = min(pages, (new_size + PAGE_SIZE - 1) >> PAGE_SHIFT)
    mask = 0
    for p in range(first, end):
        mask |= 1 << p
    return File(new_size, f.cached & ~mask, f.holes | mask, f.zeroed | mask, f.poison,
                f.zero_from)


def punch_hole(f: File, offset: int, length: int, pages: int) -> File:
    first = offset >> PAGE_SHIFT
    end = min(pages, (offset + length) >> PAGE_SHIFT)
    mask = 0
    for p in range(first, end):
        if (p << PAGE_SHIFT) < f.size:
            mask |= 1 << p
    return f._replace(cached=f.cached & ~mask, holes=f.holes | mask, zeroed=f.zeroed | mask)


def poison(f: File, offset: int, length: int, pages: int) -> File:
    first = offset >> PAGE_SHIFT
    end = min(pages, (offset + length) >> PAGE_SHIFT)
    mask = sum(1 << p for p in range(first, end))
    return f._replace(cached=f.cached & ~mask, poison=f.poison | mask)


def bad_pages(f: File, pages: int, holes: bool = False) -> list[int]:
    """Window pages a guest access cannot be backed by: beyond EOF or poisoned (and holes,
    when they fail: ``holes``)."""
    eof = (f.size + PAGE_SIZE - 1) >> PAGE_SHIFT
    bad = f.poison | (f.holes if holes else 0)
    return [p for p in range(pages) if p >= eof or bad >> p & 1]


def cannot_back(f: File, page: int, holes: bool = False) -> bool:
    """A blocking gup of this page fails (beyond EOF, or a hole that fails)."""
    return (page << PAGE_SHIFT) >= f.size or (holes and bool(f.holes >> page & 1))


def cannot_supply(f: File, page: int) -> bool:
    """No data can legitimately be read from this page: beyond EOF, a hole not written
    since (its bit is cleared when a blocking gup allocates it, or a write fills it), or
    hwpoisoned. An access that completes on such a page consumed fabricated data."""
    return (page << PAGE_SHIFT) >= f.size or bool((f.holes | f.poison) >> page & 1)


def cause_of(f: File, page: int) -> str:
    if f.poison >> page & 1:
        return "poisoned"
    if (page << PAGE_SHIFT) >= f.size:
        return "beyond-eof"
    if f.holes >> page & 1:
        return "hole"
    return "unknown"
