/* faultline guest kernel: boot, GDT/IDT/TSS, page tables, tasks, scheduler, system calls,
 * #MC / #PF / notification handling, memory_failure(). See faultline/abi.py for the ABI. */
#include "kernel.h"

#define PTE_P      0x1ULL
#define PTE_W      0x2ULL
#define PTE_U      0x4ULL
#define PTE_PS     0x80ULL
#define PTE_POISON (1ULL << 9) /* software bit, in a not-present PTE: the frame is poisoned */
#define PTE_ADDR   0x000FFFFFFFFFF000ULL
#define PT_USER    (PTE_P | PTE_W | PTE_U) /* intermediate entries: the leaf decides */

#define EIO    5
#define EFAULT 14
#define ENOSYS 38

#define MSR_MCG_CAP    0x179
#define MSR_MCG_STATUS 0x17a
#define MSR_MC0_STATUS 0x401
#define MCG_RIPV       (1ULL << 0)
#define MCI_VAL        (1ULL << 63)
#define MCI_ADDRV      (1ULL << 58)
#define MCI_MISCV      (1ULL << 59)
#define MCI_AR         (1ULL << 55)
#define CR4_MCE        (1ULL << 6)

#define KMAX_WINDOWS  64
#define KMAX_KMAPS    (KMAX_TASKS * MAX_MAPS)
#define MAP_HASH_BITS 12
#define KIDENT_LIMIT  (512ULL << 20) /* kernel identity map of RAM: below the user stack PD */
#define LOW_4K_LIMIT  ANON_POOL_GPA  /* [0, 4 MiB): 4 KiB PTEs (kernel image, heap, low area) */
#define PENDING_MAX   8
#define USER_VA_LIMIT (1ULL << 47)

/* --- state ------------------------------------------------------------------------------ */
struct task {
    struct frame ctx;
    u64 cr3;
    u32 id, vcpu, nr_insns, nr_maps, flags, first_map;
    volatile u32 dead;
    u32 started;
    u64 steps;
};

struct kmap {
    u64 vaddr, gpa;
    u64 *pte;
    u16 task, next; /* next: index + 1 in the gpa hash chain, 0 = end */
    u32 flags;
};

struct region { u64 pfn, end_pfn; u64 *bits; };

struct cpu {
    u32 id;
    int cur;   /* task index, -1 = none */
    u32 pos;   /* position of cur in list */
    u32 nr;    /* tasks on this vCPU */
    u8 list[KMAX_TASKS];
    struct report *rep, *rep_main, *rep_nested;
    u32 idle_reported, kread_ar, npending;
    u64 ar_consumed; /* gpa whose failure a KREAD already turned into -EIO */
    u64 pending[PENDING_MAX]; /* AO #MC pfns taken while this vCPU held the lock */
};

struct tss {
    u32 r0;
    u64 rsp0, rsp1, rsp2, r1;
    u64 ist[7];
    u64 r2;
    u16 r3, iomap;
} __attribute__((packed));
_Static_assert(sizeof(struct tss) == 104, "tss");

struct dtr { u16 limit; u64 base; } __attribute__((packed));

static struct boot_header *boot;
static volatile u32 boot_state; /* 0 = vCPU 0 still setting up, 1 = ready, 2 = failed */
static u64 gdt[5 + 2 * KMAX_VCPUS] __attribute__((aligned(16)));
static struct tss tss[KMAX_VCPUS] __attribute__((aligned(16)));
static u64 idt[512] __attribute__((aligned(16)));
static u64 kernel_cr3;
static u64 heap_next;
static u64 verbose;
static struct task tasks[KMAX_TASKS];
static u32 nr_tasks;
static struct kmap kmaps[KMAX_KMAPS];
static u32 nr_kmaps;
static u16 map_hash[1 << MAP_HASH_BITS];
static struct region regions[1 + KMAX_WINDOWS];
static u32 nr_regions;
static volatile u32 mf_lock; /* 0 = free, else owner vCPU + 1 */
static struct cpu cpus[KMAX_VCPUS];

