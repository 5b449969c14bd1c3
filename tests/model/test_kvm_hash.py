import random

from faultline.model import kvm as K


def test_hash_fn_is_hash_32_golden_ratio():
    assert K.GOLDEN_RATIO_32 == 0x61C88647
    for gfn in (0, 1, 0x100002, 0xFFFF_FFFF, 0x1_0000_0002):
        assert K.apf_hash_fn(gfn) == (((gfn & 0xFFFFFFFF) * 0x61C88647) & 0xFFFFFFFF) >> 26
    assert K.apf_hash_fn(0x1_0000_0002) == K.apf_hash_fn(2)  # only the low 32 bits


def _colliding(n, size=64):
    key = K.apf_hash_fn(1, size)
    out, g = [], 1
    while len(out) < n:
        if K.apf_hash_fn(g, size) == key:
            out.append(g)
        g += 1
    return out


def test_linear_probe_and_backward_shift_delete():
    a, b, c = _colliding(3)
    h = K.hash_add((), a)
    h = K.hash_add(h, b)
    h = K.hash_add(h, c)
    key = K.apf_hash_fn(a)
    dense = K.hash_slots(h)
    assert dense[key] == a and dense[(key + 1) % 64] == b and dense[(key + 2) % 64] == c
    h2 = K.hash_del(h, a)
    dense = K.hash_slots(h2)
    # b and c shift back so their probe chains stay unbroken.
    assert dense[key] == b and dense[(key + 1) % 64] == c
    assert dense[(key + 2) % 64] == K.EMPTY_GFN
    assert K.hash_find(h2, b) and K.hash_find(h2, c) and not K.hash_find(h2, a)


def test_hash_matches_a_set_under_random_ops():
    rng = random.Random(1)
    for size in (4, 8, 64):
        h, ref = (), set()
        for _ in range(2000):
            g = rng.randrange(3 * size)
            if g in ref:
                h = K.hash_del(h, g, size)
                ref.discard(g)
            elif len(ref) < size:
                h = K.hash_add(h, g, size)
                ref.add(g)
            assert {x for _, x in h} == ref
            for x in range(3 * size):
                assert K.hash_find(h, x, size) == (x in ref)
        assert len(h) <= size


def test_error_hash_collisions_overwrite():
    a, b = _colliding(2)
    e = K.error_add((), a)
    e = K.error_add(e, b)
    assert K.error_find_and_remove(e, a) == (False, e)
    found, e2 = K.error_find_and_remove(e, b)
    assert found and e2 == ()


def test_tokens_never_zero():
    tok, nid = K.alloc_apf_token(0, 0)  # id 0 on vCPU 0 would be token 0: skipped
    assert tok == 1 << 12 and nid == 2
    apf_id = (1 << 20) - 1
    for _ in range(4):
        tok, apf_id = K.alloc_apf_token(apf_id, 0)
        assert tok != 0
    assert K.make_token(3, 5) == (3 << 12) | 5
    assert K.lowest_free_token(set(), 0) == 0x1000
    assert K.lowest_free_token({0x1000, 0x3000}, 0) == 0x2000
    assert K.lowest_free_token(set(), 1) == 0x1001
