"""The decision module (faultline.vmm.policy) beyond decide(): repeats, the bare-EFAULT
page, the watcher's notification, the MCE capability, what each policy needs, and the
read-only refusal. Pure functions: no /dev/kvm."""

from __future__ import annotations

import pytest

from faultline.pages import PageRanges
from faultline.vmm import policy as pol

P = pol.PAGE_SIZE
W = 0x1_0000_0000


def test_count_fault_per_page_and_vcpu_with_in_flight() -> None:
    n, v = pol.count_fault(0, in_flight=False)
    assert (n, v) == (1, pol.HANDLE)
    # the event for it is still on its way: neither counted nor answered again
    assert pol.count_fault(n, in_flight=True) == (1, pol.IN_FLIGHT)
    n, v = pol.count_fault(n, in_flight=False)
    assert (n, v) == (2, pol.HANDLE)
    assert pol.count_fault(n, in_flight=False) == (pol.MAX_REPEATS + 1, pol.GIVE_UP)


def test_pick_bare_efault_page_skips_handled_pages_in_ranges() -> None:
    bad = [(W + 2 * P, 3), (W + 10 * P, 1)]
    assert pol.pick_bare_efault_page(bad, set()) == W + 2 * P
    assert pol.pick_bare_efault_page(bad, {W + 2 * P, W + 3 * P}) == W + 4 * P
    assert pol.pick_bare_efault_page(bad, {W + 2 * P, W + 3 * P, W + 4 * P}) == W + 10 * P
    assert pol.pick_bare_efault_page(bad, {W + k * P for k in (2, 3, 4, 10)}) is None
    # a 1 GiB window truncated to half is one range, not a list of pages
    assert pol.pick_bare_efault_page([(W, 1 << 17)], {W}) == W + P


def test_file_change_notify_only_what_is_news() -> None:
    # a 4-page window whose file was truncated from 4 pages to 1, with page 0 a hole
    now_bad = PageRanges([(W, 1), (W + P, 3)])
    seen = PageRanges()
    d = pol.file_change_notify(now_bad, seen, PageRanges(), W + P)
    assert d == pol.Notify(((W, 1, "hole"), (W + P, 3, "beyond-eof")))
    # already notified by the fault path, or bad at the last look: not news
    d = pol.file_change_notify(now_bad, PageRanges([(W + 3 * P, 1)]),
                               PageRanges([(W + P, 1)]), W + P)
    assert d == pol.Notify(((W, 1, "hole"), (W + 2 * P, 1, "beyond-eof")))
    assert pol.file_change_notify(now_bad, now_bad, PageRanges(), W + P) is None


@pytest.mark.parametrize("policy", pol.POLICIES)
def test_a_refused_store_is_not_a_memory_failure(policy: str) -> None:
    win = pol.Window(W, 4 * P, 4 * P)
    assert pol.decide(policy, W + P + 8, "read-only", win) == pol.RefuseWrite(W + P + 8)


def test_each_policy_declares_what_it_needs() -> None:
    assert set(pol.NEEDS) == set(pol.POLICIES)
    assert {p for p, n in pol.NEEDS.items() if n.watch_files} == {"proactive"}
    assert pol.WINDOWED == {p for p, n in pol.NEEDS.items() if n.window}


def test_mcg_cap_is_qemus_default_where_kvm_supports_it() -> None:
    # this host: KVM_X86_GET_MCE_CAP_SUPPORTED = 0x1000100 (docs/design.md)
    assert pol.mcg_cap(0x1000100 | 0xFF) == pol.MCG_CTL_P | pol.MCG_SER_P | 10
    assert pol.mcg_cap(0) == 10
