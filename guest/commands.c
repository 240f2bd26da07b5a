/*
 * Shell commands. To add one: write `static int cmd_x(int argc, char **argv)`
 * (argv[0] is the command name, return 0 on success) and add a line to
 * commands[] below. Larger groups can live in their own file with a
 * non-static function declared here.
 */
#include "kernel.h"
#include "commands.h"
int cmd_serial_selftest(int argc, char **argv);	/* serial8250.c */

static int usage(char **argv)
{
	const struct command *c;

	for (c = commands; c->name; c++)
		if (!strcmp(c->name, argv[0]))
			printf("usage: %s %s\n", c->name, c->help);
	return 2;
}

static int arg_u64(int argc, char **argv, int i, u64 dflt, u64 *out)
{
	if (i >= argc) {
		*out = dflt;
		return 0;
	}
	if (parse_u64(argv[i], out)) {
		printf("%s: bad number '%s'\n", argv[0], argv[i]);
		return -1;
	}
	return 0;
}

static int cmd_help(int argc, char **argv)
{
	const struct command *c;

	(void)argc, (void)argv;
	for (c = commands; c->name; c++)
		printf("  %-14s %s\n", c->name, c->help);
	printf("A script (kvmkit run cmd1 args; cmd2 ...) stops at the first command that fails\n"
	       "and ends the VM with its status; '-cmd' lets cmd fail and goes on.\n");
	return 0;
}

static int cmd_echo(int argc, char **argv)
{
	int i;

	for (i = 1; i < argc; i++)
		printf(i + 1 < argc ? "%s " : "%s", argv[i]);
	printf("\n");
	return 0;
}

static int cmd_poweroff(int argc, char **argv)
{
	u64 status;

	if (arg_u64(argc, argv, 1, 0, &status) || status > 255)
		return usage(argv);
	poweroff((int)status);
}

static int cmd_reboot(int argc, char **argv)
{
	(void)argc, (void)argv;
	reboot();
}

static const char *e820_type(u32 t)
{
	switch (t) {
	case 1: return "usable";
	case 2: return "reserved";
	case 3: return "ACPI data";
	case 4: return "ACPI NVS";
	case 5: return "unusable";
	default: return "other";
	}
}

static int cmd_mem(int argc, char **argv)
{
	int i;

	(void)argc, (void)argv;
	for (i = 0; i < e820_count; i++)
		printf("e820: [mem 0x%016lx-0x%016lx] %s\n", e820[i].addr,
		       e820[i].addr + e820[i].size - 1, e820_type(e820[i].type));
	printf("RAM total: %lu KiB (%lu MiB)\n", e820_ram_total() >> 10, e820_ram_total() >> 20);
	return 0;
}

static int cmd_rdtsc(int argc, char **argv)
{
	(void)argc, (void)argv;
	printf("tsc: %lu\n", rdtsc());
	return 0;
}

static int cmd_ticks(int argc, char **argv)
{
	int i;

	(void)argc, (void)argv;
	printf("tsc since boot: %lu cycles\n", rdtsc() - boot_tsc);
	for (i = 0; i < 16; i++)
		if (irq_counts[i])
			printf("irq %d: %lu\n", i, irq_counts[i]);
	for (i = IRQ_BASE + 16; i < SPURIOUS_VECTOR; i++)
		if (vector_counts[i] && i != SYSCALL_VECTOR)
			printf("vector 0x%x: %lu\n", i, vector_counts[i]);
	printf("spurious: %lu, com1 rx bytes: %lu (dropped %lu)\n", spurious_count,
	       serial_rx_bytes, serial_rx_dropped);
	return 0;
}

static int cmd_triple_fault(int argc, char **argv)
{
	(void)argc, (void)argv;
	printf("triple-fault: zero-limit IDT, then ud2\n");
	do_triple_fault();
	printf("triple-fault: still running?!\n");
	return 1;
}

