from types import SimpleNamespace

from faultline.model import vmm as M
from faultline.pages import PageRanges
from faultline.vmm import policy as P

W = 0x1_0000_0000


def test_truncation_range_whole_range_clipped():
    assert P.truncation_range(W, 0x4000, 0x4000, 0x2000) == (W + 0x2000, 2)
    assert P.truncation_range(W, 0x3000, 0x4000, 0x2000) == (W + 0x2000, 1)
    assert P.truncation_range(W, 0x4000, 0x4000, 0x2800) == (W + 0x3000, 1)  # EOF page stays
    assert P.truncation_range(W, 0x4000, 0x2000, 0x4000) is None


def test_hole_range_whole_pages_only():
    assert P.hole_range(W, 0x4000, 0x1000, 0x2000) == (W + 0x1000, 2)
    assert P.hole_range(W, 0x4000, 0x800, 0x1000) is None


def test_decide():
    win = P.Window(W, 0x4000, 0x2000, 0x4000)
    assert isinstance(P.decide("abort", W + 0x2000, "beyond-eof", win), P.Abort)
    assert P.decide("mce", W + 0x2010, "beyond-eof", win) == P.InjectMce(W + 0x2000, True)
    assert P.decide("mce", W + 0x2000, "beyond-eof", win, in_context=False) == \
        P.InjectMce(W + 0x2000, False)
    assert P.decide("notify", W + 0x3000, "beyond-eof", win) == \
        P.Notify(((W + 0x2000, 2, "beyond-eof"),))
    assert isinstance(P.decide("mce", W, "unknown", win), P.Abort)
    assert isinstance(P.decide("abort", W, "poisoned", win), P.InjectMce)


def test_the_models_bad_pages_are_what_the_watcher_sees():
    """The model's input to P.file_change_notify: whole hole pages below EOF and every
    page from the one after EOF (as faultline.vmm.faults.bad_ranges)."""
    spec = SimpleNamespace(window_gpa=W, pages=4, gpa=lambda p: W + p * P.PAGE_SIZE)
    # 4 pages truncated to 1.5: page 1 holds EOF (still backed), 2..3 are beyond it
    assert M.bad_ranges(spec, 0x1800, 0).ranges() == [(W + 0x2000, 2)]
    # a hole at page 1 of a full file; a hole bit on the EOF page is not a whole page
    assert M.bad_ranges(spec, 0x4000, 0b10).ranges() == [(W + 0x1000, 1)]
    assert M.bad_ranges(spec, 0x1800, 0b10).ranges() == [(W + 0x2000, 2)]
    d = P.file_change_notify(M.bad_ranges(spec, 0x2000, 0), M.bad_ranges(spec, 0x4000, 0),
                             PageRanges(), W + 0x2000)
    assert d == P.Notify(((W + 0x2000, 2, "beyond-eof"),))


def test_mce_encoding_matches_qemu():
    status, addr, misc, mcg = P.mce_encoding(0x1234000, True)
    assert status == (1 << 63 | 1 << 61 | 1 << 60 | 1 << 59 | 1 << 58 | 1 << 56 | 1 << 55 | 0x134)
    assert mcg == 0b111 and addr == 0x1234000 and misc == 0x8C
    status, _, _, mcg = P.mce_encoding(0x1234000, False)
    assert status & 0xFFFF == 0xC0 and not status & (1 << 55) and mcg == 0b101
    assert P.MCE_BANK == 9


def test_mce_encoding_for_an_amd_guest_matches_qemu():
    # kvm_mce_inject(), IS_AMD_CPU(env): VAL|EN|MISCV|ADDRV, no S / AR / MCACOD
    base = 1 << 63 | 1 << 60 | 1 << 59 | 1 << 58
    status, addr, misc, mcg = P.mce_encoding(0x1234000, True, "amd")
    assert status == base | 1 << 61 | 1 << 43  # UC | POISON
    assert mcg == 0b111 and addr == 0x1234000 and misc == 0x8C
    status, _, _, mcg = P.mce_encoding(0x1234000, False, "amd")
    assert status == base | 1 << 44 | 1 << 43 and mcg == 0b101  # DEFERRED | POISON
    assert P.mce_encoding(0x1000, True) == P.mce_encoding(0x1000, True, "intel")


def test_page_runs_and_counted_pages():
    assert M.page_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]
    # repeats keyed gidx * vcpus + vcpu: gidx 1 counted on vCPU 1 of 2
    counted = M.Counted(((3, 1),), {W: 0, W + 0x1000: 1}, 2)
    assert W + 0x1000 in counted and W not in counted
    assert P.pick_bare_efault_page([(W, 2)], counted) == W


def test_one_vcpu_notification_no_longer_aborts_spuriously():
    """With the notification to the faulting vCPU only (conform's MODEL_PARAMS), vCPU 0
    faulting on a page whose record went to vCPU 1 is not a repeat (policy.count_fault:
    per page and vCPU, in flight only for the vCPU the AR event is queued for): the VMM
    notifies again instead of giving up."""
    from pathlib import Path

    from faultline.check.properties import check_system
    from faultline.conform import MODEL_PARAMS
    from faultline.model import System
    from faultline.scenario import load

    sc = load(Path(__file__).resolve().parents[2] / "scenarios" / "check-standard.toml")
    for design in ("error-gfn", "request"):
        r = check_system(System(sc, design, "notify", symmetry=True, **MODEL_PARAMS))
        assert r.complete and r.failing() == [], design
