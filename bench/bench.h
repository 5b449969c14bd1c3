/* faultline bench: the C baselines' shared part. A VM built from an image that Python
 * prepared exactly as for a faultline run (faultline/bench/image.py): guest RAM, regs,
 * sregs, CPUID, MCE set-up and the DAX windows, read from a directory.
 *
 * vm.conf (one item per line):
 *   ram_bytes N | mcg_cap N | uffd 0/1 | mce STATUS MISC MCG_STATUS BANK
 *   window GPA BYTES FILE_OFFSET PATH
 * ram.bin, regs.bin (struct kvm_regs), sregs.bin (struct kvm_sregs),
 * cpuid.bin (struct kvm_cpuid2 + entries).
 * Constants come from abi_gen.h, generated from faultline/abi.py by the bench build. */
#pragma once
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#undef MC_VECTOR /* <asm/kvm.h> has it too (same value) */
#include "abi_gen.h"

#define MAX_REGIONS 16

struct region {
    uint64_t gpa, size, file_offset;
    uint8_t *hva;
    int fd; /* -1: anonymous RAM */
};

struct report {
    uint16_t kind, magic, vcpu, task;
    uint64_t a, b, c, d;
};
_Static_assert(sizeof(struct report) == REPORT_STRUCT_SIZE, "report");

static int kvm_fd = -1, vm_fd = -1, vcpu_fd = -1;
static struct kvm_run *run;
static uint8_t *ram;
static uint64_t ram_bytes, mcg_cap;
static uint64_t mce_status, mce_misc, mce_mcg_status, mce_bank;
static int use_uffd;
static int synced_regs; /* kvm_run->s.regs.regs is valid after each exit */
static struct region regions[MAX_REGIONS]; /* sorted by gpa (Python writes them so) */
static int nr_regions;

static void die(const char *what)
{
    fprintf(stderr, "bench: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what Python's perf_counter_ns reads */
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *slurp(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die(path);
    void *buf = malloc(st.st_size ? st.st_size : 1);
    if (!buf || read(fd, buf, st.st_size) != st.st_size)
        die(path);
    close(fd);
    *len = st.st_size;
    return buf;
}

static void add_memslot(int slot, struct region *r)
{
    struct kvm_userspace_memory_region m = {
        .slot = slot, .flags = 0, .guest_phys_addr = r->gpa, .memory_size = r->size,
        .userspace_addr = (uint64_t)r->hva};
    if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &m) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
}

static void register_uffd(struct region *r)
{
    /* As faultline's SigbusOnMissing: a missing page of a window raises SIGBUS. */
    static int uffd = -1;
    if (uffd < 0) {
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (uffd < 0)
            die("userfaultfd");
        struct uffdio_api api = {.api = UFFD_API,
                                 .features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_MISSING_SHMEM};
        if (ioctl(uffd, UFFDIO_API, &api) < 0)
            die("UFFDIO_API");
    }
    struct uffdio_register reg = {.range = {(uint64_t)r->hva, r->size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");
}

/* Build the VM and its vCPU 0 from the image directory. */
static void setup(const char *dir)
{
    char conf[4096];
    snprintf(conf, sizeof(conf), "%s/vm.conf", dir);
    FILE *f = fopen(conf, "r");
    if (!f)
        die(conf);
    char line[8192];
    nr_regions = 1; /* regions[0] is RAM */
    while (fgets(line, sizeof(line), f)) {
        unsigned long long a, b, c, d;
        char path[4096];
        if (sscanf(line, "ram_bytes %llu", &a) == 1)
            ram_bytes = a;
        else if (sscanf(line, "mcg_cap %llu", &a) == 1)
            mcg_cap = a;
        else if (sscanf(line, "uffd %llu", &a) == 1)
            use_uffd = (int)a;
        else if (sscanf(line, "mce %llu %llu %llu %llu", &a, &b, &c, &d) == 4) {
            mce_status = a;
            mce_misc = b;
            mce_mcg_status = c;
            mce_bank = d;
        } else if (sscanf(line, "window %llu %llu %llu %4095s", &a, &b, &c, path) == 4) {
            if (nr_regions == MAX_REGIONS) {
                fprintf(stderr, "bench: too many windows\n");
                exit(2);
            }
            struct region *r = &regions[nr_regions++];
            r->gpa = a;
            r->size = b;
            r->file_offset = c;
            r->fd = open(path, O_RDWR | O_CLOEXEC);
            if (r->fd < 0)
                die(path);
            r->hva = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd,
                          (off_t)r->file_offset);
            if (r->hva == MAP_FAILED)
                die("mmap window");
        }
    }
    fclose(f);

    size_t len;
    char path[4096];
    snprintf(path, sizeof(path), "%s/ram.bin", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    /* A private copy-on-write mapping of the image: the guest's writes stay in this run. */
    ram = mmap(NULL, ram_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    if (ram == MAP_FAILED)
        die("mmap ram.bin");
    close(fd);
    regions[0] = (struct region){.gpa = 0, .size = ram_bytes, .hva = ram, .fd = -1};

    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0)
        die("/dev/kvm");
    vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (vm_fd < 0)
        die("KVM_CREATE_VM");
    ioctl(vm_fd, KVM_SET_TSS_ADDR, 0xFFFBD000ul); /* as faultline: VMX needs it, else harmless */
    for (int i = 0; i < nr_regions; i++) {
        if (i > 0 && use_uffd)
            register_uffd(&regions[i]);
        add_memslot(i, &regions[i]);
    }
    vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
    if (vcpu_fd < 0)
        die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    void *cpuid = slurp(dir, "cpuid.bin", &len);
    if (ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");
    void *sregs = slurp(dir, "sregs.bin", &len);
    if (len != sizeof(struct kvm_sregs) || ioctl(vcpu_fd, KVM_SET_SREGS, sregs) < 0)
        die("KVM_SET_SREGS");
    void *regs = slurp(dir, "regs.bin", &len);
    if (len != sizeof(struct kvm_regs) || ioctl(vcpu_fd, KVM_SET_REGS, regs) < 0)
        die("KVM_SET_REGS");
    if (mcg_cap && ioctl(vcpu_fd, KVM_X86_SETUP_MCE, &mcg_cap) < 0)
        die("KVM_X86_SETUP_MCE");
    /* As faultline's VMM: KVM stores the GPRs into kvm_run at every exit. */
    int sync = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
    if (sync > 0 && (sync & KVM_SYNC_X86_REGS)) {
        run->kvm_valid_regs = KVM_SYNC_X86_REGS;
        synced_regs = 1;
    }
    free(cpuid);
    free(sregs);
    free(regs);
}

/* The kind of the report record at gpa (0 if it is not a valid record). */
static inline int report_kind(uint64_t gpa, struct report *out)
{
    if (gpa > ram_bytes - sizeof(struct report))
        return 0;
    memcpy(out, ram + gpa, sizeof(*out));
    return out->magic == REPORT_MAGIC ? out->kind : 0;
}

/* GPA -> region: binary search, as GuestMemory.find_region. */
static inline struct region *find_region(uint64_t gpa)
{
    int lo = 0, hi = nr_regions;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    struct region *r = &regions[lo - 1];
    return gpa < r->gpa + r->size ? r : NULL;
}