/*
 * bad-insn [sse [addr] | cmpxchg16b]
 *   sse (default): pxor from an address nobody claims (0xd0000000). Not RAM,
 *     so KVM must emulate the access as MMIO, and KVM's instruction emulator
 *     has no pxor: KVM_RUN returns KVM_EXIT_INTERNAL_ERROR (emulation) on a
 *     hardware-virtualization host and on a PVM host alike.
 *   cmpxchg16b: lock cmpxchg16b on RAM. Fails emulation only where CPL0 code
 *     is emulated (PVM); with VMX/SVM it runs natively and the guest goes on
 *     ("completed" is printed and the command returns 1).
 */
static int cmd_bad_insn(int argc, char **argv)
{
	static u64 slot[2] __attribute__((aligned(16)));
	u64 addr = 0xd0000000UL;

	if (argc > 1 && !strcmp(argv[1], "cmpxchg16b")) {
		printf("bad-insn: lock cmpxchg16b at %p\n", (void *)slot);
		do_cmpxchg16b(slot);
	} else {
		if (argc > 1 && strcmp(argv[1], "sse"))
			return usage(argv);
		if (arg_u64(argc, argv, 2, addr, &addr) || addr >= (1UL << 32))
			return usage(argv);
		printf("bad-insn: pxor from mmio 0x%lx\n", addr);
		do_sse_mmio(addr);
	}
	printf("bad-insn: instruction completed (no emulation failure on this host)\n");
	return 1;
}

static int cmd_halt(int argc, char **argv)
{
	int irqs = argc > 1 && !strcmp(argv[1], "irq");

	printf("halt: %s\n", irqs ? "sti;hlt forever (interrupts still served)" : "cli;hlt forever");
	for (;;) {
		if (irqs)
			sti_hlt();
		else
			__asm__ volatile("cli; hlt");
	}
	return 0;
}

static int pio_loop(int argc, char **argv, int in)
{
	u64 count, port;
	long cycles;

	if (argc < 2 || arg_u64(argc, argv, 1, 0, &count) ||
	    arg_u64(argc, argv, 2, 0x80, &port) || port > 0xffff)
		return usage(argv);
	cycles = run_user(in ? user_pio_in_loop : user_pio_out_loop, (long)count, (long)port, 0);
	printf("%s: %lu x %s 0x%lx at CPL3: %lu tsc cycles", argv[0], count,
	       in ? "inb" : "outb", port, (u64)cycles);
	if (count)
		printf(", %lu per access", (u64)cycles / count);
	printf("\n");
	return 0;
}

static int cmd_pio_loop(int argc, char **argv)
{
	return pio_loop(argc, argv, 0);
}

static int cmd_pio_read_loop(int argc, char **argv)
{
	return pio_loop(argc, argv, 1);
}

/* Runs at CPL3: may only use its stack, its arguments and int $0x80. */
static long user_hello(long a0, long a1, long a2)
{
	static const char msg[] = "hello from user mode\n";
	long n;

	(void)a0, (void)a1, (void)a2;
	n = user_syscall(SYS_WRITE, (long)msg, sizeof(msg) - 1);
	if (n != sizeof(msg) - 1)
		return -1;
	return (long)(read_cs() & 3) | (long)(read_rflags() & 0x3000);	/* CPL, IOPL */
}

static int cmd_user_test(int argc, char **argv)
{
	u64 gate = syscalls_by_gate, ud = syscalls_by_ud;
	long cpl;

	(void)argc, (void)argv;
	cpl = run_user(user_hello, 0, 0, 0);
	printf("user-test: back in the kernel, user code ran at CPL %ld with IOPL %ld\n",
	       cpl & 3, (cpl >> 12) & 3);
	cpl &= 3;
	printf("user-test: int $0x80 arrived %lu times through the gate, %lu times as #UD\n",
	       syscalls_by_gate - gate, syscalls_by_ud - ud);
	if (cpl != 3) {
		printf("user-test: FAILED\n");
		return 1;
	}
	printf("user-test: ok\n");
	return 0;
}

static int cmd_ud2(int argc, char **argv)
{
	(void)argc, (void)argv;
	expect_exception(6, do_ud2_resume);
	do_ud2();
	if (!exception_caught()) {
		printf("ud2: no #UD?!\n");
		return 1;
	}
	printf("ud2: caught #UD (vector 6), resumed\n");
	return 0;
}

