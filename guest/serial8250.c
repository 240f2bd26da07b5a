/*
 * An 8250-family UART driver for any COM port, written after the logic of
 * Linux's drivers/tty/serial/8250 (read for facts, not copied):
 *
 *  - autoconfig: IER test, loopback test, FCR=0x01 then IIR bits 7:6 name
 *    the family (0: 8250/16450 by the scratch register, 1: unknown,
 *    2: 16550 with a broken FIFO, 3: 16550A), and for a 16550A the checks
 *    for an EFR (ST16650), a NatSemi SuperIO, a TI16750 (64-byte FIFO bit)
 *    and an XScale UUE bit, each of which a plain 16550A fails;
 *  - startup: the UART_BUG_THRE test (re-enabling ETBEI must raise THRE
 *    again) and the UART_BUG_TXEN test (enabling ETBEI with the
 *    transmitter empty must raise an interrupt);
 *  - the interrupt: loop over the ports on the IRQ until one full round
 *    finds no IIR interrupt, at most PASS_LIMIT rounds ("too much work for
 *    irq" otherwise, counted); one pass reads IIR, LSR, receives while
 *    LSR.DR (at most 256 bytes), reads MSR, and loads up to tx_loadsz bytes
 *    (16 on a 16550A, 1 otherwise) when LSR.THRE and ETBEI is on, turning
 *    ETBEI off once the transmit buffer is empty.
 *
 * The transmit buffer is a window [tx_pos, tx_limit) of at most XMIT_SIZE
 * bytes into the caller's data, advanced in process context only (as the
 * tty layer refills Linux's 4 KiB xmit ring): an interrupt never sends more
 * than the window holds, so one interrupt sends at most 4 KiB.
 *
 * This guest runs its CPL0 code in KVM's instruction emulator on PVM hosts
 * (~1 us per instruction), so the per-byte paths are kept to a handful of
 * instructions around each port access; the self-test's data generation
 * and checking run natively at CPL3 through run_user().
 */
#include "kernel.h"
#include "serial8250.h"

/* Registers (offsets from the base port). */
#define RBR	0	/* receive buffer (read) */
#define THR	0	/* transmit holding (write) */
#define DLL	0	/* divisor latch low (LCR.DLAB) */
#define IER	1	/* interrupt enable */
#define DLM	1	/* divisor latch high (LCR.DLAB) */
#define IIR	2	/* interrupt identification (read) */
#define FCR	2	/* FIFO control (write) */
#define EFR	2	/* enhanced features (ST16650, with LCR = 0xbf) */
#define LCR	3
#define MCR	4
#define LSR	5
#define MSR	6
#define SCR	7	/* scratch */

#define IER_RDI		0x01	/* received data (and character timeout) */
#define IER_THRI	0x02	/* transmitter holding register empty */
#define IER_RLSI	0x04	/* receiver line status */
#define IER_MSI		0x08	/* modem status */
#define IER_UUE		0x40	/* XScale: UART unit enable */

#define IIR_NO_INT	0x01
#define IIR_64BYTE	0x20	/* TI16750: 64-byte FIFO enabled */

#define FCR_ENABLE	0x01
#define FCR_CLEAR_RX	0x02
#define FCR_CLEAR_TX	0x04
#define FCR_64BYTE	0x20	/* TI16750, written with LCR.DLAB */
#define FCR_RTRIG_8	0x80	/* RX trigger at 8 bytes */

#define LCR_WLEN8	0x03
#define LCR_DLAB	0x80
#define LCR_CONF_A	0x80	/* DLAB: where an ST16C650V1 shows its EFR */
#define LCR_CONF_B	0xbf	/* where other EFR parts show it */

#define MCR_DTR		0x01
#define MCR_RTS		0x02
#define MCR_OUT2	0x08	/* enables the IRQ driver on a PC */
#define MCR_LOOP	0x10

#define LSR_DR		0x01
#define LSR_OE		0x02
#define LSR_PE		0x04
#define LSR_FE		0x08
#define LSR_BI		0x10
#define LSR_THRE	0x20
#define LSR_TEMT	0x40
#define LSR_ERRORS	(LSR_OE | LSR_PE | LSR_FE | LSR_BI)

