"""The bundled guest under KVM: banner, scripts, console input, every way a VM ends."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from kvmkit import VirtualMachine

pytestmark = pytest.mark.kvm

KVMKIT = [sys.executable, "-m", "kvmkit"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def test_banner_and_script_status():
    with VirtualMachine(script="echo hello world; poweroff 7") as vm:
        vm.console.wait_for("kvmkit guest ")
        vm.console.wait_for("hello world")
        assert vm.wait(60) == 7
    assert "exit port" in vm.stop_message


def test_console_input_reaches_the_shell():
    with VirtualMachine() as vm:
        vm.console.wait_for("kvmkit> ", timeout=60)
        vm.console.send("echo typed-by-test\r")
        vm.console.wait_for("typed-by-test", timeout=30)
        vm.console.wait_for("kvmkit> ", timeout=30)
        vm.console.send("poweroff 5\r")
        assert vm.wait(30) == 5


def test_triple_fault_is_reported():
    with VirtualMachine(script="triple-fault") as vm:
        assert vm.wait(60) == 2
    assert "triple-faulted" in vm.stop_message and "KVM_EXIT_SHUTDOWN" in vm.stop_message


def test_instruction_kvm_cannot_emulate_reports_rip_and_bytes():
    with VirtualMachine(script="bad-insn") as vm:
        assert vm.wait(60) == 1
    msg = vm.stop_message
    assert "KVM_EXIT_INTERNAL_ERROR" in msg
    assert "rip=0x" in msg
    assert "instruction bytes: " in msg and "unavailable" not in msg


def test_reboot_through_i8042_stops_cleanly():
    with VirtualMachine(script="reboot") as vm:
        assert vm.wait(60) == 0
    assert vm.machine.reset_requested
    assert "i8042" in vm.stop_message


def test_two_vcpus_boot():
    with VirtualMachine(script="echo smp; poweroff 0", cpus=2) as vm:
        vm.console.wait_for("smp")
        assert vm.wait(60) == 0


def test_cli_runs_script_and_returns_guest_status():
    p = subprocess.run(KVMKIT + ["run", "--stats", "echo", "from-cli;", "poweroff", "4"], env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr
    assert "kvmkit guest " in p.stdout and "from-cli" in p.stdout
    assert "userspace exits" in p.stderr and "0x03f8 out" in p.stderr


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen; got {buf[-500:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_sigint_while_vcpu_halted_restores_terminal():
    """Ctrl-C (SIGINT) with the vCPU halted in the kernel: kvmkit exits 130 and the tty is as before."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen(KVMKIT + ["run", "halt"], env=ENV, stdin=slave, stdout=slave, stderr=slave)
    try:
        _read_until(master, b"+ halt", 60)
        time.sleep(0.5)
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 130
        assert termios.tcgetattr(slave) == before
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
        os.close(slave)


def test_ctrl_a_x_quits_from_the_terminal():
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen(KVMKIT + ["run"], env=ENV, stdin=slave, stdout=slave, stderr=slave)
    try:
        _read_until(master, b"kvmkit> ", 60)
        os.write(master, b"\x01x")
        assert p.wait(20) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
        os.close(slave)


def test_sigterm_stops_the_vm():
    p = subprocess.Popen(KVMKIT + ["run", "halt", "irq"], env=ENV, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 143
    finally:
        if p.poll() is None:
            p.kill()


def test_statistics_are_current_while_the_vm_runs():
    """Ctrl-A s reads the tallies of a running VM: a kick hands them over."""
    with VirtualMachine(script="pio-loop 500 0x80; shell") as vm:
        vm.console.wait_for("kvmkit> ", timeout=60)
        vm.machine.kick_all()
        deadline = time.monotonic() + 5
        while vm.machine.exit_stats()[0].pio[(0x80, "out")] < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        st = vm.machine.exit_stats()[0]
        assert st.pio[(0x80, "out")] == 500
        assert st.run_ns > 0 and st.exits[2] >= 500
        assert vm.status is None  # still running
        vm.console.send("poweroff 0\r")
        assert vm.wait(30) == 0
    assert vm.machine.exit_stats()[0].pio[(0x80, "out")] == 500
