/*
 * Commands driving virtio-pci devices (virtio.c): virtio-blk-test,
 * virtio-blk-bench, virtio-console-test, virtio-rng-test. Each opens the
 * device, runs, prints one summary line (README.md) and resets the device.
 * Data is generated and checked at CPL3 (virtio_fill / virtio_check), the
 * xorshift32 stream of serial-selftest with a selectable seed.
 */
#include "kernel.h"
#include "virtio.h"

/* common options: [irq|poll] [event-idx|no-event-idx] [indirect|no-indirect] [dev=N] */
#define COMMON_OPTS "[irq|poll] [no-event-idx] [no-indirect] [dev=N]"

static void print_mode(const struct vdev *d)
{
	printf("mode=%s event-idx=%d indirect=%d", d->irq == 2 ? "intx" : d->irq ? "irq" : "poll", d->event_idx, d->indirect);
}

static void print_open(const struct vdev *d, const char *cmd)
{
	const struct pci_func *f = d->pf;
	int i;

	printf("%s: 00:%02x.%u %04x:%04x features offered 0x%lx negotiated 0x%lx, queue size", cmd,
	       f->dev, f->fn, f->vendor, f->device, d->offered, d->features);
	for (i = 0; i < d->nvq; i++)
		printf(" %u", d->vq[i].size);
	if (d->irq == 2) {
		printf(", intx on IOAPIC pin %d, vector 0x%x (level)", d->intx_pin, VIRTIO_INTX_VECTOR);
	} else if (d->irq) {
		printf(", msix vectors 0x%x (config)", VIRTIO_VECTOR_BASE);
		for (i = 0; i < d->nvq; i++)
			printf(" 0x%x (queue %d)", d->vq[i].vector, i);
	} else {
		printf(", polling");
	}
	printf("\n");
}

static u64 kicks(const struct vdev *d)
{
	u64 n = 0;
	int i;

	for (i = 0; i < d->nvq; i++)
		n += d->vq[i].kicks;
	return n;
}

/* ============================================================ virtio-blk */

#define BLK_F_SIZE_MAX	1
#define BLK_F_SEG_MAX	2
#define BLK_F_RO	5
#define BLK_F_BLK_SIZE	6
#define BLK_F_FLUSH	9
#define BLK_T_IN	0
#define BLK_T_OUT	1
#define BLK_T_FLUSH	4
#define BLK_T_GET_ID	8
#define BLK_S_OK	0
#define BLK_S_IOERR	1
#define BLK_S_UNSUPP	2
#define BLK_S_NONE	0xff	/* what we put there: the device did not write it */

#define BLK_CFG_CAPACITY 0
#define BLK_CFG_SIZE_MAX 8
#define BLK_CFG_SEG_MAX	12
#define BLK_CFG_BLK_SIZE 20

#define BLK_MAX_SECTORS	16384	/* virtio-blk-test: 8 MiB */

struct blk_req {
	u32 type;
	u32 reserved;
	u64 sector;
	u8 status;
} __attribute__((aligned(16)));

static struct blk_req blk_reqs[VQ_MAX];
static char blk_id[24] __attribute__((aligned(16)));

struct blk {
	struct vdev d;
	struct vq *q;
	u64 capacity;
	u32 size_max, seg_max, blk_size, max_segs, seg_len;
	u64 max_req;			/* bytes in one request at most */
	int ro;
	u64 requests;
	u64 status_count[4];		/* ok, ioerr, unsupp, other */
	u16 free_slot[VQ_MAX];
	u32 nfree;
	u64 slot_sectors[VQ_MAX];
};

static struct blk blk;

static const char *status_name(u8 s)
{
	switch (s) {
	case BLK_S_OK: return "ok";
	case BLK_S_IOERR: return "ioerr";
	case BLK_S_UNSUPP: return "unsupp";
	case BLK_S_NONE: return "unwritten";
	}
	return "bad";
}

