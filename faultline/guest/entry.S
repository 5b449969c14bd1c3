/* faultline guest kernel: entry point, interrupt stubs, return to user, fixable kernel load. */
#include "kernel.h"

/* --- Multiboot v1 (QEMU's -kernel): the same image, a 32-bit way in --------------------
 * QEMU loads [__kernel_start, __load_end) from the file as the address fields say (the ELF64
 * itself is refused without them), zeroes up to _end, loads the boot info (a multiboot
 * module, after the image) and enters mb_entry32 in flat 32-bit protected mode, paging
 * off, %eax = MB_MAGIC_EAX, %ebx = the multiboot info. mb_entry32 copies the module to
 * BOOT_INFO_GPA, masks the 8259s (SeaBIOS leaves the PIT's IRQ 0 on vector 8, our #DF
 * gate), starts the other vCPUs (INIT + SIPI to ap_tramp copied below 1 MiB), then every
 * vCPU switches to long mode with boot page tables at MB_PML4 and enters _start as on
 * our VMM: %rdi = boot info GPA, %rsi = vCPU id (the APIC id). BOOT_INFO_GPA and
 * BOOT_INFO_MAX_BYTES are linker symbols (build.py: --defsym from faultline.abi). */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010003 /* page-aligned modules, memory info, address fields */
#define MB_MAGIC_EAX 0x2BADB002
#define MBI_FLAGS_MODS 8
#define LAPIC_SVR 0xFEE000F0
#define LAPIC_ICR_LO 0xFEE00300
#define LAPIC_ICR_HI 0xFEE00310
#define ICR_INIT_ALL_BUT_SELF 0x000C4500
#define ICR_SIPI_ALL_BUT_SELF 0x000C4600
#define AP_TRAMPOLINE_GPA 0x30000 /* free below 1 MiB: past the VMM's boot tables */
#define BOOT_CS32 0x18
/* Boot page tables (identity map of 1 GiB, 2 MiB pages), built below 1 MiB where our VMM
 * puts its own (vmm/boot.py): not in the image, whose size the guest's heap budget counts. */
#define MB_PML4 0x21000
#define MB_PDPT 0x22000
#define MB_PD   0x23000

    .section .text.multiboot, "ax"
    .balign 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header      /* header_addr */
    .long __kernel_start /* load_addr */
    .long __load_end     /* load_end_addr */
    .long _end           /* bss_end_addr */
    .long mb_entry32     /* entry_addr */

    .code32
mb_entry32:
    cli
    cld
    mov $(cpu_stacks + KSTACK_BYTES), %esp /* vCPU 0's stack, for icr_wait */
    cmp $MB_MAGIC_EAX, %eax
    jne mb_fail
    testl $MBI_FLAGS_MODS, (%ebx)
    jz mb_fail
    cmpl $1, 20(%ebx)            /* mods_count */
    jb mb_fail
    mov 24(%ebx), %edx           /* mods_addr */
    mov 0(%edx), %esi            /* mod_start */
    mov 4(%edx), %ecx            /* mod_end */
    sub %esi, %ecx
    cmp $BOOT_INFO_MAX_BYTES, %ecx
    ja mb_fail
    mov $BOOT_INFO_GPA, %edi     /* the module sits in what becomes the kernel heap */
    rep movsb
    mov $MB_PML4, %edi
    xor %eax, %eax
    mov $(3 * 4096 / 4), %ecx
    rep stosl
    movl $(MB_PDPT + 3), MB_PML4
    movl $(MB_PD + 3), MB_PDPT
    mov $MB_PD, %edi
    mov $0x83, %eax              /* present, writable, 2 MiB page */
    mov $512, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov $0xff, %al
    out %al, $0xa1
    out %al, $0x21
    mov $ap_tramp, %esi
    mov $AP_TRAMPOLINE_GPA, %edi
    mov $(ap_tramp_end - ap_tramp), %ecx
    rep movsb
    orl $0x100, LAPIC_SVR        /* software-enable the local APIC */
    movl $0, LAPIC_ICR_HI
    movl $ICR_INIT_ALL_BUT_SELF, LAPIC_ICR_LO
    call icr_wait
    movl $(ICR_SIPI_ALL_BUT_SELF | (AP_TRAMPOLINE_GPA >> 12)), LAPIC_ICR_LO
    call icr_wait
    movl $(ICR_SIPI_ALL_BUT_SELF | (AP_TRAMPOLINE_GPA >> 12)), LAPIC_ICR_LO
    call icr_wait
    xor %ebx, %ebx               /* the BSP is vCPU 0 */
    jmp mb_long32
