// SPDX-License-Identifier: GPL-2.0
/*
 * pvce: the kvmkit paravirtual clock event device (docs/pv-clockevent.md).
 *
 * One per-CPU clock_event_device that takes the absolute expiry in
 * nanoseconds of CLOCK_MONOTONIC, exactly as the clockevents core hands it
 * to set_next_ktime(): no conversion to device ticks, no calibration.
 *
 * The deadline goes into a 64-byte block of guest memory shared with the
 * host. Moving the deadline later costs no exit at all (the host re-arms
 * when its old timer goes off); only a deadline earlier than the one the
 * host has armed rings the doorbell, a 32-bit MMIO write that kvmkit serves
 * in the host kernel with an ioeventfd. With shared=0 every program is one
 * 64-bit MMIO write of the DEADLINE register.
 *
 * The host runs its timer on its own CLOCK_MONOTONIC and needs the offset
 * between the two clocks: the driver measures it with the SYNC/SYNC_END
 * handshake at start-up and again from its interrupt, on its own CPU, once
 * resync_ms milliseconds have passed or when an interrupt came before the
 * deadline.
 *
 * The device assumes the guest clock runs at the host's rate (kvmclock).
 * When it does not (a guest on the TSC with a deliberately wrong tsc_khz, as
 * kvmkit's nested-PVM quirks set it), the driver measures the rate: the
 * host's view of the guest clock (GUEST_NOW, host time minus the offset)
 * against ktime between two handshakes, and programs
 * anchor + (expires - anchor) * rate, anchor being the last handshake's
 * midpoint, where the host and guest clocks agree. With equal rates the
 * deadline is passed through unchanged.
 *
 * Interrupts arrive on an ISA IRQ line (irq_base + cpu), edge triggered,
 * with the line's affinity pinned to its CPU: a loadable module cannot claim
 * a raw IDT vector, which the device's other routing mode (MSI to the vCPU's
 * local APIC) needs.
 *
 * The module cannot be unloaded: the tick may be running on its devices.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/clockchips.h>
#include <linux/cpu.h>
#include <linux/cpuhotplug.h>
#include <linux/smp.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/percpu.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/math64.h>
#include <linux/timekeeping.h>

/* Register map: offsets in each CPU's 4 KiB window. */
#define PVCE_ID			0x00	/* u32 RO */
#define PVCE_VERSION		0x04	/* u32 RO */
#define PVCE_FEATURES		0x08	/* u32 RO */
#define PVCE_CONTROL		0x10	/* u32 RW */
#define PVCE_DEADLINE		0x18	/* u64 RW */
#define PVCE_STATUS		0x20	/* u64 RO, W1C low bits */
#define PVCE_SYNC		0x28	/* u64 WO */
#define PVCE_SYNC_END		0x30	/* u64 WO */
#define PVCE_SYNC_ERROR		0x38	/* u64 RO */
#define PVCE_GUEST_NOW		0x40	/* u64 RO */
#define PVCE_SHARED_GPA		0x48	/* u64 RW */
#define PVCE_DOORBELL		0x50	/* u32 WO */
#define PVCE_WINDOW		0x1000

#define PVCE_MAGIC		0x45435650	/* "PVCE" */
#define PVCE_MAJOR		1

#define PVCE_FEAT_SHARED	(1U << 2)
#define PVCE_CTRL_ENABLE	(1U << 0)
#define PVCE_CTRL_SHARED	(1U << 2)
#define PVCE_CTRL_ROUTE_GSI	(1U << 3)
#define PVCE_CTRL_GSI_SHIFT	16

#define PVCE_NEVER		(1ULL << 63)

/* The shared deadline block (64-byte aligned guest RAM). */
struct pvce_shared {
	u64 deadline;		/* guest writes */
	u64 armed;		/* host writes: deadline its timer is armed for */
	u32 count;		/* host writes: expiries delivered */
	u32 reserved[11];
} __aligned(64);

