"""The VMM side of the model: exits to userspace handled with the shared policy module
(faultline.vmm.policy), exactly the decisions the real VMM takes."""

from __future__ import annotations

from collections.abc import Iterable

from faultline.abi import PAGE_SHIFT, PAGE_SIZE
from faultline.pages import PageRanges
from faultline.vmm import policy as P


def holes_ranges(mask: int) -> tuple[tuple[int, int], ...]:
    """Bitmask of hole pages -> byte ranges (offset, length)."""
    out = []
    p = 0
    while mask >> p:
        if mask >> p & 1:
            q = p
            while mask >> q & 1:
                q += 1
            out.append((p << PAGE_SHIFT, (q - p) << PAGE_SHIFT))
            p = q
        else:
            p += 1
    return tuple(out)


def window(spec, size: int, known_size: int | None, holes_mask: int) -> P.Window:
    # What SEEK_HOLE tells the real VMM: holes end at EOF, so the hole page holding EOF
    # (a sparse tail) is not a whole page of the hole (P.hole_range skips it).
    holes = tuple((off, min(n, size - off)) for off, n in holes_ranges(holes_mask)
                  if off < size)
    return P.Window(spec.window_gpa, spec.window_bytes, size, known_size, holes)


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending page numbers -> runs (first page, npages)."""
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def bad_ranges(spec, size: int, holes_mask: int) -> PageRanges:
    """The window pages that cannot be backed at this file size and holes, as the real
    VMM's faults.bad_ranges sees them: whole hole pages below EOF (SEEK_HOLE stops at EOF,
    so the page holding it is not one) and every page from the one after EOF."""
    eof_page = -(-size // PAGE_SIZE)
    out = PageRanges((spec.gpa(p), n) for p, n in
                     page_runs(p for p in range(min(size >> PAGE_SHIFT, spec.pages))
                               if holes_mask >> p & 1))
    out.add(spec.gpa(eof_page), spec.pages - eof_page)
    return out


class Counted:
    """The pages the VMM counted a fault on (any vCPU), from Vmm.repeats keyed
    gidx * vcpus + vcpu: the ``handled`` a bare -EFAULT's page is chosen against
    (policy.pick_bare_efault_page), as the real VMM's Detector.handled."""

    def __init__(self, repeats: tuple[tuple[int, int], ...], gpa_gidx: dict[int, int],
                 nvcpus: int) -> None:
        self.gidxs = {key // nvcpus for key, _ in repeats}
        self.gpa_gidx = gpa_gidx

    def __contains__(self, gpa: object) -> bool:
        return self.gpa_gidx.get(gpa, -1) in self.gidxs  # type: ignore[call-overload]

