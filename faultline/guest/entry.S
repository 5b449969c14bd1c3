/* faultline guest kernel: entry point, interrupt stubs, return to user, fixable kernel load. */
#include "kernel.h"

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