static unsigned long base = 0xfea00000;
module_param(base, ulong, 0444);
MODULE_PARM_DESC(base, "guest-physical address of CPU 0's register window");
static int irq_base = 10;
module_param(irq_base, int, 0444);
MODULE_PARM_DESC(irq_base, "ISA IRQ of CPU 0's timer interrupt; CPU n uses irq_base + n");
static bool shared = true;
module_param(shared, bool, 0444);
MODULE_PARM_DESC(shared, "program deadlines through the shared block (no exit when a deadline moves later)");
static unsigned int resync_ms = 1000;
module_param(resync_ms, uint, 0444);
MODULE_PARM_DESC(resync_ms, "period of the clock offset handshake in ms (0: only at start-up and on an early interrupt)");
static int rating = 450;	/* the local APIC timer's is 100 */
module_param(rating, int, 0444);

struct pvce_cpu {
	struct clock_event_device ced;
	void __iomem *regs;
	struct pvce_shared *shm;
	u32 control;
	u64 anchor;		/* guest ns of the last handshake's midpoint */
	u64 rate;		/* host ns per guest ns, 32.32 fixed point */
	u64 expires;		/* the last deadline the core asked for */
	int irq;
	unsigned int cpu;
	bool online;
	char name[16];
	call_single_data_t forward;	/* an interrupt taken on another CPU, run on this one */
};

static DEFINE_PER_CPU(struct pvce_cpu, pvce_cpus);
static enum cpuhp_state pvce_hp_state;
static bool use_shared;

#define PVCE_RATE_ONE		(1ULL << 32)
#define PVCE_RATE_MIN_NS	(2 * NSEC_PER_MSEC)	/* shortest baseline for a rate estimate */

static struct pvce_cpu *to_pvce(struct clock_event_device *ced)
{
	return container_of(ced, struct pvce_cpu, ced);
}

/*
 * One handshake: bracket a trapping write between two clock readings. Before
 * it, GUEST_NOW (host time minus the old offset) has advanced by the host
 * time since the last handshake; against ktime's advance that gives the rate.
 * Runs on pc's CPU (hotplug callback, interrupt).
 */
static void pvce_sync(struct pvce_cpu *pc)
{
	u64 t1, t2, g, k;
	unsigned long flags;

	local_irq_save(flags);
	if (pc->anchor) {
		t1 = ktime_get_ns();
		g = readq(pc->regs + PVCE_GUEST_NOW);
		t2 = ktime_get_ns();
		k = t1 + (t2 - t1) / 2;
		if (k - pc->anchor >= PVCE_RATE_MIN_NS && g > pc->anchor &&
		    g - pc->anchor < (k - pc->anchor) * 64)
			pc->rate = mul_u64_u64_div_u64(g - pc->anchor, PVCE_RATE_ONE, k - pc->anchor);
	}
	t1 = ktime_get_ns();
	writeq(t1, pc->regs + PVCE_SYNC);
	t2 = ktime_get_ns();
	writeq(t2, pc->regs + PVCE_SYNC_END);
	pc->anchor = t1 + (t2 - t1) / 2;
	local_irq_restore(flags);
}

/* The guest deadline t on the host's guest-clock scale (see the top). */
static u64 pvce_scale(struct pvce_cpu *pc, u64 t)
{
	u64 d;

	if (pc->rate == PVCE_RATE_ONE || t <= pc->anchor)
		return t;
	/*
	 * Past ~18 minutes, program 18 minutes: the early interrupt then
	 * resynchronises and programs the rest (no overflow: rate < 64).
	 */
	d = min_t(u64, t - pc->anchor, 1ULL << 40);
	return pc->anchor + mul_u64_u64_shr(d, pc->rate, 32);
}

static int pvce_set_next_ktime(ktime_t expires, struct clock_event_device *ced)
{
	struct pvce_cpu *pc = to_pvce(ced);
	u64 t;

	pc->expires = expires < 0 ? 0 : (u64)expires;
	t = pvce_scale(pc, pc->expires);

	if (!use_shared) {
		writeq(t, pc->regs + PVCE_DEADLINE);
		return 0;
	}
	WRITE_ONCE(pc->shm->deadline, t);
	/*
	 * Store DEADLINE, then load ARMED: the host stores ARMED, then loads
	 * DEADLINE again. With a full barrier on both sides one of us sees
	 * the other's store, so an earlier deadline is never left unarmed.
	 */
	smp_mb();
	if (t < READ_ONCE(pc->shm->armed))
		writel(1, pc->regs + PVCE_DOORBELL);
	return 0;
}

