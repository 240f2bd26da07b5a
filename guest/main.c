/*
 * kvmkit bundled guest: boot information, the script runner and the shell.
 */
#include "kernel.h"
#include "commands.h"

#define CMDLINE_MAX 4096

struct e820_entry e820[E820_MAX];
int e820_count;
char cmdline[CMDLINE_MAX];
const char *boot_path = "linux64";

/* Linux boot_params (zero page) offsets, Documentation/x86/zero-page.rst */
#define BP_E820_ENTRIES	0x1e8	/* u8 */
#define BP_CMD_LINE_PTR	0x228	/* u32 */
#define BP_E820_TABLE	0x2d0	/* 20-byte entries */

/* Xen PVH hvm_start_info */
#define PVH_MAGIC		0x336ec578
#define PVH_VERSION		4	/* u32 */
#define PVH_CMDLINE_PADDR	24	/* u64 */
#define PVH_MEMMAP_PADDR	40	/* u64, version >= 1 */
#define PVH_MEMMAP_ENTRIES	48	/* u32 */

static void copy_cmdline(u64 paddr)
{
	const char *s = (const char *)paddr;
	int i;

	if (!paddr || paddr >= (1UL << 32))
		return;
	for (i = 0; i < CMDLINE_MAX - 1 && s[i]; i++)
		cmdline[i] = s[i];
	cmdline[i] = 0;
}

static void read_boot_params(const u8 *bp)
{
	int i, n = bp[BP_E820_ENTRIES];

	if (n > E820_MAX)
		n = E820_MAX;
	for (i = 0; i < n; i++) {
		const u8 *e = bp + BP_E820_TABLE + 20 * i;
		memcpy(&e820[i].addr, e, 8);
		memcpy(&e820[i].size, e + 8, 8);
		memcpy(&e820[i].type, e + 16, 4);
	}
	e820_count = n;
	copy_cmdline(*(const u32 *)(bp + BP_CMD_LINE_PTR));
}

static void read_pvh_start_info(const u8 *si)
{
	u32 version;
	int i, n;

	boot_path = "pvh";
	if (*(const u32 *)si != PVH_MAGIC)
		return;
	version = *(const u32 *)(si + PVH_VERSION);
	copy_cmdline(*(const u64 *)(si + PVH_CMDLINE_PADDR));
	if (version < 1)
		return;
	n = *(const u32 *)(si + PVH_MEMMAP_ENTRIES);
	if (n > E820_MAX)
		n = E820_MAX;
	for (i = 0; i < n; i++) {
		const u8 *e = (const u8 *)*(const u64 *)(si + PVH_MEMMAP_PADDR) + 24 * i;
		memcpy(&e820[i].addr, e, 8);
		memcpy(&e820[i].size, e + 8, 8);
		memcpy(&e820[i].type, e + 16, 4);
	}
	e820_count = n;
}

u64 e820_ram_total(void)
{
	u64 total = 0;
	int i;

	for (i = 0; i < e820_count; i++)
		if (e820[i].type == 1)
			total += e820[i].size;
	return total;
}

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Split line in place into words; returns argc. */
static int split(char *line, char **argv, int max)
{
	int argc = 0;

	for (;;) {
		while (is_space(*line))
			*line++ = 0;
		if (!*line || argc == max)
			return argc;
		argv[argc++] = line;
		while (*line && !is_space(*line))
			line++;
	}
}

int run_line(char *line)
{
	char *argv[MAX_ARGS];
	int argc = split(line, argv, MAX_ARGS);
	const struct command *c;

	if (!argc)
		return 0;
	for (c = commands; c->name; c++)
		if (!strcmp(c->name, argv[0]))
			return c->fn(argc, argv);
	printf("unknown command '%s' (try 'help')\n", argv[0]);
	return 127;
}

/* Script: the part of the command line after a "--" word. */
static char *find_script(char *s)
{
	char *p = s;

	for (; *p; p++) {
		if (p[0] == '-' && p[1] == '-' && (p == s || is_space(p[-1])) &&
		    (!p[2] || is_space(p[2])))
			return p[2] ? p + 3 : p + 2;
	}
	return NULL;
}

/*
 * A "-" before a command (as in make) lets it fail: the script goes on.
 * Skips the "-" and the blanks after it; returns whether there was one.
 */
