"""The length-prefixed frame stream (host/netstream.py): the codec at every split point, bad lengths, fixed
buffers, and the backend over a real socket pair (partial writes, bounded output, the peer going away)."""

from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.host.netstream import (
    LENGTH,
    MAX_FRAME,
    FrameDecoder,
    StreamBackend,
    StreamProtocolError,
    frame_header,
)


def encode(frames: list[bytes]) -> bytes:
    return b"".join(frame_header(len(f)) + f for f in frames)


def drain(dec: FrameDecoder) -> list[bytes]:
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(bytes(f))
    return out


FRAMES = [b"\x01" * 60, os.urandom(1514), b"\x02" * 14]


def test_round_trip_and_the_header_is_big_endian() -> None:
    assert frame_header(0x0102) == b"\0\0\x01\x02"
    dec = FrameDecoder()
    assert dec.feed(encode(FRAMES)) == len(encode(FRAMES))
    assert drain(dec) == FRAMES and dec.buffered == 0


def test_partial_reads_at_every_split_point() -> None:
    stream = encode(FRAMES)
    for k in range(len(stream) + 1):
        dec = FrameDecoder(max_frame=2000, capacity=4096)
        dec.feed(stream[:k])
        got = drain(dec)
        dec.feed(stream[k:])
        got += drain(dec)
        assert got == FRAMES, k
    dec = FrameDecoder(max_frame=2000, capacity=4096)
    got = []
    for i in range(len(stream)):                          # one byte at a time
        dec.feed(stream[i:i + 1])
        got += drain(dec)
    assert got == FRAMES


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
       cuts=st.lists(st.integers(1, 700), max_size=30))
def test_any_chunking_gives_the_frames_back(frames: list[bytes], cuts: list[int]) -> None:
    stream = encode(frames)
    dec = FrameDecoder(max_frame=300, capacity=400)       # small: the buffer compacts often
    got: list[bytes] = []
    pos = 0
    for cut in cuts + [len(stream)] * (len(stream) + 1):
        if pos >= len(stream):
            break
        n = dec.feed(stream[pos:pos + cut])
        pos += n
        got += drain(dec)
    assert got == frames


@pytest.mark.parametrize("length", [0, 1001, 0xFFFF_FFFF])
def test_bad_lengths_are_protocol_errors_and_never_allocated(length: int) -> None:
    dec = FrameDecoder(max_frame=1000)
    size = len(dec._buf)
    dec.feed(LENGTH.pack(length) + b"x" * 10)
    assert dec.has_frame()                                # "something to report": the error
    with pytest.raises(StreamProtocolError, match="outside 1..1000"):
        dec.next_frame()
    assert len(dec._buf) == size == dec.capacity


def test_buffering_is_bounded() -> None:
    dec = FrameDecoder(max_frame=100, capacity=200)
    stream = encode([b"a" * 100] * 10)
    assert dec.feed(stream) == 200                        # the rest stays with the caller
    assert len(dec._buf) == 200
    assert len(drain(dec)) == 1                           # 104 bytes made one frame; 96 wait for more
    assert dec.buffered == 96


# --- the backend over a socket pair ------------------------------------------------------------

def pair(**kw) -> tuple[StreamBackend, socket.socket]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return StreamBackend(ours, **kw), peer


def views(frame: bytes, pieces: int = 3) -> list[memoryview]:
    step = max(1, len(frame) // pieces)
    return [memoryview(frame)[i:i + step] for i in range(0, len(frame), step)]


def read_all(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    sock.settimeout(5)
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "peer closed early"
        out += chunk
    return bytes(out)


def test_frames_go_out_as_one_gather_write_and_come_back_whole() -> None:
    be, peer = pair()
    frames = [os.urandom(n) for n in (60, 1514, 9000)]
    assert be.write_frames([views(f) for f in frames]) == 3
    assert be.tx_sendmsg_calls == 1 and not be.output_pending
    assert read_all(peer, len(encode(frames))) == encode(frames)
    peer.sendall(encode(frames)[:100])                    # the first frame, and a bit of the next
    time.sleep(0.05)
    assert bytes(be.read_frame()) == frames[0]
    assert be.read_frame() is None                        # the rest has not come yet
    peer.sendall(encode(frames)[100:])
    time.sleep(0.05)
    assert [bytes(be.read_frame()), bytes(be.read_frame())] == frames[1:]
    assert (be.rx_frames, be.tx_frames) == (3, 3)
    be.close()
    peer.close()


def test_a_slow_peer_fills_the_bounded_output_then_back_pressure() -> None:
    be, peer = pair(max_frame=2000, out_limit=8192)
    be.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent: list[bytes] = []
    refused = 0
    for i in range(200):
        f = bytes([i]) * (1000 + i)
        if be.write_frames([views(f)]) == 1:
            sent.append(f)
        else:
            refused += 1
            break
    assert refused == 1 and be.output_pending             # the bound was reached: a frame was refused
    assert len(be._out) <= 8192
    got = bytearray()
    peer.settimeout(5)
    while not be.flush():
        got += peer.recv(1 << 16)
    want = encode(sent)
    got += read_all(peer, len(want) - len(got))
    assert bytes(got) == want                             # in order, none split, none twice
    be.close()
    peer.close()


def test_a_framing_error_or_a_closed_peer_takes_the_backend_down() -> None:
    be, peer = pair(max_frame=1000)
    peer.sendall(LENGTH.pack(0))
    time.sleep(0.05)
    assert be.read_frame() is None and "framing" in (be.down or "")
    be2, peer2 = pair()
    peer2.close()
    assert be2.read_frame() is None and be2.down == "it closed the connection"
    assert be2.write_frames([views(b"x" * 60)] * 3) == 3   # taken, and dropped: counted
    assert be2.tx_dropped == 3 and be2.tx_frames == 0
    for b, p in ((be, peer), (be2, None)):
        b.close()
        if p is not None:
            p.close()


def test_max_frame_is_the_devices() -> None:
    from kvmkit.devices.virtio.net import MAX_FRAME as DEVICE_MAX
    assert MAX_FRAME == DEVICE_MAX == 65535 + 14 + 4


class ShortSocket:
    """A socket that takes at most ``room`` bytes per call (then EAGAIN until given more room)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.wire = bytearray()
        self.calls = 0

    def setblocking(self, flag: bool) -> None:
        pass

    def _take(self, data: bytes) -> int:
        if self.room == 0:
            raise BlockingIOError
        n = min(self.room, len(data))
        self.wire += data[:n]
        self.room -= n
        return n

    def sendmsg(self, iov) -> int:
        self.calls += 1
        return self._take(b"".join(bytes(v) for v in iov))

    def send(self, data) -> int:
        return self._take(bytes(data))


@pytest.mark.parametrize("room", [0, 3, 4, 7, 64, 67, 128])
def test_a_frame_cut_by_a_short_write_is_finished_from_the_buffer(room: int) -> None:
    sock = ShortSocket(room)
    be = StreamBackend(sock, max_frame=1000)  # type: ignore[arg-type]
    frames = [bytes([1]) * 60, bytes([2]) * 60, bytes([3]) * 60]
    assert be.write_frames([views(f) for f in frames]) == 3
    assert be.tx_frames == 3 and sock.calls == 1
    assert be.output_pending == (room < len(encode(frames)))
    sock.room = 1 << 20
    assert be.flush()
    assert bytes(sock.wire) == encode(frames)
