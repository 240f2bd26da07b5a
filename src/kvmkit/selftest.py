"""The bundled guest's ``serial-selftest`` protocol, shared by its tests and benchmarks/serial.py.

Both ends must agree on the byte stream and on how the guest's one-line
summary reads; keeping them here means a change to the guest's output is
made in one place on the host side.
"""

from __future__ import annotations

import functools
import re

SUMMARY = re.compile(
    r"serial-selftest: COM(?P<port>\d) (?P<type>\S+) (?P<dir>tx|rx) (?P<bytes>\d+) bytes in (?P<tsc>\d+) tsc, "
    r"irqs=(?P<irqs>\d+), passes=(?P<passes>\d+), .*?"
    r"unhandled-irqs=(?P<unhandled>\d+), pass-limit-overflows=(?P<overflows>\d+), "
    r"lsr-errors=(?P<lsr_errors>\d+), errors=(?P<errors>\d+).*?crc=0x(?P<crc>[0-9a-f]{8})")


@functools.lru_cache(maxsize=8)
def stream(n: int, seed: int = 1) -> bytes:
    """The self-test's bytes: xorshift32 from ``seed`` (1 for serial-selftest; the virtio
    commands take seed=N), the low 8 bits of each new state."""
    x = seed
    out = bytearray(n)
    for i in range(n):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)
