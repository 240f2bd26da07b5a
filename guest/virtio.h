/* virtio 1.2 over PCI (modern transport) and split virtqueues; see virtio.c. */
#ifndef KVMKIT_GUEST_VIRTIO_H
#define KVMKIT_GUEST_VIRTIO_H

#include "kernel.h"
#include "pci.h"

#define VIRTIO_VENDOR		0x1af4
#define VIRTIO_ID_BLOCK		2
#define VIRTIO_ID_CONSOLE	3
#define VIRTIO_ID_RNG		4

/* device status */
#define VIRTIO_S_ACKNOWLEDGE	1
#define VIRTIO_S_DRIVER		2
#define VIRTIO_S_DRIVER_OK	4
#define VIRTIO_S_FEATURES_OK	8
#define VIRTIO_S_NEEDS_RESET	0x40
#define VIRTIO_S_FAILED		0x80

/* transport and ring feature bits */
#define VIRTIO_F_INDIRECT_DESC	28
#define VIRTIO_F_EVENT_IDX	29
#define VIRTIO_F_VERSION_1	32
#define VIRTIO_F_ACCESS_PLATFORM 33

#define VIRTIO_MSI_NO_VECTOR	0xffff
#define VQ_MAX			128	/* queue size this driver uses at most */
#define VQ_IND_MAX		16	/* descriptors in one indirect table */
#define VIRTIO_MAX_QUEUES	2

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2
#define VRING_DESC_F_INDIRECT	4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY	1

/* one buffer of a request: device-readable (out) first, then device-writable (in) */
struct vsg {
	u64 addr;
	u32 len;
};

struct vq {
	struct vdev *dev;
	u16 index, size;
	u16 last_used;		/* next used entry to look at */
	u16 avail_idx;		/* our copy of avail->idx */
	u16 kicked_idx;		/* avail idx at the last notification decision */
	u16 num_free, free_head, heads_busy;
	u16 vector;		/* MSI-X entry's IDT vector, 0 if none */
	u16 msix_entry;
	u64 notify;		/* notify address */
	volatile struct vring_desc *desc;
	volatile u16 *avail;	/* flags, idx, ring[size], used_event */
	volatile u8 *used;	/* flags, idx, ring[size] {id, len}, avail_event */
	struct vring_desc *ind;	/* VQ_MAX indirect tables of VQ_IND_MAX */
	/* driver-private shadow state (never read back from shared memory) */
	u16 next[VQ_MAX];
	u16 ndesc[VQ_MAX];	/* ring descriptors a head holds; 0: free */
	u32 wlen[VQ_MAX];	/* device-writable bytes of the chain */
	u64 cookie[VQ_MAX];
	/* statistics */
	u64 added, completed, kicks, kicks_skipped;
};

struct vdev {
	struct pci_func *pf;
	int type;
	u64 common, notify_base, isr, devcfg;
	u32 notify_mult, notify_len, devcfg_len;
	u64 offered, features;	/* device features, negotiated features */
	int irq;		/* 1: MSI-X interrupts and sti;hlt, 2: INTx through the IOAPIC, 0: polling */
	int intx_pin;		/* intx mode: the IOAPIC pin (the function's Interrupt Line) */
	int event_idx, indirect;
	struct msix msix;
	int nvq;
	struct vq vq[VIRTIO_MAX_QUEUES];
	u64 vec_base[VIRTIO_MAX_QUEUES + 1];	/* vector_counts at open */
	u64 wake_base, intx_base;
	u64 waits, hlts;
	int broken;		/* the device broke a rule: stop using it */
};

/* Options shared by the virtio commands (parsed by virtio_parse_opts). */
struct vopts {
	int irq, event_idx, indirect;
	u64 dev, seed, buf;
	u64 num[4];
	int nnum;
	const char *word;	/* one free word: read/write, tx/rx */
};

/* Timeout: TSC cycles without progress (~7 s at 3 GHz) */
#define VIRTIO_TIMEOUT_TSC	20000000000UL

int virtio_parse_opts(int argc, char **argv, struct vopts *o);
/* Find the index'th device of type, reset it and negotiate; features: device-specific bits wanted. */
int virtio_open(struct vdev *d, int type, int index, u64 want, const struct vopts *o);
int virtio_setup_vq(struct vdev *d, int qi);
int virtio_driver_ok(struct vdev *d);
void virtio_close(struct vdev *d);
int virtio_has(const struct vdev *d, int bit);
u32 virtio_cfg_read32(struct vdev *d, u32 off);
u64 virtio_cfg_read64(struct vdev *d, u32 off);
u8 virtio_cfg_read8(struct vdev *d, u32 off);
u64 virtio_irqs(const struct vdev *d);	/* interrupts on its vectors since open */
void virtio_print_irqs(const struct vdev *d, const char *cmd);	/* per vector */

int vq_add(struct vq *q, const struct vsg *sg, int nout, int nin, u64 cookie);
void vq_kick(struct vq *q);
/* 1: a completion (cookie, len), 0: none, -1: the device broke a rule */
int vq_get(struct vq *q, u64 *cookie, u32 *len);
/* No progress: wait (sti;hlt or pause) and check the timeout; -1 on timeout or a broken device. */
int virtio_idle(struct vdev *d, u64 *since, const char *what);

/* CPL3 helpers (run_user): the xorshift32 stream and CRC-32, as serial-selftest */
struct vcheck {
	u64 buf, n, seed;
	u64 errors, first_error, nonzero, distinct;
	u32 crc;
};
void virtio_fill(u64 buf, u64 n, u64 seed);
void virtio_check(struct vcheck *c);	/* errors vs the stream; seed 0: only crc/nonzero/distinct */
void virtio_copy(u64 dst, u64 src, u64 n);
int virtio_buffer_fits(u64 base, u64 n);

#define VIRTIO_BUF	0x2000000UL	/* 32 MiB: data buffers (as serial-selftest) */

#endif