static int blk_open(struct blk *b, const struct vopts *o)
{
	u32 i;

	memset(b, 0, sizeof(*b));
	if (virtio_open(&b->d, VIRTIO_ID_BLOCK, (int)o->dev,
			(1UL << BLK_F_SIZE_MAX) | (1UL << BLK_F_SEG_MAX) | (1UL << BLK_F_RO) |
			(1UL << BLK_F_BLK_SIZE) | (1UL << BLK_F_FLUSH), o))
		goto fail;
	if (!b->d.devcfg) {
		printf("virtio-blk: no device config capability\n");
		goto fail;
	}
	b->capacity = virtio_cfg_read64(&b->d, BLK_CFG_CAPACITY);
	b->ro = virtio_has(&b->d, BLK_F_RO);
	if (virtio_has(&b->d, BLK_F_SIZE_MAX))
		b->size_max = virtio_cfg_read32(&b->d, BLK_CFG_SIZE_MAX);
	if (virtio_has(&b->d, BLK_F_SEG_MAX))
		b->seg_max = virtio_cfg_read32(&b->d, BLK_CFG_SEG_MAX);
	if (virtio_has(&b->d, BLK_F_BLK_SIZE))
		b->blk_size = virtio_cfg_read32(&b->d, BLK_CFG_BLK_SIZE);
	if (virtio_setup_vq(&b->d, 0) || virtio_driver_ok(&b->d) || b->d.broken)
		goto fail;
	b->q = &b->d.vq[0];
	/* data segments per request: the indirect table (or ring) less header and status */
	b->max_segs = VQ_IND_MAX - 2;
	if (!b->d.indirect && b->max_segs > (u32)b->q->size - 2)
		b->max_segs = b->q->size > 2 ? (u32)b->q->size - 2 : 0;
	if (b->seg_max && b->max_segs > b->seg_max)
		b->max_segs = b->seg_max;
	b->seg_len = 1U << 22;
	if (b->size_max && b->size_max < b->seg_len)
		b->seg_len = b->size_max & ~511u;
	b->max_req = (u64)b->max_segs * b->seg_len;
	if (!b->max_req) {
		printf("virtio-blk: size_max %u / seg_max %u leave no room for data\n", b->size_max,
		       b->seg_max);
		goto fail;
	}
	for (i = 0; i < VQ_MAX; i++)
		b->free_slot[i] = (u16)(VQ_MAX - 1 - i);
	b->nfree = VQ_MAX;
	return 0;
fail:
	virtio_close(&b->d);
	return -1;
}

/* Cut [data, data+len) into segments of at most seg_len bytes, from sg[n]; returns the new n, -1 if too many. */
static int add_segs(struct blk *b, struct vsg *sg, int n, u64 data, u64 len)
{
	for (; len; n++) {
		u64 k = len < b->seg_len ? len : b->seg_len;

		if (n > (int)b->max_segs)
			return -1;
		sg[n].addr = data;
		sg[n].len = (u32)k;
		data += k;
		len -= k;
	}
	return n;
}

/* Queue one request in slot; 1 added, 0 no room, -1 error. */
static int blk_submit(struct blk *b, u16 slot, u32 type, u64 sector, u64 data, u64 len)
{
	struct blk_req *r = &blk_reqs[slot];
	struct vsg sg[VQ_IND_MAX];
	int n = 0, nout, ret;
	int writable = type == BLK_T_IN || type == BLK_T_GET_ID;

	r->type = type;
	r->reserved = 0;
	r->sector = sector;
	r->status = BLK_S_NONE;
	sg[n].addr = (u64)r;
	sg[n++].len = 16;
	if (!writable && (n = add_segs(b, sg, n, data, len)) < 0)
		return -1;
	nout = n;
	if (writable && (n = add_segs(b, sg, n, data, len)) < 0)
		return -1;
	sg[n].addr = (u64)&r->status;
	sg[n++].len = 1;
	ret = vq_add(b->q, sg, nout, n - nout, slot);
	if (ret > 0)
		b->requests++;
	return ret;
}

static void count_status(struct blk *b, u8 s)
{
	b->status_count[s <= BLK_S_UNSUPP ? s : 3]++;
}