#define MSR_DELTAS	0x0f

#define RX_BUDGET	256	/* bytes per rx_chars call, as Linux */
#define XMIT_SIZE	4096	/* transmit window, Linux's xmit ring size */

#define LAPIC_EOI_ADDR	0xfee000b0UL
#define IOAPIC_BASE	0xfec00000UL
#define IDT_GATE_INTR	0x8e	/* present, DPL 0, 64-bit interrupt gate */

struct type_info {
	const char *name;
	int fifo_size, tx_loadsz;
	u8 fcr;
};

static const struct type_info types[] = {
	[UART_UNKNOWN] = { "unknown", 1, 1, 0 },
	[UART_8250] = { "8250", 1, 1, 0 },
	[UART_16450] = { "16450", 1, 1, 0 },
	[UART_16550] = { "16550", 1, 1, 0 },
	[UART_16550A] = { "16550A", 16, 16, FCR_ENABLE | FCR_RTRIG_8 },
	[UART_16650] = { "ST16650", 1, 1, 0 },
	[UART_16650V2] = { "ST16650V2", 32, 16, FCR_ENABLE },
	[UART_16750] = { "TI16750", 64, 64, FCR_ENABLE | FCR_RTRIG_8 | FCR_64BYTE },
	[UART_XSCALE] = { "XScale", 32, 32, FCR_ENABLE | FCR_RTRIG_8 },
};

const char *serial8250_type_name(enum uart_type t)
{
	return t < ARRAY_SIZE(types) ? types[t].name : "?";
}

/* ------------------------------------------------------------ autoconfig */

static enum uart_type probe_8250_or_16450(u16 b)
{
	u8 save = inb(b + SCR), s1, s2;

	outb(b + SCR, 0xa5);
	s1 = inb(b + SCR);
	outb(b + SCR, 0x5a);
	s2 = inb(b + SCR);
	outb(b + SCR, save);
	return s1 == 0xa5 && s2 == 0x5a ? UART_16450 : UART_8250;
}

/* IIR said 16550A: rule out the parts that extend it, as Linux does. */
static enum uart_type probe_16550a(u16 b)
{
	u8 mcr, excr, fifo1, fifo2, ier;

	/* ST16C650V1 shows a zero EFR with DLAB set; a 16550A shows its IIR there. */
	outb(b + LCR, LCR_CONF_A);
	if (inb(b + EFR) == 0) {
		enum uart_type t = UART_16550A;

		outb(b + EFR, 0xa8);
		if (inb(b + EFR) != 0)
			t = UART_16650;
		outb(b + EFR, 0);
		return t;
	}
	/* Other EFR parts show it with LCR = 0xbf. */
	outb(b + LCR, LCR_CONF_B);
	if (inb(b + EFR) == 0)
		return UART_16650V2;

	/* NatSemi SuperIO: register 2 under LCR 0xe0 mirrors MCR.LOOP. */
	outb(b + LCR, 0);
	mcr = inb(b + MCR);
	outb(b + LCR, 0xe0);
	excr = inb(b + 2);
	if (!((excr ^ mcr) & MCR_LOOP)) {
		outb(b + LCR, 0);
		outb(b + MCR, mcr ^ MCR_LOOP);
		outb(b + LCR, 0xe0);
		excr = inb(b + 2);
		outb(b + LCR, 0);
		outb(b + MCR, mcr);
		if ((excr ^ mcr) & MCR_LOOP)
			printf("serial8250: port 0x%x looks like a NatSemi SuperIO (driven as 16550A)\n", b);
	}

