/*
 * COM1 (16550A at 0x3f8, ISA IRQ 4). Output polls LSR.THRE and then fills
 * the transmit FIFO; input is interrupt driven (IER.ERBFI + MCR.OUT2) into a
 * ring buffer, and a reader waits with sti;hlt, never by polling LSR.
 */
#include "kernel.h"

#define COM1	0x3f8
#define RBR	0	/* receive buffer (read) */
#define THR	0	/* transmit holding (write) */
#define IER	1	/* interrupt enable */
#define IIR	2	/* interrupt identification (read) */
#define FCR	2	/* FIFO control (write) */
#define LCR	3	/* line control */
#define MCR	4	/* modem control */
#define LSR	5	/* line status */
#define MSR	6	/* modem status */
#define DLL	0	/* divisor latch, LCR.DLAB = 1 */
#define DLM	1

#define LSR_DR		0x01	/* data ready */
#define LSR_THRE	0x20	/* transmit holding register empty */
#define IER_ERBFI	0x01	/* received data available interrupt */
#define MCR_DTR		0x01
#define MCR_RTS		0x02
#define MCR_OUT2	0x08	/* gates the IRQ line on PC hardware */

int serial_fifo_size = 1;
u64 serial_irq_count, serial_rx_bytes, serial_rx_dropped;

#define RX_RING 256
static volatile u8 rx_ring[RX_RING];
static volatile unsigned rx_head, rx_tail;	/* head: producer (irq) */

void serial_init(void)
{
	outb(COM1 + IER, 0);
	outb(COM1 + LCR, 0x80);		/* DLAB */
	outb(COM1 + DLL, 1);		/* 115200 baud */
	outb(COM1 + DLM, 0);
	outb(COM1 + LCR, 0x03);		/* 8N1 */
	outb(COM1 + FCR, 0x07);		/* enable and clear FIFOs, trigger 1 */
	if ((inb(COM1 + IIR) & 0xc0) == 0xc0)
		serial_fifo_size = 16;
	outb(COM1 + MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
}

void serial_enable_rx_irq(void)
{
	outb(COM1 + IER, IER_ERBFI);
}

static void tx_chunk(const char *s, size_t n)
{
	while (n) {
		size_t k = n < (size_t)serial_fifo_size ? n : (size_t)serial_fifo_size;
		while (!(inb(COM1 + LSR) & LSR_THRE))
			;
		n -= k;
		while (k--)
			outb(COM1 + THR, (u8)*s++);
	}
}

void serial_write(const char *s, size_t n)
{
	size_t start = 0, i;

	for (i = 0; i < n; i++) {
		if (s[i] == '\n') {
			tx_chunk(s + start, i - start);
			tx_chunk("\r\n", 2);
			start = i + 1;
		}
	}
	tx_chunk(s + start, n - start);
}

void serial_irq(void)
{
	u8 iir;
	int guard = 64;

	serial_irq_count++;
	while (!((iir = inb(COM1 + IIR)) & 1) && guard--) {
		switch (iir & 0x0e) {
		case 0x04:	/* received data available */
		case 0x0c:	/* character timeout */
			while (inb(COM1 + LSR) & LSR_DR) {
				u8 c = inb(COM1 + RBR);
				unsigned next = (rx_head + 1) % RX_RING;
				serial_rx_bytes++;
				if (next == rx_tail) {
					serial_rx_dropped++;
					continue;
				}
				rx_ring[rx_head] = c;
				rx_head = next;
			}
			break;
		case 0x06:	/* line status */
			inb(COM1 + LSR);
			break;
		case 0x00:	/* modem status */
			inb(COM1 + MSR);
			break;
		default:	/* THRE: nothing to send from here */
			break;
		}
	}
}

int serial_getc(void)
{
	int c;

	for (;;) {
		cli();
		if (rx_tail != rx_head) {
			c = rx_ring[rx_tail];
			rx_tail = (rx_tail + 1) % RX_RING;
			return c;
		}
		sti_hlt();
	}
}
