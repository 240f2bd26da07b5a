/* PCI bus 0 through configuration mechanism #1; see pci.c. */
#ifndef KVMKIT_GUEST_PCI_H
#define KVMKIT_GUEST_PCI_H

#include "kernel.h"

#define PCI_MAX_FUNCS	64

#define PCI_COMMAND		0x04
#define PCI_INTERRUPT_LINE	0x3c
#define PCI_INTERRUPT_PIN	0x3d
#define PCI_CMD_IO		0x0001
#define PCI_CMD_MEM		0x0002
#define PCI_CMD_MASTER		0x0004
#define PCI_CMD_INTX_DISABLE	0x0400
#define PCI_STATUS		0x06
#define PCI_STATUS_CAP_LIST	0x0010
#define PCI_CAP_PTR		0x34

#define PCI_CAP_ID_MSI		0x05
#define PCI_CAP_ID_VNDR		0x09
#define PCI_CAP_ID_PCIE		0x10
#define PCI_CAP_ID_MSIX		0x11

/* The guest's window for memory BARs the firmware/VMM left at 0 (or above 4 GiB). */
#define PCI_WINDOW_START	0xc0000000UL
#define PCI_WINDOW_END		0xfe000000UL

struct pci_bar {
	u64 addr, size;		/* size 0: not implemented */
	u8 io, is64, prefetch;
	u8 assigned;		/* the guest wrote this address (BAR was 0) */
	u8 relocated;		/* the guest moved it below 4 GiB */
	u8 upper;		/* the upper half of a 64-bit BAR: no BAR of its own */
};

struct pci_func {
	u8 dev, fn, hdr_type, irq_pin, irq_line, rev;
	u16 vendor, device, sub_vendor, sub_device;
	u32 class_code;		/* base << 16 | sub << 8 | prog-if */
	int nbars;
	struct pci_bar bar[6];
	u64 rom_addr, rom_size;
};

extern struct pci_func pci_funcs[PCI_MAX_FUNCS];
extern int pci_nfuncs;

u32 pci_read32(const struct pci_func *f, u32 off);
u16 pci_read16(const struct pci_func *f, u32 off);
u8 pci_read8(const struct pci_func *f, u32 off);
void pci_write32(const struct pci_func *f, u32 off, u32 v);
void pci_write16(const struct pci_func *f, u32 off, u16 v);

/* Enumerate bus 0 (sizes BARs, assigns the missing ones); the count, -1 on error. */
int pci_scan(int verbose);
/* Walk the capability list: offset of the next capability with id after `after` (0: first), 0 if none. */
u32 pci_find_cap(const struct pci_func *f, u8 id, u32 after);
/* Map [addr, addr + size) uncached (PCD|PWT on its 2 MiB pages); -1 if not possible. */
int pci_map_mmio(u64 addr, u64 size);

/* MSI-X */
struct msix {
	u32 cap;		/* capability offset, 0: none */
	u32 table_size;
	u64 table;		/* address of entry 0 */
};
int pci_msix_probe(const struct pci_func *f, struct msix *m);
void pci_msix_set_entry(const struct msix *m, u32 entry, u8 vector, u32 apic_id, int masked);
void pci_msix_enable(const struct pci_func *f, const struct msix *m, int on);

#endif
