"""Ethernet frames over a byte stream, as QEMU's ``-netdev stream`` and passt frame them.

Each frame travels as a 4-byte big-endian length, then the frame. This
module has the codec (:class:`FrameDecoder`, :func:`frame_header`) and
:class:`StreamBackend`, a network backend over any connected, non-blocking
stream socket (passt's, in ``host/netuser.py``).

Everything is bounded, whatever the peer sends:

* The decoder reassembles into one buffer of fixed size; a length of 0 or
  over ``max_frame`` is a protocol error (the connection is dropped with
  that reason), never an allocation.
* Output goes straight from the caller's views to ``sendmsg`` (length
  prefixes and frame pieces in one gather list). What the socket does not
  take is copied into an output buffer of at most ``out_limit`` bytes;
  once that is full, :meth:`StreamBackend.write_frames` takes fewer frames
  than offered and the caller holds the rest (back pressure, nothing
  dropped). Only a backend that is down drops frames, and counts them.

The backend is not thread-safe: its owner serialises calls (machine/net.py
holds a lock around it).
"""

from __future__ import annotations

import socket
import struct
from typing import Sequence

LENGTH = struct.Struct(">I")
# A frame of ETH_MAX_MTU (65535) with its Ethernet header and a VLAN tag; the
# virtio-net device bounds its frames the same way.
MAX_FRAME = 65535 + 14 + 4
OUT_LIMIT = 1 << 20          # bytes of output kept while the peer is slow
IOV_MAX = 1024               # buffers per sendmsg (Linux's UIO_MAXIOV)
RECV_BATCH = 256 << 10       # free space aimed for at each receive (several frames a system call)


class StreamProtocolError(Exception):
    """The peer broke the framing (a zero or oversized length): the stream cannot be trusted further."""


def frame_header(length: int) -> bytes:
    """The 4-byte big-endian length that precedes a frame on the stream."""
    return LENGTH.pack(length)


