/* faultline bench fault, C baseline: from the end of the R_TASK_START report's handling (the
 * task's next instruction is the load from the truncated DAX page) to the arrival of the
 * guest #MC handler's R_MCE report. On the way, as faultline with the mce policy:
 * detection (MMIO exit in a window, or a bare -EFAULT), a minimal resolution (region lookup
 * + fstat of the backing file), the MCIP check and KVM_X86_SET_MCE with the encoding of
 * faultline.vmm.policy.mce_encoding (given in vm.conf).
 * Like faultline it reads the GPRs from kvm_run (KVM_CAP_SYNC_REGS) and skips the
 * MCG_STATUS read before the first #MC. Differences (see docs/performance.md): a bare
 * -EFAULT's GPA is taken as the first window page beyond EOF after KVM_TRANSLATE(rip)
 * (faultline decodes the instruction, with KVM_GET_SREGS and a page walk); no
 * /proc/self/maps cross-check, no event log. */
#include "bench.h"

#define MSR_MCG_STATUS 0x17a
#define MCG_STATUS_MCIP (1ull << 2)
#define PAGE_MASK (~(uint64_t)(PAGE_SIZE - 1))

static uint64_t pending_gpa, faults;
static uint64_t t_fault, t_mce; /* fault exit seen; KVM_X86_SET_MCE done: the VMM's share */
static int pending, mce_injected;

/* A bare -EFAULT names no GPA: the instruction's context first, then the first window page
 * that cannot be backed. */
static uint64_t recover_bare(void)
{
    struct kvm_regs regs;
    if (synced_regs)
        regs = run->s.regs.regs;
    else if (ioctl(vcpu_fd, KVM_GET_REGS, &regs) < 0)
        die("KVM_GET_REGS");
    struct kvm_translation tr = {.linear_address = regs.rip};
    if (ioctl(vcpu_fd, KVM_TRANSLATE, &tr) < 0)
        die("KVM_TRANSLATE");
    for (int i = 1; i < nr_regions; i++) {
        struct stat st;
        if (fstat(regions[i].fd, &st) < 0)
            die("fstat");
        uint64_t eof_page = ((uint64_t)st.st_size + PAGE_SIZE - 1) & PAGE_MASK;
        if (eof_page < regions[i].file_offset + regions[i].size)
            return regions[i].gpa + (eof_page > regions[i].file_offset
                                         ? eof_page - regions[i].file_offset : 0);
    }
    fprintf(stderr, "bench: bare EFAULT and no bad window page\n");
    exit(3);
}

/* Resolution (region + fstat: is the page beyond EOF?) and the decision: an SRAR. */
static void on_fault(uint64_t gpa)
{
    struct region *r = find_region(gpa);
    if (!r || r->fd < 0) {
        fprintf(stderr, "bench: fault at %#llx outside the windows\n", (unsigned long long)gpa);
        exit(3);
    }
    struct stat st;
    if (fstat(r->fd, &st) < 0)
        die("fstat");
    uint64_t off = r->file_offset + (gpa - r->gpa);
    if ((off & PAGE_MASK) < (uint64_t)st.st_size) {
        fprintf(stderr, "bench: fault at %#llx is not beyond EOF\n", (unsigned long long)gpa);
        exit(3);
    }
    faults++;
    pending = 1;
    pending_gpa = gpa & PAGE_MASK;
}

static void inject(void)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e;
    } msrs = {.hdr = {.nmsrs = 1}, .e = {.index = MSR_MCG_STATUS}};
    /* As faultline: MCIP can only be set by an #MC we injected, so the first needs no read. */
    if (mce_injected) {
        if (ioctl(vcpu_fd, KVM_GET_MSRS, &msrs) != 1)
            die("KVM_GET_MSRS");
        if (msrs.e.data & MCG_STATUS_MCIP)
            return; /* as faultline: wait for the guest to finish its handler */
    }
    struct kvm_x86_mce mce = {.status = mce_status, .addr = pending_gpa, .misc = mce_misc,
                              .mcg_status = mce_mcg_status, .bank = (uint8_t)mce_bank};
    if (ioctl(vcpu_fd, KVM_X86_SET_MCE, &mce) < 0)
        die("KVM_X86_SET_MCE");
    if (!t_mce)
        t_mce = now_ns();
    mce_injected = 1;
    pending = 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE_DIR\n", argv[0]);
        return 2;
    }
    setup(argv[1]);
    uint64_t t0 = 0, t1 = 0;
    const char *source = "none";
    for (;;) {
        if (pending)
            inject();
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EFAULT) {
                if (!t_fault)
                    t_fault = now_ns();
                source = "bare-efault";
                on_fault(recover_bare());
                continue;
            }
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t n = run->io.size * run->io.count;
            if (run->io.direction != KVM_EXIT_IO_OUT) {
                memset(data, 0xff, n);
            } else if (run->io.port == REPORT_PORT) {
                uint32_t gpa = 0;
                memcpy(&gpa, data, n < 4 ? n : 4);
                struct report rep;
                int kind = report_kind(gpa, &rep);
                if (kind == R_MCE) {
                    t1 = now_ns();
                    break;
                }
                if (kind == R_PANIC || kind == R_EXCEPTION) {
                    fprintf(stderr, "bench: guest report kind %d\n", kind);
                    return 3;
                }
                if (kind == R_TASK_START)
                    t0 = now_ns();
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            struct region *r = find_region(run->mmio.phys_addr);
            if (!run->mmio.is_write) /* completed on re-entry: filler, never used */
                memset(run->mmio.data, r ? 0xde : 0xff, run->mmio.len);
            if (r) {
                if (!t_fault)
                    t_fault = now_ns();
                source = "mmio";
                on_fault(run->mmio.phys_addr);
            }
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            break;
        } else {
            fprintf(stderr, "bench: unexpected exit %u\n", run->exit_reason);
            return 3;
        }
    }
    if (!t0 || !t1) {
        fprintf(stderr, "bench: no task start / #MC report seen\n");
        return 3;
    }
    printf("{\"fault_to_mce_ns\": %llu, \"exit_to_mce_ns\": %llu, \"vmm_ns\": %llu, "
           "\"source\": \"%s\", \"faults\": %llu}\n", (unsigned long long)(t1 - t0),
           (unsigned long long)(t1 - t_fault), (unsigned long long)(t_mce - t_fault), source,
           (unsigned long long)faults);
    return 0;
}
