"""PageRanges (the VMM's sets of guest pages: notified, bad at the watcher's last look)
against plain sets of pages."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from faultline.abi import PAGE_SIZE
from faultline.memory import PageRanges

BASE = 0x1_0000_0000
ADDS = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), max_size=12)


def _build(adds: list[tuple[int, int]]) -> tuple[PageRanges, set[int]]:
    pr, ref = PageRanges(), set()
    for first, n in adds:
        pr.add(BASE + first * PAGE_SIZE, n)
        ref.update(BASE + (first + k) * PAGE_SIZE for k in range(n))
    return pr, ref


def _pages(pr: PageRanges) -> set[int]:
    return {g + k * PAGE_SIZE for g, n in pr.ranges() for k in range(n)}


def _well_formed(pr: PageRanges) -> bool:
    """Sorted, disjoint, never touching (touching ranges are merged), none empty."""
    pairs = list(zip(pr._starts, pr._ends, strict=True))
    return all(s < e for s, e in pairs) and all(
        e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs))


@given(ADDS, st.lists(st.integers(0, 80), max_size=30))
def test_page_ranges_equal_a_set_of_pages(adds: list[tuple[int, int]],
                                          probes: list[int]) -> None:
    pr, ref = _build(adds)
    assert len(pr) == len(ref) and bool(pr) == bool(ref)
    assert _well_formed(pr) and _pages(pr) == ref
    pages = [BASE + p * PAGE_SIZE for p in probes]
    assert [p in pr for p in pages] == [p in ref for p in pages]
    assert PageRanges(pr.ranges()) == pr  # rebuilt from its ranges, in any order
    assert PageRanges(reversed(pr.ranges())) == pr


@given(ADDS, ADDS, st.integers(0, 80))
def test_minus_and_split_equal_set_operations(a: list[tuple[int, int]],
                                              b: list[tuple[int, int]], cut: int) -> None:
    pa, ra = _build(a)
    pb, rb = _build(b)
    diff = pa.minus(pb)
    assert _well_formed(diff) and _pages(diff) == ra - rb
    at = BASE + cut * PAGE_SIZE
    below, above = pa.split_at(at)
    assert _well_formed(below) and _well_formed(above)
    assert _pages(below) == {p for p in ra if p < at}
    assert _pages(above) == {p for p in ra if p >= at}


def test_a_whole_window_is_one_range() -> None:
    pr = PageRanges([(BASE + 0x2000_0000, 131_072)])
    assert len(pr) == 131_072 and pr.ranges() == [(BASE + 0x2000_0000, 131_072)]
    assert BASE + 0x2000_0000 in pr and BASE + 0x1FFF_F000 not in pr
    assert not pr.minus(pr) and pr.minus(PageRanges()) == pr