static int strip_ignore(char **cmd)
{
	char *p = *cmd;

	while (is_space(*p))
		p++;
	if (*p != '-')
		return 0;
	p++;
	while (is_space(*p))
		p++;
	*cmd = p;
	return 1;
}

/* A command's status as a VM exit status: 1-255 as they are, anything else 1. */
static int exit_status(int status)
{
	return status > 0 && status <= 255 ? status : 1;
}

/*
 * Run the ';'-separated script the way `sh -e` runs one: the first command
 * that fails ends the VM with its status, so `kvmkit run` exits with it and
 * nothing after a failed step runs on a broken state or hides the failure.
 * A command written "-cmd" may fail; its status is reported and the script
 * goes on. Returns 1 when the last command is "shell".
 */
static int run_script(char *script)
{
	static char buf[CMDLINE_MAX];
	char *cmd = script, *end;
	int last_is_shell = 0;

	while (cmd) {
		char *argv[1];
		int status, ignore;

		end = cmd;
		while (*end && *end != ';')
			end++;
		if (*end)
			*end++ = 0;
		else
			end = NULL;
		while (is_space(*cmd))
			cmd++;
		if (!*cmd) {
			cmd = end;
			continue;
		}
		printf("+ %s\n", cmd);
		ignore = strip_ignore(&cmd);
		memcpy(buf, cmd, strlen(cmd) + 1);
		if (split(buf, argv, 1) == 0) {		/* a lone "-" */
			cmd = end;
			continue;
		}
		last_is_shell = !strcmp(argv[0], "shell");
		status = run_line(cmd);
		if (status && ignore) {
			printf("'%s' failed with status %d (ignored: it has a '-')\n", argv[0], status);
		} else if (status) {
			status = exit_status(status);
			printf("'%s' failed with status %d, so the script stops "
			       "(write '-%s' to let it fail)\n", argv[0], status, argv[0]);
			poweroff(status);
		}
		cmd = end;
	}
	return last_is_shell;
}

static void read_line(char *buf, int size)
{
	int n = 0;
	static int last_cr;

	for (;;) {
		int c = serial_getc();

		if (c == '\n' && last_cr) {	/* CR LF: one end of line */
			last_cr = 0;
			continue;
		}
		last_cr = c == '\r';
		if (c == '\r' || c == '\n') {
			puts_raw("\n");
			buf[n] = 0;
			return;
		}
		if (c == 0x7f || c == 0x08) {	/* DEL / backspace */
			if (n) {
				n--;
				puts_raw("\b \b");
			}
		} else if (c == 0x03) {		/* Ctrl-C: drop the line */
			puts_raw("^C\n");
			n = 0;
			buf[0] = 0;
			return;
		} else if (c == 0x15) {		/* Ctrl-U: erase the line */
			for (; n; n--)
				puts_raw("\b \b");
		} else if (c >= 0x20 && c < 0x7f && n < size - 1) {
			char ch = (char)c;
			buf[n++] = ch;
			serial_write(&ch, 1);
		}
	}
}

static void shell(void)
{
	static char line[256];
	char *cmd;

	printf("type 'help' for commands\n");
	for (;;) {
		puts_raw("kvmkit> ");
		read_line(line, sizeof(line));
		cmd = line;
		strip_ignore(&cmd);	/* a script line pasted here: failures never end the shell */
		run_line(cmd);
	}
}

void kmain(u64 boot_params, u64 pvh_start_info)
{
	char *script;
	u64 ram;

	boot_tsc = rdtsc();
	serial_init();
	printf("kvmkit guest " GUEST_VERSION " (x86-64)\n");
	if (boot_params)
		read_boot_params((const u8 *)boot_params);
	else if (pvh_start_info)
		read_pvh_start_info((const u8 *)pvh_start_info);
	else
		boot_path = "none";
	cpu_init();
	irq_init();
	ram = e820_ram_total();
	printf("boot: %s, memory: %lu MiB RAM (%lu KiB) in %d e820 entries\n",
	       boot_path, ram >> 20, ram >> 10, e820_count);
	printf("command line: %s\n", cmdline);

	script = find_script(cmdline);
	if (script && *script) {
		if (!run_script(script))
			poweroff(0);
	}
	shell();
}
