/*
 * virtio 1.2 PCI transport (modern: vendor-specific capabilities) and
 * split virtqueues, written from the virtio 1.2 specification (4.1 PCI,
 * 2.7 split virtqueues, 3.1 device initialization); Linux's
 * virtio_pci_modern_dev.c and virtio_ring.c were read for facts only.
 *
 * Init (virtio_open / virtio_setup_vq / virtio_driver_ok):
 *   1. find the function (1af4:1040+id, or a transitional 1af4:1000-103f
 *      whose subsystem id is the device id) and its vendor capabilities:
 *      common, notify (+ notify_off_multiplier), ISR, device config; each
 *      must lie inside a memory BAR; the BAR pages are mapped uncached;
 *   2. COMMAND: memory decode, bus master, INTx off;
 *   3. reset (status 0, then wait until it reads 0), ACKNOWLEDGE, DRIVER;
 *   4. read the 64 feature bits, refuse a device without VERSION_1, write
 *      VERSION_1 | (EVENT_IDX) | (INDIRECT_DESC) | the device bits wanted
 *      that it offers, FEATURES_OK, read it back (FAILED if it is gone);
 *   5. irq mode: MSI-X on (function mask while every entry gets masked),
 *      entry 0 -> vector 0x40 for config changes, written to
 *      config_msix_vector and read back; poll mode: MSI-X off;
 *   6. per queue: select, read the maximum size, use the largest power of
 *      two <= min(max, 128), write size and the desc/driver/device
 *      addresses (two 32-bit halves each), irq mode: entry 1 + q ->
 *      vector 0x41 + q (read back), read queue_notify_off, enable;
 *   7. DRIVER_OK, read back (NEEDS_RESET/FAILED are errors).
 * Close: reset (wait for 0), MSI-X entries masked and MSI-X off, bus
 * master off, so the device no longer touches this guest's memory.
 *
 * Everything read from the device is checked before use: capability
 * ranges against their BAR, queue sizes, used->idx (it may advance at most
 * by the number of requests in flight), used ids (an in-flight head) and
 * lengths (at most the chain's writable bytes). A device that breaks one is
 * marked broken and no longer used. Waits end after VIRTIO_TIMEOUT_TSC TSC
 * cycles without progress; in irq mode a LAPIC periodic timer (WAKE_VECTOR,
 * ~10 ms) wakes sti;hlt so a missing interrupt cannot hang the guest.
 */
#include "kernel.h"
#include "virtio.h"

/* common configuration structure (4.1.4.3) */
#define CC_DFSELECT	0x00	/* le32 device_feature_select */
#define CC_DF		0x04	/* le32 device_feature */
#define CC_GFSELECT	0x08	/* le32 driver_feature_select */
#define CC_GF		0x0c	/* le32 driver_feature */
#define CC_MSIX_CONFIG	0x10	/* le16 config_msix_vector */
#define CC_NUM_QUEUES	0x12	/* le16 */
#define CC_STATUS	0x14	/* u8 device_status */
#define CC_CFG_GEN	0x15	/* u8 config_generation */
#define CC_Q_SELECT	0x16	/* le16 */
#define CC_Q_SIZE	0x18	/* le16 */
#define CC_Q_MSIX	0x1a	/* le16 queue_msix_vector */
#define CC_Q_ENABLE	0x1c	/* le16 */
#define CC_Q_NOFF	0x1e	/* le16 queue_notify_off */
#define CC_Q_DESC	0x20	/* le64 */
#define CC_Q_DRIVER	0x28	/* le64 (avail ring) */
#define CC_Q_DEVICE	0x30	/* le64 (used ring) */
#define CC_MIN_LEN	0x38

#define CAP_COMMON	1
#define CAP_NOTIFY	2
#define CAP_ISR		3
#define CAP_DEVICE	4

#define LAPIC_BASE	0xfee00000UL
#define LAPIC_LVT_TIMER	0x320
#define LAPIC_TMICT	0x380
#define LAPIC_TDCR	0x3e0
#define LVT_PERIODIC	(1U << 17)
#define LVT_MASKED	(1U << 16)

static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static const char *const type_names[] = { "?", "net", "blk", "console", "rng" };

static const char *tname(int type)
{
	return type >= 0 && type < (int)ARRAY_SIZE(type_names) ? type_names[type] : "?";
}

