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


def test_on_file_change():
    n = P.on_file_change(W, 0x4000, 0x4000, 0x2000)
    assert n == P.Notify(((W + 0x2000, 2, "beyond-eof"),))
    assert P.on_file_change(W, 0x4000, 0x4000, 0x4000) is None
    n = P.on_file_change(W, 0x4000, 0x4000, 0x4000, ((0x1000, 0x1000),))
    assert n == P.Notify(((W + 0x1000, 1, "hole"),))


def test_mce_encoding_matches_qemu():
    status, addr, misc, mcg = P.mce_encoding(0x1234000, True)
    assert status == (1 << 63 | 1 << 61 | 1 << 60 | 1 << 59 | 1 << 58 | 1 << 56 | 1 << 55 | 0x134)
    assert mcg == 0b111 and addr == 0x1234000 and misc == 0x8C
    status, _, _, mcg = P.mce_encoding(0x1234000, False)
    assert status & 0xFFFF == 0xC0 and not status & (1 << 55) and mcg == 0b101
    assert P.MCE_BANK == 9


def test_pick_bare_efault_gpa():
    assert P.pick_bare_efault_gpa([W + 0x3000, W + 0x2000], set()) == W + 0x2000
    assert P.pick_bare_efault_gpa([W + 0x3000, W + 0x2000], {W + 0x2000}) == W + 0x3000
    assert P.pick_bare_efault_gpa([W + 0x2000], {W + 0x2000}) is None