/*
 * nsect sectors from sector0, requests of req sectors, at most depth in
 * flight. Data at buf + offset (per_slot = 0) or in one req-sized buffer
 * per in-flight slot (per_slot = 1, for benchmarks). Returns the number of
 * requests that did not end with `expect`, -1 if the device failed.
 */
static long blk_run(struct blk *b, u32 type, u64 sector0, u64 nsect, u64 buf, int per_slot, u64 req,
		    u32 depth, u8 expect, const char *what)
{
	u64 next = 0, done = 0, since = rdtsc(), cookie;
	u32 inflight = 0, len;
	long bad = 0;
	int r;

	/*
	 * free_slot[] is a stack whose top starts at slot 0: with at most
	 * depth requests in flight only slots 0..depth-1 are ever popped, so
	 * per-slot buffers need depth x req sectors.
	 */
	if (depth > VQ_MAX)
		depth = VQ_MAX;
	while (done < nsect) {
		int added = 0, progress = 0;

		while (next < nsect && inflight < depth && b->nfree) {
			u64 n = nsect - next < req ? nsect - next : req;
			u16 slot = b->free_slot[--b->nfree];
			u64 data = per_slot ? buf + (u64)slot * req * 512 : buf + next * 512;

			r = blk_submit(b, slot, type, sector0 + next, data, n * 512);
			if (r <= 0) {
				b->nfree++;
				if (r < 0) {
					printf("virtio-blk: request of %lu bytes does not fit a chain\n", n * 512);
					return -1;
				}
				break;
			}
			b->slot_sectors[slot] = n;
			next += n;
			inflight++;
			added = 1;
		}
		if (added)
			vq_kick(b->q);
		while ((r = vq_get(b->q, &cookie, &len)) > 0) {
			u8 s = blk_reqs[cookie].status;

			count_status(b, s);
			if (s != expect) {
				if (!bad)
					printf("virtio-blk: %s: sector %lu: status %s (%u)\n", what,
					       blk_reqs[cookie].sector, status_name(s), s);
				bad++;
			}
			done += b->slot_sectors[cookie];
			b->free_slot[b->nfree++] = (u16)cookie;
			inflight--;
			progress = 1;
		}
		if (r < 0)
			return -1;
		if (progress) {
			since = rdtsc();
			continue;
		}
		if (virtio_idle(&b->d, &since, what))
			return -1;
	}
	return bad;
}

/* One request without sectors of data (FLUSH) or with a small buffer (GET_ID); its status. */
static int blk_one(struct blk *b, u32 type, u64 data, u64 len, const char *what)
{
	u64 since = rdtsc(), cookie;
	u16 slot = b->free_slot[b->nfree - 1];
	u32 got;
	int r;

	if (blk_submit(b, slot, type, 0, data, len) <= 0)
		return -1;
	vq_kick(b->q);
	while ((r = vq_get(b->q, &cookie, &got)) == 0)
		if (virtio_idle(&b->d, &since, what))
			return -1;
	if (r < 0)
		return -1;
	count_status(b, blk_reqs[cookie].status);
	return blk_reqs[cookie].status;
}