/* ------------------------------------------------------------ options */

static int has_eq(const char *s)
{
	for (; *s; s++)
		if (*s == '=')
			return 1;
	return 0;
}

int virtio_parse_opts(int argc, char **argv, struct vopts *o)
{
	int i;

	memset(o, 0, sizeof(*o));
	o->irq = o->event_idx = o->indirect = 1;
	o->seed = 1;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		u64 v;

		if (!strcmp(a, "irq"))
			o->irq = 1;
		else if (!strcmp(a, "poll"))
			o->irq = 0;
		else if (!strcmp(a, "intx"))
			o->irq = 2;
		else if (!strcmp(a, "event-idx"))
			o->event_idx = 1;
		else if (!strcmp(a, "no-event-idx"))
			o->event_idx = 0;
		else if (!strcmp(a, "indirect"))
			o->indirect = 1;
		else if (!strcmp(a, "no-indirect"))
			o->indirect = 0;
		else if (!strncmp(a, "dev=", 4) && !parse_u64(a + 4, &v) && v < 64)
			o->dev = v;
		else if (!strncmp(a, "seed=", 5) && !parse_u64(a + 5, &v) && v && v <= 0xffffffffUL)
			o->seed = v;
		else if (!strncmp(a, "buf=", 4) && !parse_u64(a + 4, &v) && v)
			o->buf = v;
		else if (a[0] >= '0' && a[0] <= '9' && o->nnum < 4 && !parse_u64(a, &v))
			o->num[o->nnum++] = v;
		else if (!o->word && a[0] >= 'a' && a[0] <= 'z' && !has_eq(a))
			o->word = a;
		else {
			printf("%s: bad argument '%s'\n", argv[0], a);
			return -1;
		}
	}
	return 0;
}

/* -------------------------------------------------------- LAPIC wake */

static u32 saved_lvt, saved_tdcr;
static int wake_on;

/* Periodic LAPIC timer: ~10 ms at the 1 GHz bus clock KVM and QEMU model. */
static void wake_start(void)
{
	if (wake_on)
		return;
	saved_lvt = mmio_read32(LAPIC_BASE + LAPIC_LVT_TIMER);
	saved_tdcr = mmio_read32(LAPIC_BASE + LAPIC_TDCR);
	mmio_write32(LAPIC_BASE + LAPIC_TDCR, 0x3);		/* divide by 16 */
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, LVT_PERIODIC | WAKE_VECTOR);
	mmio_write32(LAPIC_BASE + LAPIC_TMICT, 625000);
	wake_on = 1;
}

static void wake_stop(void)
{
	if (!wake_on)
		return;
	mmio_write32(LAPIC_BASE + LAPIC_TMICT, 0);
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, saved_lvt | LVT_MASKED);
	mmio_write32(LAPIC_BASE + LAPIC_TDCR, saved_tdcr);
	wake_on = 0;
}

/* ------------------------------------------------------ common config */

static u8 cc_read8(struct vdev *d, u32 off) { return mmio_read8(d->common + off); }
static u16 cc_read16(struct vdev *d, u32 off) { return mmio_read16(d->common + off); }
static u32 cc_read32(struct vdev *d, u32 off) { return mmio_read32(d->common + off); }
static void cc_write8(struct vdev *d, u32 off, u8 v) { mmio_write8(d->common + off, v); }
static void cc_write16(struct vdev *d, u32 off, u16 v) { mmio_write16(d->common + off, v); }
static void cc_write32(struct vdev *d, u32 off, u32 v) { mmio_write32(d->common + off, v); }

static void cc_write64(struct vdev *d, u32 off, u64 v)
{
	cc_write32(d, off, (u32)v);		/* low half first */
	cc_write32(d, off + 4, (u32)(v >> 32));
}

static void set_status(struct vdev *d, u8 bits)
{
	cc_write8(d, CC_STATUS, cc_read8(d, CC_STATUS) | bits);
}

static int reset(struct vdev *d)
{
	u64 t0 = rdtsc();

	cc_write8(d, CC_STATUS, 0);
	while (cc_read8(d, CC_STATUS) != 0) {
		if (rdtsc() - t0 > VIRTIO_TIMEOUT_TSC) {
			printf("virtio-%s: reset: status still 0x%x after %lu tsc cycles\n", tname(d->type),
			       cc_read8(d, CC_STATUS), VIRTIO_TIMEOUT_TSC);
			return -1;
		}
		cpu_relax();
	}
	return 0;
}

