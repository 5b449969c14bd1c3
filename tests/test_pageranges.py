"""PageRanges (the VMM's record of notified pages) against a plain set of pages."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from faultline.abi import PAGE_SIZE
from faultline.vmm.runner import PageRanges

BASE = 0x1_0000_0000


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)), max_size=12),
       st.lists(st.integers(0, 80), max_size=30))
def test_page_ranges_equal_a_set_of_pages(adds: list[tuple[int, int]],
                                          probes: list[int]) -> None:
    pr, ref = PageRanges(), set()
    for first, n in adds:
        pr.add(BASE + first * PAGE_SIZE, n)
        ref.update(BASE + (first + k) * PAGE_SIZE for k in range(n))
    assert len(pr) == len(ref)
    # disjoint, sorted, and never touching (touching ranges are merged)
    pairs = list(zip(pr._starts, pr._ends, strict=True))
    assert all(s < e for s, e in pairs)
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs))
    pages = [BASE + p * PAGE_SIZE for p in probes]
    assert [p in pr for p in pages] == [p in ref for p in pages]
    assert pr.outside(pages) == [p for p in pages if p not in ref]


def test_a_whole_window_is_one_range() -> None:
    pr = PageRanges()
    pr.add(BASE + 0x2000_0000, 131_072)
    assert len(pr) == 131_072 and len(pr._starts) == 1
    assert BASE + 0x2000_0000 in pr and BASE + 0x1FFF_F000 not in pr
