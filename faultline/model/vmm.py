"""The VMM side of the model: exits to userspace handled with the shared policy module
(faultline.vmm.policy), exactly the decisions the real VMM takes."""

from __future__ import annotations

from faultline.abi import PAGE_SHIFT, PAGE_SIZE
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


def recover_bare_efault_gpa(bad_gpas: list[int], handled_gpas: set[int]) -> int | None:
    """A bare -EFAULT carries no GPA: scan the windows for bad pages (beyond EOF, poisoned)
    and take the lowest one not handled yet, as the real VMM does."""
    return P.pick_bare_efault_gpa(bad_gpas, handled_gpas)


def page_of(gpa: int) -> int:
    return gpa & ~(PAGE_SIZE - 1)