mb_fail:
    cli
    hlt
    jmp mb_fail

/* Wait for the ICR's delivery-status bit. */
icr_wait:
    testl $0x1000, LAPIC_ICR_LO
    jnz icr_wait
    ret

/* An AP, from ap_tramp: flat 32-bit, selectors of boot_gdt. */
ap_entry32:
    mov $KERNEL_DS, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $1, %eax
    cpuid
    shr $24, %ebx                /* initial APIC id = vCPU id */
    jmp mb_long32

/* %ebx = vCPU id; 32-bit protected mode, paging off. */
mb_long32:
    lgdt boot_gdtr
    mov %cr4, %eax
    or $0x60, %eax               /* PAE | MCE */
    mov %eax, %cr4
    mov $MB_PML4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx        /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010023, %eax         /* PG | WP | NE | MP | PE */
    mov %eax, %cr0
    ljmp $KERNEL_CS, $mb_entry64

    .code64
mb_entry64:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $BOOT_INFO_GPA, %edi
    mov %ebx, %esi
    jmp _start

/* Real-mode AP start-up code, copied to AP_TRAMPOLINE_GPA (SIPI: CS = that >> 4, IP = 0). */
    .code16
ap_tramp:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl ap_gdtr - ap_tramp
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $BOOT_CS32, $ap_entry32
    .balign 8
ap_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
ap_tramp_end:
    .code64

    .section .data
    .balign 8
/* null, 64-bit code (KERNEL_CS), flat data (KERNEL_DS), flat 32-bit code (BOOT_CS32) */
boot_gdt:
    .quad 0, 0x00209A0000000000, 0x00CF92000000FFFF, 0x00CF9A000000FFFF
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt


    .code64
    .section .text.entry, "ax"
    .globl _start
/* All vCPUs enter here: 64-bit, CPL 0, paging on (VMM boot tables), %rdi = boot info GPA,
 * %rsi = vCPU id. */
_start:
    cli
    cld
    cmp $KMAX_VCPUS, %rsi
    jae 2f
    mov %rsi, %rax
    imul $CPU_STACK_BLOCK, %rax
    lea cpu_stacks+KSTACK_BYTES(%rax), %rsp
    xor %ebp, %ebp
    call kmain
2:  cli
    hlt
    jmp 2b

/* One 16-byte stub per vector: push a zero error code where the CPU pushes none, then the
 * vector number, then the common path. */
    .macro ISR vec
    .balign 16
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp isr_common
    .endm

    .text
    .balign 16
    .globl isr_table
isr_table:
    .altmacro
    .set vec, 0
    .rept 256
    ISR %vec
    .set vec, vec + 1
    .endr
    .noaltmacro

isr_common:
    cld
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call trap
isr_restore:
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

/* enter_user(frame): restore a frame built in C and iretq to it. */
    .globl enter_user
enter_user:
    mov %rdi, %rsp
    jmp isr_restore

/* switch_stack_and_idle(rsp): abandon the current stack (a dead task's frame, or an IST
 * stack) for the vCPU's kernel stack and idle there forever. */
    .globl switch_stack_and_idle
switch_stack_and_idle:
    mov %rdi, %rsp
    xor %ebp, %ebp
    call idle_loop
1:  hlt
    jmp 1b

/* struct kread_result kread_copy(u64 vaddr): the kernel's own load of a user u64. A #PF or
 * #MC with RIP in [kread_copy, kread_end) is fixed up by trap(): RIP = kread_fixup, rax = 0,
 * rdx = -errno. (On this host a load that exits as MMIO completes before the injected #MC
 * is delivered, so RIP may already be at the ret.) */
    .globl kread_copy, kread_insn, kread_end, kread_fixup
kread_copy:
    xor %edx, %edx
kread_insn:
    mov (%rdi), %rax
    ret
kread_end:
kread_fixup:
    ret

    .section .bss
    .balign 4096
    .globl cpu_stacks
cpu_stacks:
    .space KMAX_VCPUS * CPU_STACK_BLOCK
