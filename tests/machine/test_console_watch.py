"""The panic watch on the guest console, and how it turns a reset after a panic into a failure."""

from __future__ import annotations

import pytest

from kvmkit.machine.console_watch import MAX_LINE, ConsoleWatch
from kvmkit.machine.lifecycle import PANIC, PANIC_STATUS

LINE = b"Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"


@pytest.mark.parametrize("cut", [1, 7, 26, 27, 40, len(LINE)])
def test_the_panic_line_is_found_across_any_split(cut: int) -> None:
    w = ConsoleWatch()
    text = b"[    1.234] Freeing unused kernel memory\r\n[    1.300] " + LINE + b"\r\n[    1.301] CPU: 0 PID: 1\r\n"
    at = text.index(LINE) + cut
    for chunk in (text[:at], text[at:]):
        w.feed(chunk)
    assert w.panic_line == LINE.decode()


def test_no_panic_and_bounded_lines() -> None:
    w = ConsoleWatch()
    w.feed(b"Kernel panic - not syncing" [:-1] + b"\n" + b"x" * 100_000)
    assert w.panic_line is None and len(w._tail) < 64
    w.feed(b"Kernel panic - not syncing: " + b"y" * 10_000)  # a line that never ends is cut
    assert w.panic_line is not None and len(w.panic_line) == MAX_LINE
    w2 = ConsoleWatch()
    w2.feed(b"Kernel panic - not syncing: half a li")        # a VM that stops mid-line
    assert w2.panic_line == "Kernel panic - not syncing: half a li"


@pytest.mark.kvm
def test_a_reset_after_the_panic_line_is_a_panic_with_its_status() -> None:
    from kvmkit.api import VirtualMachine
    with VirtualMachine(script="echo Kernel panic - not syncing: kvmkit test; reboot") as vm:
        assert vm.wait(30) == PANIC_STATUS
        assert vm.machine.outcome is not None and vm.machine.outcome.kind == PANIC
        # (the bundled guest echoes its script line first, so the line seen may run on to "; reboot")
        assert vm.stop_message.startswith("guest kernel panicked: Kernel panic - not syncing: kvmkit test")
    with VirtualMachine(script="echo all is well; reboot") as vm:
        assert vm.wait(30) == 0 and vm.stop_message == "guest requested a reset (i8042)"
