/*
 * Timer drivers and the `timer-bench` command: the local APIC one-shot
 * timer (TMICT), the TSC-deadline timer (where CPUID offers it) and the
 * kvmkit paravirtual clock event device (docs/pv-clockevent.md), each run
 * through N program -> expiry cycles the same way:
 *
 *   program(now + delta); while (no new interrupt) sti;hlt; record lateness
 *
 * Every timer interrupt uses an ISA-range vector (IRQ_BASE + 8 / + 9), so
 * cpu.c's trap_dispatch counts it in irq_counts[] and sends the EOI: the
 * loop watches the count and needs no handler of its own.
 *
 * A run is bracketed by writes to port 0x510 (TIMER_MARK_PORT): byte
 * 2 * mode at the start and 2 * mode + 1 at the end, so a host benchmark
 * can read its counters exactly there (benchmarks/timer.py).
 *
 * This code runs at CPL0, which the project's nested KVM emulates at about
 * 1 us per instruction: the cycle is kept to a few dozen instructions.
 */
#include "kernel.h"

#define LAPIC_BASE	0xfee00000UL
#define LAPIC_LVT_TIMER	0x320
#define LAPIC_TMICT	0x380	/* initial count */
#define LAPIC_TMCCT	0x390	/* current count */
#define LAPIC_TDCR	0x3e0	/* divide configuration; 0xb = divide by 1 */
#define LVT_MASKED	(1U << 16)
#define LVT_TSC_DEADLINE (2U << 17)
#define MSR_TSC_DEADLINE 0x6e0

#define TIMER_VECTOR	(IRQ_BASE + 8)	/* LAPIC timer (one-shot and TSC deadline) */
#define PV_VECTOR	(IRQ_BASE + 9)	/* PV clock event device, MSI */
#define PV_GSI		10		/* pv-gsi: IOAPIC pin 10 -> vector IRQ_BASE + 10 */
#define IOAPIC_BASE	0xfec00000UL
#define TIMER_MARK_PORT	0x510

/* PV clock event device, vCPU 0's window (docs/pv-clockevent.md) */
#define PVCE_BASE	0xfea00000UL
#define PVCE_ID		0x00
#define PVCE_FEATURES	0x08
#define PVCE_TSC_KHZ	0x0c
#define PVCE_CONTROL	0x10
#define PVCE_DEADLINE	0x18
#define PVCE_STATUS	0x20
#define PVCE_SYNC	0x28
#define PVCE_SYNC_END	0x30
#define PVCE_SYNC_ERROR	0x38
#define PVCE_GUEST_NOW	0x40
#define PVCE_SHARED_GPA	0x48
#define PVCE_DOORBELL	0x50
#define PVCE_MAGIC	0x45435650
#define PVCE_FEAT_SHARED (1U << 2)
#define PVCE_CTRL_ENABLE (1U << 0)
#define PVCE_CTRL_SHARED (1U << 2)
#define PVCE_CTRL_ROUTE_GSI (1U << 3)
#define PVCE_CTRL_GSI_SHIFT 16
#define PVCE_NEVER	(1UL << 63)

struct pvce_shared {
	volatile u64 deadline;	/* guest writes */
	volatile u64 armed;	/* host writes */
	volatile u32 count;	/* host writes */
	u32 reserved[11];
} __attribute__((aligned(64)));

static struct pvce_shared pv_shm;

enum { M_TMICT = 1, M_TSCDL, M_PV, M_PVREG, M_PVLATER, M_PVGSI };
static const char *const mode_names[] = { "", "tmict", "tsc-deadline", "pv", "pv-reg", "pv-later", "pv-gsi" };

static u64 tsc_khz;		/* from the PV device, else calibrated against the LAPIC timer */
static u64 ns_mult;		/* ns = tsc * ns_mult >> 32 */
static u64 apic_per_ms;		/* LAPIC timer ticks per ms, divide by 1 */

static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u32 cpuid_ecx(u32 leaf)
{
	u32 a = leaf, b, c = 0, d;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return c;
}
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline u64 tsc_to_ns(u64 tsc) { return (u64)(((unsigned __int128)tsc * ns_mult) >> 32); }
static inline u64 now_ns(void) { return tsc_to_ns(rdtsc()); }

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE, reg);		/* IOREGSEL */
	mmio_write32(IOAPIC_BASE + 0x10, v);	/* IOWIN */
}

static int pv_present(void)
{
	return mmio_read32(PVCE_BASE + PVCE_ID) == PVCE_MAGIC;
}

static int tsc_deadline_offered(void)
{
	return (cpuid_ecx(1) >> 24) & 1;
}