/* virtio-blk-test [opts] [seed=N] [sectors [start]] */
int cmd_virtio_blk_test(int argc, char **argv)
{
	struct blk *b = &blk;
	struct vopts o;
	struct vcheck c;
	u64 n, start, bytes, wbuf = VIRTIO_BUF, rbuf;
	long bad = 0, r;
	int s, flush = -1, ro_write = -1, failed = 0, i;
	char serial[21];

	if (virtio_parse_opts(argc, argv, &o) || o.word || o.nnum > 2)
		goto usage;
	n = o.nnum > 0 ? o.num[0] : 64;
	start = o.nnum > 1 ? o.num[1] : 0;
	if (!n || n > BLK_MAX_SECTORS)
		goto usage;
	bytes = n * 512;
	rbuf = wbuf + bytes;
	if (!virtio_buffer_fits(wbuf, 2 * bytes)) {
		printf("virtio-blk-test: %lu bytes of buffers do not fit in RAM at 0x%lx\n", 2 * bytes, wbuf);
		return 2;
	}
	if (blk_open(b, &o))
		return 1;
	print_open(&b->d, "virtio-blk-test");

	memset(blk_id, 0, sizeof(blk_id));
	s = blk_one(b, BLK_T_GET_ID, (u64)blk_id, 20, "get-id");
	for (i = 0; i < 20 && blk_id[i]; i++)
		serial[i] = blk_id[i] > ' ' && blk_id[i] < 0x7f ? blk_id[i] : '_';
	serial[i] = 0;
	if (s != BLK_S_OK || !i) {
		serial[0] = '-';
		serial[1] = 0;
	}
	if (s < 0)
		goto broken;
	printf("virtio-blk-test: capacity %lu sectors, serial %s, size_max %u, seg_max %u, blk_size %u%s%s\n",
	       b->capacity, serial, b->size_max, b->seg_max, b->blk_size, b->ro ? ", read-only" : "",
	       virtio_has(&b->d, BLK_F_FLUSH) ? ", flush" : "");
	if (start > b->capacity || n > b->capacity - start) {
		printf("virtio-blk-test: sectors %lu-%lu beyond the capacity (%lu)\n", start, start + n - 1,
		       b->capacity);
		virtio_close(&b->d);
		return 2;
	}
	if (b->ro) {
		/* a write must fail with IOERR and change nothing */
		u64 before[4];

		memcpy(before, b->status_count, sizeof(before));
		virtio_fill(rbuf, bytes, 0);
		r = blk_run(b, BLK_T_OUT, start, n < 8 ? n : 8, rbuf, 0, 128, 1, BLK_S_IOERR, "read-only write");
		if (r < 0)
			goto broken;
		for (i = 3; i >= 0; i--)
			if (b->status_count[i] != before[i])
				ro_write = i == 3 ? 0xfe : i;
		bad += r;
	} else {
		virtio_fill(wbuf, bytes, o.seed);
		r = blk_run(b, BLK_T_OUT, start, n, wbuf, 0, 128, VQ_MAX, BLK_S_OK, "write");
		if (r < 0)
			goto broken;
		bad += r;
		if (virtio_has(&b->d, BLK_F_FLUSH)) {
			flush = blk_one(b, BLK_T_FLUSH, 0, 0, "flush");
			if (flush < 0)
				goto broken;
			bad += flush != BLK_S_OK;
		}
	}
	virtio_fill(rbuf, bytes, 0);	/* what is read must come from the device */
	r = blk_run(b, BLK_T_IN, start, n, rbuf, 0, 128, VQ_MAX, BLK_S_OK, "read");
	if (r < 0)
		goto broken;
	bad += r;
	goto check;
broken:
	failed = 1;
check:
	memset(&c, 0, sizeof(c));
	c.buf = rbuf;
	c.n = bytes;
	c.seed = o.seed;
	virtio_check(&c);
	if (c.errors)
		printf("virtio-blk-test: %lu bytes differ from the pattern, the first at byte %lu (sector %lu)\n",
		       c.errors, c.first_error, start + c.first_error / 512);
	virtio_print_irqs(&b->d, "virtio-blk-test");
	printf("virtio-blk-test: ");
	print_mode(&b->d);
	printf(" dev=%lu ro=%d capacity=%lu serial=%s sectors=%lu start=%lu seed=%lu bytes=%lu requests=%lu "
	       "irqs=%lu kicks=%lu flush=%s ro-write=%s errors=%lu crc=0x%08x result=%s\n",
	       o.dev, b->ro, b->capacity, serial, n, start, o.seed, bytes, b->requests, virtio_irqs(&b->d),
	       kicks(&b->d), flush < 0 ? "-" : status_name((u8)flush),
	       ro_write < 0 ? "-" : status_name((u8)ro_write), c.errors + (u64)bad + (u64)failed, c.crc,
	       c.errors || bad || failed ? "FAILED" : "ok");
	virtio_close(&b->d);
	return c.errors || bad || failed ? 1 : 0;
usage:
	printf("usage: virtio-blk-test " COMMON_OPTS " [seed=N] [sectors (64, max %u) [start]]\n",
	       BLK_MAX_SECTORS);
	return 2;
}

