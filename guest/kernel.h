/* kvmkit bundled guest: shared declarations. */
#ifndef KVMKIT_GUEST_KERNEL_H
#define KVMKIT_GUEST_KERNEL_H

#include "layout.h"

#define GUEST_VERSION "0.1"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;
typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)
#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* ---- port I/O, MMIO, CPU ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline u16 mmio_read16(u64 addr) { return *(volatile u16 *)addr; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void mmio_write16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* sti;hlt back to back: an interrupt pending at sti still wakes the hlt */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }

/* ---- lib.c ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
int parse_u64(const char *s, u64 *out);		/* decimal or 0x hex; 0 on success */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void puts_raw(const char *s);

/* ---- serial.c (COM1) ---- */
void serial_init(void);
void serial_enable_rx_irq(void);
void serial_write(const char *s, size_t n);	/* '\n' -> "\r\n" */
void serial_irq(void);
int serial_getc(void);				/* blocks with sti;hlt */
extern u64 serial_irq_count, serial_rx_bytes, serial_rx_dropped;
extern int serial_fifo_size;

/* ---- cpu.c ---- */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rdi, rsi, rbp, rbx, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;		/* pushed by the CPU */
};
void cpu_init(void);				/* GDT TSS, IDT */
void irq_init(void);				/* PICs masked, LAPIC, IOAPIC */
void trap_dispatch(struct trap_frame *f);
void expect_exception(int vector, void (*resume)(void));
int exception_caught(void);
void poweroff(int status) __attribute__((noreturn));
void reboot(void) __attribute__((noreturn));
u32 lapic_id(void);
extern u64 irq_counts[16];
extern u64 vector_counts[256];			/* every interrupt vector >= 32 */
extern u64 spurious_count;
extern u64 syscalls_by_gate, syscalls_by_ud;	/* how int $0x80 arrived */
extern u64 boot_tsc;

/* ---- head.S ---- */
long run_user(long (*fn)(long, long, long), long a0, long a1, long a2);
long user_stream_fill(long buf, long n, long seed);
/* Route IOAPIC pin to vector, level-triggered, active high; ack_addr (a byte read before EOI,
   e.g. a virtio ISR) deasserts the line; 0 unroutes. */
void ioapic_route_level(int pin, int vector, u64 ack_addr);
void ioapic_mask(int pin);
void user_return(long value) __attribute__((noreturn));
long user_pio_out_loop(long count, long port, long unused);
long user_pio_in_loop(long count, long port, long unused);
long user_syscall(long nr, long a0, long a1);
u64 read_cs(void);
u64 read_rflags(void);
void do_ud2(void);
void do_ud2_resume(void);
void do_sse_mmio(u64 addr);
void do_cmpxchg16b(void *p16);
void do_triple_fault(void);
extern u8 isr_stubs[];
extern u64 gdt_tss[2];

/* ---- main.c: what the boot loader told us ---- */
#define E820_MAX 128
struct e820_entry {
	u64 addr, size;
	u32 type;
};
extern struct e820_entry e820[E820_MAX];
extern int e820_count;
extern char cmdline[];
extern const char *boot_path;		/* "linux64" or "pvh" */
u64 e820_ram_total(void);
int run_line(char *line);			/* run one command line; its status */

#endif