int virtio_has(const struct vdev *d, int bit)
{
	return (d->features >> bit) & 1;
}

static void check_dev_range(struct vdev *d, u32 off, u32 n)
{
	if ((u64)off + n > d->devcfg_len && !d->broken) {
		printf("virtio-%s: device config read at 0x%x+%u beyond its length 0x%x\n", tname(d->type),
		       off, n, d->devcfg_len);
		d->broken = 1;
	}
}

u8 virtio_cfg_read8(struct vdev *d, u32 off)
{
	check_dev_range(d, off, 1);
	return d->broken ? 0 : mmio_read8(d->devcfg + off);
}

u32 virtio_cfg_read32(struct vdev *d, u32 off)
{
	check_dev_range(d, off, 4);
	return d->broken ? 0 : mmio_read32(d->devcfg + off);
}

/* Two 32-bit reads, retried while config_generation changes (a bounded number of times). */
u64 virtio_cfg_read64(struct vdev *d, u32 off)
{
	u32 lo, hi;
	u8 gen;
	int tries = 0;

	check_dev_range(d, off, 8);
	if (d->broken)
		return 0;
	do {
		gen = cc_read8(d, CC_CFG_GEN);
		lo = mmio_read32(d->devcfg + off);
		hi = mmio_read32(d->devcfg + off + 4);
	} while (gen != cc_read8(d, CC_CFG_GEN) && ++tries < 100);
	if (tries == 100)
		printf("virtio-%s: config_generation keeps changing\n", tname(d->type));
	return ((u64)hi << 32) | lo;
}

u64 virtio_irqs(const struct vdev *d)
{
	u64 n = 0;
	int e;

	/* take what the LAPIC holds pending (sent while we ran with IF=0) */
	__asm__ volatile("sti; nop; cli" ::: "memory");
	for (e = 0; e <= VIRTIO_MAX_QUEUES; e++)
		n += vector_counts[VIRTIO_VECTOR_BASE + e] - d->vec_base[e];
	return n + vector_counts[VIRTIO_INTX_VECTOR] - d->intx_base;
}

void virtio_print_irqs(const struct vdev *d, const char *cmd)
{
	int e, n = d->irq == 1 ? (int)d->msix.table_size : 0;

	if (n > VIRTIO_MAX_QUEUES + 1)
		n = VIRTIO_MAX_QUEUES + 1;
	printf("%s: interrupts:", cmd);
	for (e = 0; e < n; e++)
		printf(" vector 0x%x %lu,", VIRTIO_VECTOR_BASE + e,
		       vector_counts[VIRTIO_VECTOR_BASE + e] - d->vec_base[e]);
	if (d->irq == 2)
		printf(" intx pin %d vector 0x%x %lu,", d->intx_pin, VIRTIO_INTX_VECTOR,
		       vector_counts[VIRTIO_INTX_VECTOR] - d->intx_base);
	printf(" wake timer %lu, hlt %lu\n", vector_counts[WAKE_VECTOR] - d->wake_base, d->hlts);
}

/* ------------------------------------------------------------- open */

static int is_type(const struct pci_func *f, int type)
{
	if (f->vendor != VIRTIO_VENDOR)
		return 0;
	if (f->device == 0x1040 + type)
		return 1;
	/* transitional: device id 0x1000-0x103f, the subsystem id names the type */
	return f->device >= 0x1000 && f->device <= 0x103f && f->sub_device == type;
}

/* Locate one virtio capability's structure; 0 on success. */
static int map_cap(struct vdev *d, u32 p, u64 *addr, u32 *len)
{
	const struct pci_func *f = d->pf;
	u8 bar = pci_read8(f, p + 4);
	u32 off = pci_read32(f, p + 8), n = pci_read32(f, p + 12);
	const struct pci_bar *b;

	if (bar > 5 || (int)bar >= f->nbars || !f->bar[bar].size || f->bar[bar].io || !f->bar[bar].addr) {
		printf("virtio-%s: capability at 0x%x names bar%u, not a memory BAR\n", tname(d->type), p, bar);
		return -1;
	}
	b = &f->bar[bar];
	if (!n || (u64)off + n > b->size) {
		printf("virtio-%s: capability at 0x%x: bar%u+0x%x len 0x%x outside the BAR (size 0x%lx)\n",
		       tname(d->type), p, bar, off, n, b->size);
		return -1;
	}
	if (b->addr + b->size > (1UL << 32) || pci_map_mmio(b->addr + off, n)) {
		printf("virtio-%s: bar%u at 0x%lx is not mapped\n", tname(d->type), bar, b->addr);
		return -1;
	}
	*addr = b->addr + off;
	*len = n;
	return 0;
}