/* --- small helpers ---------------------------------------------------------------------- */
static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v)
{
    asm volatile("outl %0, %1" ::"a"(v), "Nd"(port) : "memory");
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    asm volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 read_cr2(void) { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { asm volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline u64 read_cr4(void) { u64 v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { asm volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }

static void zero(void *p, u64 n)
{
    u64 *q = p;
    for (u64 i = 0; i < n / 8; i++)
        q[i] = 0;
}

static struct cpu *this_cpu(void *stack_addr)
{
    return &cpus[((u64)stack_addr - (u64)cpu_stacks) / CPU_STACK_BLOCK];
}

static void puts_serial(const char *s)
{
    while (*s)
        outb(SERIAL_PORT, (u8)*s++);
}

static void puthex(u64 v)
{
    char buf[17];
    int i = 16;
    buf[16] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i);
    puts_serial(&buf[i]);
}

/* One record per exit: fill this vCPU's buffer, then outl its GPA to REPORT_PORT. Under
 * QEMU (BOOT_OPT_DOORBELL, abi.py): ring the debugcon doorbell and wait for faultline to
 * clear the pending word, so the report is as synchronous as an I/O exit is on our VMM. */
static u32 doorbell; /* BOOT_OPT_DOORBELL, set by vCPU 0 before the others run */

static void report(struct cpu *c, u32 kind, u32 task, u64 a, u64 b, u64 cc, u64 d)
{
    struct report *r = c->rep;
    r->kind = (u16)kind;
    r->magic = (u16)REPORT_MAGIC;
    r->vcpu = (u16)c->id;
    r->task = (u16)task;
    r->a = a;
    r->b = b;
    r->c = cc;
    r->d = d;
    if (doorbell) {
        volatile u64 *pending = (volatile u64 *)((u64)r + REPORT_PENDING_OFFSET);
        *pending = 1;
        asm volatile("" ::: "memory"); /* the record is complete before the doorbell */
        outb(DOORBELL_PORT, (u8)(((u64)r - boot->report_buf_gpa) / DOORBELL_UNIT));
        while (*pending)
            cpu_relax();
        return;
    }
    outl(REPORT_PORT, (u32)(u64)r);
}

static __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        asm volatile("cli; hlt");
}

static __attribute__((noreturn)) void panic(struct cpu *c, u64 reason, u64 b, u64 cc, u64 d)
{
    report(c, R_PANIC, NO_TASK, reason, b, cc, d);
    puts_serial("faultline guest: panic ");
    puthex(reason);
    puts_serial("\n");
    halt_forever();
}

static void lock(struct cpu *c)
{
    while (__atomic_exchange_n(&mf_lock, c->id + 1, __ATOMIC_ACQUIRE))
        while (mf_lock)
            cpu_relax();
}
static void unlock(void) { __atomic_store_n(&mf_lock, 0, __ATOMIC_RELEASE); }

static u32 task_id(struct cpu *c) { return c->cur < 0 ? NO_TASK : tasks[c->cur].id; }

/* --- page allocator and page tables ----------------------------------------------------- */
static u64 *alloc_pages(struct cpu *c, u64 n)
{
    if (heap_next + n * PAGE_SIZE > ANON_POOL_GPA || n > ANON_POOL_GPA / PAGE_SIZE)
        panic(c, PANIC_NO_MEMORY, heap_next, n, 0);
    u64 *p = (u64 *)heap_next;
    heap_next += n * PAGE_SIZE;
    zero(p, n * PAGE_SIZE);
    return p;
}

/* The PTE for va in the 4-level table at pml4, creating tables (U|W|P) on the way. */
static u64 *walk(struct cpu *c, u64 *pml4, u64 va)
{
    u64 *t = pml4;
    for (int shift = 39; shift > 12; shift -= 9) {
        u64 *e = &t[(va >> shift) & 511];
        if (!(*e & PTE_P)) {
            u64 *n = alloc_pages(c, 1);
            *e = (u64)n | PT_USER;
        } else if (*e & PTE_PS) {
            panic(c, PANIC_BAD_BOOT_INFO, va, 0xdead, 0);
        }
        t = (u64 *)(*e & PTE_ADDR);
    }
    return &t[(va >> 12) & 511];
}

static u64 *kpd0;

static void build_kernel_tables(struct cpu *c)
{
    u64 *pml4 = alloc_pages(c, 1), *pdpt = alloc_pages(c, 1);
    kpd0 = alloc_pages(c, 1);
    pml4[0] = (u64)pdpt | PT_USER;
    pdpt[0] = (u64)kpd0 | PT_USER;
    for (u64 pd = 0; pd < LOW_4K_LIMIT >> 21; pd++) {
        u64 *pt = alloc_pages(c, 1);
        kpd0[pd] = (u64)pt | PT_USER;
        for (u64 i = 0; i < 512; i++) {
            u64 pa = (pd << 21) | (i << 12);
            if (pa == 0)
                continue; /* catch null pointers */
            if (pa >= (u64)__user_start && pa < (u64)__user_end)
                pt[i] = pa | PTE_P | PTE_U; /* the interpreter: user read/execute */
            else
                pt[i] = pa | PTE_P | PTE_W;
        }
    }
    u64 lim = boot->ram_bytes < KIDENT_LIMIT ? boot->ram_bytes : KIDENT_LIMIT;
    for (u64 pd = LOW_4K_LIMIT >> 21; pd < (lim + (1 << 21) - 1) >> 21; pd++)
        kpd0[pd] = (pd << 21) | PTE_P | PTE_W | PTE_PS;
    kernel_cr3 = (u64)pml4;
}

/* --- boot info validation ---------------------------------------------------------------- */
static int in_boot(u64 off, u64 bytes) { return off <= BOOT_INFO_MAX_BYTES && bytes <= BOOT_INFO_MAX_BYTES - off; }

static u64 validate(void)
{
    struct boot_header *h = boot;
    if (h->magic != BOOT_MAGIC) return 1;
    if (h->version != BOOT_VERSION) return 2;
    if (h->nr_vcpus == 0 || h->nr_vcpus > KMAX_VCPUS) return 3;
    if ((h->ram_bytes & (PAGE_SIZE - 1)) || h->ram_bytes < ANON_POOL_GPA + PAGE_SIZE ||
        h->ram_bytes > (1ULL << MAX_GUEST_PHYS_BITS))
        return 4;
    if (h->nr_windows > KMAX_WINDOWS || h->nr_tasks > KMAX_TASKS) return 5;
    if (!in_boot(h->windows_off, (u64)h->nr_windows * sizeof(struct boot_window)) ||
        (h->windows_off & 7))
        return 6;
    if (!in_boot(h->tasks_off, (u64)h->nr_tasks * sizeof(struct boot_task)) || (h->tasks_off & 7))
        return 7;
    if (h->notify_entries == 0 || h->notify_entries > 4096 || h->notify_ring_gpa < PAGE_SIZE ||
        (h->notify_ring_gpa & 7) ||
        h->notify_ring_gpa + sizeof(struct notify_header) +
                (u64)h->notify_entries * sizeof(struct notify_entry) > KERNEL_LOAD_GPA)
        return 8;
    if (h->report_buf_stride < 2 * sizeof(struct report) || (h->report_buf_stride & 7) ||
        h->report_buf_gpa < PAGE_SIZE || (h->report_buf_gpa & 7) ||
        h->report_buf_gpa + (u64)h->nr_vcpus * h->report_buf_stride > KERNEL_LOAD_GPA)
        return 9;
    struct boot_window *w = (void *)((u64)h + h->windows_off);
    for (u32 i = 0; i < h->nr_windows; i++) {
        if ((w[i].gpa | w[i].bytes) & (PAGE_SIZE - 1) || !w[i].bytes ||
            w[i].gpa < h->ram_bytes || w[i].bytes > (1ULL << MAX_GUEST_PHYS_BITS) ||
            w[i].gpa > (1ULL << MAX_GUEST_PHYS_BITS) - w[i].bytes)
            return 10;
        for (u32 j = 0; j < i; j++)
            if (w[i].gpa < w[j].gpa + w[j].bytes && w[j].gpa < w[i].gpa + w[i].bytes)
                return 11;
    }
    struct boot_task *t = (void *)((u64)h + h->tasks_off);
    for (u32 i = 0; i < h->nr_tasks; i++) {
        if (t[i].vcpu >= h->nr_vcpus || t[i].id >= NO_TASK) return 12;
        if (t[i].nr_insns == 0 || t[i].nr_insns > MAX_INSNS || t[i].nr_maps > MAX_MAPS) return 13;
        if (!in_boot(t[i].maps_off, (u64)t[i].nr_maps * sizeof(struct boot_map)) ||
            !in_boot(t[i].prog_off, (u64)t[i].nr_insns * sizeof(struct insn)) ||
            ((t[i].maps_off | t[i].prog_off) & 7))
            return 14;
        struct boot_map *m = (void *)((u64)h + t[i].maps_off);
        for (u32 k = 0; k < t[i].nr_maps; k++) {
            if ((m[k].vaddr | m[k].gpa) & (PAGE_SIZE - 1) || m[k].vaddr < USER_ANON_BASE ||
                m[k].vaddr >= USER_VA_LIMIT)
                return 15;
            if (m[k].window == MAP_NO_WINDOW) {
                if (m[k].gpa < ANON_POOL_GPA || m[k].gpa >= h->ram_bytes) return 16;
            } else {
                if (m[k].window >= h->nr_windows || m[k].gpa < w[m[k].window].gpa ||
                    m[k].gpa >= w[m[k].window].gpa + w[m[k].window].bytes)
                    return 17;
            }
        }
    }
    return 0;
}

/* --- poison bookkeeping ---------------------------------------------------------------- */
static struct region *region_cache;

static struct region *find_region(u64 pfn)
{
    struct region *r = region_cache;
    if (r && pfn >= r->pfn && pfn < r->end_pfn)
        return r;
    for (u32 i = 0; i < nr_regions; i++)
        if (pfn >= regions[i].pfn && pfn < regions[i].end_pfn)
            return region_cache = &regions[i];
    return 0;
}

static void add_region(struct cpu *c, u64 gpa, u64 bytes)
{
    struct region *r = &regions[nr_regions++];
    u64 pages = bytes >> PAGE_SHIFT;
    r->pfn = gpa >> PAGE_SHIFT;
    r->end_pfn = r->pfn + pages;
    r->bits = alloc_pages(c, (pages / 8 + PAGE_SIZE - 1) / PAGE_SIZE + 1);
}

static inline u32 map_hash_of(u64 pfn)
{
    return (u32)((pfn * 0x9E3779B97F4A7C15ULL) >> (64 - MAP_HASH_BITS));
}

static struct kmap *task_map_by_vaddr(struct task *t, u64 vaddr, u64 hint)
{
    u64 page = vaddr & ~(PAGE_SIZE - 1);
    struct kmap *m = &kmaps[t->first_map];
    if (hint < t->nr_maps && m[hint].vaddr == page)
        return &m[hint];
    for (u32 i = 0; i < t->nr_maps; i++)
        if (m[i].vaddr == page)
            return &m[i];
    return 0;
}

static u64 task_vaddr_of_gpa(struct task *t, u64 gpa)
{
    struct kmap *m = &kmaps[t->first_map];
    for (u32 i = 0; i < t->nr_maps; i++)
        if (m[i].gpa == (gpa & ~(PAGE_SIZE - 1)))
            return m[i].vaddr + (gpa & (PAGE_SIZE - 1));
    return 0;
}

/* Mark a task dead; only the first killer reports. */
static void kill_task(struct cpu *c, struct task *t, u64 signo, u64 code, u64 vaddr, u64 gpa)
{
    lock(c);
    u32 was = t->dead;
    t->dead = 1;
    unlock();
    if (!was)
        report(c, R_SIGNAL, t->id, signo, code, vaddr, gpa);
}

static void exit_task(struct cpu *c, struct task *t, u64 code)
{
    lock(c);
    u32 was = t->dead;
    t->dead = 1;
    unlock();
    if (!was)
        report(c, R_EXIT, t->id, code, 0, 0, 0);
}

static void drain_pending(struct cpu *c);

static volatile u64 *ar_mailbox(struct cpu *c)
{
    return (volatile u64 *)((u64)c->rep_main + AR_MAILBOX_OFFSET);
}

/* Offline one frame: poison it, unmap it from every task (not-present PTE with the poison
 * bit), report, early-kill the mappers that asked for it. Returns 1 if newly poisoned.
 * No report (exit) happens while the lock is held. */
static int memory_failure_q(struct cpu *c, u64 pfn, u32 source, int ar_task, int quiet);

static int memory_failure(struct cpu *c, u64 pfn, u32 source, int ar_task)
{
    return memory_failure_q(c, pfn, source, ar_task, 0);
}

/* quiet: the caller reports the offlined range itself (one R_OFFLINE for a whole notified
 * range instead of one exit per page). */
static int memory_failure_q(struct cpu *c, u64 pfn, u32 source, int ar_task, int quiet)
{
    struct { u16 task; u64 vaddr; } victims[KMAX_TASKS];
    u32 nv = 0;
    struct region *r = find_region(pfn);
    if (!r)
        return 0;
    lock(c);
    u64 bit = pfn - r->pfn;
    if (r->bits[bit / 64] & (1ULL << (bit % 64))) {
        unlock();
        return 0;
    }
    r->bits[bit / 64] |= 1ULL << (bit % 64);
    for (u32 i = map_hash[map_hash_of(pfn)]; i; i = kmaps[i - 1].next) {
        struct kmap *m = &kmaps[i - 1];
        if (m->gpa >> PAGE_SHIFT != pfn)
            continue;
        *m->pte = (pfn << PAGE_SHIFT) | PTE_POISON;
        struct task *t = &tasks[m->task];
        if ((t->flags & TASK_F_EARLY_KILL) && !t->dead && (int)m->task != ar_task &&
            nv < KMAX_TASKS) {
            t->dead = 1;
            victims[nv].task = m->task;
            victims[nv++].vaddr = m->vaddr;
        }
    }
    unlock();
    if (!quiet)
        report(c, R_OFFLINE, NO_TASK, pfn << PAGE_SHIFT, source, 1, 0);
    for (u32 i = 0; i < nv; i++)
        report(c, R_SIGNAL, tasks[victims[i].task].id, SIGBUS, BUS_MCEERR_AO, victims[i].vaddr,
               pfn << PAGE_SHIFT);
    if (c->npending)
        drain_pending(c);
    return 1;
}

static void drain_pending(struct cpu *c)
{
    while (c->npending) {
        u64 pfn = c->pending[--c->npending];
        memory_failure(c, pfn, OFFLINE_MCE_AO, -1);
    }
}

/* --- tasks ------------------------------------------------------------------------------- */
static void setup_task(struct cpu *c, u32 i)
{
    struct boot_task *bt = (struct boot_task *)((u64)boot + boot->tasks_off) + i;
    struct boot_map *bm = (void *)((u64)boot + bt->maps_off);
    struct insn *prog = (void *)((u64)boot + bt->prog_off);
    struct task *t = &tasks[i];
    t->id = bt->id;
    t->vcpu = bt->vcpu;
    t->nr_insns = bt->nr_insns;
    t->nr_maps = bt->nr_maps;
    t->flags = bt->flags;
    t->first_map = nr_kmaps;

    u64 *pml4 = alloc_pages(c, 1), *pdpt = alloc_pages(c, 1), *pd0 = alloc_pages(c, 1);
    pml4[0] = (u64)pdpt | PT_USER;
    pdpt[0] = (u64)pd0 | PT_USER;
    for (u32 k = 0; k < 512; k++)
        pd0[k] = kpd0[k]; /* the kernel half: shared PTs and 2 MiB leaves, supervisor-only */
    t->cr3 = (u64)pml4;

    /* The task's read-only copy of its program and map table. */
    struct uprog *up = (struct uprog *)alloc_pages(c, USER_PROG_PAGES);
    up->nr_insns = bt->nr_insns;
    up->nr_maps = bt->nr_maps;
    up->insns_off = (sizeof(struct uprog) + 15) & ~15ULL;
    struct insn *uins = (void *)((u64)up + up->insns_off);
    for (u32 k = 0; k < bt->nr_insns; k++)
        uins[k] = prog[k];
    for (u64 p = 0; p < USER_PROG_PAGES; p++)
        *walk(c, pml4, USER_PROG_VADDR + p * PAGE_SIZE) = ((u64)up + p * PAGE_SIZE) | PTE_P | PTE_U;
    u64 *stack = alloc_pages(c, USER_STACK_PAGES);
    for (u64 p = 0; p < USER_STACK_PAGES; p++)
        *walk(c, pml4, USER_STACK_TOP - (USER_STACK_PAGES - p) * PAGE_SIZE) =
            ((u64)stack + p * PAGE_SIZE) | PTE_P | PTE_U | PTE_W;

    for (u32 k = 0; k < bt->nr_maps; k++) {
        struct kmap *m = &kmaps[nr_kmaps];
        m->vaddr = bm[k].vaddr;
        m->gpa = bm[k].gpa;
        m->flags = bm[k].flags;
        m->task = (u16)i;
        m->pte = walk(c, pml4, m->vaddr);
        *m->pte = m->gpa | PTE_P | PTE_U | ((m->flags & MAP_F_WRITE) ? PTE_W : 0);
        u32 h = map_hash_of(m->gpa >> PAGE_SHIFT);
        m->next = map_hash[h];
        map_hash[h] = (u16)(nr_kmaps + 1);
        nr_kmaps++;
        up->maps[k].vaddr = m->vaddr;
        up->maps[k].flags = m->flags;
    }

    struct frame *f = &t->ctx;
    zero(f, sizeof(*f));
    f->rip = (u64)uentry;
    f->cs = USER_CS;
    f->rflags = 0x202;
    f->rsp = USER_STACK_TOP - 8;
    f->ss = USER_DS;
    f->rdi = USER_PROG_VADDR;
}

/* Next runnable task after the current one (round robin, the current one last). */
static void go_idle(struct cpu *c) __attribute__((noreturn));

static void resume_user(struct cpu *c, struct frame *f, int switch_task)
{
    struct task *t = c->cur >= 0 ? &tasks[c->cur] : 0;
    if (t && !t->dead && !switch_task) {
        write_cr3(t->cr3);
        return;
    }
    struct task *next = 0;
    u32 pos = 0;
    for (u32 k = 1; k <= c->nr; k++) {
        pos = (c->pos + k) % c->nr;
        if (!tasks[c->list[pos]].dead) {
            next = &tasks[c->list[pos]];
            break;
        }
    }
    if (!next)
        go_idle(c);
    if (next != t) {
        if (t && !t->dead)
            t->ctx = *f;
        *f = next->ctx;
        c->cur = c->list[pos];
        c->pos = pos;
    }
    if (!next->started) {
        next->started = 1;
        report(c, R_TASK_START, next->id, next->nr_insns, 0, 0, 0);
    }
    write_cr3(next->cr3);
}

static void go_idle(struct cpu *c)
{
    c->cur = -1;
    write_cr3(kernel_cr3);
    if (!c->idle_reported) {
        c->idle_reported = 1;
        report(c, R_IDLE, NO_TASK, c->id, 0, 0, 0);
    }
    switch_stack_and_idle((u64)cpu_stacks + c->id * CPU_STACK_BLOCK + KSTACK_BYTES);
}

void idle_loop(void)
{
    u64 here;
    struct cpu *c = this_cpu(&here);
    for (;;) {
        drain_pending(c);
        asm volatile("sti; hlt; cli" ::: "memory");
    }
}

/* --- handlers ----------------------------------------------------------------------------- */
static void do_syscall(struct cpu *c, struct frame *f)
{
    struct task *t = &tasks[c->cur];
    if (t->dead) {
        resume_user(c, f, 1);
        return;
    }
    switch (f->rax) {
    case SYS_STEP:
        t->steps++;
        report(c, R_STEP, t->id, f->rdi, t->steps, 0, 0);
        if (verbose) {
            puts_serial("t");
            puthex(t->id);
            puts_serial(" pc ");
            puthex(f->rdi);
            puts_serial("\n");
        }
        resume_user(c, f, 1);
        return;
    case SYS_VALUE: {
        struct kmap *m = task_map_by_vaddr(t, f->rdi, f->r10);
        u64 gpa = m ? m->gpa + (f->rdi & (PAGE_SIZE - 1)) : ~0ULL;
        report(c, R_VALUE, t->id, f->rdi, f->rsi, gpa, f->rdx);
        f->rax = 0;
        break;
    }
    case SYS_EXIT:
        exit_task(c, t, f->rdi);
        resume_user(c, f, 1);
        return;
    case SYS_KREAD: {
        u64 va = f->rdi;
        struct kmap *m = task_map_by_vaddr(t, va, f->r10);
        if (!m || (va & (PAGE_SIZE - 1)) > PAGE_SIZE - 8) {
            f->rax = 0;
            f->rdx = (u64)-EFAULT;
            break;
        }
        c->kread_ar = 0;
        struct kread_result r = kread_copy(va);
        /* The VMM names an access that did not complete (its load returned filler) in this
         * vCPU's mailbox before re-entering: checked synchronously, since no interrupt can
         * get into this interrupts-off path in time. */
        volatile u64 *mbox = ar_mailbox(c);
        u64 failed = *mbox;
        u64 gpa = m->gpa + (va & (PAGE_SIZE - 1));
        if (failed && (failed >> PAGE_SHIFT) == (gpa >> PAGE_SHIFT)) {
            *mbox = 0;
            c->ar_consumed = failed;
            r.err = -EIO;
        }
        /* Let a pending notification in: if it offlined this page (or names this vCPU's
         * access as failed), the value is not to be trusted. */
        asm volatile("sti; nop; nop; cli" ::: "memory");
        if (!r.err && (c->kread_ar || (*m->pte & PTE_POISON)))
            r.err = -EIO;
        f->rax = r.err ? 0 : r.value;
        f->rdx = (u64)r.err;
        if (!r.err)
            report(c, R_VALUE, t->id, va, r.value, m->gpa + (va & (PAGE_SIZE - 1)), VALUE_KREAD);
        break;
    }
    default:
        f->rax = (u64)-ENOSYS;
        break;
    }
    resume_user(c, f, 0);
}

static int in_kread(u64 rip) { return rip >= (u64)kread_copy && rip < (u64)kread_end; }

static __attribute__((noreturn)) void kernel_exception(struct cpu *c, struct frame *f, u64 cr2)
{
    c->rep = c->rep_nested;
    report(c, R_EXCEPTION, task_id(c), f->vec, f->err, f->rip, cr2);
    panic(c, PANIC_KERNEL_EXCEPTION, f->vec, f->rip, cr2);
}

static void do_page_fault(struct cpu *c, struct frame *f)
{
    u64 cr2 = read_cr2();
    if (!(f->cs & 3)) {
        if (in_kread(f->rip) && c->cur >= 0) {
            struct kmap *m = task_map_by_vaddr(&tasks[c->cur], cr2, ~0ULL);
            f->rip = (u64)kread_fixup;
            f->rax = 0;
            f->rdx = (u64)((m && (*m->pte & PTE_POISON)) ? -EIO : -EFAULT);
            return;
        }
        kernel_exception(c, f, cr2);
    }
    struct task *t = &tasks[c->cur];
    struct kmap *m = task_map_by_vaddr(t, cr2, ~0ULL);
    if (m && !(*m->pte & PTE_P) && (*m->pte & PTE_POISON))
        kill_task(c, t, SIGBUS, BUS_MCEERR_AR, cr2, m->gpa + (cr2 & (PAGE_SIZE - 1)));
    else
        kill_task(c, t, SIGSEGV, SEGV_MAPERR, cr2, m ? m->gpa + (cr2 & (PAGE_SIZE - 1)) : 0);
}

static void do_machine_check(struct cpu *c, struct frame *f)
{
    int user = f->cs & 3;
    struct report *saved = c->rep;
    if (!user)
        c->rep = c->rep_nested; /* it may have interrupted a half-written report */
    u64 nbanks = rdmsr(MSR_MCG_CAP) & 0xff;
    u64 mcg = rdmsr(MSR_MCG_STATUS);
    u64 status = 0, addr = 0, misc = 0;
    u32 bank = 0;
    for (bank = 0; bank < nbanks; bank++) {
        status = rdmsr(MSR_MC0_STATUS + 4 * bank);
        if (status & MCI_VAL)
            break;
    }
    if (bank < nbanks) {
        if (status & MCI_ADDRV)
            addr = rdmsr(MSR_MC0_STATUS + 4 * bank + 1);
        if (status & MCI_MISCV)
            misc = rdmsr(MSR_MC0_STATUS + 4 * bank + 2);
    } else {
        status = 0;
    }
    report(c, R_MCE, task_id(c), mcg, status, addr, misc);
    if (bank < nbanks)
        wrmsr(MSR_MC0_STATUS + 4 * bank, 0);
    wrmsr(MSR_MCG_STATUS, 0); /* clears MCIP: the next #MC can be taken */
    if (!(status & MCI_VAL)) {
        c->rep = saved;
        return;
    }
    u64 pfn = addr >> PAGE_SHIFT;
    int has_addr = (status & MCI_ADDRV) != 0;
    if (status & MCI_AR) {
        if (user && c->cur >= 0) {
            struct task *t = &tasks[c->cur];
            if (has_addr && (mcg & MCG_RIPV))
                memory_failure(c, pfn, OFFLINE_MCE_AR, c->cur);
            kill_task(c, t, SIGBUS, BUS_MCEERR_AR, has_addr ? task_vaddr_of_gpa(t, addr) : 0,
                      addr);
        } else if (!user && in_kread(f->rip)) {
            f->rip = (u64)kread_fixup;
            f->rax = 0;
            f->rdx = (u64)-EIO;
            if (has_addr)
                memory_failure(c, pfn, OFFLINE_MCE_AR, -1);
        } else {
            panic(c, PANIC_KERNEL_MCE, status, f->rip, addr);
        }
    } else if (has_addr) {
        if (mf_lock == c->id + 1) {
            if (c->npending < PENDING_MAX)
                c->pending[c->npending++] = pfn;
        } else {
            memory_failure(c, pfn, OFFLINE_MCE_AO, -1);
        }
    }
    c->rep = saved;
}

static void do_notify(struct cpu *c, struct frame *f)
{
    struct notify_header *h = (void *)boot->notify_ring_gpa;
    struct notify_entry *ring = (void *)(boot->notify_ring_gpa + sizeof(*h));
    u32 n = boot->notify_entries;
    u32 head = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
    u32 tail = h->tail;
    u32 records = 0;
    u64 pages = 0;
    int user = f->cs & 3, ar = 0, refused = 0;
    u64 ar_gpa = 0;
    int cur = (user && c->cur >= 0) ? c->cur : -1;
    if (head - tail > n)
        tail = head - n; /* a VMM that overran the ring: take the newest */
    while (tail != head) {
        struct notify_entry e = ring[tail % n];
        int mine = (e.flags & NOTIFY_F_AR) && ((e.flags >> NOTIFY_AR_VCPU_SHIFT) & 0xff) == c->id;
        struct region *r = find_region(e.gpa >> PAGE_SHIFT);
        if (e.cause == CAUSE_READONLY) {
            /* A store the read-only memslot refused: the page is fine and stays mapped for
             * every task; only the writer is told (SIGSEGV SEGV_ACCERR, below), as a store
             * to a read-only file mapping is on Linux. Nothing is offlined. */
            if (mine) {
                refused = 1;
                ar_gpa = e.ar_gpa;
                *ar_mailbox(c) = 0;
            }
            tail++;
            records++;
            __atomic_store_n(&h->tail, tail, __ATOMIC_RELEASE);
            continue;
        }
        if (r && !(e.gpa & (PAGE_SIZE - 1))) {
            u64 pfn = e.gpa >> PAGE_SHIFT;
            u64 np = e.npages < r->end_pfn - pfn ? e.npages : r->end_pfn - pfn;
            u64 run = 0; /* newly offlined pages ending at pfn + p, reported as one range */
            for (u64 p = 0; p < np; p++) {
                if (memory_failure_q(c, pfn + p, OFFLINE_NOTIFY, mine ? cur : -1, 1)) {
                    run++;
                    pages++;
                } else if (run) {
                    report(c, R_OFFLINE, NO_TASK, (pfn + p - run) << PAGE_SHIFT,
                           OFFLINE_NOTIFY, run, 0);
                    run = 0;
                }
            }
            if (run)
                report(c, R_OFFLINE, NO_TASK, (pfn + np - run) << PAGE_SHIFT, OFFLINE_NOTIFY,
                       run, 0);
        }
        if (mine && c->ar_consumed && e.ar_gpa == c->ar_consumed) {
            c->ar_consumed = 0; /* a KREAD already failed with -EIO for it */
            mine = 0;
        } else if (mine) {
            ar = 1;
            ar_gpa = e.ar_gpa;
            *ar_mailbox(c) = 0;
        }
        tail++;
        records++;
        __atomic_store_n(&h->tail, tail, __ATOMIC_RELEASE);
    }
    report(c, R_NOTIFY, task_id(c), records, pages, 0, 0);
    if (refused && !ar && cur >= 0) {
        struct task *t = &tasks[cur];
        kill_task(c, t, SIGSEGV, SEGV_ACCERR, task_vaddr_of_gpa(t, ar_gpa), ar_gpa);
    } else if (ar) {
        if (cur >= 0) {
            struct task *t = &tasks[cur];
            kill_task(c, t, SIGBUS, BUS_MCEERR_AR, task_vaddr_of_gpa(t, ar_gpa), ar_gpa);
        } else {
            c->kread_ar = 1; /* a kernel access (KREAD) failed: it returns -EIO */
        }
    }
}

void trap(struct frame *f)
{
    struct cpu *c = this_cpu(f);
    u64 vec = f->vec;
    int user = f->cs & 3;
    if (vec == 3 && user) {
        do_syscall(c, f);
        return;
    }
    if (vec == MC_VECTOR) {
        do_machine_check(c, f);
    } else if (vec == NOTIFY_VECTOR) {
        do_notify(c, f);
    } else if (vec == 14) {
        do_page_fault(c, f);
    } else if (vec == 2 || vec >= 32) {
        /* NMI, spurious or unknown external interrupt: ignore */
    } else if (!user) {
        kernel_exception(c, f, read_cr2());
    } else {
        struct task *t = &tasks[c->cur];
        report(c, R_EXCEPTION, t->id, vec, f->err, f->rip, read_cr2());
        kill_task(c, t, SIGSEGV, 0, f->rip, 0);
    }
    if (user)
        resume_user(c, f, 0);
    else if (c->npending && mf_lock != c->id + 1)
        drain_pending(c);
}

/* --- boot -------------------------------------------------------------------------------- */
static void set_gate(u32 vec, u64 handler, u32 ist, u32 dpl)
{
    idt[vec * 2] = (handler & 0xffff) | ((u64)KERNEL_CS << 16) | ((u64)ist << 32) |
                   (0xEULL << 40) | ((u64)dpl << 45) | (1ULL << 47) |
                   ((handler >> 16) & 0xffff) << 48;
    idt[vec * 2 + 1] = handler >> 32;
}

static void build_descriptors(void)
{
    gdt[0] = 0;
    gdt[1] = 0x00209A0000000000ULL; /* kernel code, 64-bit */
    gdt[2] = 0x0000920000000000ULL; /* kernel data */
    gdt[3] = 0x0000F20000000000ULL; /* user data, DPL 3 */
    gdt[4] = 0x0020FA0000000000ULL; /* user code, 64-bit, DPL 3 */
    for (u32 i = 0; i < KMAX_VCPUS; i++) {
        u64 block = (u64)cpu_stacks + i * CPU_STACK_BLOCK;
        tss[i].rsp0 = block + KSTACK_BYTES;
        tss[i].ist[0] = block + KSTACK_BYTES + MCSTACK_BYTES; /* IST1: #MC */
        tss[i].ist[1] = block + CPU_STACK_BLOCK;              /* IST2: #DF */
        tss[i].iomap = sizeof(struct tss);                    /* no I/O bitmap: user outs #GP */
        u64 base = (u64)&tss[i];
        gdt[5 + 2 * i] = (sizeof(struct tss) - 1) | ((base & 0xffffff) << 16) | (0x9ULL << 40) |
                         (1ULL << 47) | (((base >> 24) & 0xff) << 56);
        gdt[6 + 2 * i] = base >> 32;
    }
    for (u32 v = 0; v < 256; v++)
        set_gate(v, (u64)isr_table + 16 * v, v == MC_VECTOR ? 1 : v == 8 ? 2 : 0, v == 3 ? 3 : 0);
}

static void load_descriptors(u32 id)
{
    struct dtr g = {sizeof(gdt) - 1, (u64)gdt}, i = {sizeof(idt) - 1, (u64)idt};
    asm volatile("lgdt %0" ::"m"(g) : "memory");
    asm volatile("pushq %0; leaq 1f(%%rip), %%rax; pushq %%rax; lretq; 1:" ::"i"(KERNEL_CS)
                 : "rax", "memory");
    asm volatile("mov %0, %%ss; mov %1, %%ds; mov %1, %%es; mov %1, %%fs; mov %1, %%gs" ::"r"(
                     (u16)KERNEL_DS),
                 "r"((u16)0));
    asm volatile("ltr %0" ::"r"((u16)(TSS_SEL0 + 16 * id)));
    asm volatile("lidt %0" ::"m"(i) : "memory");
}

/* `faultline bench exit-loop`: n back-to-back port exits, nothing else in between. */
static void bench_exits(u32 n)
{
    for (u32 i = 0; i < n; i++)
        outl(BENCH_PORT, i);
}

void kmain(u64 boot_gpa, u64 vcpu)
{
    struct cpu *c = &cpus[vcpu];
    c->id = (u32)vcpu;
    c->cur = -1;
    c->rep = c->rep_main = (struct report *)(REPORT_BUF_GPA + vcpu * REPORT_BUF_STRIDE);
    c->rep_nested = (struct report *)(REPORT_BUF_GPA + vcpu * REPORT_BUF_STRIDE +
                                      REPORT_BUF_STRIDE / 2);
    if (vcpu == 0) {
        boot = (struct boot_header *)boot_gpa;
        u64 why = (boot_gpa < PAGE_SIZE || boot_gpa > KERNEL_LOAD_GPA - BOOT_INFO_MAX_BYTES ||
                   (boot_gpa & 7))
                      ? 100
                      : validate();
        if (why) {
            boot_state = 2;
            panic(c, PANIC_BAD_BOOT_INFO, why, boot_gpa, 0);
        }
        verbose = boot->options & BOOT_OPT_VERBOSE;
        doorbell = (boot->options & BOOT_OPT_DOORBELL) != 0;
        heap_next = ((u64)_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        build_descriptors();
        build_kernel_tables(c);
        add_region(c, 0, boot->ram_bytes);
        struct boot_window *w = (void *)((u64)boot + boot->windows_off);
        for (u32 i = 0; i < boot->nr_windows; i++)
            add_region(c, w[i].gpa, w[i].bytes);
        nr_tasks = boot->nr_tasks;
        outl(BOOT_PROGRESS_PORT, 0);
        for (u32 i = 0; i < nr_tasks; i++) {
            setup_task(c, i);
            outl(BOOT_PROGRESS_PORT, i + 1);
        }
        __atomic_store_n(&boot_state, 1, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&boot_state, __ATOMIC_ACQUIRE) == 0)
            cpu_relax();
        if (boot_state != 1)
            halt_forever();
        if (vcpu >= boot->nr_vcpus)
            halt_forever();
    }
    c->rep = c->rep_main = (struct report *)(boot->report_buf_gpa + vcpu * boot->report_buf_stride);
    c->rep_nested = (struct report *)((u64)c->rep_main + (boot->report_buf_stride / 2 & ~7ULL));
    load_descriptors(c->id);
    write_cr3(kernel_cr3);
    write_cr4(read_cr4() | CR4_MCE);
    for (u32 i = 0; i < nr_tasks; i++)
        if (tasks[i].vcpu == c->id)
            c->list[c->nr++] = (u8)i;
    c->pos = c->nr ? c->nr - 1 : 0; /* so the first pick is list[0] */
    report(c, R_BOOT, NO_TASK, c->id, c->nr, 0, 0);
    if (c->id == 0)
        puts_serial("faultline guest up\n");
    if (c->id == 0 && (boot->options & BOOT_OPT_BENCH_EXITS))
        bench_exits(boot->reserved);
    struct frame f;
    zero(&f, sizeof(f));
    resume_user(c, &f, 1);
    enter_user(&f);
}