class FrameDecoder:
    """Reassembles length-prefixed frames from stream reads, in a buffer whose size never changes.

    Read into :meth:`space` (``recv_into``), report the count with
    :meth:`filled`, then take frames with :meth:`next_frame`. A frame is
    a view into the buffer, valid until the next call to :meth:`space`,
    :meth:`feed` or :meth:`next_frame`: the consumer copies it (into guest
    RAM) before asking for more.
    """

    def __init__(self, max_frame: int = MAX_FRAME, capacity: int | None = None) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        need = LENGTH.size + max_frame
        self.capacity = max(capacity or 0, need) if capacity is not None else need + RECV_BATCH
        self._buf = bytearray(self.capacity)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return self._end - self._start

    def has_frame(self) -> bool:
        """Whether :meth:`next_frame` would return a frame (or raise) without more input."""
        have = self._end - self._start
        if have < LENGTH.size:
            return False
        length = LENGTH.unpack_from(self._buf, self._start)[0]
        return not 0 < length <= self.max_frame or have >= LENGTH.size + length

    def next_frame(self) -> memoryview | None:
        """The next whole frame, or None until more bytes arrive; StreamProtocolError on a bad length."""
        have = self._end - self._start
        if have < LENGTH.size:
            return None
        length = LENGTH.unpack_from(self._buf, self._start)[0]
        if not 0 < length <= self.max_frame:
            raise StreamProtocolError(f"frame length {length} is outside 1..{self.max_frame}")
        if have < LENGTH.size + length:
            return None
        first = self._start + LENGTH.size
        self._start = first + length
        if self._start == self._end:
            self._start = self._end = 0
        return self._view[first:first + length]

    def space(self) -> memoryview:
        """Where the next read goes: the free tail, made as large as it can be (never empty)."""
        if self._start and self.capacity - self._end < RECV_BATCH:
            have = self._end - self._start
            self._view[:have] = self._view[self._start:self._end]  # memoryview assignment: memmove
            self._start, self._end = 0, have
        return self._view[self._end:]

    def filled(self, n: int) -> None:
        """``n`` bytes were read into the last :meth:`space`."""
        if not 0 <= n <= self.capacity - self._end:
            raise ValueError(f"{n} bytes do not fit the {self.capacity - self._end} bytes offered")
        self._end += n

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Copy in as much of ``data`` as fits; returns how many bytes were taken."""
        room = self.space()
        n = min(len(room), len(data))
        room[:n] = memoryview(data).cast("B")[:n]
        self._end += n
        return n


class StreamBackend:
    """A network backend over a connected stream socket speaking the length-prefixed framing.

    ``read_frame`` returns one frame or None (never blocks); ``write_frames``
    takes frames while its output bound allows; ``flush`` writes what waits
    once the socket is writable. When the peer closes, errs or breaks the
    framing, the backend goes *down* (:attr:`down` says why): it reads
    nothing more and takes every frame offered, dropping it (counted in
    :attr:`tx_dropped`).
    """

    kind = "stream"

    def __init__(self, sock: socket.socket, *, name: str = "net", max_frame: int = MAX_FRAME,
                 out_limit: int = OUT_LIMIT) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self.max_frame = max_frame
        self.out_limit = max(out_limit, LENGTH.size + max_frame)
        self.decoder = FrameDecoder(max_frame)
        self._out = bytearray()
        self.down: str | None = None
        self.rx_frames = 0
        self.rx_bytes = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.tx_sendmsg_calls = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- receive ------------------------------------------------------------------------
    def read_frame(self) -> memoryview | None:
        """The next frame from the peer, or None when none has arrived (or the backend is down)."""
        while self.down is None:
            try:
                frame = self.decoder.next_frame()
            except StreamProtocolError as e:
                self._go_down(f"the peer broke the stream framing ({e})")
                return None
            if frame is not None:
                self.rx_frames += 1
                self.rx_bytes += len(frame)
                return frame
            try:
                n = self.sock.recv_into(self.decoder.space())
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                self._go_down(f"reading from it failed: {e.strerror or e}")
                return None
            if n == 0:
                self._go_down("it closed the connection")
                return None
            self.decoder.filled(n)
        return None

    def buffered_frame(self) -> bool:
        """Whether a frame (or a framing error) waits in the decoder: the socket may not wake us for it."""
        return self.down is None and self.decoder.has_frame()

    # --- transmit -----------------------------------------------------------------------
    @property
    def output_pending(self) -> bool:
        return bool(self._out)

    def write_frames(self, frames: Sequence[Sequence[memoryview]]) -> int:
        """Send or buffer frames in order while the output bound allows; returns how many were taken."""
        if self.down is not None:
            self.tx_dropped += len(frames)
            return len(frames)
        taken = 0
        if not self._out:
            taken = self._send_direct(frames)
        while taken < len(frames) and self.down is None:
            frame = frames[taken]
            size = sum(len(v) for v in frame)
            if len(self._out) + LENGTH.size + size > self.out_limit:
                break
            self._out += frame_header(size)
            for v in frame:
                self._out += v
            self._count_out(size)
            taken += 1
        if self.down is not None:  # the socket failed on the way: the rest is dropped, and counted
            self.tx_dropped += len(frames) - taken
            return len(frames)
        return taken

    def _send_direct(self, frames: Sequence[Sequence[memoryview]]) -> int:
        """sendmsg straight from the views. The part of a frame the socket did not take is copied to
        the output buffer, so a frame is never split between taken and not taken. Returns frames taken."""
        taken = 0
        while taken < len(frames):
            iov: list[bytes | memoryview] = []
            batch: list[tuple[int, int]] = []  # (frame size, its first iov index) per frame in this call
            for frame in frames[taken:]:
                if iov and len(iov) + 1 + len(frame) > IOV_MAX:
                    break
                size = sum(len(v) for v in frame)
                batch.append((size, len(iov)))
                iov.append(frame_header(size))
                iov.extend(frame)
            try:
                self.tx_sendmsg_calls += 1
                sent = self.sock.sendmsg(iov)
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as e:
                self._go_down(f"writing to it failed: {e.strerror or e}")
                return taken
            for k, (size, first) in enumerate(batch):
                whole = LENGTH.size + size
                if sent >= whole:
                    sent -= whole
                    self._count_out(size)
                    taken += 1
                    continue
                if sent:  # this frame went out in part: keep the rest, in order, before anything newer
                    last = batch[k + 1][1] if k + 1 < len(batch) else len(iov)
                    self._out += b"".join(iov[first:last])[sent:]
                    self._count_out(size)
                    taken += 1
                return taken
        return taken

    def _count_out(self, size: int) -> None:
        self.tx_frames += 1
        self.tx_bytes += size

    def flush(self) -> bool:
        """Write buffered output; True once none is left (or the backend is down and dropped it)."""
        while self._out and self.down is None:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                self._go_down(f"writing to it failed: {e.strerror or e}")
                break
            del self._out[:n]
        return not self._out

    # --- state ----------------------------------------------------------------------------
    def describe(self) -> str:
        """What the backend is connected to, for messages."""
        return "the stream peer"

    def why_down(self) -> str | None:
        """Why the backend is down (None while it is up)."""
        return self.down

    def _go_down(self, why: str) -> None:
        if self.down is None:
            self.down = why
            self._out.clear()  # bytes the peer will never read; their frames were counted when taken

    def counters(self) -> dict[str, int]:
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes, "tx_dropped": self.tx_dropped,
                "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes, "tx_sendmsg_calls": self.tx_sendmsg_calls}

    def close(self) -> None:
        if self.down is None:
            self.down = "closed by kvmkit"
        try:
            self.sock.close()
        except OSError:
            pass