static int find_caps(struct vdev *d)
{
	const struct pci_func *f = d->pf;
	u32 p = 0, len;
	int guard = 48, found = 0;

	while ((p = pci_find_cap(f, PCI_CAP_ID_VNDR, p)) && guard--) {
		u8 type = pci_read8(f, p + 3), cap_len = pci_read8(f, p + 2);
		u64 addr;

		if (type < CAP_COMMON || type > CAP_DEVICE || (found & (1 << type)))
			continue;	/* not one of ours, or not the first of its type */
		if (cap_len < 16 || (type == CAP_NOTIFY && cap_len < 20))
			continue;
		if (map_cap(d, p, &addr, &len))
			return -1;
		found |= 1 << type;
		switch (type) {
		case CAP_COMMON:
			if (len < CC_MIN_LEN) {
				printf("virtio-%s: common config only 0x%x bytes\n", tname(d->type), len);
				return -1;
			}
			d->common = addr;
			break;
		case CAP_NOTIFY:
			d->notify_base = addr;
			d->notify_len = len;
			d->notify_mult = pci_read32(f, p + 16);
			break;
		case CAP_ISR:
			d->isr = addr;
			break;
		case CAP_DEVICE:
			d->devcfg = addr;
			d->devcfg_len = len;
			break;
		}
	}
	if ((found & 0xe) != 0xe) {
		printf("virtio-%s: missing capabilities:%s%s%s\n", tname(d->type),
		       found & (1 << CAP_COMMON) ? "" : " common", found & (1 << CAP_NOTIFY) ? "" : " notify",
		       found & (1 << CAP_ISR) ? "" : " isr");
		return -1;
	}
	return 0;
}

static void fail(struct vdev *d, const char *why)
{
	printf("virtio-%s: %s (status 0x%x)\n", tname(d->type), why, cc_read8(d, CC_STATUS));
	set_status(d, VIRTIO_S_FAILED);
}