static int pvce_shutdown(struct clock_event_device *ced)
{
	struct pvce_cpu *pc = to_pvce(ced);

	writel(pc->control & ~PVCE_CTRL_ENABLE, pc->regs + PVCE_CONTROL);
	return 0;
}

static int pvce_set_oneshot(struct clock_event_device *ced)
{
	struct pvce_cpu *pc = to_pvce(ced);

	if (use_shared)
		WRITE_ONCE(pc->shm->deadline, PVCE_NEVER);
	writel(pc->control, pc->regs + PVCE_CONTROL);
	if (!(readl(pc->regs + PVCE_CONTROL) & PVCE_CTRL_ENABLE))
		return -EIO;
	return 0;
}

static void pvce_event(struct pvce_cpu *pc)
{
	u64 now = ktime_get_ns();

	/*
	 * Early (the rate estimate was off, or the clocks moved apart) or due
	 * for a resync: a handshake first, so the event handler programs the
	 * next deadline against a fresh anchor (and, early, a value that
	 * differs from the one that fired, which the host would not re-arm).
	 */
	if (now < pc->expires || (resync_ms && now - pc->anchor >= (u64)resync_ms * NSEC_PER_MSEC))
		pvce_sync(pc);
	if (pc->ced.event_handler)
		pc->ced.event_handler(&pc->ced);
}

/* Runs on pc's CPU, in the function-call IPI: hard interrupt context, like the interrupt. */
static void pvce_forwarded(void *info)
{
	pvce_event(info);
}

static irqreturn_t pvce_interrupt(int irq, void *dev_id)
{
	struct pvce_cpu *pc = dev_id;

	/*
	 * A CPU's event handler must run on that CPU: it reprograms the
	 * device of the CPU it runs on. The line's affinity is set before
	 * it is started, so this should not happen; if it does (a deferred
	 * affinity move delivers one interrupt to the old CPU), the event
	 * goes on to its CPU rather than leaving that CPU without a tick.
	 */
	if (unlikely(pc->cpu != smp_processor_id())) {
		pr_warn_once("pvce: %s interrupt taken on CPU %u, forwarded\n", pc->name, smp_processor_id());
		smp_call_function_single_async(pc->cpu, &pc->forward);	/* -EBUSY: one is on its way */
		return IRQ_HANDLED;
	}
	pvce_event(pc);
	return IRQ_HANDLED;
}

