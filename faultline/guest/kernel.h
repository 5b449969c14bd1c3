/* faultline guest kernel: shared declarations. Every ABI number comes from abi_gen.h. */
#pragma once
#ifndef __ASSEMBLER__
#include "abi_gen.h"
#endif

#ifndef __ASSEMBLER__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

/* --- ABI structures (layouts in faultline/abi.py) --------------------------------------- */
struct boot_header {
    u64 magic;
    u32 version, nr_vcpus;
    u64 ram_bytes;
    u32 nr_windows, nr_tasks, windows_off, tasks_off;
    u64 options, notify_ring_gpa;
    u32 notify_vector, notify_entries;
    u64 report_buf_gpa;
    u32 report_buf_stride, reserved;
};
struct boot_window { u64 gpa, bytes; u32 id, flags; };
struct boot_task { u32 id, vcpu, nr_maps, nr_insns, maps_off, prog_off, flags, pad; };
struct boot_map { u64 vaddr, gpa; u32 flags, window; };
struct insn { u8 op, slot; u16 flags; u32 arg; u64 imm; };
struct report { u16 kind, magic, vcpu, task; u64 a, b, c, d; };
struct notify_header { u32 head, tail, entries, pad; };
struct notify_entry { u64 gpa, npages; u32 cause, flags; u64 ar_gpa; };

_Static_assert(sizeof(struct boot_header) == BOOT_HEADER_SIZE, "boot header");
_Static_assert(sizeof(struct boot_window) == BOOT_WINDOW_SIZE, "boot window");
_Static_assert(sizeof(struct boot_task) == BOOT_TASK_SIZE, "boot task");
_Static_assert(sizeof(struct boot_map) == BOOT_MAP_SIZE, "boot map");
_Static_assert(sizeof(struct insn) == INSN_SIZE, "insn");
_Static_assert(sizeof(struct report) == REPORT_STRUCT_SIZE, "report");
_Static_assert(sizeof(struct notify_header) == NOTIFY_HEADER_SIZE, "notify header");
_Static_assert(sizeof(struct notify_entry) == NOTIFY_ENTRY_SIZE, "notify entry");

/* --- The task's read-only user page: what the interpreter runs ------------------------- */
struct umap { u64 vaddr; u32 flags, pad; };
struct uprog {
    u32 nr_insns, nr_maps;
    u64 insns_off;              /* from the start of this struct */
    struct umap maps[MAX_MAPS]; /* nr_maps valid */
    /* insns follow at insns_off */
};

#endif

/* Kernel-chosen user layout (below USER_ANON_BASE, in the task's own page directory). */
#define USER_PROG_VADDR   (USER_STACK_TOP - 0x100000ULL)
#define USER_PROG_PAGES   2ULL
#define USER_STACK_PAGES  2ULL
#ifndef __ASSEMBLER__
_Static_assert(sizeof(struct uprog) + MAX_INSNS * INSN_SIZE <= USER_PROG_PAGES * PAGE_SIZE,
               "user program pages");
#endif

/* Kernel capacity (>= the scenario validator's limits). */
#define KMAX_VCPUS 8
#define KMAX_TASKS 64

/* Selectors: null, kernel code, kernel data, user data, user code, then one TSS per vCPU. */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   (0x18 | 3)
#define USER_CS   (0x20 | 3)
#define TSS_SEL0  0x28

#ifndef __ASSEMBLER__
/* The trap frame built by entry.S (lowest address first). */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vec, err;
    u64 rip, cs, rflags, rsp, ss;
};
_Static_assert(sizeof(struct frame) == 22 * 8, "frame");
#endif

/* Per-vCPU stacks: one block per vCPU so a stack address names its vCPU. */
#define KSTACK_BYTES  16384
#define MCSTACK_BYTES 8192
#define DFSTACK_BYTES 8192
#define CPU_STACK_BLOCK (KSTACK_BYTES + MCSTACK_BYTES + DFSTACK_BYTES)

#ifndef __ASSEMBLER__
struct kread_result { u64 value; i64 err; };
/* entry.S */
extern void enter_user(struct frame *f) __attribute__((noreturn));
extern void switch_stack_and_idle(u64 rsp) __attribute__((noreturn));
extern struct kread_result kread_copy(u64 vaddr);
extern char kread_insn[], kread_end[], kread_fixup[];
extern char isr_table[];
extern char cpu_stacks[];
/* kernel.c */
void trap(struct frame *f);
void kmain(u64 boot_gpa, u64 vcpu) __attribute__((noreturn));
void idle_loop(void) __attribute__((noreturn));
/* user.c */
extern void uentry(const struct uprog *p) __attribute__((noreturn));
extern char __user_start[], __user_end[], __kernel_start[], _end[];
#endif