int virtio_open(struct vdev *d, int type, int index, u64 want, const struct vopts *o)
{
	int i, n, seen = 0;
	u64 drv;
	u16 cmd;

	memset(d, 0, sizeof(*d));
	d->type = type;
	n = pci_scan(1);
	for (i = 0; i < n; i++) {
		if (is_type(&pci_funcs[i], type) && seen++ == index) {
			d->pf = &pci_funcs[i];
			break;
		}
	}
	if (!d->pf) {
		printf("virtio-%s: no device #%d on PCI bus 0 (%d found)\n", tname(type), index, seen);
		return -1;
	}
	if (find_caps(d))
		return -1;
	cmd = pci_read16(d->pf, PCI_COMMAND);
	pci_write16(d->pf, PCI_COMMAND, cmd | PCI_CMD_MEM | PCI_CMD_MASTER | PCI_CMD_INTX_DISABLE);

	if (reset(d))
		return -1;
	set_status(d, VIRTIO_S_ACKNOWLEDGE);
	set_status(d, VIRTIO_S_DRIVER);
	cc_write32(d, CC_DFSELECT, 0);
	d->offered = cc_read32(d, CC_DF);
	cc_write32(d, CC_DFSELECT, 1);
	d->offered |= (u64)cc_read32(d, CC_DF) << 32;
	if (!((d->offered >> VIRTIO_F_VERSION_1) & 1)) {
		fail(d, "device does not offer VERSION_1 (legacy only)");
		return -1;
	}
	drv = want | (1UL << VIRTIO_F_VERSION_1);
	if (o->event_idx)
		drv |= 1UL << VIRTIO_F_EVENT_IDX;
	if (o->indirect)
		drv |= 1UL << VIRTIO_F_INDIRECT_DESC;
	d->features = d->offered & drv;
	cc_write32(d, CC_GFSELECT, 0);
	cc_write32(d, CC_GF, (u32)d->features);
	cc_write32(d, CC_GFSELECT, 1);
	cc_write32(d, CC_GF, (u32)(d->features >> 32));
	set_status(d, VIRTIO_S_FEATURES_OK);
	if (!(cc_read8(d, CC_STATUS) & VIRTIO_S_FEATURES_OK)) {
		fail(d, "device did not accept the features (FEATURES_OK cleared)");
		return -1;
	}
	d->event_idx = virtio_has(d, VIRTIO_F_EVENT_IDX);
	d->indirect = virtio_has(d, VIRTIO_F_INDIRECT_DESC);
	d->irq = o->irq;

	for (i = 0; i <= VIRTIO_MAX_QUEUES; i++)
		d->vec_base[i] = vector_counts[VIRTIO_VECTOR_BASE + i];
	d->wake_base = vector_counts[WAKE_VECTOR];
	d->intx_base = vector_counts[VIRTIO_INTX_VECTOR];
	if (pci_msix_probe(d->pf, &d->msix) == 0)
		pci_msix_enable(d->pf, &d->msix, 0);	/* whatever a previous user left */
	else if (d->irq == 1) {
		fail(d, "irq mode needs MSI-X, the function has none");
		return -1;
	}
	if (d->irq == 2) {
		/* INTx: the ISR byte read in the interrupt handler lowers the line before the EOI */
		d->intx_pin = pci_read8(d->pf, PCI_INTERRUPT_LINE);
		if (!pci_read8(d->pf, PCI_INTERRUPT_PIN) || d->intx_pin == 0 || d->intx_pin >= 24) {
			fail(d, "intx mode needs an INTx pin routed to an IOAPIC pin (Interrupt Line)");
			virtio_close(d);
			return -1;
		}
		pci_write16(d->pf, PCI_COMMAND, pci_read16(d->pf, PCI_COMMAND) & ~PCI_CMD_INTX_DISABLE);
		ioapic_route_level(d->intx_pin, VIRTIO_INTX_VECTOR, d->isr);
		wake_start();
	} else if (d->irq) {
		pci_msix_enable(d->pf, &d->msix, 1);
		pci_msix_set_entry(&d->msix, 0, VIRTIO_VECTOR_BASE, lapic_id(), 0);
		cc_write16(d, CC_MSIX_CONFIG, 0);
		if (cc_read16(d, CC_MSIX_CONFIG) != 0) {
			fail(d, "config_msix_vector 0 refused");
			virtio_close(d);
			return -1;
		}
		wake_start();
	}
	return 0;
}

/* ------------------------------------------------------------- queues */

/* Ring memory for the queues of the open device (one device at a time). */
struct vq_area {
	struct vring_desc desc[VQ_MAX];			/* 16-byte aligned */
	u16 avail[VQ_MAX + 3] __attribute__((aligned(4096)));
	u8 used[6 + 8 * VQ_MAX] __attribute__((aligned(4096)));
	struct vring_desc ind[VQ_MAX * VQ_IND_MAX] __attribute__((aligned(4096)));
} __attribute__((aligned(4096)));
static struct vq_area vq_areas[VIRTIO_MAX_QUEUES];