static int cmd_gp_fault(int argc, char **argv)
{
	(void)argc, (void)argv;
	printf("gp-fault: reading non-canonical address 0x8000000000000000\n");
	(void)*(volatile u64 *)0x8000000000000000UL;
	return 1;
}

static int cmd_info(int argc, char **argv)
{
	(void)argc, (void)argv;
	printf("kvmkit guest " GUEST_VERSION ", boot path %s, lapic id %u, com1 fifo %d bytes\n",
	       boot_path, lapic_id(), serial_fifo_size);
	return 0;
}

static int cmd_shell(int argc, char **argv)
{
	(void)argc, (void)argv;
	return 0;	/* handled by the script runner */
}

int cmd_timer_bench(int argc, char **argv);	/* timer.c */
int cmd_lspci(int argc, char **argv);		/* pci.c */
int cmd_virtio_blk_test(int argc, char **argv);	/* virtio_cmds.c */
int cmd_virtio_blk_bench(int argc, char **argv);
int cmd_virtio_console_test(int argc, char **argv);
int cmd_virtio_rng_test(int argc, char **argv);

const struct command commands[] = {
	{ "help", "list commands and how scripts run", cmd_help },
	{ "echo", "<words>: print the words", cmd_echo },
	{ "poweroff", "[status]: end the VM with status (port 0x501)", cmd_poweroff },
	{ "reboot", "reset through the i8042, else triple fault", cmd_reboot },
	{ "mem", "print the e820 memory map", cmd_mem },
	{ "rdtsc", "print the time-stamp counter", cmd_rdtsc },
	{ "ticks", "TSC cycles since boot and interrupt counts", cmd_ticks },
	{ "gp-fault", "unexpected #GP: exception report, status 3", cmd_gp_fault },
	{ "info", "boot path, LAPIC id, serial FIFO", cmd_info },
	{ "triple-fault", "zero-limit IDT + ud2: KVM_EXIT_SHUTDOWN", cmd_triple_fault },
	{ "bad-insn", "[sse [addr]|cmpxchg16b]: KVM_EXIT_INTERNAL_ERROR", cmd_bad_insn },
	{ "halt", "[irq]: cli;hlt forever (irq: sti;hlt forever)", cmd_halt },
	{ "pio-loop", "<count> [port]: outb loop at CPL3, TSC cycles", cmd_pio_loop },
	{ "pio-read-loop", "<count> [port]: inb loop at CPL3, TSC cycles", cmd_pio_read_loop },
	{ "user-test", "write from CPL3 through int $0x80", cmd_user_test },
	{ "ud2", "raise #UD and catch it (IDT test)", cmd_ud2 },
	{ "serial-selftest", "<port 2-4> tx|rx <bytes>: 8250 driver xorshift32 stream test", cmd_serial_selftest },
	{ "timer-bench", "[all|tmict|tsc-deadline|pv|pv-reg|pv-later] [n] [delta_us]: timer cycles", cmd_timer_bench },
	{ "lspci", "[clear-virtio-bars]: PCI bus 0: ids, class, BARs (0 ones get assigned), capabilities", cmd_lspci },
	{ "virtio-blk-test", "[irq|poll] [no-event-idx] [no-indirect] [dev=N] [seed=N] [sectors [start]]: write, flush, read back, verify", cmd_virtio_blk_test },
	{ "virtio-blk-bench", "read|write <MiB> [req_KiB [depth]] [irq|poll] [...]: sequential I/O, TSC cycles", cmd_virtio_blk_bench },
	{ "virtio-console-test", "[tx|rx] <bytes> [buf=N] [seed=N] [irq|poll] [...]: xorshift32 stream over port 0", cmd_virtio_console_test },
	{ "virtio-rng-test", "<bytes> [irq|poll] [...]: read entropy, crude check", cmd_virtio_rng_test },
	{ "shell", "(last in a script) stay in the shell", cmd_shell },
	{ NULL, NULL, NULL },
};