	/* TI16750: IIR bit 5 follows FCR bit 5 only when written with DLAB set. */
	outb(b + LCR, 0);
	outb(b + FCR, FCR_ENABLE | FCR_64BYTE);
	fifo1 = inb(b + IIR) & (0xc0 | IIR_64BYTE);
	outb(b + FCR, FCR_ENABLE);
	outb(b + LCR, LCR_DLAB);
	outb(b + FCR, FCR_ENABLE | FCR_64BYTE);
	fifo2 = inb(b + IIR) & (0xc0 | IIR_64BYTE);
	outb(b + FCR, FCR_ENABLE);
	outb(b + LCR, 0);
	if (fifo1 == 0xc0 && fifo2 == (0xc0 | IIR_64BYTE))
		return UART_16750;

	/* XScale: IER bit 6 (UUE) sticks. */
	ier = inb(b + IER);
	outb(b + IER, ier | IER_UUE);
	if (inb(b + IER) & IER_UUE) {
		outb(b + IER, ier);
		return UART_XSCALE;
	}
	outb(b + IER, ier);
	return UART_16550A;
}

static void clear_fifos(struct uart8250 *up)
{
	u16 b = up->base;

	if (up->fifo_size > 1) {
		outb(b + FCR, FCR_ENABLE);
		outb(b + FCR, FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
		outb(b + FCR, 0);
	}
}

static enum uart_type autoconfig(struct uart8250 *up)
{
	u16 b = up->base;
	u8 ier, ier_zero, ier_all, mcr, lcr, msr;
	enum uart_type t;

	/* IER keeps its low nibble on a UART; an empty bus reads back 0xff. */
	ier = inb(b + IER);
	outb(b + IER, 0);
	ier_zero = inb(b + IER) & 0x0f;
	outb(b + IER, 0x0f);
	ier_all = inb(b + IER) & 0x0f;
	outb(b + IER, ier);
	if (ier_zero != 0 || ier_all != 0x0f) {
		printf("serial8250: no UART at 0x%x (IER test read %#x/%#x)\n", b, ier_zero, ier_all);
		return UART_UNKNOWN;
	}

	mcr = inb(b + MCR);
	lcr = inb(b + LCR);
	/* Loopback with RTS and OUT2: MSR must show CTS and DCD only. */
	outb(b + MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
	msr = inb(b + MSR) & 0xf0;
	outb(b + MCR, mcr);
	if (msr != 0x90) {
		printf("serial8250: port 0x%x failed the loopback test (MSR %#x)\n", b, msr);
		return UART_UNKNOWN;
	}

	/* Clear an EFR if there is one, then ask the IIR about the FIFO. */
	outb(b + LCR, LCR_CONF_B);
	outb(b + EFR, 0);
	outb(b + LCR, 0);
	outb(b + FCR, FCR_ENABLE);
	switch (inb(b + IIR) >> 6) {
	case 0:
		t = probe_8250_or_16450(b);
		break;
	case 2:
		t = UART_16550;
		break;
	case 3:
		t = probe_16550a(b);
		break;
	default:
		t = UART_UNKNOWN;
		break;
	}
	outb(b + LCR, lcr);

	up->type = t;
	up->fifo_size = types[t].fifo_size;
	up->tx_loadsz = types[t].tx_loadsz;
	up->fcr = types[t].fcr;
	/* Leave it quiet: modem lines as found, FIFOs off, RBR read, no interrupts. */
	outb(b + MCR, mcr);
	clear_fifos(up);
	inb(b + RBR);
	outb(b + IER, 0);
	up->ier = 0;
	return t;
}

/* ------------------------------------------------------------- interrupts */

struct serial8250_irq_stats serial8250_irq_stats[16];
static struct uart8250 *irq_ports[16];
static u8 saved_gate[16][16];
static u32 saved_redir[16][2];

void serial8250_interrupt(int irq);	/* called by the stubs below */
extern u8 serial8250_isr3[], serial8250_isr4[];

/*
 * Interrupt entry for ISA IRQ 3 and 4: save the caller-saved registers,
 * call serial8250_interrupt(irq), return. Installed in the IDT while a
 * port is open (cpu.c's own gates are saved and put back afterwards).
 */
__asm__(
	"	.text\n"
	"	.globl serial8250_isr3\n"
	"serial8250_isr3:\n"
	"	pushq %rdi\n"
	"	movl $3, %edi\n"
	"	jmp 1f\n"
	"	.globl serial8250_isr4\n"
	"serial8250_isr4:\n"
	"	pushq %rdi\n"
	"	movl $4, %edi\n"
	"1:	pushq %rax\n"
	"	pushq %rcx\n"
	"	pushq %rdx\n"
	"	pushq %rsi\n"
	"	pushq %r8\n"
	"	pushq %r9\n"
	"	pushq %r10\n"
	"	pushq %r11\n"
	"	cld\n"
	"	call serial8250_interrupt\n"
	"	popq %r11\n"
	"	popq %r10\n"
	"	popq %r9\n"
	"	popq %r8\n"
	"	popq %rsi\n"
	"	popq %rdx\n"
	"	popq %rcx\n"
	"	popq %rax\n"
	"	popq %rdi\n"
	"	iretq\n");

static u8 *idt_gate(int vector)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr;

	__asm__ volatile("sidt %0" : "=m"(idtr));
	return (u8 *)idtr.base + 16 * vector;
}

static u32 ioapic_read(u32 reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

static void request_irq(struct uart8250 *up)
{
	int irq = up->irq;

	if (!irq_ports[irq]) {
		u64 isr = (u64)(irq == 3 ? serial8250_isr3 : serial8250_isr4);
		u8 *g = idt_gate(IRQ_BASE + irq);
		u16 cs = KERNEL_CS;

		memcpy(saved_gate[irq], g, 16);
		memset(g, 0, 16);
		g[0] = (u8)isr;
		g[1] = (u8)(isr >> 8);
		memcpy(g + 2, &cs, 2);
		g[5] = IDT_GATE_INTR;
		g[6] = (u8)(isr >> 16);
		g[7] = (u8)(isr >> 24);
		memcpy(g + 8, (u8 *)&isr + 4, 4);
		/* IOAPIC pin = ISA IRQ: edge, active high, fixed, to this CPU */
		saved_redir[irq][0] = ioapic_read(0x10 + 2 * irq);
		saved_redir[irq][1] = ioapic_read(0x11 + 2 * irq);
		ioapic_write(0x11 + 2 * irq, lapic_id() << 24);
		ioapic_write(0x10 + 2 * irq, IRQ_BASE + irq);
	}
	up->next = irq_ports[irq];
	irq_ports[irq] = up;
}

static void free_irq(struct uart8250 *up)
{
	int irq = up->irq;
	struct uart8250 **pp;

	for (pp = &irq_ports[irq]; *pp; pp = &(*pp)->next) {
		if (*pp == up) {
			*pp = up->next;
			break;
		}
	}
	up->next = NULL;
	if (!irq_ports[irq]) {
		ioapic_write(0x10 + 2 * irq, saved_redir[irq][0]);
		ioapic_write(0x11 + 2 * irq, saved_redir[irq][1]);
		memcpy(idt_gate(IRQ_BASE + irq), saved_gate[irq], 16);
	}
}

static void stop_tx(struct uart8250 *up)
{
	if (up->ier & IER_THRI) {
		up->ier &= ~IER_THRI;
		outb(up->base + IER, up->ier);
	}
}

/* Receive while LSR says data (or a break) is there; returns the last LSR. */
static u8 rx_chars(struct uart8250 *up, u8 lsr)
{
	u16 b = up->base;
	u8 *buf = up->rx_buf;
	u64 pos = up->rx_pos, len = up->rx_len;
	int budget = RX_BUDGET;

	up->rx_passes++;
	do {
		u8 c = 0;

		if (lsr & LSR_DR)
			c = inb(b + RBR);
		if (lsr & LSR_ERRORS)
			up->lsr_errors++;
		if (pos < len)
			buf[pos] = c;
		pos++;
		if (--budget == 0)
			break;
		lsr = inb(b + LSR);
	} while (lsr & (LSR_DR | LSR_BI));
	up->rx_pos = pos;
	return lsr;
}

/* Load up to tx_loadsz bytes into the FIFO; ETBEI off once the window is empty. */
static void tx_chars(struct uart8250 *up)
{
	u16 b = up->base;
	u64 pos = up->tx_pos, n = up->tx_limit - pos;
	const u8 *p = up->tx_buf + pos;

	if (!n) {
		stop_tx(up);
		return;
	}
	if (n > (u64)up->tx_loadsz)
		n = (u64)up->tx_loadsz;
	up->tx_pos = pos + n;
	up->thre_passes++;
	while (n--)
		outb(b + THR, *p++);
	if (up->tx_pos == up->tx_limit)
		stop_tx(up);
}

int serial8250_handle_irq(struct uart8250 *up)
{
	u16 b = up->base;
	u8 iir = inb(b + IIR), lsr;

	if (iir & IIR_NO_INT)
		return 0;
	up->passes++;
	lsr = inb(b + LSR);
	if (lsr & LSR_ERRORS & ~LSR_BI)
		up->lsr_errors++;
	if (lsr & (LSR_DR | LSR_BI))
		lsr = rx_chars(up, lsr);
	if (inb(b + MSR) & MSR_DELTAS)
		up->msr_deltas++;
	if ((lsr & LSR_THRE) && (up->ier & IER_THRI))
		tx_chars(up);
	return 1;
}

void serial8250_interrupt(int irq)
{
	struct serial8250_irq_stats *st = &serial8250_irq_stats[irq];
	struct uart8250 *head = irq_ports[irq], *up = head, *end = NULL;
	int rounds = 0, handled = 0;

	st->irqs++;
	irq_counts[irq]++;
	if (irq == 4)
		serial_irq();	/* COM1 (the console) shares IRQ 4 */
	if (up) {
		do {
			if (serial8250_handle_irq(up)) {
				handled = 1;
				end = NULL;
			} else if (!end) {
				end = up;
			}
			up = up->next ? up->next : head;
			if (up == head) {
				st->loops++;
				if (rounds++ > PASS_LIMIT) {
					st->overflows++;	/* "too much work for irq" */
					break;
				}
			}
		} while (up != end);
	}
	if (!handled)
		st->unhandled++;
	mmio_write32(LAPIC_EOI_ADDR, 0);
}

void serial8250_start_tx(struct uart8250 *up)
{
	if (!(up->ier & IER_THRI)) {
		up->ier |= IER_THRI;
		outb(up->base + IER, up->ier);
		if ((up->bugs & UART_BUG_TXEN) && (inb(up->base + LSR) & LSR_THRE))
			tx_chars(up);
	}
}

/* ----------------------------------------------------------------- startup */

static const u16 com_base[4] = { 0x3f8, 0x2f8, 0x3e8, 0x2e8 };
static const u8 com_irq[4] = { 4, 3, 4, 3 };

static void clear_interrupt_registers(u16 b)
{
	inb(b + LSR);
	inb(b + RBR);
	inb(b + IIR);
	inb(b + MSR);
}

int serial8250_startup(struct uart8250 *up, int index)
{
	u16 b;
	u8 iir1, iir2, lsr;
	int i;

	memset(up, 0, sizeof(*up));
	up->index = (u8)index;
	up->base = b = com_base[index];
	up->irq = com_irq[index];
	if (autoconfig(up) == UART_UNKNOWN)
		return -1;

	clear_fifos(up);
	clear_interrupt_registers(b);
	if (inb(b + LSR) == 0xff) {
		printf("serial8250: COM%d: LSR reads 0xff, no UART\n", index + 1);
		return -1;
	}
	request_irq(up);

	/*
	 * UART_BUG_THRE: with the transmitter idle, enabling ETBEI must raise
	 * THRE, and raise it again after an IIR read cleared it and ETBEI was
	 * toggled. (Interrupts are off here; MCR.OUT2 is not yet set.)
	 */
	for (i = 0; i < 100000 && !(inb(b + LSR) & LSR_THRE); i++)
		;
	outb(b + IER, IER_THRI);
	iir1 = inb(b + IIR);
	outb(b + IER, 0);
	outb(b + IER, IER_THRI);
	iir2 = inb(b + IIR);
	outb(b + IER, 0);
	if (!(iir1 & IIR_NO_INT) && (iir2 & IIR_NO_INT))
		up->bugs |= UART_BUG_THRE;

	outb(b + LCR, LCR_WLEN8);
	outb(b + MCR, MCR_DTR | MCR_RTS | MCR_OUT2);

	/* UART_BUG_TXEN: enabling ETBEI with TEMT set must raise an interrupt. */
	outb(b + IER, IER_THRI);
	lsr = inb(b + LSR);
	iir1 = inb(b + IIR);
	outb(b + IER, 0);
	if ((lsr & LSR_TEMT) && (iir1 & IIR_NO_INT))
		up->bugs |= UART_BUG_TXEN;
	clear_interrupt_registers(b);

	/* termios: 115200 8N1, FIFOs with the type's trigger level */
	outb(b + LCR, LCR_DLAB | LCR_WLEN8);
	outb(b + DLL, 1);
	outb(b + DLM, 0);
	outb(b + LCR, LCR_WLEN8);
	if (up->fcr & FCR_ENABLE) {
		outb(b + FCR, FCR_ENABLE);
		outb(b + FCR, up->fcr);
	}
	up->ier = IER_RLSI | IER_RDI;
	outb(b + IER, up->ier);
	return 0;
}

void serial8250_shutdown(struct uart8250 *up)
{
	u16 b = up->base;

	up->ier = 0;
	outb(b + IER, 0);
	outb(b + MCR, MCR_DTR | MCR_RTS);	/* OUT2 off: the IRQ line is released */
	clear_fifos(up);
	inb(b + RBR);
	free_irq(up);
}

/* ---------------------------------------------------------- serial-selftest */

/*
 * The test stream: xorshift32 (x ^= x << 13; x ^= x >> 17; x ^= x << 5)
 * seeded with 1, one byte per step, the byte being the low 8 bits of the
 * new state. crc is zlib's CRC-32 of the bytes.
 */
#define SELFTEST_BUF	0x2000000UL	/* 32 MiB: RAM for the stream */

struct check_result {
	u64 errors;
	u64 first_error;
	u32 crc;
};


/* CPL3: compare buf with the stream, and CRC-32 it. */
static long user_check(long buf, long n, long result)
{
	const u8 *p = (const u8 *)buf;
	struct check_result *r = (struct check_result *)result;
	u32 x = 1, crc = 0xffffffffu;
	u64 errors = 0, first = (u64)-1;
	long i;
	int k;

	for (i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		if (p[i] != (u8)x) {
			if (!errors)
				first = (u64)i;
			errors++;
		}
		crc ^= p[i];
		for (k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
	}
	r->errors = errors;
	r->first_error = first;
	r->crc = ~crc;
	return 1;
}

extern u8 __end[];

static int buffer_fits(u64 n)
{
	int i;

	if ((u64)__end > SELFTEST_BUF)
		return 0;
	for (i = 0; i < e820_count; i++)
		if (e820[i].type == 1 && e820[i].addr <= SELFTEST_BUF &&
		    e820[i].addr + e820[i].size >= SELFTEST_BUF + n)
			return 1;
	return 0;
}

static struct uart8250 selftest_port;
static u64 console_seen;

static void print_counters(struct uart8250 *up)
{
	struct serial8250_irq_stats *st = &serial8250_irq_stats[up->irq];

	printf("irqs=%lu, passes=%lu, thre-passes=%lu, rx-passes=%lu, unhandled-irqs=%lu, "
	       "pass-limit-overflows=%lu, lsr-errors=%lu",
	       st->irqs, up->passes, up->thre_passes, up->rx_passes, st->unhandled,
	       st->overflows, up->lsr_errors);
}

/*
 * The vCPU is busy in this command, not stuck: a line typed on COM1 gets a
 * progress report (the console's own interrupt handler queues the bytes).
 */
static void console_poll(struct uart8250 *up, int tx, u64 n)
{
	u64 avail = serial_rx_bytes - serial_rx_dropped;

	while (console_seen < avail) {
		int c = serial_getc();

		console_seen++;
		if (c == '\r' || c == '\n') {
			cli();
			printf("serial-selftest: COM%d %s progress %lu/%lu bytes, ", up->index + 1,
			       tx ? "tx" : "rx", tx ? up->tx_pos : up->rx_pos, n);
			print_counters(up);
			printf("\n");
		}
	}
	cli();
}

int cmd_serial_selftest(int argc, char **argv)
{
	struct uart8250 *up = &selftest_port;
	struct serial8250_irq_stats *st;
	struct check_result res;
	u64 port, n, t0, t1;
	int tx;

	if (argc != 4 || parse_u64(argv[1], &port) || port < 2 || port > 4 ||
	    (strcmp(argv[2], "tx") && strcmp(argv[2], "rx")) || parse_u64(argv[3], &n) || !n) {
		printf("usage: serial-selftest <port 2-4> tx|rx <bytes>  (COM1 is the console)\n");
		return 2;
	}
	tx = !strcmp(argv[2], "tx");
	if (!buffer_fits(n)) {
		printf("serial-selftest: %lu bytes do not fit in RAM at 0x%lx\n", n, SELFTEST_BUF);
		return 2;
	}
	if (serial8250_startup(up, (int)port - 1))
		return 1;
	st = &serial8250_irq_stats[up->irq];
	memset(st, 0, sizeof(*st));
	printf("serial-selftest: COM%lu at 0x%x irq %d: %s (fifo %d, tx_loadsz %d), bugs:%s%s%s\n",
	       port, up->base, up->irq, serial8250_type_name(up->type), up->fifo_size, up->tx_loadsz,
	       up->bugs & UART_BUG_THRE ? " THRE" : "", up->bugs & UART_BUG_TXEN ? " TXEN" : "",
	       up->bugs ? "" : " none");
	console_seen = serial_rx_bytes - serial_rx_dropped;

	if (tx) {
		run_user(user_stream_fill, (long)SELFTEST_BUF, (long)n, 1);
		up->tx_buf = (const u8 *)SELFTEST_BUF;
		t0 = rdtsc();
	} else {
		up->rx_buf = (u8 *)SELFTEST_BUF;
		up->rx_len = n;
		printf("serial-selftest: COM%lu ready to receive %lu bytes\n", port, n);
		t0 = rdtsc();
	}
	for (;;) {
		cli();
		if (tx) {
			if (up->tx_pos == up->tx_limit) {
				if (up->tx_limit == n)
					break;
				/* the "tty layer" refills the xmit window, then starts TX */
				up->tx_limit = up->tx_pos + XMIT_SIZE < n ? up->tx_pos + XMIT_SIZE : n;
				serial8250_start_tx(up);
			}
		} else if (up->rx_pos >= n) {
			break;
		}
		console_poll(up, tx, n);
		if (up->bugs & UART_BUG_THRE)
			serial8250_handle_irq(up);	/* no THRE interrupt to wait for: poll */
		else
			sti_hlt();
	}
	if (tx) {
		/* wait until the FIFO has gone to the host */
		while (!(inb(up->base + LSR) & LSR_TEMT))
			console_poll(up, tx, n);
	}
	t1 = rdtsc();
	cli();
	serial8250_shutdown(up);
	/* all bytes count as wrong unless the check runs to its end */
	res.errors = n;
	res.first_error = 0;
	res.crc = 0;
	if (run_user(user_check, (long)SELFTEST_BUF, (long)n, (long)&res) != 1)
		printf("serial-selftest: the check did not complete\n");
	printf("serial-selftest: COM%lu %s %s %lu bytes in %lu tsc, ", port,
	       serial8250_type_name(up->type), tx ? "tx" : "rx", n, t1 - t0);
	print_counters(up);
	printf(", errors=%lu", res.errors);
	if (res.errors)
		printf(" (first at byte %lu)", res.first_error);
	if (!tx && up->rx_pos > n)
		printf(", extra-bytes=%lu", up->rx_pos - n);
	printf(", crc=0x%08x\n", res.crc);
	return res.errors ? 1 : 0;
}
