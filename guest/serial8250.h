/*
 * An 8250-family UART driver for COM1-COM4 that follows the logic of
 * Linux's 8250 driver (autoconfig probe, startup THRE/TXEN tests, an
 * interrupt loop with a 512-pass limit, 16-byte transmit loads), used by
 * the serial-selftest command. See docs/serial.md.
 */
#ifndef KVMKIT_GUEST_SERIAL8250_H
#define KVMKIT_GUEST_SERIAL8250_H

#include "kernel.h"

#define PASS_LIMIT	512	/* handler passes per interrupt, as Linux's 8250_core */

enum uart_type {
	UART_UNKNOWN, UART_8250, UART_16450, UART_16550, UART_16550A,
	UART_16650, UART_16650V2, UART_16750, UART_XSCALE,
};

#define UART_BUG_THRE	0x1	/* THRE not re-raised when ETBEI is re-enabled */
#define UART_BUG_TXEN	0x2	/* no THRE interrupt when ETBEI is enabled */

struct uart8250 {
	u16 base;
	u8 irq;
	u8 index;			/* 0 for COM1 */
	enum uart_type type;
	int fifo_size, tx_loadsz;
	u8 fcr;				/* FCR value for normal operation */
	u8 ier;				/* IER as the driver last wrote it */
	u32 bugs;
	/* transmit: bytes [tx_pos, tx_limit) of tx_buf are the "xmit buffer" */
	const u8 *tx_buf;
	u64 tx_pos, tx_limit;
	/* receive: bytes land at rx_buf[rx_pos] while rx_pos < rx_len */
	u8 *rx_buf;
	u64 rx_pos, rx_len, rx_extra;
	/* counters */
	u64 passes;			/* handler passes that found an interrupt */
	u64 thre_passes, rx_passes;
	u64 lsr_errors, msr_deltas;
	struct uart8250 *next;		/* next port on the same IRQ */
};

struct serial8250_irq_stats {
	u64 irqs;			/* interrupt entries */
	u64 loops;			/* handler passes over the port list */
	u64 unhandled;			/* entries where no port had work */
	u64 overflows;			/* "too much work for irq": pass limit hit */
};

const char *serial8250_type_name(enum uart_type t);
/* Probe and start a port; 0 on success, -1 with a message printed if absent. */
int serial8250_startup(struct uart8250 *up, int index);
void serial8250_shutdown(struct uart8250 *up);
void serial8250_start_tx(struct uart8250 *up);
int serial8250_handle_irq(struct uart8250 *up);	/* one pass: 1 if it had work */
extern struct serial8250_irq_stats serial8250_irq_stats[16];

/* The serial-selftest command (commands.c table entry). */
int cmd_serial_selftest(int argc, char **argv);

#endif