/* virtio-blk-bench read|write <MiB> [req_KiB [depth]] [opts] */
int cmd_virtio_blk_bench(int argc, char **argv)
{
	struct blk *b = &blk;
	struct vopts o;
	u64 mib, req_kib, depth, nsect, req, t0, t1;
	long r;
	int write;

	if (virtio_parse_opts(argc, argv, &o) || !o.word || o.nnum < 1 || o.nnum > 3)
		goto usage;
	if (strcmp(o.word, "read") && strcmp(o.word, "write"))
		goto usage;
	write = !strcmp(o.word, "write");
	mib = o.num[0];
	req_kib = o.nnum > 1 ? o.num[1] : 128;
	depth = o.nnum > 2 ? o.num[2] : 32;
	if (!mib || mib > (1UL << 20) || !req_kib || req_kib > 4096 || !depth || depth > VQ_MAX)
		goto usage;
	if (!virtio_buffer_fits(VIRTIO_BUF, depth * req_kib * 1024)) {
		printf("virtio-blk-bench: %lu x %lu KiB of buffers do not fit in RAM at 0x%lx\n", depth,
		       req_kib, VIRTIO_BUF);
		return 2;
	}
	if (blk_open(b, &o))
		return 1;
	print_open(&b->d, "virtio-blk-bench");
	nsect = mib << 11;
	req = req_kib * 2;
	if (req * 512 > b->max_req) {
		req = b->max_req / 512;
		printf("virtio-blk-bench: requests cut to %lu KiB (size_max %u, seg_max %u)\n", req / 2,
		       b->size_max, b->seg_max);
	}
	if (depth > b->q->size)
		depth = b->q->size;
	if (nsect > b->capacity) {
		printf("virtio-blk-bench: %lu MiB is beyond the capacity (%lu sectors)\n", mib, b->capacity);
		virtio_close(&b->d);
		return 2;
	}
	if (write && b->ro) {
		printf("virtio-blk-bench: the device is read-only\n");
		virtio_close(&b->d);
		return 2;
	}
	if (write)
		virtio_fill(VIRTIO_BUF, depth * req * 512, o.seed);
	t0 = rdtsc();
	r = blk_run(b, write ? BLK_T_OUT : BLK_T_IN, 0, nsect, VIRTIO_BUF, 1, req, (u32)depth, BLK_S_OK,
		    write ? "bench write" : "bench read");
	t1 = rdtsc();
	virtio_print_irqs(&b->d, "virtio-blk-bench");
	printf("virtio-blk-bench: %s bytes=%lu requests=%lu req-bytes=%lu depth=%lu tsc=%lu irqs=%lu "
	       "kicks=%lu hlts=%lu errors=%lu ", o.word, nsect * 512, b->requests, req * 512, depth, t1 - t0,
	       virtio_irqs(&b->d), kicks(&b->d), b->d.hlts, r < 0 ? 1 : (u64)r);
	print_mode(&b->d);
	printf(" result=%s\n", r ? "FAILED" : "ok");
	virtio_close(&b->d);
	return r ? 1 : 0;
usage:
	printf("usage: virtio-blk-bench read|write <MiB> [req_KiB (128) [depth (32)]] " COMMON_OPTS "\n");
	return 2;
}

/* ======================================================== virtio-console */

#define CONSOLE_RXQ	0
#define CONSOLE_TXQ	1
#define CONSOLE_MAX	(32UL << 20)

