"""The faulting instruction's memory operands (bare -EFAULT recovery), against addresses
worked out by hand; the per-site cache must not change any of them."""

from __future__ import annotations

import pytest

from faultline.kvm import uapi
from faultline.vmm import decode

CASES = [
    # mov %rdi, 0x10(%rax,%rbx): base + index + disp, a store
    ("48897c1810", {"rax": 0x8000_0000, "rbx": 0x3000}, (0x8000_3010, 8, "write")),
    # mov -0x10(%rip), %rax: RIP-relative, from the end of the 7-byte instruction
    ("488b05f0ffffff", {}, (0x1000 + 7 - 0x10, 8, "read")),
    # mov (%eax), %rax with an address-size override: only the low 32 bits of rax
    ("67488b00", {"rax": 0xFFFF_FFFF_0000_1234}, (0x1234, 8, "read")),
    # movl $0x2a, 0x1000: an absolute address, no base
    ("c70425001000002a000000", {}, (0x1000, 4, "write")),
    # call *%rax: the push of the return address is the memory access
    ("ffd0", {"rax": 5, "rsp": 0x100}, (0xF8, 8, "write")),
]


@pytest.mark.parametrize(("code", "regs", "want"), CASES, ids=[c for c, _, _ in CASES])
def test_operand_addresses(code: str, regs: dict[str, int], want: tuple[int, int, str]) -> None:
    for _ in range(2):  # cold, then from the per-site cache
        accs = decode.accesses(bytes.fromhex(code), 0x1000, regs)
        assert accs[0] == decode.Access(0x1000, 1, "exec")  # the fetch, always first
        assert (accs[1].gva, accs[1].size, accs[1].kind) == want


def test_registers_from_a_kvm_regs() -> None:
    regs = uapi.kvm_regs(rax=0x8000_0000, rbx=0x3000)
    accs = decode.accesses(bytes.fromhex("48897c1810"), 0x1000, regs)
    assert accs[1].gva == 0x8000_3010


def test_undecodable_bytes_give_only_the_fetch() -> None:
    assert decode.accesses(b"\x0f\xff", 0x1000, {}) == [decode.Access(0x1000, 1, "exec")]
