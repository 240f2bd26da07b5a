/*
 * timer_check: POSIX timers and nanosleep as the guest's clock measures them.
 * Built on the host with `gcc -static -O2 timer_check.c -o timer_check`
 * (tests/linux/test_pvce_module.py) and run in the busybox initramfs.
 *
 *   timer_check [N] [PERIOD_MS]
 *
 * 1. N one-shot CLOCK_MONOTONIC timers of PERIOD_MS each (timer_create with
 *    SIGEV_SIGNAL + timer_settime, waited for with sigwaitinfo);
 * 2. one periodic timer with the same period, N expiries;
 * 3. N nanosleep() calls of PERIOD_MS.
 * Each interval is measured with clock_gettime(CLOCK_MONOTONIC) and printed
 * in microseconds, one line per kind: "oneshot_us: a b c ...", then
 * "done overruns=K". Exit status 0 unless a system call failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
	printf("timer_check: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 20;
	long period_ms = argc > 2 ? atol(argv[2]) : 50;
	long long period_ns = period_ms * 1000000LL;
	struct sigevent sev;
	struct itimerspec its;
	sigset_t set;
	timer_t tid;
	long long t0, t1;
	int i, overruns = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		die("sigprocmask");
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SIGRTMIN;
	if (timer_create(CLOCK_MONOTONIC, &sev, &tid))
		die("timer_create");

	/* one-shots */
	printf("oneshot_us:");
	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = period_ns / 1000000000LL;
	its.it_value.tv_nsec = period_ns % 1000000000LL;
	for (i = 0; i < n; i++) {
		t0 = now_ns();
		if (timer_settime(tid, 0, &its, NULL))
			die("timer_settime");
		if (sigwaitinfo(&set, NULL) < 0)
			die("sigwaitinfo");
		t1 = now_ns();
		printf(" %lld", (t1 - t0) / 1000);
	}
	printf("\n");

	/* periodic */
	printf("periodic_us:");
	its.it_interval = its.it_value;
	t0 = now_ns();
	if (timer_settime(tid, 0, &its, NULL))
		die("timer_settime periodic");
	for (i = 0; i < n; i++) {
		if (sigwaitinfo(&set, NULL) < 0)
			die("sigwaitinfo periodic");
		overruns += timer_getoverrun(tid);
		t1 = now_ns();
		printf(" %lld", (t1 - t0) / 1000);
		t0 = t1;
	}
	printf("\n");
	memset(&its, 0, sizeof(its));
	timer_settime(tid, 0, &its, NULL);

	/* nanosleep */
	printf("nanosleep_us:");
	for (i = 0; i < n; i++) {
		struct timespec req = { period_ns / 1000000000LL, period_ns % 1000000000LL };

		t0 = now_ns();
		while (nanosleep(&req, &req) && errno == EINTR)
			;
		t1 = now_ns();
		printf(" %lld", (t1 - t0) / 1000);
	}
	printf("\n");
	printf("done overruns=%d\n", overruns);
	return 0;
}