static int pvce_cpu_online(unsigned int cpu)
{
	struct pvce_cpu *pc = per_cpu_ptr(&pvce_cpus, cpu);
	struct clock_event_device *ced = &pc->ced;
	int ret;

	pc->regs = ioremap(base + (unsigned long)cpu * PVCE_WINDOW, PVCE_WINDOW);
	if (!pc->regs)
		return -ENOMEM;
	if (readl(pc->regs + PVCE_ID) != PVCE_MAGIC) {
		pr_warn("pvce: no device window for CPU %u at %#lx\n", cpu,
			base + (unsigned long)cpu * PVCE_WINDOW);
		ret = -ENODEV;
		goto unmap;
	}
	pc->control = PVCE_CTRL_ENABLE | PVCE_CTRL_ROUTE_GSI |
		      ((u32)(irq_base + cpu) << PVCE_CTRL_GSI_SHIFT);
	if (use_shared) {
		pc->shm = (struct pvce_shared *)get_zeroed_page(GFP_KERNEL);
		if (!pc->shm) {
			ret = -ENOMEM;
			goto unmap;
		}
		pc->shm->deadline = PVCE_NEVER;
		pc->shm->armed = PVCE_NEVER;
		writeq(virt_to_phys(pc->shm), pc->regs + PVCE_SHARED_GPA);
		pc->control |= PVCE_CTRL_SHARED;
	}
	pc->irq = irq_base + cpu;
	pc->cpu = cpu;
	INIT_CSD(&pc->forward, pvce_forwarded, pc);
	snprintf(pc->name, sizeof(pc->name), "pvce%u", cpu);
	/*
	 * The affinity first: set on a line not yet started, it is where the
	 * vector is allocated when request_irq() starts it. Set after, an
	 * IO-APIC line moves only at its next interrupt, which then still
	 * arrives on the CPU picked by default. (The 8259 has no affinity:
	 * with noapic every line goes to CPU 0, which is fine on one CPU.)
	 */
	ret = irq_set_affinity(pc->irq, cpumask_of(cpu));
	if (ret && cpu != 0)
		pr_warn("pvce: IRQ %d cannot be sent to CPU %u only (error %d)\n", pc->irq, cpu, ret);
	ret = request_irq(pc->irq, pvce_interrupt, IRQF_TIMER | IRQF_NOBALANCING, pc->name, pc);
	if (ret) {
		pr_warn("pvce: IRQ %d for CPU %u: error %d\n", pc->irq, cpu, ret);
		goto free_shm;
	}
	/* Two handshakes PVCE_RATE_MIN_NS apart give the first rate estimate. */
	pc->anchor = 0;
	pc->rate = PVCE_RATE_ONE;
	pc->expires = 0;
	pvce_sync(pc);
	while (ktime_get_ns() - pc->anchor < PVCE_RATE_MIN_NS)
		cpu_relax();
	pvce_sync(pc);
	pr_info("pvce: CPU %u: host ns per guest ns %llu.%03llu\n", cpu, pc->rate >> 32,
		((pc->rate & 0xffffffffULL) * 1000) >> 32);

	memset(ced, 0, sizeof(*ced));
	ced->name = pc->name;
	ced->features = CLOCK_EVT_FEAT_ONESHOT | CLOCK_EVT_FEAT_KTIME;
	ced->rating = rating;
	ced->cpumask = cpumask_of(cpu);
	ced->irq = pc->irq;
	ced->set_next_ktime = pvce_set_next_ktime;
	ced->set_state_shutdown = pvce_shutdown;
	ced->set_state_oneshot = pvce_set_oneshot;
	ced->set_state_oneshot_stopped = pvce_shutdown;
	ced->tick_resume = pvce_shutdown;
	/* ns in, ns out: a 1:1 "frequency" for the parts of the core that look */
	ced->mult = 1;
	ced->shift = 0;
	ced->min_delta_ns = 1000;
	ced->max_delta_ns = KTIME_MAX;
	ced->min_delta_ticks = 1000;
	ced->max_delta_ticks = ULONG_MAX;
	pc->online = true;
	clockevents_register_device(ced);
	return 0;

free_shm:
	if (pc->shm) {
		writeq(0, pc->regs + PVCE_SHARED_GPA);
		free_page((unsigned long)pc->shm);
		pc->shm = NULL;
	}
unmap:
	iounmap(pc->regs);
	pc->regs = NULL;
	return ret;
}

static int __init pvce_init(void)
{
	void __iomem *regs;
	u32 id, version, features;
	int ret;

	regs = ioremap(base, PVCE_WINDOW);
	if (!regs)
		return -ENOMEM;
	id = readl(regs + PVCE_ID);
	version = readl(regs + PVCE_VERSION);
	features = readl(regs + PVCE_FEATURES);
	iounmap(regs);
	if (id != PVCE_MAGIC || (version >> 16) != PVCE_MAJOR) {
		pr_info("pvce: no device at %#lx (id %#x, version %#x)\n", base, id, version);
		return -ENODEV;
	}
	use_shared = shared && (features & PVCE_FEAT_SHARED);
	pr_info("pvce: version %u.%u at %#lx, %s deadlines\n", version >> 16, version & 0xffff,
		base, use_shared ? "shared-block" : "register");

	ret = cpuhp_setup_state(CPUHP_AP_ONLINE_DYN, "clockevents/pvce:online", pvce_cpu_online, NULL);
	if (ret < 0)
		return ret;
	pvce_hp_state = ret;
	return 0;
}
module_init(pvce_init);

MODULE_DESCRIPTION("kvmkit paravirtual clock event device");
MODULE_AUTHOR("kvmkit");
MODULE_LICENSE("GPL");
