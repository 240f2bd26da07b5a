/*
 * kvmkit bundled guest: entry points, descriptor tables, page tables,
 * interrupt stubs and the ring-3 trampolines.
 *
 * Two ways in:
 *  _start     64-bit entry, Linux boot-protocol style (what kvmkit uses):
 *             long mode, paging on, RSI = boot_params (zero page).
 *  pvh_entry  32-bit Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), used by
 *             QEMU's -kernel: protected mode, paging off, EBX = start_info.
 * Both end in common64 with RSI = boot_params (or 0) and RDI = PVH
 * start_info (or 0), on our own GDT and page tables.
 */
#include "layout.h"

/* ---------------------------------------------------------------- notes */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4				/* namesz: "Xen\0" */
	.long 8				/* descsz */
	.long 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry
	.balign 4

/* ---------------------------------------------------------------- entry */
	.section .text.head, "ax"
	.code64
	.globl _start
_start:
	xorl %edi, %edi			/* no PVH start_info on this path */
	jmp common64

	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl %ebx, %edi			/* start_info, kept in EDI */
	lgdt gdt_desc			/* 32-bit lgdt reads limit + low 4 bytes of base */
	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %cr4, %eax
	orl $0x20, %eax			/* CR4.PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx		/* IA32_EFER */
	rdmsr
	orl $0x100, %eax		/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG | PE */
	movl %eax, %cr0
	ljmp $KERNEL_CS, $pvh64

	.code64
pvh64:
	xorl %esi, %esi			/* no boot_params on this path */
	/* fall through */

common64:
	cli
	cld
	movq %rsi, %r12			/* boot_params */
	movq %rdi, %r13			/* PVH start_info */
	leaq kernel_stack_top(%rip), %rsp
	lgdt gdt_desc(%rip)
	pushq $KERNEL_CS
	leaq 1f(%rip), %rax
	pushq %rax
	lretq				/* reload CS from our GDT */
1:	movl $KERNEL_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movq $pml4, %rax
	movq %rax, %cr3			/* our identity map, U/S set everywhere */
	movq %cr4, %rax
	/* clear VME PVI TSD PCIDE SMEP SMAP PKE; set PAE OSFXSR OSXMMEXCPT */
	andq $~((1 << 0) | (1 << 1) | (1 << 2) | (1 << 17) | (1 << 20) | (1 << 21) | (1 << 22)), %rax
	orq $((1 << 5) | (1 << 9) | (1 << 10)), %rax
	movq %rax, %cr4
	movq %cr0, %rax
	andq $~((1 << 2) | (1 << 3) | (1 << 18)), %rax	/* EM, TS, AM off */
	orq $((1 << 1) | (1 << 5)), %rax		/* MP, NE */
	movq %rax, %cr0
	/* zero .bss (stacks live in .stack and are not cleared) */
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	movq %r12, %rdi
	movq %r13, %rsi
	call kmain
2:	cli
	hlt
	jmp 2b

/* ------------------------------------------------------ interrupt stubs */
/*
 * 256 stubs, 16 bytes apart: stub for vector v is at isr_stubs + 16 * v.
 * Each pushes a zero error code when the CPU does not, then the vector.
 */
	.text
	.balign 16
	.globl isr_stubs
isr_stubs:
	vec = 0
	.rept 256
	.balign 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	vec = vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rbx
	pushq %rbp
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi
	call trap_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rbp
	popq %rbx
	popq %rdx
	popq %rcx
	popq %rax
	addq $16, %rsp			/* vector, error code */
	iretq

/* -------------------------------------------------------------- ring 3 */
/*
 * long run_user(long (*fn)(long, long, long), long a0, long a1, long a2)
 * Runs fn(a0, a1, a2) at CPL3 with IOPL=3 on the user stack. Returns the
 * value fn returns (through user_exit_trampoline: int $0x80, SYS_EXIT) or
 * passes to SYS_EXIT itself.
 */
	.globl run_user
run_user:
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, saved_kernel_rsp(%rip)
	leaq user_stack_top(%rip), %rax
	leaq user_exit_trampoline(%rip), %r8
	movq %r8, -8(%rax)		/* return address of fn */
	subq $8, %rax
	pushq $USER_DS			/* SS */
	pushq %rax			/* RSP */
	pushq $0x3202			/* RFLAGS: IOPL=3, IF */
	pushq $USER_CS			/* CS */
	pushq %rdi			/* RIP */
	movq %rsi, %rdi
	movq %rdx, %rsi
	movq %rcx, %rdx
	movl $USER_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	xorl %eax, %eax
	xorl %ebx, %ebx
	xorl %ecx, %ecx
	xorl %ebp, %ebp
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r11d, %r11d
	xorl %r12d, %r12d
	xorl %r13d, %r13d
	xorl %r14d, %r14d
	xorl %r15d, %r15d
	iretq

/* void user_return(long value): back to run_user's caller (from SYS_EXIT) */
	.globl user_return
user_return:
	movq %rdi, %rax
	movq saved_kernel_rsp(%rip), %rsp
	movl $KERNEL_DS, %ecx
	movl %ecx, %ds
	movl %ecx, %es
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	ret