/* TSC frequency and LAPIC timer rate; the PV device tells the first. */
static int timer_calibrate(void)
{
	u64 t0, t1, c1;

	if (!tsc_khz && pv_present())
		tsc_khz = mmio_read32(PVCE_BASE + PVCE_TSC_KHZ);
	if (!tsc_khz) {
		printf("timer-bench: TSC frequency unknown (no PV clock event device)\n");
		return -1;
	}
	ns_mult = (1000000UL << 32) / tsc_khz;
	if (!apic_per_ms) {
		mmio_write32(LAPIC_BASE + LAPIC_TDCR, 0xb);
		mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
		mmio_write32(LAPIC_BASE + LAPIC_TMICT, 0xffffffff);
		t0 = rdtsc();
		while ((t1 = rdtsc()) - t0 < tsc_khz * 2)	/* 2 ms */
			;
		c1 = mmio_read32(LAPIC_BASE + LAPIC_TMCCT);
		mmio_write32(LAPIC_BASE + LAPIC_TMICT, 0);
		apic_per_ms = (0xffffffffUL - c1) * tsc_khz / (t1 - t0);
		if (!apic_per_ms)
			apic_per_ms = 1;
	}
	return 0;
}

/* Lateness histogram: 1 us buckets up to 4 ms, then one overflow bucket. */
#define LATE_BUCKETS 4097
static u32 late_hist[LATE_BUCKETS];

static u64 late_percentile(u64 n, u64 pct)
{
	u64 want = (n * pct + 99) / 100, seen = 0;
	int i;

	for (i = 0; i < LATE_BUCKETS; i++) {
		seen += late_hist[i];
		if (seen >= want && want)
			return (u64)i * 1000;
	}
	return 0;
}

static void pv_sync(u64 *err_bound)
{
	u64 t1, t2;

	t1 = now_ns();
	mmio_write64(PVCE_BASE + PVCE_SYNC, t1);
	t2 = now_ns();
	mmio_write64(PVCE_BASE + PVCE_SYNC_END, t2);
	*err_bound = mmio_read64(PVCE_BASE + PVCE_SYNC_ERROR);
}

/* Host's view of the guest clock minus ours, at the midpoint of one read. */
static long pv_clock_error(u64 *bound)
{
	u64 a, h, b;

	a = now_ns();
	h = mmio_read64(PVCE_BASE + PVCE_GUEST_NOW);
	b = now_ns();
	*bound = (b - a) / 2;
	return (long)(h - (a + (b - a) / 2));
}

static int timer_setup(int mode)
{
	u32 ctrl = PVCE_CTRL_ENABLE | ((u32)PV_VECTOR << 8);

	switch (mode) {
	case M_TMICT:
		mmio_write32(LAPIC_BASE + LAPIC_TDCR, 0xb);
		mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, TIMER_VECTOR);
		return 0;
	case M_TSCDL:
		if (!tsc_deadline_offered())
			return -1;
		mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LVT_TSC_DEADLINE | TIMER_VECTOR);
		mfence();
		return 0;
	case M_PVGSI:
		/* what the Linux module does: an edge on an ISA line (IOAPIC pin) */
		if (!pv_present())
			return -1;
		ioapic_write(0x10 + 2 * PV_GSI + 1, lapic_id() << 24);
		ioapic_write(0x10 + 2 * PV_GSI, IRQ_BASE + PV_GSI);	/* fixed, edge, unmasked */
		ctrl = PVCE_CTRL_ENABLE | PVCE_CTRL_ROUTE_GSI | ((u32)PV_GSI << PVCE_CTRL_GSI_SHIFT);
		/* fall through */
	case M_PVREG:
		if (!pv_present())
			return -1;
		mmio_write32(PVCE_BASE + PVCE_CONTROL, ctrl);
		return (mmio_read32(PVCE_BASE + PVCE_CONTROL) & PVCE_CTRL_ENABLE) ? 0 : -1;
	default:	/* M_PV, M_PVLATER */
		if (!pv_present() || !(mmio_read32(PVCE_BASE + PVCE_FEATURES) & PVCE_FEAT_SHARED))
			return -1;
		mmio_write32(PVCE_BASE + PVCE_CONTROL, 0);
		pv_shm.deadline = PVCE_NEVER;
		mmio_write64(PVCE_BASE + PVCE_SHARED_GPA, (u64)&pv_shm);
		mmio_write32(PVCE_BASE + PVCE_CONTROL, ctrl | PVCE_CTRL_SHARED);
		return (mmio_read32(PVCE_BASE + PVCE_CONTROL) & PVCE_CTRL_ENABLE) ? 0 : -1;
	}
}

static void timer_teardown(int mode)
{
	if (mode == M_TMICT || mode == M_TSCDL)
		mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
	else
		mmio_write32(PVCE_BASE + PVCE_CONTROL, 0);
	if (mode == M_PVGSI)
		ioapic_write(0x10 + 2 * PV_GSI, 1U << 16 | (IRQ_BASE + PV_GSI));	/* masked */
}

