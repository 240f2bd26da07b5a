/*
 * Baseline for benchmarks/exit_cost.py: the smallest C VMM loop that runs
 * the same real-mode guest as kvmkit does (N x "out dx, al" to port 0x80,
 * then a byte to the exit port 0x501) and handles each PIO exit by storing
 * the value, as kvmkit's POST-code sink does. It prints one JSON line.
 *
 * usage: exit_cost GUEST.bin LOAD_ADDR
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (2u << 20)

static void die(const char *what) { perror(what); exit(1); }

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int main(int argc, char **argv) {
	if (argc != 3) { fprintf(stderr, "usage: %s GUEST.bin LOAD_ADDR\n", argv[0]); return 2; }
	unsigned long load = strtoul(argv[2], NULL, 0);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	FILE *f = fopen(argv[1], "rb");
	if (!f) die(argv[1]);
	size_t n = fread(mem + load, 1, MEM_SIZE - load, f);
	fclose(f);
	if (n == 0) die("empty guest");
	struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	sregs.cs.selector = 0; sregs.cs.base = 0;
	sregs.ds.selector = 0; sregs.ds.base = 0; sregs.es = sregs.ds; sregs.ss = sregs.ds;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = load, .rsp = 0x8000, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	uint64_t exits = 0, post = 0;
	int status = -1;
	uint64_t t0 = now_ns();
	while (status < 0) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		exits++;
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
			return 1;
		}
		uint8_t *data = (uint8_t *)run + run->io.data_offset;
		if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x80)
			post = data[0];
		else if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x501)
			status = data[0];
	}
	uint64_t t1 = now_ns();
	printf("{\"exits\": %llu, \"ns\": %llu, \"status\": %d, \"last_post\": %llu}\n",
	       (unsigned long long)exits, (unsigned long long)(t1 - t0), status, (unsigned long long)post);
	return 0;
}