int virtio_setup_vq(struct vdev *d, int qi)
{
	struct vq *q = &d->vq[qi];
	struct vq_area *a = &vq_areas[qi];
	u16 max, size, noff, entry;
	u64 nofs;
	int i;

	if (qi >= VIRTIO_MAX_QUEUES || d->broken)
		return -1;
	if (cc_read16(d, CC_NUM_QUEUES) <= qi) {
		printf("virtio-%s: queue %d: the device has %u queues\n", tname(d->type), qi,
		       cc_read16(d, CC_NUM_QUEUES));
		return -1;
	}
	cc_write16(d, CC_Q_SELECT, (u16)qi);
	max = cc_read16(d, CC_Q_SIZE);
	if (!max) {
		printf("virtio-%s: queue %d not available (size 0)\n", tname(d->type), qi);
		return -1;
	}
	if (cc_read16(d, CC_Q_ENABLE)) {
		printf("virtio-%s: queue %d already enabled after reset\n", tname(d->type), qi);
		return -1;
	}
	for (size = VQ_MAX; size > max; size >>= 1)
		;
	memset(q, 0, sizeof(*q));
	memset(a, 0, sizeof(*a));
	q->dev = d;
	q->index = (u16)qi;
	q->size = size;
	q->desc = a->desc;
	q->avail = a->avail;
	q->used = a->used;
	q->ind = a->ind;
	q->num_free = size;
	for (i = 0; i < size; i++)
		q->next[i] = (u16)(i + 1);
	/* interrupt suppression as the mode wants it (2.7.7, 2.7.10) */
	q->avail[0] = d->irq ? 0 : VRING_AVAIL_F_NO_INTERRUPT;
	q->avail[2 + size] = d->irq ? 0 : 0xffff;	/* used_event: poll keeps it behind */

	cc_write16(d, CC_Q_SIZE, size);
	cc_write64(d, CC_Q_DESC, (u64)a->desc);
	cc_write64(d, CC_Q_DRIVER, (u64)a->avail);
	cc_write64(d, CC_Q_DEVICE, (u64)a->used);
	if (d->irq) {
		entry = (u16)(1 + qi);
		if (entry >= d->msix.table_size)
			entry = (u16)(d->msix.table_size - 1);
		pci_msix_set_entry(&d->msix, entry, (u8)(VIRTIO_VECTOR_BASE + entry), lapic_id(), 0);
		cc_write16(d, CC_Q_MSIX, entry);
		if (cc_read16(d, CC_Q_MSIX) != entry) {
			printf("virtio-%s: queue %d: msix vector %u refused\n", tname(d->type), qi, entry);
			return -1;
		}
		q->msix_entry = entry;
		q->vector = (u16)(VIRTIO_VECTOR_BASE + entry);
	}
	noff = cc_read16(d, CC_Q_NOFF);
	nofs = (u64)noff * d->notify_mult;
	if (nofs + 2 > d->notify_len) {
		printf("virtio-%s: queue %d: notify offset %u x %u beyond the notify region (0x%x)\n",
		       tname(d->type), qi, noff, d->notify_mult, d->notify_len);
		return -1;
	}
	q->notify = d->notify_base + nofs;
	cc_write16(d, CC_Q_ENABLE, 1);
	if (qi + 1 > d->nvq)
		d->nvq = qi + 1;
	return 0;
}

int virtio_driver_ok(struct vdev *d)
{
	u8 s;

	set_status(d, VIRTIO_S_DRIVER_OK);
	s = cc_read8(d, CC_STATUS);
	if ((s & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED)) || !(s & VIRTIO_S_DRIVER_OK)) {
		printf("virtio-%s: status 0x%x after DRIVER_OK\n", tname(d->type), s);
		return -1;
	}
	return 0;
}

void virtio_close(struct vdev *d)
{
	if (!d->pf)
		return;
	if (d->common)
		reset(d);
	if (d->msix.cap)
		pci_msix_enable(d->pf, &d->msix, 0);
	if (d->irq == 2) {
		ioapic_mask(d->intx_pin);
		ioapic_route_level(d->intx_pin, VIRTIO_INTX_VECTOR, 0);
		ioapic_mask(d->intx_pin);
	}
	wake_stop();
	pci_write16(d->pf, PCI_COMMAND, (pci_read16(d->pf, PCI_COMMAND) & ~PCI_CMD_MASTER) | PCI_CMD_INTX_DISABLE);
}

/* ------------------------------------------------------- split rings */

#define AVAIL_IDX(q)		((q)->avail[1])
#define AVAIL_RING(q, i)	((q)->avail[2 + (i)])
#define USED_EVENT(q)		((q)->avail[2 + (q)->size])
#define USED_FLAGS(q)		(*(volatile u16 *)((q)->used + 0))
#define USED_IDX(q)		(*(volatile u16 *)((q)->used + 2))
#define USED_ID(q, i)		(*(volatile u32 *)((q)->used + 4 + 8 * (i)))
#define USED_LEN(q, i)		(*(volatile u32 *)((q)->used + 8 + 8 * (i)))
#define AVAIL_EVENT(q)		(*(volatile u16 *)((q)->used + 4 + 8 * (q)->size))

