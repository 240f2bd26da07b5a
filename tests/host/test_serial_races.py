"""The serial host end against a guest that races it (issue 12, items 2 and 3), with a real host loop thread.

* Host input must never be dropped by kvmkit: bytes read from the host that
  the UART cannot take after all (the guest reset the FIFO or turned
  loopback on between the host's look at the room and its delivery) are
  kept and delivered later. Only the guest's own FIFO resets may discard
  bytes, as on the real part: what the guest reads is always an in-order
  subsequence of what the host sent, and the host's bytes are all accounted
  for (read, discarded by a reset, or still waiting).
* A guest that reads part of the RX FIFO, leaving bytes below the trigger
  level, gets a character-timeout interrupt for them again.
"""

from __future__ import annotations

import random
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.host.backends import SocketPairBackend
from kvmkit.host.loop import EventLoop
from kvmkit.machine.serial import SerialPort

RBR, IER, IIR, FCR, MCR, LSR = 0, 1, 2, 2, 4, 5


class Level:
    def __init__(self) -> None:
        self.level = False
        self.rises = 0

    def __call__(self, level: bool) -> None:
        if level and not self.level:
            self.rises += 1
        self.level = level


def is_subsequence(small: bytes, big: bytes) -> bool:
    it = iter(big)
    return all(b in it for b in small)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), ops=st.integers(200, 2000))
def test_a_racing_guest_never_makes_kvmkit_drop_host_input(seed: int, ops: int) -> None:
    rng = random.Random(seed)
    backend = SocketPairBackend()
    loop = EventLoop()
    port = SerialPort("COM2", loop, backend, Level())
    port.start()
    loop.start()
    sent = bytes(rng.randrange(256) for _ in range(3000))
    got = bytearray()
    try:
        port.io_write(FCR, 1, 0x07)
        feeder = threading.Thread(target=backend.peer.sendall, args=(sent,), daemon=True)
        feeder.start()
        for _ in range(ops):
            op = rng.random()
            if op < 0.6:
                while port.io_read(LSR, 1) & 1 and rng.random() < 0.9:
                    got.append(port.io_read(RBR, 1))
            elif op < 0.7:
                port.io_write(FCR, 1, rng.choice([0x03, 0x07, 0x01, 0x00, 0xC1]))  # RX reset, FIFO off/on
            elif op < 0.8:
                port.io_write(MCR, 1, rng.choice([0x10, 0x00, 0x0B]))               # loopback on/off
                port.io_write(MCR, 1, 0x0B)
            else:
                time.sleep(rng.random() * 0.002)
        port.io_write(MCR, 1, 0x0B)
        port.io_write(FCR, 1, 0x07)
        deadline = time.monotonic() + 10
        while len(got) + port.uart.stats.rx_discarded < len(sent) and time.monotonic() < deadline:
            if port.io_read(LSR, 1) & 1:
                got.append(port.io_read(RBR, 1))
            else:
                time.sleep(0.001)
        feeder.join(5)
        time.sleep(0.05)
        assert loop.errors == 0
        assert is_subsequence(bytes(got), sent)
        with port.lock:
            waiting = port.uart.rx_level() + len(port.stream._held_in)
        # every byte kvmkit read from the host: in the guest's hands, discarded by the guest, or waiting
        assert port.counters.host_bytes_in == len(got) + port.uart.stats.rx_discarded + waiting
    finally:
        loop.stop()
        port.close()
        backend.peer.close()


def test_bytes_left_below_the_trigger_get_another_character_timeout() -> None:
    irq = Level()
    backend = SocketPairBackend()
    loop = EventLoop()
    port = SerialPort("COM2", loop, backend, irq)
    port.start()
    loop.start()
    try:
        port.io_write(FCR, 1, 0xC1)   # FIFO on, trigger level 14
        port.io_write(IER, 1, 0x01)   # received-data interrupts
        port.io_write(MCR, 1, 0x08)   # OUT2: the interrupt reaches the line
        backend.peer.sendall(b"0123456789")   # 10 < 14: only a timeout tells the guest
        deadline = time.monotonic() + 5
        while not irq.level:
            assert time.monotonic() < deadline, "no character timeout"
            time.sleep(0.001)
        assert port.io_read(IIR, 1) & 0x0F == 0x0C
        assert bytes(port.io_read(RBR, 1) for _ in range(4)) == b"0123"   # a partial read
        first = irq.rises
        deadline = time.monotonic() + 5
        while irq.rises == first:
            assert time.monotonic() < deadline, "the six bytes left never raised a timeout again"
            time.sleep(0.001)
        assert port.io_read(IIR, 1) & 0x0F == 0x0C
        assert bytes(port.io_read(RBR, 1) for _ in range(6)) == b"456789"
    finally:
        loop.stop()
        port.close()
        backend.peer.close()