/* One mode: N cycles, lateness into late_hist. Returns TSC cycles in the loop. */
static u64 timer_run(int mode, u64 n, u64 delta_ns, u64 *wakeups)
{
	u64 delta_tsc = delta_ns * tsc_khz / 1000000;
	u64 ticks = delta_ns * apic_per_ms / 1000000;
	u64 irq = mode == M_PVGSI ? PV_GSI : mode >= M_PV ? 9 : 8;
	u64 i, start, due, woke, before, late, hlts = 0;

	memset(late_hist, 0, sizeof(late_hist));
	if (!ticks)
		ticks = 1;
	outb(TIMER_MARK_PORT, (u8)(2 * mode));
	start = rdtsc();
	for (i = 0; i < n; i++) {
		before = irq_counts[irq];
		due = rdtsc() + delta_tsc;
		switch (mode) {
		case M_TMICT:
			mmio_write32(LAPIC_BASE + LAPIC_TMICT, (u32)ticks);
			break;
		case M_TSCDL:
			wrmsr(MSR_TSC_DEADLINE, due);
			break;
		case M_PVREG:
		case M_PVGSI:
			mmio_write64(PVCE_BASE + PVCE_DEADLINE, tsc_to_ns(due));
			break;
		case M_PVLATER: {
			/*
			 * Program a deadline, wait (reading RAM only) until the
			 * host has armed it, then move it one delta later: the
			 * second program must not ring. If the first fired
			 * meanwhile, its interrupt is absorbed below.
			 */
			u64 d = tsc_to_ns(due);
			u32 c0 = pv_shm.count;
			int spin = 0;

			pv_shm.deadline = d;
			mfence();
			if (d < pv_shm.armed)
				mmio_write32(PVCE_BASE + PVCE_DOORBELL, 1);
			while (pv_shm.armed != d && pv_shm.count == c0 && spin++ < 100000)
				__asm__ volatile("pause");
			due += delta_tsc;
		}
			/* fall through */
		case M_PV: {
			u64 d = tsc_to_ns(due);
			pv_shm.deadline = d;
			mfence();
			if (d < pv_shm.armed)
				mmio_write32(PVCE_BASE + PVCE_DOORBELL, 1);
			break;
		}
		}
		/* pv-later: an interrupt for the first deadline is not the cycle's end */
		while (irq_counts[irq] == before ||
		       (mode == M_PVLATER && rdtsc() + delta_tsc / 2 < due)) {
			sti_hlt();
			cli();
			hlts++;
		}
		woke = rdtsc();
		late = woke > due ? tsc_to_ns(woke - due) / 1000 : 0;
		late_hist[late < LATE_BUCKETS - 1 ? late : LATE_BUCKETS - 1]++;
	}
	woke = rdtsc() - start;
	outb(TIMER_MARK_PORT, (u8)(2 * mode + 1));
	*wakeups = hlts;
	return woke;
}

/* timer-bench [all|tmict|tsc-deadline|pv|pv-reg|pv-later|pv-gsi] [cycles] [delta_us] */
int cmd_timer_bench(int argc, char **argv)
{
	const char *which = argc > 1 ? argv[1] : "all";
	u64 n = 1000, delta_us = 100, bound, wakeups, cycles;
	int mode, ran = 0;
	long err;

	if ((argc > 2 && parse_u64(argv[2], &n)) || (argc > 3 && parse_u64(argv[3], &delta_us)) ||
	    delta_us == 0 || delta_us > 1000000) {
		printf("usage: timer-bench [all|tmict|tsc-deadline|pv|pv-reg|pv-later|pv-gsi] [cycles] [delta_us]\n");
		return 2;
	}
	if (timer_calibrate())
		return 1;
	printf("timer-bench: tsc %lu kHz, lapic timer %lu ticks/ms, tsc-deadline %s, pv device %s\n",
	       tsc_khz, apic_per_ms, tsc_deadline_offered() ? "offered" : "not offered",
	       pv_present() ? "present" : "absent");
	if (pv_present()) {
		pv_sync(&bound);
		err = pv_clock_error(&wakeups);
		printf("timer-bench: pv clock sync: handshake +-%lu ns, measured offset error %ld ns (+-%lu ns)\n",
		       bound, err, wakeups);
	}
	for (mode = M_TMICT; mode <= M_PVGSI; mode++) {
		if (strcmp(which, "all") && strcmp(which, mode_names[mode]))
			continue;
		if (mode == M_PVLATER && delta_us < 100) {
			/* its wait tells the moved deadline's interrupt from the first
			 * one by time: delta/2 must exceed the clock offset error */
			printf("timer-bench: pv-later: needs delta_us >= 100\n");
			continue;
		}
		if (timer_setup(mode)) {
			printf("timer-bench: %s: not available here\n", mode_names[mode]);
			continue;
		}
		cycles = timer_run(mode, n, delta_us * 1000, &wakeups);
		timer_teardown(mode);
		printf("timer-bench: %s cycles=%lu delta_ns=%lu late_p50_ns=%lu late_p99_ns=%lu "
		       "tsc_per_cycle=%lu hlt_wakeups=%lu\n", mode_names[mode], n, delta_us * 1000,
		       late_percentile(n, 50), late_percentile(n, 99), n ? cycles / n : 0, wakeups);
		ran++;
	}
	if (pv_present()) {
		err = pv_clock_error(&bound);
		printf("timer-bench: pv clock after the runs: offset error %ld ns (+-%lu ns)\n", err, bound);
	}
	return ran ? 0 : 1;
}