/* Code below runs at CPL3 (all pages are user-accessible). */
	.globl user_exit_trampoline
user_exit_trampoline:
	movq %rax, %rdi
	movl $SYS_EXIT, %eax
	int $0x80
	ud2

/* long user_pio_out_loop(unsigned long count, unsigned port): TSC cycles */
	.globl user_pio_out_loop
user_pio_out_loop:
	movq %rdi, %rcx
	movl %esi, %r9d
	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	movq %rax, %r8
	movl %r9d, %edx
	xorl %eax, %eax
	testq %rcx, %rcx
	jz 2f
1:	outb %al, %dx
	decq %rcx
	jnz 1b
2:	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	subq %r8, %rax
	ret

/* long user_pio_in_loop(unsigned long count, unsigned port): TSC cycles */
	.globl user_pio_in_loop
user_pio_in_loop:
	movq %rdi, %rcx
	movl %esi, %r9d
	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	movq %rax, %r8
	movl %r9d, %edx
	testq %rcx, %rcx
	jz 2f
1:	inb %dx, %al
	decq %rcx
	jnz 1b
2:	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	subq %r8, %rax
	ret

/* long user_syscall(long nr, long a0, long a1) */
	.globl user_syscall
user_syscall:
	movq %rdi, %rax
	movq %rsi, %rdi
	movq %rdx, %rsi
	int $0x80
	ret

/* unsigned long read_cs(void) */
	.globl read_cs
read_cs:
	xorl %eax, %eax
	movw %cs, %ax
	ret

/* unsigned long read_rflags(void) */
	.globl read_rflags
read_rflags:
	pushfq
	popq %rax
	ret

/* ------------------------------------------------------ fault helpers */
/* void do_ud2(void): raises #UD; the handler resumes at do_ud2_resume */
	.globl do_ud2, do_ud2_resume
do_ud2:
	ud2
do_ud2_resume:
	ret

/*
 * void do_sse_mmio(unsigned long addr): pxor (%rdi), %xmm0 -- an SSE
 * arithmetic instruction with a memory operand. On an address that is not
 * RAM, KVM must emulate it as MMIO and its instruction emulator has no pxor,
 * so KVM_RUN ends with KVM_EXIT_INTERNAL_ERROR (emulation) on any host.
 */
	.globl do_sse_mmio
do_sse_mmio:
	pxor (%rdi), %xmm0
	ret

/* void do_cmpxchg16b(void *p16): lock cmpxchg16b on 16-byte aligned RAM */
	.globl do_cmpxchg16b
do_cmpxchg16b:
	pushq %rbx
	xorl %eax, %eax
	xorl %edx, %edx
	xorl %ebx, %ebx
	xorl %ecx, %ecx
	lock cmpxchg16b (%rdi)
	popq %rbx
	ret

/* void do_triple_fault(void): zero-limit IDT, then ud2 -> #UD -> #DF -> shutdown */
	.globl do_triple_fault
do_triple_fault:
	cli
	lidt null_idt_desc(%rip)
	ud2
	int3
	ret

/* ------------------------------------------------------------- data */
	.data
	.balign 16
	.globl gdt, gdt_tss
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00cf9a000000ffff	/* 0x08 kernel code, 32-bit (PVH stub) */
	.quad 0x00af9a000000ffff	/* 0x10 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x18 kernel data */
	.quad 0x00cffa000000ffff	/* 0x20 user code, 32-bit (unused) */
	.quad 0x00cff2000000ffff	/* 0x28 user data, DPL 3 */
	.quad 0x00affa000000ffff	/* 0x30 user code, 64-bit, DPL 3 */
gdt_tss:
	.quad 0, 0			/* 0x38 TSS (16 bytes), filled by cpu_init */
gdt_end:

	.balign 8
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

null_idt_desc:
	.word 0
	.quad 0

saved_kernel_rsp:
	.quad 0

/*
 * Identity map of 0..4 GiB with 2 MiB pages, U/S set everywhere (this test
 * kernel runs its ring-3 code out of its own image). 0xfe000000..4 GiB
 * (IOAPIC, LAPIC) is mapped uncached.
 */
	.balign 4096
	.globl pml4
pml4:
	.quad pdpt + 0x7		/* P | RW | US */
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0007
	.quad pd + 0x1007
	.quad pd + 0x2007
	.quad pd + 0x3007
	.fill 508, 8, 0
pd:
	i = 0
	.rept 2048
	.quad (i << 21) | 0x87 | ((i >= 2032) & 0x18)	/* P RW US PS [PWT PCD] */
	i = i + 1
	.endr

/* ------------------------------------------------------------- stacks */
	.section .stack, "aw", @nobits
	.balign 4096
	.skip 16384
	.globl kernel_stack_top
kernel_stack_top:
	.skip 16384
	.globl intr_stack_top
intr_stack_top:			/* TSS.RSP0: ring 3 -> ring 0 */
	.skip 16384
	.globl user_stack_top
user_stack_top:

	.section .note.GNU-stack, "", @progbits
