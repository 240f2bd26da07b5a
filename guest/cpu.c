/*
 * Descriptor tables, interrupt controllers, traps and system calls.
 * The kernel runs with interrupts off except while it waits in sti;hlt
 * (and ring-3 code runs with IF=1).
 */
#include "kernel.h"

#define LAPIC_BASE	0xfee00000UL
#define LAPIC_ID	0x020
#define LAPIC_TPR	0x080
#define LAPIC_EOI	0x0b0
#define LAPIC_SVR	0x0f0	/* spurious-interrupt vector register, bit 8 = enable */
#define IOAPIC_BASE	0xfec00000UL
#define IOAPIC_REGSEL	0x00
#define IOAPIC_WIN	0x10
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))

#define EXIT_PORT	0x501	/* kvmkit exit port: outb v ends the VM with status v */

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iopb;
	/*
	 * I/O permission bitmap, all zero: every port allowed at CPL3. Ring 3
	 * also runs with IOPL=3, which alone suffices on hardware, but the PVM
	 * host here ignores the guest's IOPL and checks the bitmap.
	 */
	u8 io_bitmap[65536 / 8];
	u8 io_bitmap_end;	/* 0xff */
} __attribute__((packed));

struct idt_gate {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 type;	/* P | DPL | 0xe (interrupt gate) */
	u16 off1;
	u32 off2;
	u32 reserved;
} __attribute__((packed));

static struct tss tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct {
	u16 limit;
	u64 base;
} __attribute__((packed)) idt_desc;

extern u8 intr_stack_top[];

u64 irq_counts[16];
u64 vector_counts[256];
u64 spurious_count;
u64 boot_tsc;

static int expected_vector = -1;
static void (*expected_resume)(void);
static int caught;

static void set_gate(int vec, int dpl)
{
	u64 addr = (u64)isr_stubs + 16 * vec;
	struct idt_gate *g = &idt[vec];

	g->off0 = (u16)addr;
	g->sel = KERNEL_CS;
	g->ist = 0;
	g->type = 0x8e | (dpl << 5);
	g->off1 = (u16)(addr >> 16);
	g->off2 = (u32)(addr >> 32);
	g->reserved = 0;
}

void cpu_init(void)
{
	u64 base = (u64)&tss, limit = sizeof(tss) - 1;
	int v;

	tss.rsp[0] = (u64)intr_stack_top;
	tss.iopb = __builtin_offsetof(struct tss, io_bitmap);
	tss.io_bitmap_end = 0xff;
	/* 64-bit available TSS descriptor, type 9, present */
	gdt_tss[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
		     (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt_tss[1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(TSS_SEL));

	for (v = 0; v < 256; v++)
		set_gate(v, v == SYSCALL_VECTOR ? 3 : 0);
	idt_desc.limit = sizeof(idt) - 1;
	idt_desc.base = (u64)idt;
	__asm__ volatile("lidt %0" : : "m"(idt_desc));
}

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

u32 lapic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
	mmio_write32(IOAPIC_BASE + IOAPIC_WIN, v);
}

/* Route ISA IRQ irq (IOAPIC pin) to vector IRQ_BASE + irq on this CPU. */
static void ioapic_route(int pin, int irq)
{
	ioapic_write(IOAPIC_REDTBL(pin) + 1, lapic_id() << 24);
	/* fixed delivery, physical destination, active high, edge, unmasked */
	ioapic_write(IOAPIC_REDTBL(pin), IRQ_BASE + irq);
}

static volatile u64 level_ack[256];  /* vector -> MMIO byte to read before EOI */

void ioapic_route_level(int pin, int vector, u64 ack_addr)
{
	level_ack[vector & 0xff] = ack_addr;
	ioapic_write(IOAPIC_REDTBL(pin) + 1, lapic_id() << 24);
	/* fixed delivery, physical destination, active high, level (bit 15), unmasked */
	ioapic_write(IOAPIC_REDTBL(pin), (1u << 15) | (u32)vector);
}

void ioapic_mask(int pin)
{
	ioapic_write(IOAPIC_REDTBL(pin), 1u << 16);
}

void irq_init(void)
{
	/* 8259s: remap to 0x20/0x28 (so a stray one is not an exception), mask all */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);

	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
	ioapic_route(4, 4);		/* COM1 */
	serial_enable_rx_irq();
}

void expect_exception(int vector, void (*resume)(void))
{
	caught = 0;
	expected_resume = resume;
	expected_vector = vector;
}

int exception_caught(void)
{
	expected_vector = -1;
	return caught;
}

void poweroff(int status)
{
	cli();
	outb(EXIT_PORT, (u8)status);
	for (;;)	/* the exit port is missing: stop here */
		__asm__ volatile("hlt");
}

void reboot(void)
{
	int i;

	cli();
	for (i = 0; i < 1000 && (inb(0x64) & 0x02); i++)	/* i8042 input buffer full */
		;
	outb(0x64, 0xfe);		/* pulse the reset line */
	do_triple_fault();
	for (;;)
		__asm__ volatile("hlt");
}

static long sys_write(u64 buf, u64 len)
{
	if (len > 4096)
		len = 4096;
	serial_write((const char *)buf, len);
	return (long)len;
}

/*
 * On a PVM host (nested KVM without VMX/SVM, see ENVIRONMENT.md) ring-3
 * `int $n` does not reach the guest's gate: the guest gets #UD at the int
 * instruction instead. Exceptions from ring 3 are delivered, so an #UD from
 * CPL3 on "cd 80" (int $0x80) is taken as the system call the gate would
 * have delivered, with RIP moved past the instruction as the gate would.
 */
u64 syscalls_by_gate, syscalls_by_ud;

static int is_int80_ud(const struct trap_frame *f)
{
	return f->vector == 6 && (f->cs & 3) == 3 && f->rip < (1UL << 32) - 2 &&
	       *(volatile const u16 *)f->rip == 0x80cd;
}

void trap_dispatch(struct trap_frame *f)
{
	u64 v = f->vector;

	if (is_int80_ud(f)) {
		f->rip += 2;
		v = SYSCALL_VECTOR;
		syscalls_by_ud++;
	} else if (v == SYSCALL_VECTOR) {
		syscalls_by_gate++;
	}

	if (v < 32) {
		if ((int)v == expected_vector) {
			caught = 1;
			expected_vector = -1;
			if (expected_resume)
				f->rip = (u64)expected_resume;
			return;
		}
		printf("\nguest exception %lu at rip=%lx err=%lx\n", v, f->rip, f->error);
		if (v == 14) {
			u64 cr2;
			__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
			printf("cr2=%lx cs=%lx rsp=%lx\n", cr2, f->cs, f->rsp);
		}
		poweroff(3);
	}
	vector_counts[v & 0xff]++;
	if (v == SYSCALL_VECTOR) {
		switch (f->rax) {
		case SYS_EXIT:
			user_return((long)f->rdi);
		case SYS_WRITE:
			f->rax = sys_write(f->rdi, f->rsi);
			break;
		default:
			f->rax = (u64)-1;
		}
		return;
	}
	if (v == SPURIOUS_VECTOR) {
		spurious_count++;
		return;		/* no EOI for a spurious interrupt */
	}
	if (v >= IRQ_BASE && v < IRQ_BASE + 16) {
		irq_counts[v - IRQ_BASE]++;
		if (v == IRQ_BASE + 4)
			serial_irq();
	}
	if (level_ack[v & 0xff])
		(void)mmio_read8(level_ack[v & 0xff]);	/* the device lowers its line before the EOI */
	lapic_write(LAPIC_EOI, 0);
}
