/*
 * PCI bus 0 through configuration mechanism #1: the address dword
 * (enable | bus << 16 | dev << 11 | fn << 8 | reg) goes to port 0xcf8,
 * the data dword is at 0xcfc. Only dword accesses are made; narrower
 * reads take a part of the dword, narrower writes read-modify-write it
 * (with the STATUS half of dword 0x04 written as 0, its bits being RW1C).
 *
 * BARs are sized the standard way with decode off in COMMAND: write all
 * ones, read back the address mask, put the old value back. A memory BAR
 * the firmware or VMM left at 0, or a 64-bit one above the 4 GiB this
 * guest maps, gets an address from PCI_WINDOW_START.. PCI_WINDOW_END
 * that overlaps no other BAR and no e820 range; `lspci` says so.
 *
 * The page tables (head.S) identity map 4 GiB with 2 MiB pages, write-back
 * below 0xfe000000. pci_map_mmio() sets PCD|PWT (PAT entry 3: UC) on the
 * 2 MiB pages of an MMIO range a driver is about to touch, unless a page
 * also holds e820 RAM.
 */
#include "kernel.h"
#include "pci.h"

#define CONFIG_ADDRESS	0xcf8
#define CONFIG_DATA	0xcfc

struct pci_func pci_funcs[PCI_MAX_FUNCS];
int pci_nfuncs;

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static u32 cfg_addr(u8 dev, u8 fn, u32 off)
{
	return 0x80000000u | ((u32)dev << 11) | ((u32)fn << 8) | (off & 0xfc);
}

static u32 cfg_read(u8 dev, u8 fn, u32 off)
{
	outl(CONFIG_ADDRESS, cfg_addr(dev, fn, off));
	return inl(CONFIG_DATA);
}

static void cfg_write(u8 dev, u8 fn, u32 off, u32 v)
{
	outl(CONFIG_ADDRESS, cfg_addr(dev, fn, off));
	outl(CONFIG_DATA, v);
}

u32 pci_read32(const struct pci_func *f, u32 off) { return cfg_read(f->dev, f->fn, off); }
u16 pci_read16(const struct pci_func *f, u32 off) { return (u16)(cfg_read(f->dev, f->fn, off) >> (8 * (off & 2))); }
u8 pci_read8(const struct pci_func *f, u32 off) { return (u8)(cfg_read(f->dev, f->fn, off) >> (8 * (off & 3))); }
void pci_write32(const struct pci_func *f, u32 off, u32 v) { cfg_write(f->dev, f->fn, off, v); }

void pci_write16(const struct pci_func *f, u32 off, u16 v)
{
	u32 d = cfg_read(f->dev, f->fn, off);
	int sh = 8 * (off & 2);

	if ((off & ~3u) == PCI_COMMAND)
		d &= 0xffff;		/* STATUS is RW1C: write zeros there */
	d = (d & ~(0xffffu << sh)) | ((u32)v << sh);
	cfg_write(f->dev, f->fn, off, d);
}

