/* The task bytecode interpreter: runs in ring 3 from the read-only .utext/.urodata pages.
 * The bytecode is untrusted: every op, slot, offset and jump target is checked. No globals
 * (this object's pages are read-only to user mode); no calls into kernel code. */
#include "kernel.h"

static inline u64 sys(u64 nr, u64 a, u64 b, u64 c, u64 slot, u64 *err)
{
    register u64 r10 asm("r10") = slot;
    u64 d = c;
    asm volatile("int3" : "+a"(nr), "+D"(a), "+S"(b), "+d"(d), "+r"(r10) : : "memory");
    if (err)
        *err = d;
    return nr;
}

static __attribute__((noreturn)) void uexit(u64 code)
{
    for (;;)
        sys(SYS_EXIT, code, 0, 0, 0, 0);
}

static inline u64 load(u64 va) { return *(volatile u64 *)va; }

/* The slot mapping page va (the hint first), or -1. */
static int find_slot(const struct uprog *p, u32 nm, u64 va, u32 hint)
{
    if (hint < nm && p->maps[hint].vaddr == va)
        return (int)hint;
    for (u32 i = 0; i < nm; i++)
        if (p->maps[i].vaddr == va)
            return (int)i;
    return -1;
}

void uentry(const struct uprog *p)
{
    u64 ctr[MAX_INSNS];
    u32 n = p->nr_insns, nm = p->nr_maps;
    const struct insn *prog = (const struct insn *)((const char *)p + p->insns_off);
    if (n > MAX_INSNS || nm > MAX_MAPS)
        uexit(EXIT_CODE_BAD_INSN);
    for (u32 i = 0; i < MAX_INSNS; i++)
        ((volatile u64 *)ctr)[i] = 0;
    u32 pc = 0;
    for (;;) {
        if (pc >= n)
            uexit(EXIT_CODE_BAD_INSN); /* ran off the end of the program */
        const struct insn *in = &prog[pc];
        u32 op = in->op, slot = in->slot, flags = in->flags, arg = in->arg;
        u64 imm = in->imm, v, err;
        u32 next = pc + 1;
        if (flags & ~(u32)INSN_F_EXPECT)
            uexit(EXIT_CODE_BAD_INSN);
        switch (op) {
        case OP_READ:
        case OP_KREAD:
        case OP_WRITE: {
            if (slot >= nm || arg > PAGE_SIZE - 8 || (arg & 7))
                uexit(EXIT_CODE_BAD_INSN);
            u64 va = p->maps[slot].vaddr + arg;
            if (op == OP_WRITE) {
                *(volatile u64 *)va = imm;
                sys(SYS_VALUE, va, imm, VALUE_WRITE, slot, 0);
                break;
            }
            if (op == OP_READ) {
                v = load(va);
                sys(SYS_VALUE, va, v, VALUE_READ, slot, 0);
            } else {
                v = sys(SYS_KREAD, va, 0, 0, slot, &err);
                if (err)
                    uexit(EXIT_CODE_KREAD_EIO);
            }
            if ((flags & INSN_F_EXPECT) && v != imm)
                uexit(EXIT_CODE_EXPECT_FAILED);
            break;
        }
        case OP_EXEC: {
            if (slot >= nm || arg >= PAGE_SIZE)
                uexit(EXIT_CODE_BAD_INSN);
            u64 va = p->maps[slot].vaddr + arg;
            asm volatile("call *%0" ::"r"(va)
                         : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory",
                           "cc");
            /* Reported after it ran: the u64 at the target, rounded down to 8 bytes. */
            v = load(va & ~7ULL);
            sys(SYS_VALUE, va, v, VALUE_EXEC, slot, 0);
            break;
        }
        case OP_READ_SPAN: {
            if (slot >= nm || imm == 0 || imm > MAX_MAPS || arg > PAGE_SIZE - 8 || (arg & 7))
                uexit(EXIT_CODE_BAD_INSN);
            u64 base = p->maps[slot].vaddr;
            for (u64 i = 0; i < imm; i++) /* every page must be mapped: check first */
                if (find_slot(p, nm, base + i * PAGE_SIZE, slot + (u32)i) < 0)
                    uexit(EXIT_CODE_BAD_INSN);
            for (u64 i = 0; i < imm; i++) {
                u64 va = base + i * PAGE_SIZE + arg;
                int s = find_slot(p, nm, base + i * PAGE_SIZE, slot + (u32)i);
                v = load(va);
                sys(SYS_VALUE, va, v, VALUE_READ, (u64)s, 0);
            }
            break;
        }
        case OP_YIELD:
            break;
        case OP_SPIN:
            for (u32 i = 0; i < arg; i++)
                asm volatile("" ::: "memory");
            break;
        case OP_LOOP:
            if (arg >= n)
                uexit(EXIT_CODE_BAD_INSN);
            if (ctr[pc] < imm) {
                ctr[pc]++;
                next = arg;
            } else {
                ctr[pc] = 0;
            }
            break;
        case OP_EXIT:
            uexit(arg);
        default:
            uexit(EXIT_CODE_BAD_INSN);
        }
        sys(SYS_STEP, pc, 0, 0, 0, 0);
        pc = next;
    }
}