/* 1: added, 0: no room now, -1: cannot ever be added */
int vq_add(struct vq *q, const struct vsg *sg, int nout, int nin, u64 cookie)
{
	int total = nout + nin, use_ind, need, k;
	u16 head, i, last = 0;
	u32 wlen = 0;

	if (total < 1 || total > VQ_IND_MAX || (total > q->size && !q->dev->indirect))
		return -1;
	use_ind = q->dev->indirect && total > 1;
	need = use_ind ? 1 : total;
	if (q->num_free < need)
		return 0;
	head = q->free_head;
	for (k = 0; k < total; k++)
		if (k >= nout)
			wlen += sg[k].len;
	if (use_ind) {
		struct vring_desc *t = &q->ind[head * VQ_IND_MAX];

		for (k = 0; k < total; k++) {
			t[k].addr = sg[k].addr;
			t[k].len = sg[k].len;
			t[k].flags = (k + 1 < total ? VRING_DESC_F_NEXT : 0) | (k >= nout ? VRING_DESC_F_WRITE : 0);
			t[k].next = (u16)(k + 1 < total ? k + 1 : 0);
		}
		q->desc[head].addr = (u64)t;
		q->desc[head].len = (u32)(total * sizeof(*t));
		q->desc[head].flags = VRING_DESC_F_INDIRECT;
		q->desc[head].next = 0;
		q->free_head = q->next[head];
	} else {
		i = head;
		for (k = 0; k < total; k++) {
			q->desc[i].addr = sg[k].addr;
			q->desc[i].len = sg[k].len;
			q->desc[i].flags = (k + 1 < total ? VRING_DESC_F_NEXT : 0) | (k >= nout ? VRING_DESC_F_WRITE : 0);
			q->desc[i].next = k + 1 < total ? q->next[i] : 0;
			last = i;
			i = q->next[i];
		}
		(void)last;
		q->free_head = i;
	}
	q->num_free -= (u16)need;
	q->ndesc[head] = (u16)need;
	q->wlen[head] = wlen;
	q->cookie[head] = cookie;
	q->heads_busy++;
	AVAIL_RING(q, q->avail_idx & (q->size - 1)) = head;
	barrier();		/* ring entry before idx (x86: stores stay in order) */
	q->avail_idx++;
	AVAIL_IDX(q) = q->avail_idx;
	q->added++;
	return 1;
}

void vq_kick(struct vq *q)
{
	u16 new = q->avail_idx, old = q->kicked_idx;
	int need;

	if (new == old)
		return;
	mb();			/* avail->idx visible before we read the device's suppression */
	q->kicked_idx = new;
	if (q->dev->event_idx)
		need = (u16)(new - AVAIL_EVENT(q) - 1) < (u16)(new - old);
	else
		need = !(USED_FLAGS(q) & VRING_USED_F_NO_NOTIFY);
	if (need) {
		mmio_write16(q->notify, q->index);
		q->kicks++;
	} else {
		q->kicks_skipped++;
	}
}

static void broken(struct vq *q, const char *fmt, u64 a, u64 b, u64 c)
{
	printf("virtio-%s: queue %u: ", tname(q->dev->type), q->index);
	printf(fmt, a, b, c);
	printf(" -- device no longer used\n");
	q->dev->broken = 1;
}

int vq_get(struct vq *q, u64 *cookie, u32 *len)
{
	u16 idx = USED_IDX(q), slot, n, last;
	u32 id, l;

	if (q->dev->broken)
		return -1;
	if (idx == q->last_used)
		return 0;
	if ((u16)(idx - q->last_used) > q->heads_busy) {
		broken(q, "used idx jumped from %lu to %lu with %lu requests in flight", q->last_used, idx,
		       q->heads_busy);
		return -1;
	}
	barrier();		/* idx before the entry (x86: loads stay in order) */
	slot = q->last_used & (q->size - 1);
	id = USED_ID(q, slot);
	l = USED_LEN(q, slot);
	if (id >= q->size || !q->ndesc[id]) {
		broken(q, "used id %lu is not a request in flight (used idx %lu, %lu)", id, q->last_used, 0);
		return -1;
	}
	if (l > q->wlen[id]) {
		broken(q, "used len %lu > the %lu writable bytes of request %lu", l, q->wlen[id], id);
		return -1;
	}
	n = q->ndesc[id];
	for (last = id; --n; last = q->next[last])
		;
	q->next[last] = q->free_head;
	q->free_head = (u16)id;
	q->num_free += q->ndesc[id];
	q->ndesc[id] = 0;
	q->heads_busy--;
	*cookie = q->cookie[id];
	*len = l;
	q->last_used++;
	q->completed++;
	if (!q->dev->irq && q->dev->event_idx)
		USED_EVENT(q) = (u16)(q->last_used - 1);	/* never reached: no interrupt */
	return 1;
}

