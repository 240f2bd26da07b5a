/* The shell's command table; see commands.c and README.md. */
#ifndef KVMKIT_GUEST_COMMANDS_H
#define KVMKIT_GUEST_COMMANDS_H

#define MAX_ARGS 16

struct command {
	const char *name;
	const char *help;	/* "<args>: what it does" */
	int (*fn)(int argc, char **argv);	/* returns 0 on success */
};

/* Terminated by an entry with name == NULL. */
extern const struct command commands[];

#endif
