"""Sets of guest pages as ranges: pure (no I/O), shared by the VMM and the decision module."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from faultline.abi import PAGE_SIZE


class PageRanges:
    """A set of guest pages kept as sorted, disjoint, non-touching [start, end) gpa ranges.
    A DAX window's bad pages come in ranges (a truncation makes half of a 1 GiB window bad:
    131,072 pages); as a set of pages the VMM spent ~15 ms adding one notification and
    ~100 ms on one proactive look (faultline bench offline-range, docs/performance.md)."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """`ranges`: (first gpa, number of pages) pairs, in any order, may overlap."""
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, npages in ranges:
            self.add(first, npages)

    def add(self, first: int, npages: int) -> None:
        if npages <= 0:
            return
        start, end = first, first + npages * PAGE_SIZE
        i = bisect.bisect_left(self._ends, start)  # the first range that may touch it
        j = i
        while j < len(self._starts) and self._starts[j] <= end:
            start, end = min(start, self._starts[j]), max(end, self._ends[j])
            j += 1
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def ranges(self) -> list[tuple[int, int]]:
        """(first gpa, number of pages), ascending."""
        return [(s, (e - s) // PAGE_SIZE) for s, e in zip(self._starts, self._ends, strict=True)]

    def minus(self, other: PageRanges) -> PageRanges:
        """The pages in this set and not in `other`."""
        out = PageRanges()
        ostarts, oends = other._starts, other._ends
        for start, end in zip(self._starts, self._ends, strict=True):
            i = bisect.bisect_right(oends, start)  # other's first range ending after start
            while start < end:
                if i >= len(ostarts) or ostarts[i] >= end:
                    out._starts.append(start)
                    out._ends.append(end)
                    break
                if ostarts[i] > start:
                    out._starts.append(start)
                    out._ends.append(ostarts[i])
                start = max(start, oends[i])
                i += 1
        return out

    def split_at(self, gpa: int) -> tuple[PageRanges, PageRanges]:
        """(the pages below `gpa`, the pages at or above it)."""
        below, above = PageRanges(), PageRanges()
        for start, end in zip(self._starts, self._ends, strict=True):
            if start < gpa:
                below._starts.append(start)
                below._ends.append(min(end, gpa))
            if end > gpa:
                above._starts.append(max(start, gpa))
                above._ends.append(end)
        return below, above

    def __contains__(self, gpa: object) -> bool:
        if not isinstance(gpa, int):
            return False
        i = bisect.bisect_right(self._starts, gpa) - 1
        return i >= 0 and gpa < self._ends[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageRanges):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __len__(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True)) // PAGE_SIZE

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __repr__(self) -> str:
        return "PageRanges(" + ", ".join(f"{s:#x}+{n}" for s, n in self.ranges()) + ")"