/* Ask for an interrupt at the next completion; 1 if one is already there. */
static int vq_arm(struct vq *q)
{
	if (!q->heads_busy)
		return 0;
	if (q->dev->event_idx)
		USED_EVENT(q) = q->last_used;
	mb();			/* used_event visible before we look at used->idx */
	return USED_IDX(q) != q->last_used;
}

int virtio_idle(struct vdev *d, u64 *since, const char *what)
{
	int i, ready = 0;
	u8 s;

	if (d->broken)
		return -1;
	d->waits++;
	if (rdtsc() - *since > VIRTIO_TIMEOUT_TSC) {
		printf("virtio-%s: timeout: no progress for %lu tsc cycles while %s\n", tname(d->type),
		       VIRTIO_TIMEOUT_TSC, what);
		for (i = 0; i < d->nvq; i++)
			printf("virtio-%s: queue %d: avail idx %u, used idx %u, last used %u, in flight %u\n",
			       tname(d->type), i, d->vq[i].avail_idx, USED_IDX(&d->vq[i]), d->vq[i].last_used,
			       d->vq[i].heads_busy);
		return -1;
	}
	if (d->irq || (d->waits & 0xffff) == 0) {
		s = cc_read8(d, CC_STATUS);
		if (s & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED)) {
			printf("virtio-%s: device status 0x%x while %s\n", tname(d->type), s, what);
			d->broken = 1;
			return -1;
		}
	}
	if (!d->irq) {
		cpu_relax();
		return 0;
	}
	for (i = 0; i < d->nvq; i++)
		ready |= vq_arm(&d->vq[i]);
	if (!ready) {
		sti_hlt();
		cli();
		d->hlts++;
	}
	return 0;
}

/* -------------------------------------------------- CPL3 data helpers */

static long user_check(long arg, long unused1, long unused2)
{
	struct vcheck *c = (struct vcheck *)arg;
	const u8 *p = (const u8 *)c->buf;
	u32 x = (u32)c->seed, crc = 0xffffffffu;
	u64 errors = 0, first = (u64)-1, nonzero = 0, distinct = 0, i;
	u64 seen[4] = { 0, 0, 0, 0 };
	int k;

	(void)unused1, (void)unused2;
	for (i = 0; i < c->n; i++) {
		u8 b = p[i];

		if (c->seed) {
			x ^= x << 13;
			x ^= x >> 17;
			x ^= x << 5;
			if (b != (u8)x) {
				if (!errors)
					first = i;
				errors++;
			}
		}
		nonzero += b != 0;
		seen[b >> 6] |= 1UL << (b & 63);
		crc ^= b;
		for (k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
	}
	for (k = 0; k < 4; k++)
		for (i = 0; i < 64; i++)
			distinct += (seen[k] >> i) & 1;
	c->errors = errors;
	c->first_error = first;
	c->nonzero = nonzero;
	c->distinct = distinct;
	c->crc = ~crc;
	return 1;
}

static long user_copy(long dst, long src, long n)
{
	u64 *d8 = (u64 *)dst;
	const u64 *s8 = (const u64 *)src;
	long i, w = n / 8;

	for (i = 0; i < w; i++)
		d8[i] = s8[i];
	for (i = w * 8; i < n; i++)
		((u8 *)dst)[i] = ((const u8 *)src)[i];
	return 0;
}

void virtio_fill(u64 buf, u64 n, u64 seed)
{
	run_user(user_stream_fill, (long)buf, (long)n, (long)seed);
}

void virtio_check(struct vcheck *c)
{
	c->errors = c->n;	/* all wrong unless the check runs to its end */
	c->crc = 0;
	if (run_user(user_check, (long)c, 0, 0) != 1)
		printf("virtio: the data check did not complete\n");
}

void virtio_copy(u64 dst, u64 src, u64 n)
{
	run_user(user_copy, (long)dst, (long)src, (long)n);
}

extern u8 __end[];

int virtio_buffer_fits(u64 base, u64 n)
{
	int i;

	if ((u64)__end > base)
		return 0;
	for (i = 0; i < e820_count; i++)
		if (e820[i].type == 1 && e820[i].addr <= base && e820[i].addr + e820[i].size >= base + n)
			return 1;
	return 0;
}
