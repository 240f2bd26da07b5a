/* Selectors and numbers shared by head.S and the C files. */
#ifndef KVMKIT_GUEST_LAYOUT_H
#define KVMKIT_GUEST_LAYOUT_H

#define KERNEL_CS32	0x08
#define KERNEL_CS	0x10
#define KERNEL_DS	0x18
#define USER_DS		(0x28 | 3)
#define USER_CS		(0x30 | 3)
#define TSS_SEL		0x38

#define IRQ_BASE	0x20	/* ISA IRQ n -> vector IRQ_BASE + n */
#define SYSCALL_VECTOR	0x80	/* int $0x80, DPL 3 */
#define SPURIOUS_VECTOR	0xff
#define WAKE_VECTOR	0x3f	/* LAPIC periodic timer bounding a driver's sti;hlt waits */
#define VIRTIO_VECTOR_BASE 0x40	/* virtio MSI-X entry e -> vector 0x40 + e (0: config, 1 + q: queue q) */
#define VIRTIO_INTX_VECTOR 0x4f	/* virtio INTx (intx mode): the IOAPIC pin of its Interrupt Line, level */

/* int $0x80 ABI: RAX = number, RDI, RSI = arguments, result in RAX. */
#define SYS_EXIT	0	/* exit(value): back to the kernel, run_user returns value */
#define SYS_WRITE	1	/* write(buf, len) to COM1 */

#endif