/* virtio-console-test [tx|rx] <bytes> [buf=N] [seed=N] [opts] */
int cmd_virtio_console_test(int argc, char **argv)
{
	static struct vdev dev;
	struct vdev *d = &dev;
	struct vopts o;
	struct vcheck c;
	u64 n, bufsz, pool, got = 0, extra = 0, buffers = 0, since, t0 = rdtsc(), t1, cookie;
	struct vq *q;
	u32 len;
	int tx = 1, r, failed = 0;

	if (virtio_parse_opts(argc, argv, &o) || o.nnum != 1)
		goto usage;
	if (o.word && strcmp(o.word, "tx") && strcmp(o.word, "rx"))
		goto usage;
	tx = !o.word || !strcmp(o.word, "tx");
	n = o.num[0];
	bufsz = o.buf ? o.buf : tx ? 32768 : 4096;
	if (!n || n > CONSOLE_MAX || bufsz > (1UL << 20))
		goto usage;
	pool = VIRTIO_BUF + ((n + 4095) & ~4095UL);
	if (!virtio_buffer_fits(VIRTIO_BUF, pool - VIRTIO_BUF + (tx ? 0 : VQ_MAX * bufsz))) {
		printf("virtio-console-test: buffers do not fit in RAM at 0x%lx\n", VIRTIO_BUF);
		return 2;
	}
	if (virtio_open(d, VIRTIO_ID_CONSOLE, (int)o.dev, 0, &o) ||
	    virtio_setup_vq(d, CONSOLE_RXQ) || virtio_setup_vq(d, CONSOLE_TXQ) || virtio_driver_ok(d)) {
		virtio_close(d);
		return 1;
	}
	print_open(d, "virtio-console-test");
	q = &d->vq[tx ? CONSOLE_TXQ : CONSOLE_RXQ];
	if (tx) {
		u64 sent = 0, done = 0;

		virtio_fill(VIRTIO_BUF, n, o.seed);
		since = t0 = rdtsc();
		while (done < n) {
			int added = 0, progress = 0;

			while (sent < n) {
				struct vsg sg;

				sg.addr = VIRTIO_BUF + sent;
				sg.len = (u32)(n - sent < bufsz ? n - sent : bufsz);
				r = vq_add(q, &sg, 1, 0, sg.len);
				if (r < 0)
					goto broken;
				if (!r)
					break;
				sent += sg.len;
				buffers++;
				added = 1;
			}
			if (added)
				vq_kick(q);
			while ((r = vq_get(q, &cookie, &len)) > 0) {
				done += cookie;
				progress = 1;
			}
			if (r < 0)
				goto broken;
			if (progress)
				since = rdtsc();
			else if (virtio_idle(d, &since, "sending"))
				goto broken;
		}
		got = done;
	} else {
		/*
		 * Buffers (pool slots of bufsz) are posted for at most the bytes
		 * still wanted, so the device is never handed room for more than
		 * n bytes: what it has beyond them stays with the host.
		 */
		static u32 rx_size[VQ_MAX];
		u16 free_slot[VQ_MAX];
		u64 posted = 0;
		u32 i, nfree = q->size;
		int announced = 0;

		for (i = 0; i < nfree; i++)
			free_slot[i] = (u16)i;
		virtio_fill(VIRTIO_BUF, n, 0);
		since = t0 = rdtsc();
		while (got < n) {
			int added = 0, progress = 0;

			while (got + posted < n && nfree) {
				struct vsg sg;

				i = free_slot[--nfree];
				sg.addr = pool + i * bufsz;
				sg.len = (u32)(n - got - posted < bufsz ? n - got - posted : bufsz);
				r = vq_add(q, &sg, 0, 1, i);
				if (r <= 0) {
					nfree++;
					if (r < 0)
						goto broken;
					break;
				}
				rx_size[i] = sg.len;
				posted += sg.len;
				added = 1;
			}
			if (added)
				vq_kick(q);
			if (!announced) {
				printf("virtio-console-test: rx ready for %lu bytes\n", n);
				announced = 1;
				since = t0 = rdtsc();
			}
			while ((r = vq_get(q, &cookie, &len)) > 0) {
				u64 k = len < n - got ? len : n - got;

				virtio_copy(VIRTIO_BUF + got, pool + cookie * bufsz, k);
				posted -= rx_size[cookie];
				got += k;
				extra += len - k;
				buffers++;
				free_slot[nfree++] = (u16)cookie;
				if (len)
					progress = 1;
			}
			if (r < 0)
				goto broken;
			if (progress)
				since = rdtsc();
			else if (virtio_idle(d, &since, "receiving"))
				goto broken;
		}
	}
	goto done;
broken:
	failed = 1;
done:
	t1 = rdtsc();
	memset(&c, 0, sizeof(c));
	c.buf = VIRTIO_BUF;
	c.n = n;
	c.seed = o.seed;
	virtio_check(&c);
	if (!tx && c.errors)
		printf("virtio-console-test: %lu of %lu bytes differ from the stream, the first at byte %lu\n",
		       c.errors, n, c.first_error);
	virtio_print_irqs(d, "virtio-console-test");
	printf("virtio-console-test: %s bytes=%lu %s=%lu buffers=%lu buf-bytes=%lu tsc=%lu irqs=%lu kicks=%lu "
	       "extra-bytes=%lu errors=%lu crc=0x%08x ", tx ? "tx" : "rx", n, tx ? "sent" : "received", got,
	       buffers, bufsz, t1 - t0, virtio_irqs(d), kicks(d), extra,
	       c.errors + (u64)failed + (got != n), c.crc);
	print_mode(d);
	printf(" result=%s\n", c.errors || failed || got != n ? "FAILED" : "ok");
	virtio_close(d);
	return c.errors || failed || got != n ? 1 : 0;
usage:
	printf("usage: virtio-console-test [tx|rx] <bytes> [buf=N] [seed=N] " COMMON_OPTS "\n");
	return 2;
}

