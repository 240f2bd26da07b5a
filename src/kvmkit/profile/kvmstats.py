"""KVM's binary statistics (KVM_GET_STATS_FD): in-kernel exit counts kvmkit never sees.

An exit KVM handles itself (an APIC access, an in-kernel HLT) never reaches
the vCPU loop, so userspace accounting alone undercounts. The stats file
descriptor exposes the kernel's own counters; the layout is self-describing
(header, descriptors with names, data), documented in the KVM API docs.
"""

from __future__ import annotations

import ctypes
import os

from ..kvm import structs as s

STATS_TYPE_CUMULATIVE = 0 << 0
STATS_TYPE_INSTANT = 1 << 0
STATS_TYPE_PEAK = 2 << 0
STATS_TYPE_LINEAR_HIST = 3 << 0
STATS_TYPE_LOG_HIST = 4 << 0
STATS_TYPE_MASK = 0xF


class StatsReader:
    """Reads one VM's or vCPU's stats fd; descriptors are parsed once, values on each :meth:`read`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        hdr_raw = os.pread(fd, ctypes.sizeof(s.kvm_stats_header), 0)
        if len(hdr_raw) < ctypes.sizeof(s.kvm_stats_header):
            raise OSError("short read of the KVM stats header")
        self.header = s.kvm_stats_header.from_buffer_copy(hdr_raw)
        h = self.header
        desc_size = ctypes.sizeof(s.kvm_stats_desc) + h.name_size
        raw = os.pread(fd, desc_size * h.num_desc, h.desc_offset)
        self.id = os.pread(fd, h.name_size, h.id_offset).split(b"\0", 1)[0].decode(errors="replace")
        self.descs: list[tuple[str, int, int, int]] = []  # (name, flags, offset, size)
        for i in range(h.num_desc):
            chunk = raw[i * desc_size:(i + 1) * desc_size]
            if len(chunk) < desc_size:
                break
            d = s.kvm_stats_desc.from_buffer_copy(chunk[:ctypes.sizeof(s.kvm_stats_desc)])
            name = chunk[ctypes.sizeof(s.kvm_stats_desc):].split(b"\0", 1)[0].decode(errors="replace")
            self.descs.append((name, d.flags, d.offset, d.size))
        end = max((off + 8 * size for _, _, off, size in self.descs), default=0)
        self._data_len = end

    def read(self) -> dict[str, int]:
        """Current values of the scalar counters (histograms are summed)."""
        data = os.pread(self.fd, self._data_len, self.header.data_offset)
        out: dict[str, int] = {}
        for name, flags, off, size in self.descs:
            vals = [int.from_bytes(data[off + 8 * i: off + 8 * i + 8], "little") for i in range(size)]
            if (flags & STATS_TYPE_MASK) in (STATS_TYPE_LINEAR_HIST, STATS_TYPE_LOG_HIST):
                out[name] = sum(vals)
            else:
                out[name] = vals[0] if vals else 0
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
