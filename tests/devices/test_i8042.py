"""The 8042 controller and AT keyboard: Linux's probe sequence, the one-byte output buffer, IRQ 1, Ctrl-Alt-Del.

The sequences below are what Linux 6.1's i8042 and atkbd drivers send
(drivers/input/serio/i8042.c, drivers/input/keyboard/atkbd.c), in order.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.devices.i8042 import (CTR_KBDDIS, CTR_KBDINT, CTR_XLATE, CTRL_ALT_DEL, I8042, KBD_BUFFER, STR_A2,
                                  STR_AUXDATA, STR_OBF)

DATA, CMD = 0, 4


class Rig:
    def __init__(self) -> None:
        self.resets = 0
        self.irq1: list[bool] = []
        self.irq12: list[bool] = []
        self.k = I8042(self.reset, irq_kbd=self.irq1.append, irq_aux=self.irq12.append)

    def reset(self) -> None:
        self.resets += 1

    def command(self, cmd: int, data: int | None = None) -> None:
        self.k.io_write(CMD, 1, cmd)
        if data is not None:
            self.k.io_write(DATA, 1, data)

    def read_all(self) -> list[int]:
        out = []
        for _ in range(64):
            if not self.k.io_read(CMD, 1) & STR_OBF:
                break
            out.append(self.k.io_read(DATA, 1))
        return out

    def kbd(self, *data: int) -> list[int]:
        for d in data:
            self.k.io_write(DATA, 1, d)
        return self.read_all()

    def linux_probe(self) -> None:
        """i8042_controller_check/selftest/init, then the keyboard port enabled, then atkbd's probe and setup."""
        assert self.read_all() == []                     # i8042_flush: nothing waits
        self.command(0xAA)
        assert self.read_all() == [0x55]                 # self test passed
        self.command(0x20)
        ctr = self.read_all()[0]
        assert ctr & CTR_XLATE and ctr & CTR_KBDINT      # as firmware left it: translated, interrupt on
        self.command(0x60, (ctr | CTR_KBDDIS) & ~CTR_KBDINT)  # disabled while the driver sets up
        self.command(0x20)
        assert self.read_all() == [(ctr | CTR_KBDDIS) & ~CTR_KBDINT]
        self.command(0x60, (ctr & ~CTR_KBDDIS) | CTR_KBDINT)  # i8042_enable_kbd_port
        assert self.kbd(0xF2) == [0xFA, 0xAB, 0x41]      # GETID, translated: 0x83 -> 0x41
        assert self.kbd(0xF5) == [0xFA]                  # atkbd_deactivate
        assert self.kbd(0xED) == [0xFA] and self.kbd(0x00) == [0xFA]   # LEDs off
        assert self.kbd(0xF3) == [0xFA] and self.kbd(0x00) == [0xFA]   # fastest typematic rate
        assert self.kbd(0xF4) == [0xFA]                  # atkbd_activate


def test_linux_probe_then_ctrl_alt_del_in_set_1() -> None:
    r = Rig()
    assert not r.k.keyboard_listening                    # power-on: no driver yet
    assert not r.k.send_ctrl_alt_del()
    r.linux_probe()
    assert r.k.keyboard_listening and r.k.typematic == 0 and r.k.leds == 0
    r.irq1.clear()
    assert r.k.send_ctrl_alt_del()
    got = r.read_all()
    assert got == list(CTRL_ALT_DEL[1]) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    # one rising edge per byte: high while a byte waits, low once it is read
    assert r.irq1 == [True, False] * len(got)
    assert r.irq12 == [] and r.resets == 0


