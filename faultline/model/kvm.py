"""KVM pieces of the model that stand alone: the async-PF gfn hash, tokens, requests.

Semantics follow arch/x86/kvm/x86.c (kvm_add_async_pf_gfn, kvm_async_pf_gfn_slot,
kvm_find_async_pf_gfn, kvm_del_async_pf_gfn, alloc_apf_token) and, for the error-gfn
design, Vivek Goyal's v4 (kvm_add_error_gfn / kvm_find_and_remove_error_gfn: one slot per
hash key, a collision overwrites).

A hash is kept *sparse* in the model state: a sorted tuple of (slot, gfn) pairs; an empty
slot (~0 upstream) is simply absent. That keeps states small and canonical.
"""

from __future__ import annotations

GOLDEN_RATIO_32 = 0x61C88647
ASYNC_PF_PER_VCPU = 64
EMPTY_GFN = (1 << 64) - 1  # ~0: the kernel's "slot free"

# Request bits (KVM_ARCH_REQ numbers as upstream; the model uses them as a bitmask).
KVM_REQ_APF_HALT = 7
KVM_REQ_APF_READY = 28
KVM_REQ_MEMORY_FAULT = 40  # the "request" design's new request (not upstream)
REQ_APF_READY = 1 << 0
REQ_MEMORY_FAULT = 1 << 1

TOKEN_VCPU_BITS = 12


def order_base_2(n: int) -> int:
    return (n - 1).bit_length()


def hash_32(val: int, bits: int) -> int:
    """include/linux/hash.h: hash_32(val, bits) = (val * GOLDEN_RATIO_32) >> (32 - bits)."""
    return ((val * GOLDEN_RATIO_32) & 0xFFFF_FFFF) >> (32 - bits)


def apf_hash_fn(gfn: int, size: int = ASYNC_PF_PER_VCPU) -> int:
    """kvm_async_pf_hash_fn(): hash_32(gfn & 0xffffffff, order_base_2(ASYNC_PF_PER_VCPU))."""
    return hash_32(gfn & 0xFFFF_FFFF, order_base_2(size))


def _slot(table: dict[int, int], gfn: int, size: int) -> int:
    """kvm_async_pf_gfn_slot(): probe until gfn or an empty slot (at most size probes)."""
    key = apf_hash_fn(gfn, size)
    for _ in range(size):
        g = table.get(key)
        if g is None or g == gfn:
            break
        key = (key + 1) & (size - 1)
    return key


def hash_find(h: tuple[tuple[int, int], ...], gfn: int, size: int = ASYNC_PF_PER_VCPU) -> bool:
    """kvm_find_async_pf_gfn()."""
    if not h:
        return False
    table = dict(h)
    return table.get(_slot(table, gfn, size)) == gfn


def hash_add(h: tuple[tuple[int, int], ...], gfn: int,
             size: int = ASYNC_PF_PER_VCPU) -> tuple[tuple[int, int], ...]:
    """kvm_add_async_pf_gfn(): linear probe to the first empty slot."""
    table = dict(h)
    if len(table) >= size:
        raise OverflowError("async PF gfn hash full (the kernel would spin here)")
    key = apf_hash_fn(gfn, size)
    while key in table:
        key = (key + 1) & (size - 1)
    table[key] = gfn
    return tuple(sorted(table.items()))


def hash_del(h: tuple[tuple[int, int], ...], gfn: int,
             size: int = ASYNC_PF_PER_VCPU) -> tuple[tuple[int, int], ...]:
    """kvm_del_async_pf_gfn(): backward-shift deletion keeping every probe chain intact."""
    table = dict(h)
    i = j = _slot(table, gfn, size)
    if table.get(i) != gfn:  # WARN_ON_ONCE upstream
        return h
    mask = size - 1
    while True:
        del table[i]
        while True:
            j = (j + 1) & mask
            g = table.get(j)
            if g is None:
                return tuple(sorted(table.items()))
            k = apf_hash_fn(g, size)
            # k lies cyclically in ]i, j]: the entry at j may stay.
            if not ((i < k <= j) if i <= j else (i < k or k <= j)):
                break
        table[i] = table[j]
        i = j


def hash_slots(h: tuple[tuple[int, int], ...], size: int = ASYNC_PF_PER_VCPU) -> list[int]:
    """The dense kernel view: a list of size gfns, EMPTY_GFN for a free slot."""
    out = [EMPTY_GFN] * size
    for k, g in h:
        out[k] = g
    return out


# --- error-gfn design (Vivek v4): one entry per key, collisions overwrite ------------


def error_add(h: tuple[tuple[int, int], ...], gfn: int,
              size: int = ASYNC_PF_PER_VCPU) -> tuple[tuple[int, int], ...]:
    """kvm_add_error_gfn(): error_gfns[hash(gfn)] = gfn ("just a hint")."""
    table = dict(h)
    table[apf_hash_fn(gfn, size)] = gfn
    return tuple(sorted(table.items()))


def error_find_and_remove(h: tuple[tuple[int, int], ...], gfn: int, size: int = ASYNC_PF_PER_VCPU
                          ) -> tuple[bool, tuple[tuple[int, int], ...]]:
    """kvm_find_and_remove_error_gfn()."""
    key = apf_hash_fn(gfn, size)
    for k, g in h:
        if k == key:
            if g == gfn:
                return True, tuple(x for x in h if x[0] != key)
            break
    return False, h


# --- tokens ------------------------------------------------------------------------


def make_token(apf_id: int, vcpu_id: int) -> int:
    """(id << 12) | vcpu_id as a u32."""
    return ((apf_id << TOKEN_VCPU_BITS) | vcpu_id) & 0xFFFF_FFFF


def alloc_apf_token(apf_id: int, vcpu_id: int) -> tuple[int, int]:
    """alloc_apf_token(): (token, next id). A u32 token of 0 means "slot free" to the
    guest (a lost page-ready): ids giving 0 are skipped, so the token is never 0."""
    while True:
        token = make_token(apf_id, vcpu_id)
        apf_id = (apf_id + 1) & ((1 << (32 - TOKEN_VCPU_BITS)) - 1)
        if token != 0:
            return token, apf_id


def lowest_free_token(in_use: set[int] | frozenset[int], vcpu_id: int) -> int:
    """The model's canonical allocation: the lowest id >= 1 whose token is not in use.

    Same shape as upstream ((id << 12) | vcpu_id, never 0, unique among the vCPU's
    outstanding work), but a loop that repeats reaches the same state again, which keeps
    the state space finite for the checker.
    """
    i = 1
    while True:
        token = make_token(i, vcpu_id)
        if token not in in_use:
            return token
        i += 1
