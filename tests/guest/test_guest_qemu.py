"""Boot the bundled guest under QEMU TCG (its Xen PVH entry) and drive it.

QEMU's isa-debug-exit at 0x501 stands in for kvmkit's exit port: a guest
`outb v` makes QEMU exit with status (v << 1) | 1.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time

from _qemu import QEMU, QEMU_GUEST, qemu_status
from kvmkit.boot.bundled import bundled_guest

pytestmark = QEMU_GUEST

TIMEOUT = 60



def qemu_cmd(append: str) -> list[str]:
    return [
        QEMU, "-machine", "pc", "-accel", "tcg", "-m", "128",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0x501,iosize=1",
        "-kernel", str(bundled_guest()), "-append", append,
    ]


def boot(script: str) -> tuple[int, str]:
    proc = subprocess.run(qemu_cmd(f"console=ttyS0 -- {script}"), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout.decode(errors="replace").replace("\r\n", "\n")


class Console:
    """QEMU with the guest's COM1 on a pipe, for the interactive shell."""

    def __init__(self, append: str = "console=ttyS0"):
        self.proc = subprocess.Popen(qemu_cmd(append), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def expect(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self.sel.select(0):
                raise AssertionError(f"no {text!r} in guest output:\n{self.text}")
            if self.sel.select(min(left, 1.0)):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"QEMU exited; no {text!r} in:\n{self.text}")
                self.out += chunk
        return self.text

    def send(self, data: str) -> None:
        self.proc.stdin.write(data.encode())
        self.proc.stdin.flush()

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace").replace("\r\n", "\n")

    def wait(self) -> int:
        try:
            rest, _ = self.proc.communicate(timeout=TIMEOUT)
            self.out += rest
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def test_banner_echo_user_mode_pio_and_poweroff_status():
    rc, out = boot("echo hi there; user-test; pio-loop 1000 0x80; pio-read-loop 100 0x80; poweroff 7")
    lines = out.splitlines()
    assert lines[0].startswith("kvmkit guest "), out
    assert "memory: 127 MiB RAM" in out
    assert "command line: console=ttyS0 -- echo hi there;" in out
    assert "\nhi there\n" in out
    assert "hello from user mode\n" in out
    assert "user code ran at CPL 3" in out
    assert "user-test: ok" in out
    assert "pio-loop: 1000 x outb 0x80 at CPL3:" in out
    assert "pio-read-loop: 100 x inb 0x80 at CPL3:" in out
    assert rc == qemu_status(7), out


def test_script_without_poweroff_ends_with_status_0():
    rc, out = boot("echo done")
    assert "\ndone\n" in out
    assert rc == qemu_status(0), out


def test_mem_and_help():
    rc, out = boot("mem; help")
    assert "e820: [mem 0x0000000000100000-" in out and "usable" in out
    for name in ("help", "echo", "poweroff", "reboot", "mem", "ticks", "rdtsc", "triple-fault",
                 "bad-insn", "halt", "pio-loop", "pio-read-loop", "user-test"):
        assert f"\n  {name} " in out, name
    assert rc == qemu_status(0)


def test_expected_exception_is_caught():
    rc, out = boot("ud2; echo after")
    assert "ud2: caught #UD (vector 6), resumed" in out
    assert "\nafter\n" in out
    assert rc == qemu_status(0)


def test_unexpected_exception_reports_and_exits_3():
    rc, out = boot("gp-fault; echo not reached")
    assert "guest exception 13 at rip=" in out and " err=0" in out, out
    assert "\nnot reached\n" not in out
    assert rc == qemu_status(3)


def test_unknown_command_stops_the_script_with_status_127():
    rc, out = boot("echo first; frobnicate; echo next")
    assert "\nfirst\n" in out
    assert "unknown command 'frobnicate'" in out
    assert "'frobnicate' failed with status 127, so the script stops" in out
    assert "+ echo next" not in out and "\nnext\n" not in out
    assert rc == qemu_status(127), out


def test_a_failing_command_stops_the_script_with_its_status():
    rc, out = boot("poweroff 999; echo next")     # a usage error: status 2
    assert "usage: poweroff" in out
    assert "\nnext\n" not in out
    assert rc == qemu_status(2), out


def test_a_dash_lets_a_command_fail_and_the_script_goes_on():
    rc, out = boot("-frobnicate; - poweroff 999; echo next")
    assert "+ -frobnicate\n" in out and "unknown command 'frobnicate'" in out
    assert "'frobnicate' failed with status 127 (ignored" in out
    assert "'poweroff' failed with status 2 (ignored" in out
    assert "\nnext\n" in out
    assert rc == qemu_status(0), out


def test_triple_fault_resets_the_machine():
    # With -no-reboot QEMU exits 0 on the reset a triple fault causes.
    rc, out = boot("triple-fault; echo not reached")
    assert "triple-fault: zero-limit IDT" in out
    assert "still running" not in out and "\nnot reached\n" not in out
    assert rc == 0


def test_reboot_resets_the_machine():
    rc, out = boot("reboot; echo not reached")
    assert "\nnot reached\n" not in out
    assert rc == 0


def test_interactive_shell_reads_input_by_interrupt():
    con = Console()
    try:
        con.expect("kvmkit> ")
        con.send("echo typed here\r")
        con.expect("\ntyped here\n")
        con.expect("kvmkit> ")
        con.send("echp\x7fo fixed\r")          # backspace edits the line
        con.expect("\nfixed\n")
        con.send("ticks\r")
        text = con.expect("com1 rx bytes")
        assert "irq 4: " in text, text
        con.send("poweroff 9\r")
        assert con.wait() == qemu_status(9), con.text
    finally:
        con.close()


def test_script_ending_with_shell_stays_in_the_shell():
    con = Console("console=ttyS0 -- echo scripted; shell")
    try:
        con.expect("\nscripted\n")
        con.expect("kvmkit> ")
        con.send("poweroff 2\n")
        assert con.wait() == qemu_status(2), con.text
    finally:
        con.close()