/* ============================================================ virtio-rng */

#define RNG_MAX		(16UL << 20)

/* virtio-rng-test <bytes> [opts] */
int cmd_virtio_rng_test(int argc, char **argv)
{
	static struct vdev dev;
	struct vdev *d = &dev;
	struct vopts o;
	struct vcheck c;
	u64 n, got = 0, requests = 0, since, cookie;
	u32 len;
	int r, failed = 0, ok;

	if (virtio_parse_opts(argc, argv, &o) || o.word || o.nnum != 1)
		goto usage;
	n = o.num[0];
	if (!n || n > RNG_MAX)
		goto usage;
	if (!virtio_buffer_fits(VIRTIO_BUF, n)) {
		printf("virtio-rng-test: %lu bytes do not fit in RAM at 0x%lx\n", n, VIRTIO_BUF);
		return 2;
	}
	if (virtio_open(d, VIRTIO_ID_RNG, (int)o.dev, 0, &o) || virtio_setup_vq(d, 0) || virtio_driver_ok(d)) {
		virtio_close(d);
		return 1;
	}
	print_open(d, "virtio-rng-test");
	virtio_fill(VIRTIO_BUF, n, 0);
	since = rdtsc();
	/* one buffer at a time, so the bytes that arrive are contiguous */
	while (got < n) {
		struct vsg sg = { VIRTIO_BUF + got, (u32)(n - got < 4096 ? n - got : 4096) };

		if (vq_add(&d->vq[0], &sg, 0, 1, 0) <= 0)
			goto broken;
		requests++;
		vq_kick(&d->vq[0]);
		while ((r = vq_get(&d->vq[0], &cookie, &len)) == 0)
			if (virtio_idle(d, &since, "waiting for entropy"))
				goto broken;
		if (r < 0)
			goto broken;
		got += len;
		if (len)
			since = rdtsc();	/* zero-length answers are no progress */
		else if (virtio_idle(d, &since, "getting empty buffers back"))
			goto broken;
	}
	goto done;
broken:
	failed = 1;
done:
	memset(&c, 0, sizeof(c));
	c.buf = VIRTIO_BUF;
	c.n = got;
	c.seed = 0;
	virtio_check(&c);
	ok = !failed && got == n && c.nonzero > 0;
	virtio_print_irqs(d, "virtio-rng-test");
	printf("virtio-rng-test: bytes=%lu received=%lu requests=%lu irqs=%lu kicks=%lu zero-bytes=%lu "
	       "distinct=%lu errors=%lu crc=0x%08x ", n, got, requests, virtio_irqs(d), kicks(d),
	       got - c.nonzero, c.distinct, (u64)failed + (got != n) + (c.nonzero == 0), c.crc);
	print_mode(d);
	printf(" result=%s\n", ok ? "ok" : "FAILED");
	virtio_close(d);
	return ok ? 0 : 1;
usage:
	printf("usage: virtio-rng-test <bytes (max %lu)> " COMMON_OPTS "\n", RNG_MAX);
	return 2;
}
