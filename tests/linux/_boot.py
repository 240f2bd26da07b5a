"""Shared by the stock-kernel boot tests: the command line, and a console reader on a pseudo terminal.

``Milestones`` timestamps the first match of each pattern on the console;
``start_kvmkit`` runs `kvmkit run --kernel ... --initrd ...` on a pty as a
user would (the nested-PVM quirks come from kvmkit's `auto` profile, as in
tests/linux/test_boot_stock.py); ``Milestones.run`` types one shell command
and returns its output.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

APPEND = "console=ttyS0 earlyprintk=serial,ttyS0,115200"
MEM = "128M"
REPO = Path(__file__).resolve().parents[2]
CURSOR_QUERY = b"\x1b[6n"  # busybox line editing asks where the cursor is after each prompt


class Milestones:
    """Collects everything read from the console and timestamps the first match of each pattern."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.t0 = time.monotonic()
        self.buf = bytearray()
        self.pos = 0
        self.times: dict[str, float] = {}
        self.cond = threading.Condition()
        self.eof = False
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()
        self._n = 0
        self._answered = 0  # where the last cursor query answered ends in buf

    def _reader(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()
                query = self.buf.find(CURSOR_QUERY, max(self._answered, len(self.buf) - len(data) - len(CURSOR_QUERY)))
                if query >= 0:
                    self._answered = query + len(CURSOR_QUERY)
                    self._answer_cursor_query(query)

    def _answer_cursor_query(self, end: int) -> None:
        """Answer busybox's "where is the cursor" (ESC [6n) as a terminal does: row 24, this line's column.

        Unanswered, busybox's line editor sleeps 20 ms of guest time after
        each Enter (its wait for a late answer), 200 ms of host time at the
        nested-PVM profile's slowed guest clock: a delay a user on a terminal
        never sees, and that timings of the console would otherwise include.
        """
        column = end - (self.buf.rfind(b"\n", 0, end) + 1) + 1
        try:
            os.write(self.fd, b"\x1b[24;%dR" % max(1, column))
        except OSError:
            pass

    def wait(self, name: str, pattern: str | bytes | re.Pattern[bytes], timeout: float) -> float:
        """Wait for ``pattern`` after the previous match; record and return the host time."""
        if isinstance(pattern, (str, bytes)):
            rx = re.compile(re.escape(pattern.encode() if isinstance(pattern, str) else pattern))
        else:
            rx = pattern
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    t = time.monotonic() - self.t0
                    self.times[name] = t
                    print(f"milestone {t:7.1f} s  {name}", file=sys.stderr, flush=True)
                    return t
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    tail = self.buf[-3000:].decode("utf-8", "replace")
                    raise AssertionError(f"{name}: {pattern!r} not seen within {timeout} s "
                                         f"(at {time.monotonic() - self.t0:.0f} s); console tail:\n{tail}")
                self.cond.wait(min(left, 1.0))

    def run(self, command: str, timeout: float = 60, name: str | None = None) -> str:
        """Type ``command`` into the shell; return what it printed (up to an end marker it echoes).

        A guest process that dies of a signal fails the test at once, with its
        output: there is no retry (docs/quirks.md, "The TLS crash").
        """
        self._n += 1
        with self.cond:
            start = self.pos
        n = self._n
        os.write(self.fd, f"echo @@beg-$(({n} + 0))@@; {command}; echo @@end-$(({n} + 0))@@\r".encode())
        self.wait(name or command, f"@@end-{n}@@", timeout)
        with self.cond:
            out = self.buf[start:self.pos].decode("utf-8", "replace")
        # Only the shell's output has the markers expanded; the echoed command line has "$((n + 0))".
        out = out.split(f"@@beg-{n}@@", 1)[-1]
        out = out.rsplit(f"@@end-{n}@@", 1)[0].replace("\r", "").strip("\n")
        assert "Segmentation fault" not in out, f"a guest process crashed running {command!r}:\n{out}"
        return out

    @property
    def text(self) -> str:
        with self.cond:
            return self.buf.decode("utf-8", "replace")


def start_kvmkit(kernel: Path, initrd: Path, *extra: str, append: str = APPEND,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int, Milestones]:
    """`kvmkit run` with the stock command line on a new pty: (process, pty master fd, console reader)."""
    return start_kvmkit_argv(["--kernel", str(kernel), "--initrd", str(initrd), "--append", append, "--mem", MEM,
                              "--stats", *extra], env)


def start_kvmkit_argv(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int, Milestones]:
    """`kvmkit run ARGS` on a new pty (e.g. ``--restore DIR``): (process, pty master fd, console reader)."""
    master, slave = pty.openpty()
    full_env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO / "src"))
    argv = [sys.executable, "-m", "kvmkit", "run", *args]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=full_env, start_new_session=True)
    os.close(slave)
    return proc, master, Milestones(master)


def finish_kvmkit(proc: subprocess.Popen[bytes], master: int, ms: Milestones,
                  record_property: Callable[[str, object], None]) -> str:
    """Tear down a boot from start_kvmkit on every path: kill a survivor, close the pty,
    record the milestones; returns kvmkit's stderr."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    os.close(master)
    for name, t in ms.times.items():
        record_property(f"milestone {name}", f"{t:.1f}")
    return stderr


@dataclass(frozen=True)
class LinuxSnapshot:
    """The stock kernel saved at its shell by `kvmkit snapshot`, and what the boot before it measured."""

    path: Path
    env: dict[str, str]        # XDG_RUNTIME_DIR of the run that made it
    boot_to_prompt_s: float    # cold boot, first KVM_RUN to the shell prompt (host seconds)
    snapshot_s: float          # `kvmkit snapshot NAME -o DIR`, as the CLI took it
    count: int                 # the guest's background counter (/tmp/count) just before the snapshot
    cpus: int                  # vCPUs, all online (`nproc` before the snapshot)