u32 pci_find_cap(const struct pci_func *f, u8 id, u32 after)
{
	u32 p;
	int guard = 48;		/* (256 - 64) / 4 capabilities at most */

	if (!(pci_read16(f, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return 0;
	p = after ? pci_read8(f, after + 1) : pci_read8(f, PCI_CAP_PTR);
	for (p &= 0xfc; p >= 0x40 && guard--; p = pci_read8(f, p + 1) & 0xfc)
		if (pci_read8(f, p) == id)
			return p;
	return 0;
}

/* ---------------------------------------------------------- BAR sizing */

static u64 lowest_bit(u64 v) { return v & (~v + 1); }

/* Size BAR i of f (decode is off); returns how many BAR slots it uses. */
static int size_bar(struct pci_func *f, int i)
{
	struct pci_bar *b = &f->bar[i];
	u32 off = 0x10 + 4 * i, lo, mask_lo, hi = 0, mask_hi = 0xffffffffu;

	memset(b, 0, sizeof(*b));
	lo = pci_read32(f, off);
	pci_write32(f, off, 0xffffffffu);
	mask_lo = pci_read32(f, off);
	pci_write32(f, off, lo);
	if (mask_lo == 0 || mask_lo == 0xffffffffu)	/* not implemented (or nobody there) */
		return 1;
	if (lo & 1) {
		b->io = 1;
		b->addr = lo & ~3u;
		b->size = lowest_bit(mask_lo & 0xfffc);
		return 1;
	}
	b->prefetch = (lo >> 3) & 1;
	if (((lo >> 1) & 3) == 2 && i < 5) {
		b->is64 = 1;
		hi = pci_read32(f, off + 4);
		pci_write32(f, off + 4, 0xffffffffu);
		mask_hi = pci_read32(f, off + 4);
		pci_write32(f, off + 4, hi);
	}
	b->addr = ((u64)hi << 32) | (lo & ~0xfu);
	b->size = lowest_bit(((u64)mask_hi << 32) | (mask_lo & ~0xfu));
	if (b->is64) {
		memset(&f->bar[i + 1], 0, sizeof(f->bar[i + 1]));
		f->bar[i + 1].upper = 1;
		return 2;
	}
	return 1;
}

static void size_rom(struct pci_func *f)
{
	u32 off = (f->hdr_type & 0x7f) == 1 ? 0x38 : 0x30, v, mask;

	f->rom_addr = f->rom_size = 0;
	if ((f->hdr_type & 0x7f) > 1)
		return;
	v = pci_read32(f, off);
	pci_write32(f, off, 0xfffff800u);	/* enable bit stays clear */
	mask = pci_read32(f, off) & 0xfffff800u;
	pci_write32(f, off, v);
	if (mask) {
		f->rom_addr = v & 0xfffff800u;
		f->rom_size = lowest_bit(mask);
	}
}

/* -------------------------------------------------- window assignment */

static int overlaps(u64 a, u64 n, u64 b, u64 m)
{
	return a < b + m && b < a + n;
}

/* End of a range in use that overlaps [a, a + n), or 0 if none does. */
static u64 busy_until(u64 a, u64 n, const struct pci_bar *self)
{
	int i, j;

	for (i = 0; i < e820_count; i++)
		if (overlaps(a, n, e820[i].addr, e820[i].size))
			return e820[i].addr + e820[i].size;
	for (i = 0; i < pci_nfuncs; i++) {
		struct pci_func *f = &pci_funcs[i];

		for (j = 0; j < f->nbars; j++) {
			const struct pci_bar *b = &f->bar[j];

			if (b == self || !b->size || b->io || b->upper || !b->addr)
				continue;
			if (overlaps(a, n, b->addr, b->size))
				return b->addr + b->size;
		}
		if (f->rom_addr && overlaps(a, n, f->rom_addr, f->rom_size))
			return f->rom_addr + f->rom_size;
	}
	return 0;
}

static u64 window_alloc(u64 size, const struct pci_bar *self)
{
	u64 a = PCI_WINDOW_START, end;
	int guard = 4 * PCI_MAX_FUNCS * 7 + E820_MAX;

	if (size < 4096)
		size = 4096;	/* a page of its own */
	while (guard--) {
		a = (a + size - 1) & ~(size - 1);
		if (a + size > PCI_WINDOW_END || a + size < a)
			return 0;
		end = busy_until(a, size, self);
		if (!end)
			return a;
		a = end;
	}
	return 0;
}

static void write_bar(struct pci_func *f, int i, u64 addr)
{
	u16 cmd = pci_read16(f, PCI_COMMAND);
	struct pci_bar *b = &f->bar[i];

	pci_write16(f, PCI_COMMAND, cmd & ~(PCI_CMD_IO | PCI_CMD_MEM));
	pci_write32(f, 0x10 + 4 * i, (u32)addr | (pci_read32(f, 0x10 + 4 * i) & 0xf));
	if (b->is64)
		pci_write32(f, 0x14 + 4 * i, (u32)(addr >> 32));
	pci_write16(f, PCI_COMMAND, cmd);
	b->addr = addr;
}

static int assign_bars(int verbose)
{
	int i, j, n = 0;

	for (i = 0; i < pci_nfuncs; i++) {
		struct pci_func *f = &pci_funcs[i];

		for (j = 0; j < f->nbars; j++) {
			struct pci_bar *b = &f->bar[j];
			u64 a, old = b->addr;

			if (!b->size || b->io || b->upper)
				continue;
			if (b->addr && b->addr + b->size <= (1UL << 32))
				continue;
			a = window_alloc(b->size, b);
			if (!a) {
				printf("pci: 00:%02x.%u bar%d (size 0x%lx): no room in 0x%lx-0x%lx\n",
				       f->dev, f->fn, j, b->size, PCI_WINDOW_START, PCI_WINDOW_END);
				continue;
			}
			b->addr = 0;	/* not in use while looking */
			write_bar(f, j, a);
			if (old)
				b->relocated = 1;
			else
				b->assigned = 1;
			n++;
			if (verbose)
				printf("pci: 00:%02x.%u bar%d %s 0x%lx (size 0x%lx)\n", f->dev, f->fn, j,
				       old ? "moved below 4 GiB to" : "was 0, assigned", a, b->size);
		}
	}
	return n;
}

int pci_scan(int verbose)
{
	int dev, fn, i;

	pci_nfuncs = 0;
	for (dev = 0; dev < 32; dev++) {
		for (fn = 0; fn < 8; fn++) {
			struct pci_func *f;
			u32 id = cfg_read((u8)dev, (u8)fn, 0), hdr;
			u16 cmd;

			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
				if (fn == 0)
					break;
				continue;
			}
			if (pci_nfuncs == PCI_MAX_FUNCS) {
				printf("pci: more than %d functions, the rest ignored\n", PCI_MAX_FUNCS);
				return pci_nfuncs;
			}
			f = &pci_funcs[pci_nfuncs++];
			memset(f, 0, sizeof(*f));
			f->dev = (u8)dev;
			f->fn = (u8)fn;
			f->vendor = (u16)id;
			f->device = (u16)(id >> 16);
			i = (int)pci_read32(f, 0x08);
			f->rev = (u8)i;
			f->class_code = (u32)i >> 8;
			hdr = pci_read32(f, 0x0c);
			f->hdr_type = (u8)(hdr >> 16);
			f->irq_pin = pci_read8(f, 0x3d);
			f->irq_line = pci_read8(f, 0x3c);
			switch (f->hdr_type & 0x7f) {
			case 0:
				f->nbars = 6;
				f->sub_vendor = pci_read16(f, 0x2c);
				f->sub_device = pci_read16(f, 0x2e);
				break;
			case 1:
				f->nbars = 2;
				break;
			default:
				f->nbars = 0;
			}
			/* size with decode off, then restore COMMAND as it was */
			cmd = pci_read16(f, PCI_COMMAND);
			pci_write16(f, PCI_COMMAND, cmd & ~(PCI_CMD_IO | PCI_CMD_MEM));
			for (i = 0; i < f->nbars;)
				i += size_bar(f, i);
			size_rom(f);
			pci_write16(f, PCI_COMMAND, cmd);
			if (fn == 0 && !(f->hdr_type & 0x80))
				break;		/* single-function device */
		}
	}
	assign_bars(verbose);
	return pci_nfuncs;
}

/* ------------------------------------------------------------ mapping */

static int range_has_ram(u64 a, u64 n)
{
	int i;

	for (i = 0; i < e820_count; i++)
		if (e820[i].type == 1 && overlaps(a, n, e820[i].addr, e820[i].size))
			return 1;
	return 0;
}

/* The 2 MiB page-directory entry that maps addr (< 4 GiB), or NULL. */
static u64 *pde_of(u64 a)
{
	u64 cr3, *pml4, *pdpt, pdpte, *pd;

	if (a >= (1UL << 32))
		return NULL;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	pml4 = (u64 *)(cr3 & 0xffffffffff000UL);
	if (!(pml4[0] & 1))
		return NULL;
	pdpt = (u64 *)(pml4[0] & 0xffffffffff000UL);
	pdpte = pdpt[a >> 30];
	if (!(pdpte & 1) || (pdpte & 0x80))
		return NULL;	/* not the 2 MiB page layout head.S builds */
	pd = (u64 *)(pdpte & 0xffffffffff000UL);
	if (!(pd[(a >> 21) & 511] & 1) || !(pd[(a >> 21) & 511] & 0x80))
		return NULL;
	return &pd[(a >> 21) & 511];
}

int pci_map_mmio(u64 addr, u64 size)
{
	const u64 page = 1UL << 21, pcd_pwt = 0x18;
	u64 a, *pde;

	if (!size || addr + size > (1UL << 32) || addr + size < addr)
		return -1;
	for (a = addr & ~(page - 1); a < addr + size; a += page) {
		pde = pde_of(a);
		if (!pde)
			return -1;
		if ((*pde & pcd_pwt) == pcd_pwt || range_has_ram(a, page))
			continue;	/* uncached already, or RAM that stays write-back */
		*pde |= pcd_pwt;
		__asm__ volatile("invlpg (%0)" : : "r"(a) : "memory");
	}
	return 0;
}

/* How this guest maps addr: "uc" (PCD), "wt" (PWT only), "wb", "-" (not mapped). */
static const char *cache_name(u64 addr)
{
	u64 *pde = pde_of(addr);

	if (!pde)
		return "-";
	return (*pde & 0x10) ? "uc" : (*pde & 0x08) ? "wt" : "wb";
}

/* -------------------------------------------------------------- MSI-X */

#define MSIX_CTRL_ENABLE	0x8000
#define MSIX_CTRL_FMASK		0x4000

int pci_msix_probe(const struct pci_func *f, struct msix *m)
{
	u32 tbl, bir;

	memset(m, 0, sizeof(*m));
	m->cap = pci_find_cap(f, PCI_CAP_ID_MSIX, 0);
	if (!m->cap)
		return -1;
	m->table_size = (pci_read16(f, m->cap + 2) & 0x7ff) + 1;
	tbl = pci_read32(f, m->cap + 4);
	bir = tbl & 7;
	if (bir >= (u32)f->nbars || !f->bar[bir].size || f->bar[bir].io ||
	    (u64)(tbl & ~7u) + 16UL * m->table_size > f->bar[bir].size) {
		printf("pci: 00:%02x.%u: MSI-X table bar%u+0x%x does not fit its BAR\n", f->dev, f->fn,
		       bir, tbl & ~7u);
		m->cap = 0;
		return -1;
	}
	m->table = f->bar[bir].addr + (tbl & ~7u);
	if (pci_map_mmio(m->table, 16UL * m->table_size)) {
		m->cap = 0;
		return -1;
	}
	return 0;
}

void pci_msix_set_entry(const struct msix *m, u32 entry, u8 vector, u32 apic_id, int masked)
{
	u64 e = m->table + 16UL * entry;

	if (entry >= m->table_size)
		return;
	mmio_write32(e + 12, 1);				/* mask while changing it */
	mmio_write32(e + 0, 0xfee00000u | (apic_id << 12));	/* physical destination */
	mmio_write32(e + 4, 0);
	mmio_write32(e + 8, vector);				/* fixed, edge */
	mmio_write32(e + 12, masked ? 1 : 0);
}

/*
 * on: function mask + enable, every entry masked, then the function mask
 * off (the caller unmasks the entries it programs). off: entries masked,
 * MSI-X disabled.
 */
void pci_msix_enable(const struct pci_func *f, const struct msix *m, int on)
{
	u16 ctl = pci_read16(f, m->cap + 2);
	u32 i;

	if (on) {
		pci_write16(f, m->cap + 2, ctl | MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK);
		for (i = 0; i < m->table_size; i++)
			mmio_write32(m->table + 16UL * i + 12, 1);
		pci_write16(f, m->cap + 2, (ctl | MSIX_CTRL_ENABLE) & ~MSIX_CTRL_FMASK);
	} else {
		for (i = 0; i < m->table_size; i++)
			mmio_write32(m->table + 16UL * i + 12, 1);
		pci_write16(f, m->cap + 2, ctl & ~(MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK));
	}
}

/* -------------------------------------------------------------- lspci */

static const char *class_name(u32 cls)
{
	switch (cls >> 8) {
	case 0x0100: return "scsi";
	case 0x0101: return "ide";
	case 0x0106: return "sata";
	case 0x0180: return "storage";
	case 0x0200: return "ethernet";
	case 0x0300: return "vga";
	case 0x0600: return "host-bridge";
	case 0x0601: return "isa-bridge";
	case 0x0604: return "pci-bridge";
	case 0x0680: return "bridge";
	case 0x0780: return "communication";
	case 0x0c03: return "usb";
	case 0x0c05: return "smbus";
	case 0x00ff: return "unclassified";
	case 0x1000: return "crypto";
	}
	switch (cls >> 16) {
	case 0x01: return "storage";
	case 0x02: return "network";
	case 0x03: return "display";
	case 0x06: return "bridge";
	case 0x07: return "communication";
	case 0x08: return "system";
	case 0x10: return "crypto";
	case 0xff: return "misc";
	}
	return "other";
}

static const char *virtio_cfg_name(u8 t)
{
	switch (t) {
	case 1: return "common";
	case 2: return "notify";
	case 3: return "isr";
	case 4: return "device";
	case 5: return "pci-cfg";
	case 8: return "shared-memory";
	case 9: return "vendor";
	}
	return "?";
}

static void print_caps(const struct pci_func *f)
{
	u32 p;
	int guard = 48;

	if (!(pci_read16(f, PCI_STATUS) & PCI_STATUS_CAP_LIST))
		return;
	for (p = pci_read8(f, PCI_CAP_PTR) & 0xfc; p >= 0x40 && guard--; p = pci_read8(f, p + 1) & 0xfc) {
		u8 id = pci_read8(f, p);

		printf("  cap 0x%02x id 0x%02x", p, id);
		if (id == PCI_CAP_ID_MSIX) {
			u16 ctl = pci_read16(f, p + 2);
			u32 t = pci_read32(f, p + 4), b = pci_read32(f, p + 8);
			printf(" msix table-size %u table bar%u+0x%x pba bar%u+0x%x%s\n", (ctl & 0x7ff) + 1,
			       t & 7, t & ~7u, b & 7, b & ~7u, ctl & 0x8000 ? " enabled" : "");
		} else if (id == PCI_CAP_ID_MSI) {
			printf(" msi\n");
		} else if (id == PCI_CAP_ID_PCIE) {
			printf(" pcie\n");
		} else if (id == PCI_CAP_ID_VNDR && f->vendor == 0x1af4) {
			u8 type = pci_read8(f, p + 3), bar = pci_read8(f, p + 4);
			printf(" virtio %s bar%u+0x%x len 0x%x", virtio_cfg_name(type), bar,
			       pci_read32(f, p + 8), pci_read32(f, p + 12));
			if (type == 2)
				printf(" notify-off-multiplier %u", pci_read32(f, p + 16));
			printf("\n");
		} else if (id == PCI_CAP_ID_VNDR) {
			printf(" vendor len %u\n", pci_read8(f, p + 2));
		} else {
			printf("\n");
		}
	}
}

/*
 * Zero the memory BARs of every virtio function (decode off first), as a
 * VMM that assigns none would leave them: the next scan assigns them.
 */
static void clear_virtio_bars(void)
{
	int i, j;

	pci_scan(0);
	for (i = 0; i < pci_nfuncs; i++) {
		struct pci_func *f = &pci_funcs[i];

		if (f->vendor != 0x1af4)
			continue;
		pci_write16(f, PCI_COMMAND, pci_read16(f, PCI_COMMAND) & ~PCI_CMD_MEM);
		for (j = 0; j < f->nbars; j++) {
			if (!f->bar[j].size || f->bar[j].io || f->bar[j].upper)
				continue;
			pci_write32(f, 0x10 + 4 * j, pci_read32(f, 0x10 + 4 * j) & 0xf);
			if (f->bar[j].is64)
				pci_write32(f, 0x14 + 4 * j, 0);
		}
	}
}

int cmd_lspci(int argc, char **argv)
{
	int i, j, n, assigned = 0, virtio = 0;

	if (argc > 2 || (argc == 2 && strcmp(argv[1], "clear-virtio-bars"))) {
		printf("usage: lspci [clear-virtio-bars]\n");
		return 2;
	}
	if (argc == 2)
		clear_virtio_bars();
	n = pci_scan(1);
	for (i = 0; i < n; i++) {
		const struct pci_func *f = &pci_funcs[i];

		printf("00:%02x.%u %04x:%04x class %06x %s rev %02x", f->dev, f->fn, f->vendor, f->device,
		       f->class_code, class_name(f->class_code), f->rev);
		if ((f->hdr_type & 0x7f) == 0)
			printf(" subsys %04x:%04x", f->sub_vendor, f->sub_device);
		if (f->irq_pin)
			printf(" int%c line %u", 'A' + f->irq_pin - 1, f->irq_line);
		printf("\n");
		if (f->vendor == 0x1af4)
			virtio++;
		for (j = 0; j < f->nbars; j++) {
			const struct pci_bar *b = &f->bar[j];

			if (!b->size || b->upper)
				continue;
			printf("  bar%d %s%s 0x%lx size 0x%lx%s%s%s\n", j,
			       b->io ? "io" : b->is64 ? "mem64" : "mem32",
			       b->prefetch ? " pref" : "", b->addr, b->size,
			       b->io ? "" : " cache ", b->io ? "" : cache_name(b->addr),
			       b->assigned ? " (assigned by the guest)" :
			       b->relocated ? " (moved below 4 GiB by the guest)" : "");
			assigned += b->assigned || b->relocated;
		}
		if (f->rom_size)
			printf("  rom 0x%lx size 0x%lx\n", f->rom_addr, f->rom_size);
		print_caps(f);
	}
	printf("lspci: %d functions on bus 0, %d virtio, %d bars assigned by the guest\n", n, virtio,
	       assigned);
	return n > 0 ? 0 : 1;
}
