"""The 8042 keyboard controller and an AT keyboard behind it (ports 0x60 and 0x64).

Why a keyboard on a VM with no screen: it is how a PC without ACPI is asked
to shut down. Ctrl-Alt-Del reaches Linux's keyboard handler, which reboots
(or, where init has taken the key over, tells init), and kvmkit ends the VM
on the reset that follows; Firecracker's "SendCtrlAltDel" works the same
way. The same controller carries the CPU reset line Linux's ``reboot=k``
pulses.

What is modelled, after the 8042 datasheet and the IBM PS/2 keyboard
reference:

* **The controller.** Status (OBF, SYS, A2, keylock off, AUX data),
  the Controller Command Byte (keyboard/aux interrupt enables, SYS, port
  disables, translation), self test (0x55), interface tests (0x00), the
  output port with the reset line (bit 0) and A20, the "write output
  buffer" commands, and the pulse commands 0xF0-0xFF. There is no AUX
  device: commands addressed to one get no answer, and kvmkit tells Linux
  so with ``i8042.noaux`` rather than have it wait for a mouse.
* **The output buffer is one byte**, as on the part: the keyboard's bytes
  wait in the keyboard (16 at most, the buffer size of the part) until the
  guest has read the byte before, and while the keyboard interface is
  disabled. IRQ 1 (or 12 for AUX data) is high while a byte waits and the
  Command Byte enables it, so each byte is one rising edge.
* **The keyboard** answers the commands Linux's atkbd sends (reset, get
  ID, LEDs, typematic rate, scan code set, enable, disable, defaults,
  echo, resend) and sends keys in the scan code set in use, translated to
  set 1 when the Command Byte says so.

The guest controls every byte here; every queue is bounded and an unknown
command gets the part's answer (RESEND for the keyboard, nothing for the
controller), never an error.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from typing import Callable

from kvmkit.devices.state import StateReader

I8042_DATA = 0x60
I8042_COMMAND = 0x64

# Status register (read at 0x64)
STR_OBF = 0x01       # output buffer full: a byte waits at 0x60
STR_SYS = 0x04       # system flag (POST passed): follows the Command Byte
STR_A2 = 0x08        # the last write was to the command port
STR_UNLOCKED = 0x10  # keylock switch off
STR_AUXDATA = 0x20   # the waiting byte is from the AUX port

# Controller Command Byte
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_RESET = CTR_XLATE | CTR_AUXDIS | CTR_SYS | CTR_KBDINT  # as firmware leaves it

# Controller commands (written at 0x64)
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT = 0xC0
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_READ_TEST = 0xE0
CMD_PULSE_RESET = 0xFE   # pulse output port bit 0: the CPU reset line
SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
INPUT_PORT = 0x80        # keyboard not inhibited
OUTPUT_PORT_RESET = 0x03  # A20 on, reset line high (not asserted)
_WITH_DATA = {CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX} | set(range(0x60, 0x80))

# Keyboard commands and answers
KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0
KBD_GET_ID = 0xF2
KBD_SET_TYPEMATIC = 0xF3
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5   # and restore defaults
KBD_DEFAULTS = 0xF6
KBD_RESEND = 0xFE
KBD_RESET = 0xFF
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)
KBD_ID_TRANSLATED = (0xAB, 0x41)  # 0x83 through the set 2 -> set 1 translation
KBD_BUFFER = 16
TYPEMATIC_DEFAULT = 0x2B  # 10.9 characters/s after 500 ms
_WITH_PARAM = {KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_TYPEMATIC}

# Ctrl down, Alt down, Delete down, Delete up, Alt up, Ctrl up, per scan code set.
CTRL_ALT_DEL = {
    1: (0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D),
    2: (0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14),
    3: (0x11, 0x19, 0x64, 0xF0, 0x64, 0xF0, 0x19, 0xF0, 0x11),
}


class I8042:
    """The controller and its keyboard; ``on_reset`` is the CPU reset line, ``irq_kbd``/``irq_aux`` IRQ 1/12."""

    def __init__(self, on_reset: Callable[[], None], irq_kbd: Callable[[bool], None] | None = None,
                 irq_aux: Callable[[bool], None] | None = None) -> None:
        self.on_reset = on_reset
        self.irq_kbd = irq_kbd
        self.irq_aux = irq_aux
        self.output_port = OUTPUT_PORT_RESET
        self.ctr = CTR_RESET
        self._pending_cmd: int | None = None   # a controller command waiting for its data byte
        self._a2 = False
        self._obuf: int | None = None          # the one-byte output buffer
        self._obuf_aux = False
        self._ctl: collections.deque[int] = collections.deque()  # controller answers (one at a time)
        self._kbd: collections.deque[int] = collections.deque()  # bytes waiting in the keyboard
        self._kbd_pending: int | None = None   # a keyboard command waiting for its parameter
        self.scanning = True                   # keyboard enabled (F4) / disabled (F5)
        self.scancode_set = 2
        self.leds = 0
        self.typematic = TYPEMATIC_DEFAULT
        self._last_sent = KBD_ACK
        self._irq = (False, False)
        self.configured = False                # a driver wrote the Command Byte since power-on
        self.dropped = 0                       # keyboard bytes lost to a full buffer
        # Port accesses come from a vCPU thread, a key press from the control socket's.
        self.lock = threading.Lock()

    # --- BusDevice -----------------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        with self.lock:
            return self._read(offset)

    def _read(self, offset: int) -> int:
        if offset == 0:  # 0x60
            value = self._obuf if self._obuf is not None else 0x00
            self._obuf = None
            self._obuf_aux = False
            # The line drops before the next byte comes up: one edge per byte,
            # which an edge-triggered IRQ 1 (and Linux's one-byte handler) needs.
            self._update_irq()
            self._refill()
            return value
        if offset == 4:  # 0x64
            status = STR_UNLOCKED | (self.ctr & CTR_SYS)
            if self._obuf is not None:
                status |= STR_OBF | (STR_AUXDATA if self._obuf_aux else 0)
            if self._a2:
                status |= STR_A2
            return status
        return 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self._write(offset, value & 0xFF)

    def _write(self, offset: int, value: int) -> None:
        if offset == 4:
            self._a2 = True
            self._command(value)
        elif offset == 0:
            self._a2 = False
            cmd, self._pending_cmd = self._pending_cmd, None
            if cmd is None:
                self._keyboard_write(value)
            else:
                self._command_data(cmd, value)
        self._refill()

    # --- host side -------------------------------------------------------------------
    @property
    def keyboard_listening(self) -> bool:
        """A driver set the controller up, and has the keyboard scanning and its interrupt on.

        Power-on state alone does not count: a guest with no keyboard driver
        (kvmkit's bundled guest) never reads a key, and a caller waiting for
        it to react to one would wait for nothing.
        """
        return (self.configured and self.scanning and not self.ctr & CTR_KBDDIS
                and bool(self.ctr & CTR_KBDINT))

    def send_ctrl_alt_del(self) -> bool:
        """Press and release Ctrl-Alt-Del; False (and nothing sent) when no driver listens or there is no room."""
        with self.lock:
            if not self.keyboard_listening:
                return False
            codes = CTRL_ALT_DEL[self._output_set()]
            if len(self._kbd) + len(codes) > KBD_BUFFER:
                return False
            self._kbd.extend(codes)
            self._refill()
            return True

    # --- controller ------------------------------------------------------------------
    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if cmd in _WITH_DATA:
            self._pending_cmd = cmd
        elif CMD_READ_CTR <= cmd < CMD_READ_CTR + 0x20:
            self._answer(self.ctr if cmd == CMD_READ_CTR else 0x00)
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._answer(INTERFACE_OK)
        elif cmd == CMD_SELF_TEST:
            self._answer(SELF_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_INPUT:
            self._answer(INPUT_PORT)
        elif cmd == CMD_READ_OUTPUT:
            self._answer(self.output_port)
        elif cmd == CMD_READ_TEST:
            self._answer(0x00)
        elif cmd & 0xF0 == 0xF0 and not cmd & 1:  # pulse output lines; bit 0 low pulses reset
            self.on_reset()

    def _command_data(self, cmd: int, value: int) -> None:
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
            self.configured = True
        elif cmd == CMD_WRITE_OUTPUT:
            self.output_port = value
            if not value & 1:  # bit 0 low = assert CPU reset
                self.on_reset()
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._answer(value)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._answer(value, aux=True)
        # CMD_WRITE_AUX: there is no AUX device to take the byte; 0x61-0x7F: controller RAM, not kept

    def _answer(self, value: int, aux: bool = False) -> None:
        """A controller answer: next into the output buffer, ahead of the keyboard (one at most: a newer
        answer replaces one not yet in the buffer)."""
        self._ctl.clear()
        self._ctl.append(value | (0x100 if aux else 0))

    def _refill(self) -> None:
        if self._obuf is None:
            if self._ctl:
                byte = self._ctl.popleft()
                self._obuf, self._obuf_aux = byte & 0xFF, bool(byte & 0x100)
            elif self._kbd and not self.ctr & CTR_KBDDIS:
                self._obuf, self._obuf_aux = self._kbd.popleft(), False
        self._update_irq()

    def _update_irq(self) -> None:
        full = self._obuf is not None
        kbd = full and not self._obuf_aux and bool(self.ctr & CTR_KBDINT)
        aux = full and self._obuf_aux and bool(self.ctr & CTR_AUXINT)
        was_kbd, was_aux = self._irq
        self._irq = (kbd, aux)
        if kbd != was_kbd and self.irq_kbd is not None:
            self.irq_kbd(kbd)
        if aux != was_aux and self.irq_aux is not None:
            self.irq_aux(aux)

    # --- keyboard --------------------------------------------------------------------
    def _output_set(self) -> int:
        return 1 if self.ctr & CTR_XLATE and self.scancode_set == 2 else self.scancode_set

    def _send(self, *codes: int) -> None:
        for code in codes:
            if len(self._kbd) >= KBD_BUFFER:
                self.dropped += 1
                continue
            self._kbd.append(code)
            self._last_sent = code

    def _defaults(self) -> None:
        self.scancode_set, self.leds, self.typematic = 2, 0, TYPEMATIC_DEFAULT

    def _keyboard_write(self, value: int) -> None:
        pending, self._kbd_pending = self._kbd_pending, None
        if pending is not None and value not in (KBD_RESET, KBD_RESEND):
            if pending == KBD_SET_LEDS:
                self.leds = value & 0x07
            elif pending == KBD_SET_TYPEMATIC:
                self.typematic = value & 0x7F
            elif value == 0:  # KBD_SCANCODE_SET 0: which set is in use
                self._send(KBD_ACK, self.scancode_set)
                return
            elif value in (1, 2, 3):
                self.scancode_set = value
            else:
                self._send(KBD_RESEND)
                return
            self._send(KBD_ACK)
            return
        if value in _WITH_PARAM:
            self._kbd_pending = value
            self._send(KBD_ACK)
        elif value == KBD_ECHO:
            self._send(KBD_ECHO)
        elif value == KBD_GET_ID:
            self._send(KBD_ACK, *(KBD_ID_TRANSLATED if self.ctr & CTR_XLATE else KBD_ID))
        elif value == KBD_ENABLE:
            self._kbd.clear()
            self.scanning = True
            self._send(KBD_ACK)
        elif value in (KBD_DISABLE, KBD_DEFAULTS):
            self._kbd.clear()
            self._defaults()
            self.scanning = value == KBD_DEFAULTS
            self._send(KBD_ACK)
        elif value == KBD_RESET:
            self._kbd.clear()
            self._defaults()
            self.scanning = True
            self._send(KBD_ACK, KBD_BAT_OK)
        elif value == KBD_RESEND:
            self._send(self._last_sent)
        else:
            self._send(KBD_RESEND)

    # --- snapshot --------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """Controller (output port, Command Byte, a command waiting for data, the output buffer) and keyboard.

        The interrupt lines are not saved: they follow from the output buffer
        and the Command Byte, and the machine drives them after a load.
        """
        with self.lock:
            return self._state()

    def _state(self) -> dict[str, object]:
        return {
            "output_port": self.output_port, "ctr": self.ctr, "configured": self.configured,
            "pending_command": self._pending_cmd, "a2": self._a2,
            "output_buffer": None if self._obuf is None else self._obuf, "output_aux": self._obuf_aux,
            "controller_queue": list(self._ctl),
            "keyboard": {"queue": list(self._kbd), "pending": self._kbd_pending, "scanning": self.scanning,
                         "scancode_set": self.scancode_set, "leds": self.leds, "typematic": self.typematic,
                         "last_sent": self._last_sent},
        }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the controller :meth:`save_state` described; StateError (and no change) if it is damaged.

        Restoring an output port with the reset line low does not reset: the
        reset happened when it was written, before the snapshot. The
        interrupt lines are not driven: call :meth:`resync` once the machine
        is wired.
        """
        r = StateReader(state, "the i8042 controller", ("output_port", "ctr", "configured", "pending_command", "a2",
                                                         "output_buffer", "output_aux", "controller_queue", "keyboard"))
        output_port, ctr, configured = r.take_int("output_port", 0, 0xFF), r.take_int("ctr", 0, 0xFF), r.take_bool("configured")
        pending = r.take_optional_int("pending_command", 0x60, 0xFF)
        r.require(pending is None or pending in _WITH_DATA, "pending_command", "it is not a command that takes data")
        a2, obuf, obuf_aux = r.take_bool("a2"), r.take_optional_int("output_buffer", 0, 0xFF), r.take_bool("output_aux")
        r.require(obuf is not None or not obuf_aux, "output_aux", "an empty output buffer has no source")
        ctl = r.take_int_list("controller_queue", 0, 0x1FF, 1)
        k = r.take_state("keyboard", ("queue", "pending", "scanning", "scancode_set", "leds", "typematic", "last_sent"))
        kbd = k.take_int_list("queue", 0, 0xFF, KBD_BUFFER)
        kbd_pending = k.take_optional_int("pending", 0, 0xFF)
        k.require(kbd_pending is None or kbd_pending in _WITH_PARAM, "pending", "it is not a command with a parameter")
        scanning, scancode_set = k.take_bool("scanning"), k.take_int("scancode_set", 1, 3)
        leds, typematic, last = k.take_int("leds", 0, 7), k.take_int("typematic", 0, 0x7F), k.take_int("last_sent", 0, 0xFF)
        with self.lock:
            self.output_port, self.ctr, self._pending_cmd, self._a2 = output_port, ctr, pending, a2
            self.configured = configured
            self._obuf, self._obuf_aux, self._ctl = obuf, obuf_aux, collections.deque(ctl)
            self._kbd, self._kbd_pending, self.scanning = collections.deque(kbd), kbd_pending, scanning
            self.scancode_set, self.leds, self.typematic, self._last_sent = scancode_set, leds, typematic, last
            self._irq = (False, False)

    def resync(self) -> None:
        """Drive the interrupt lines as the loaded state holds them (after :meth:`load_state`)."""
        with self.lock:
            self._refill()
