"""The bundled guest's virtio command summaries (formats in guest/README.md), shared by the QEMU and KVM tests."""

from __future__ import annotations

import re

from kvmkit.selftest import stream

DISK_BYTES = 16 << 20

__all__ = ["DISK_BYTES", "BENCH", "BLK", "CONSOLE", "LSPCI_FUNC", "RNG", "stream", "summaries"]

BLK = re.compile(
    r"virtio-blk-test: mode=(?P<mode>irq|intx|poll) event-idx=(?P<event_idx>[01]) indirect=(?P<indirect>[01]) "
    r"dev=(?P<dev>\d+) ro=(?P<ro>[01]) capacity=(?P<capacity>\d+) serial=(?P<serial>\S+) "
    r"sectors=(?P<sectors>\d+) start=(?P<start>\d+) seed=(?P<seed>\d+) bytes=(?P<bytes>\d+) "
    r"requests=(?P<requests>\d+) irqs=(?P<irqs>\d+) kicks=(?P<kicks>\d+) flush=(?P<flush>\S+) "
    r"ro-write=(?P<ro_write>\S+) errors=(?P<errors>\d+) crc=0x(?P<crc>[0-9a-f]{8}) result=(?P<result>\w+)")
BENCH = re.compile(
    r"virtio-blk-bench: (?P<op>read|write) bytes=(?P<bytes>\d+) requests=(?P<requests>\d+) "
    r"req-bytes=(?P<req_bytes>\d+) depth=(?P<depth>\d+) tsc=(?P<tsc>\d+) irqs=(?P<irqs>\d+) "
    r"kicks=(?P<kicks>\d+) hlts=(?P<hlts>\d+) errors=(?P<errors>\d+) mode=(?P<mode>irq|intx|poll) "
    r"event-idx=(?P<event_idx>[01]) indirect=(?P<indirect>[01]) result=(?P<result>\w+)")
CONSOLE = re.compile(
    r"virtio-console-test: (?P<dir>tx|rx) bytes=(?P<bytes>\d+) (?:sent|received)=(?P<moved>\d+) "
    r"buffers=(?P<buffers>\d+) buf-bytes=(?P<buf_bytes>\d+) tsc=(?P<tsc>\d+) irqs=(?P<irqs>\d+) "
    r"kicks=(?P<kicks>\d+) extra-bytes=(?P<extra>\d+) errors=(?P<errors>\d+) crc=0x(?P<crc>[0-9a-f]{8}) "
    r"mode=(?P<mode>irq|intx|poll) event-idx=(?P<event_idx>[01]) indirect=(?P<indirect>[01]) result=(?P<result>\w+)")
RNG = re.compile(
    r"virtio-rng-test: bytes=(?P<bytes>\d+) received=(?P<received>\d+) requests=(?P<requests>\d+) "
    r"irqs=(?P<irqs>\d+) kicks=(?P<kicks>\d+) zero-bytes=(?P<zero>\d+) distinct=(?P<distinct>\d+) "
    r"errors=(?P<errors>\d+) crc=0x(?P<crc>[0-9a-f]{8}) mode=(?P<mode>irq|intx|poll) "
    r"event-idx=(?P<event_idx>[01]) indirect=(?P<indirect>[01]) result=(?P<result>\w+)")
LSPCI_FUNC = re.compile(r"^00:(?P<dev>[0-9a-f]{2})\.(?P<fn>\d) (?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4}) "
                        r"class (?P<cls>[0-9a-f]{6})", re.M)


def summaries(regex: re.Pattern[str], out: str, count: int) -> list[dict[str, str]]:
    found = [m.groupdict() for m in regex.finditer(out)]
    assert len(found) == count, out
    return found