def test_untranslated_set_2_and_the_set_command() -> None:
    r = Rig()
    r.linux_probe()
    r.command(0x20)
    ctr = r.read_all()[0]
    r.command(0x60, ctr & ~CTR_XLATE)
    assert r.kbd(0xF2) == [0xFA, 0xAB, 0x83]
    assert r.kbd(0xF0) == [0xFA] and r.kbd(0x00) == [0xFA, 2]        # which set: 2
    assert r.k.send_ctrl_alt_del()
    assert r.read_all() == [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
    assert r.kbd(0xF0) == [0xFA] and r.kbd(0x03) == [0xFA] and r.k.scancode_set == 3
    assert r.kbd(0xF0) == [0xFA] and r.kbd(0x07) == [0xFE]           # no set 7: RESEND
    assert r.kbd(0xEE) == [0xEE] and r.kbd(0x42) == [0xFE]           # echo; an unknown command
    assert r.kbd(0xFE) == [0xFE]                                     # resend: the last byte again
    assert r.kbd(0xFF) == [0xFA, 0xAA] and r.k.scancode_set == 2     # reset: BAT passed, defaults


def test_a_disabled_keyboard_interface_holds_its_bytes() -> None:
    r = Rig()
    r.linux_probe()
    r.command(0xAD)                                      # keyboard interface off
    assert r.k.send_ctrl_alt_del() is False              # nobody would read it now
    r.command(0xAE)
    assert r.k.send_ctrl_alt_del()
    r.command(0xAD)
    first = r.read_all()                                 # the byte already in the buffer only
    assert first == [0x1D]
    r.command(0xAE)
    assert r.read_all() == list(CTRL_ALT_DEL[1][1:])


def test_controller_commands_and_the_reset_line() -> None:
    r = Rig()
    r.command(0xAB)
    assert r.read_all() == [0x00]                        # keyboard interface test
    r.command(0xA9)
    assert r.read_all() == [0x00]
    r.command(0xD0)
    assert r.read_all() == [0x03]                        # output port: A20 on, reset high
    r.command(0xD3, 0x5A)                                # AUX loopback: comes back as AUX data
    assert r.k.io_read(CMD, 1) & (STR_OBF | STR_AUXDATA | STR_A2) == STR_OBF | STR_AUXDATA
    assert r.k.io_read(DATA, 1) == 0x5A
    r.command(0xD2, 0x99)
    assert r.read_all() == [0x99]
    r.command(0xD4, 0xF2)                                # to the AUX device: there is none
    assert r.read_all() == []
    assert r.resets == 0
    r.command(0xFE)
    assert r.resets == 1
    r.command(0xD1, 0x02)                                # write output port, reset line low
    assert r.resets == 2 and r.k.output_port == 0x02


def test_a_flood_of_keyboard_commands_stays_bounded() -> None:
    r = Rig()
    r.linux_probe()
    for _ in range(1000):
        r.k.io_write(DATA, 1, 0xF2)                      # three bytes each, never read
    assert len(r.k._kbd) <= KBD_BUFFER and r.k.dropped > 0
    assert len(r.read_all()) <= KBD_BUFFER + 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r0", "r4", "w0", "w4", "cad"]), st.integers(0, 0xFF)), max_size=80))
def test_random_sequences_never_raise_and_stay_bounded(ops: list[tuple[str, int]]) -> None:
    r = Rig()
    for op, value in ops:
        if op == "r0":
            r.k.io_read(DATA, 1)
        elif op == "r4":
            r.k.io_read(CMD, 1)
        elif op == "w0":
            r.k.io_write(DATA, 1, value)
        elif op == "w4":
            r.k.io_write(CMD, 1, value)
        else:
            r.k.send_ctrl_alt_del()
        assert len(r.k._kbd) <= KBD_BUFFER and len(r.k._ctl) <= 1
        # the line is high exactly while a byte for the keyboard waits and its interrupt is on
        st_ = r.k.io_read(CMD, 1)
        want = bool(st_ & STR_OBF and not st_ & STR_AUXDATA and r.k.ctr & CTR_KBDINT)
        assert (r.irq1[-1] if r.irq1 else False) == want
    restored = I8042(lambda: None)
    restored.load_state(r.k.save_state())
    assert restored.save_state() == r.k.save_state()
