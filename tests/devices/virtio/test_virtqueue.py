"""The split virtqueue against rings built in real guest RAM (no KVM): normal use and hostile rings."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.devices.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from kvmkit.devices.virtio.queue import MAX_DESCRIPTORS, Chain, Virtqueue, gather, scatter, slice_bufs
from kvmkit.memory import GuestMemory

from virtio_driver import Ring, device_queue

MEM_SIZE = 16 << 20
RING = 0x1000
BUF = 0x20_0000


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(MEM_SIZE)


def put(mem: GuestMemory, addr: int, data: bytes) -> tuple[int, int, bool]:
    mem.write(addr, data)
    return (addr, len(data), False)


# --- normal chains ----------------------------------------------------------------------
def test_chain_readable_then_writable(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring)
    head = ring.add([put(mem, BUF, b"hello "), put(mem, BUF + 0x100, b"world"), (BUF + 0x200, 64, True)])
    assert q.available() == 1
    chain = q.pop()
    assert chain is not None and chain.error is None and chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello ", b"world"]
    assert (chain.read_len, chain.write_len) == (11, 64)
    chain.writable[0][:3] = b"abc"          # zero-copy: the guest sees it at once
    assert mem.read(BUF + 0x200, 3) == b"abc"
    assert q.pop() is None
    q.push(chain, 3)
    assert ring.take_used() == [(head, 3)]


def test_push_clamps_used_len_to_the_writable_part(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring)
    ring.add([(BUF, 16, True)])
    chain = q.pop()
    q.push(chain, 1 << 40)
    assert ring.take_used() == [(chain.head, 16)]


def test_indirect_table_and_direct_prefix(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring, indirect=True)
    table = 0x8000
    ring.add_indirect(table, [put(mem, BUF, b"in-table"), (BUF + 0x100, 32, True)],
                      prefix=[put(mem, BUF + 0x300, b"prefix:")])
    chain = q.pop()
    assert chain.error is None
    assert gather(chain.readable, 0, chain.read_len) == b"prefix:in-table"
    assert chain.write_len == 32
    assert q.errors == {}


def test_indirect_without_negotiation_fails_the_request(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring, indirect=False)
    ring.add_indirect(0x8000, [(BUF, 8, False)])
    chain = q.pop()
    assert chain.error and not chain.readable
    assert q.errors == {"indirect_not_negotiated": 1}
    assert not q.broken


def test_zero_length_descriptors_are_skipped_without_a_ram_check(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring)
    ring.add([(1 << 62, 0, False), put(mem, BUF, b"x"), (1 << 62, 0, True)])
    chain = q.pop()
    assert chain.error is None and [bytes(v) for v in chain.readable] == [b"x"] and chain.writable == []


def test_sixteen_bit_indices_wrap(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring)
    ring.start_at(0xFFFE)
    q.last_avail = q.used_idx = q._signalled = 0xFFFE
    seen = []
    for i in range(10):                      # crosses 0xFFFF -> 0 on both rings
        ring.add([put(mem, BUF + 16 * i, bytes([i]))])
        chain = q.pop()
        assert chain.error is None and bytes(chain.readable[0]) == bytes([i])
        q.push(chain, 0)
        seen += ring.take_used()
    assert len(seen) == 10 and q.last_avail == q.used_idx == (0xFFFE + 10) & 0xFFFF
    assert ring.used_idx == 8


def test_many_requests_through_a_small_ring(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 2)
    q = device_queue(mem, ring)
    for i in range(300):
        ring.add([put(mem, BUF, i.to_bytes(2, "little")), (BUF + 64, 2, True)])
        chain = q.pop()
        scatter(chain.writable, bytes(chain.readable[0])[::-1])
        q.push(chain, 2)
        [(_, n)] = ring.take_used()
        assert n == 2 and mem.read(BUF + 64, 2) == i.to_bytes(2, "big")


# --- notifications --------------------------------------------------------------------------
def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring)
    assert not q.should_notify()             # nothing pushed
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)
    assert q.should_notify()
    assert not q.should_notify()             # nothing new since
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)
    assert not q.should_notify()


def test_event_idx_used_event(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring, event_idx=True)
    ring.set_used_event(2)                   # "interrupt me when used.idx passes 2"
    for _ in range(2):
        ring.add([(BUF, 8, True)])
        q.push(q.pop(), 0)
    assert not q.should_notify()             # used.idx went 0 -> 2: entry 2 not yet written
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)
    assert q.should_notify()                 # 2 -> 3 wrote entry 2
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)
    assert not q.should_notify()             # used_event still 2: already signalled past it
    ring.set_used_event(4)
    ring.add([(BUF, 8, True)])
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)
    q.push(q.pop(), 0)
    assert q.should_notify()                 # one batch 4 -> 6 wrote entry 4


def test_event_idx_across_the_wrap(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring, event_idx=True)
    ring.start_at(0xFFFF)
    q.last_avail = q.used_idx = q._signalled = 0xFFFF
    ring.set_used_event(0)                   # the entry after 0xFFFF
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)                       # used.idx 0xFFFF -> 0: wrote entry 0xFFFF
    assert not q.should_notify()
    ring.add([(BUF, 8, True)])
    q.push(q.pop(), 0)                       # 0 -> 1: wrote entry 0
    assert q.should_notify()


def test_disable_enable_without_event_idx(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring)
    q.disable_notifications()
    assert ring.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert not q.enable_notifications()
    assert ring.used_flags == 0
    q.disable_notifications()
    ring.add([(BUF, 8, True)])               # the race: added while the device was not listening
    assert q.enable_notifications()          # so the device must look again
    assert q.pop() is not None


def test_event_idx_avail_event(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 8)
    q = device_queue(mem, ring, event_idx=True)
    ring.add([(BUF, 8, True)])
    q.pop()
    assert ring.avail_event == 1             # kick me at the next one
    q.disable_notifications()
    ring.add([(BUF, 8, True)])
    q.pop()
    assert ring.avail_event == 1             # suppressed: left behind
    assert ring.used_flags == 0              # EVENT_IDX never uses the flag
    ring.add([(BUF, 8, True)])
    assert q.enable_notifications()          # avail_event = 2, and one is waiting
    assert ring.avail_event == 2
    q.pop()
    assert not q.enable_notifications() and ring.avail_event == 3


# --- hostile rings: the request fails ----------------------------------------------------------
def desc(ring: Ring, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    ring.write_desc(ring.desc, i, addr, length, flags, nxt)


CASES = {
    "loop": ([(0, BUF, 8, VIRTQ_DESC_F_NEXT, 1), (1, BUF, 8, VIRTQ_DESC_F_NEXT, 0)], "chain_too_long"),
    "next_out_of_range": ([(0, BUF, 8, VIRTQ_DESC_F_NEXT, 9)], "next_out_of_range"),
    "outside_ram": ([(0, MEM_SIZE - 4, 8, 0, 0)], "buffer_outside_ram"),
    "far_outside_ram": ([(0, 1 << 40, 8, 0, 0)], "buffer_outside_ram"),
    "wraps": ([(0, (1 << 64) - 4, 8, 0, 0)], "buffer_wraps"),
    "too_large": ([(0, 0, MEM_SIZE, VIRTQ_DESC_F_NEXT, 1), (1, 0, MEM_SIZE, VIRTQ_DESC_F_WRITE, 0)], None),
    "readable_after_writable": ([(0, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (1, BUF, 8, 0, 0)],
                                "readable_after_writable"),
    "readable_after_empty_writable": ([(0, BUF, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (1, BUF, 8, 0, 0)],
                                      "readable_after_writable"),
    "indirect_and_next": ([(0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)], "indirect_with_next"),
    "indirect_len_0": ([(0, 0x8000, 0, VIRTQ_DESC_F_INDIRECT, 0)], "indirect_bad_length"),
    "indirect_len_odd": ([(0, 0x8000, 24, VIRTQ_DESC_F_INDIRECT, 0)], "indirect_bad_length"),
    "indirect_outside_ram": ([(0, MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)], "indirect_outside_ram"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_chain_fails_the_request(mem: GuestMemory, name: str) -> None:
    descs, key = CASES[name]
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring, indirect=True)
    if name == "too_large":
        q.max_bytes = MEM_SIZE  # two 16 MiB buffers: over the bound, both in RAM
        key = "chain_too_large"
    for d in descs:
        desc(ring, *d)
    ring.publish(0)
    chain = q.pop()
    assert isinstance(chain, Chain) and chain.error and chain.head == 0
    assert chain.readable == [] and chain.writable == [] and chain.read_len == chain.write_len == 0
    assert q.errors == {key: 1}, q.errors
    assert not q.broken
    q.push(chain, 0)                         # the device completes it with nothing written
    assert ring.take_used() == [(0, 0)]


def test_nested_indirect_and_loops_inside_a_table(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring, indirect=True)
    table = 0x8000
    ring.write_desc(table, 0, BUF, 8, VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(table, 1, 0x9000, 16, VIRTQ_DESC_F_INDIRECT)
    desc(ring, 0, table, 32, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    assert q.pop().error and q.errors == {"nested_indirect": 1}
    ring.write_desc(table, 1, BUF, 8, VIRTQ_DESC_F_NEXT, 0)   # 0 -> 1 -> 0 inside the table
    ring.publish(0)
    assert q.pop().error and q.errors["chain_too_long"] == 1
    ring.write_desc(table, 1, BUF, 8, VIRTQ_DESC_F_NEXT, 2)   # next outside a 2-entry table
    ring.publish(0)
    assert q.pop().error and q.errors["next_out_of_range"] == 1


def test_descriptor_budget_bounds_a_long_indirect_table(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring, indirect=True)
    n = MAX_DESCRIPTORS + 10
    table = 0x10_0000
    mem.write(table, b"".join(
        (BUF).to_bytes(8, "little") + (1).to_bytes(4, "little") + VIRTQ_DESC_F_NEXT.to_bytes(2, "little")
        + (k + 1).to_bytes(2, "little") for k in range(n)))
    desc(ring, 0, table, 16 * n, VIRTQ_DESC_F_INDIRECT)
    ring.publish(0)
    before = q.descriptors_read
    assert q.pop().error
    assert q.descriptors_read - before == MAX_DESCRIPTORS
    assert q.errors == {"chain_too_long": 1}


# --- hostile rings: the queue breaks ----------------------------------------------------------------
def test_avail_idx_too_far_ahead_breaks_the_queue(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring)
    reasons = []
    q.on_broken = reasons.append
    mem.write_u16(ring.avail + 2, 5)         # five new entries in a four-entry ring
    assert q.pop() is None and q.broken and len(reasons) == 1 and "ahead" in reasons[0]
    assert q.pop() is None and not q.enable_notifications() and not q.should_notify()
    q.push(0, 0)                             # ignored
    assert ring.used_idx == 0 and q.errors == {"avail_idx_overrun": 1}
    q.reset()
    assert not q.broken and not q.ready


def test_head_out_of_range_breaks_the_queue(mem: GuestMemory) -> None:
    ring = Ring(mem, RING, 4)
    q = device_queue(mem, ring)
    ring.publish(7)
    assert q.pop() is None and q.broken and q.errors == {"head_out_of_range": 1}


@pytest.mark.parametrize("size, addrs, key", [
    (3, None, "bad_size"),
    (0, None, "bad_size"),
    (512, None, "bad_size"),                 # above max_size 256
    (8, (RING + 8, RING + 0x800, RING + 0x900), "misaligned_ring"),
    (8, (RING, RING + 0x801, RING + 0x900), "misaligned_ring"),
    (8, (RING, RING + 0x800, RING + 0x902), "misaligned_ring"),
    (8, (MEM_SIZE - 64, RING + 0x800, RING + 0x900), "ring_outside_ram"),
    (8, (RING, RING + 0x800, (1 << 64) - 8), "ring_outside_ram"),
])
def test_enable_refuses_a_bad_layout(mem: GuestMemory, size: int, addrs, key: str) -> None:
    q = Virtqueue(mem, 256)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = addrs or (RING, RING + 0x800, RING + 0x900)
    broken = []
    q.on_broken = broken.append
    assert not q.enable() and q.broken and not q.ready and broken
    assert q.errors == {key: 1}


def test_helpers_slice_gather_scatter() -> None:
    bufs = [memoryview(bytearray(b"abc")), memoryview(bytearray(b"defg")), memoryview(bytearray(b"h"))]
    assert [bytes(v) for v in slice_bufs(bufs, 2, 6)] == [b"c", b"def"]
    assert [bytes(v) for v in slice_bufs(bufs, 7)] == [b"h"]
    assert slice_bufs(bufs, 8) == []
    assert gather(bufs, 1, 5) == b"bcdef"
    assert scatter(bufs, b"XYZWVUTSRQ") == 8 and bytes(bufs[1]) == b"WVUT"


# --- property test: any ring, no exception, bounded work, views only into RAM --------------------
FUZZ_MEM = GuestMemory(MEM_SIZE)
FUZZ_BASE = ctypes.addressof(ctypes.c_char.from_buffer(FUZZ_MEM.regions[0].mm))
TABLE = 0x4000                                # where indirect tables may live

# Mostly the values that matter (RAM edges, 2^32, 2^64 wrap), sometimes anything.
# Good values are repeated so that well-formed chains (and indirect tables) come up often too.
addresses = st.sampled_from([BUF, BUF, BUF, BUF + 0x1001, TABLE, TABLE, 0, MEM_SIZE - 16, MEM_SIZE - 1,
                             MEM_SIZE, 1 << 32, (1 << 64) - 16, (1 << 64) - 1, 0x1234_5678_9ABC])
lengths = st.sampled_from([1, 16, 16, 32, 48, 100, 4096, 0, 15, 17, MEM_SIZE, (1 << 31) + 7, (1 << 32) - 1])
flag_values = st.sampled_from([0, 0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                               VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT,
                               VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 7])
descriptor = st.tuples(addresses, lengths, flag_values, st.one_of(st.integers(0, 3), st.integers(0, 20)))


def view_gpa(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) - FUZZ_BASE


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([1, 2, 4, 8, 16]),
       table=st.lists(descriptor, min_size=1, max_size=16),
       indirect=st.lists(descriptor, min_size=1, max_size=8),
       heads=st.lists(st.one_of(st.integers(0, 15), st.integers(0, 15), st.integers(0, 15), st.integers(0, 0xFFFF)),
                      min_size=1, max_size=16),
       pending=st.integers(0, 16), overrun=st.sampled_from([None, None, None, None, 17, 0x8000, 0xFFFF]),
       start=st.sampled_from([0, 0, 0xFFFE, 0x7FFF]),
       negotiated=st.booleans(), event_idx=st.booleans(), max_bytes=st.sampled_from([1 << 30, 4096]))
def test_hostile_rings_never_raise(size, table, indirect, heads, pending, overrun, start, negotiated, event_idx,
                                   max_bytes) -> None:
    mem = FUZZ_MEM
    ring = Ring(mem, 0x1000, size)
    table = (table * size)[:size]
    for i in range(size):
        ring.write_desc(ring.desc, i, *table[i])
    for i, d in enumerate(indirect):
        ring.write_desc(TABLE, i, *d)
    for k in range(size):
        h = heads[k % len(heads)]
        mem.write_u16(ring.avail + 4 + 2 * ((start + k) % size), h % size if h < 16 else h)
    q = device_queue(mem, ring, event_idx=event_idx, indirect=negotiated)
    ring.start_at(start)
    q.last_avail = q.used_idx = q._signalled = start
    mem.write_u16(ring.avail + 2, (start + (overrun or min(pending, size))) & 0xFFFF)
    q.max_bytes = max_bytes
    # Everything a chain may legitimately point at: the descriptors we wrote.
    described = {(a, n) for a, n, _, _ in table + indirect}
    pops = failed = 0
    for _ in range(size + 2):                # no ring yields more than `size` chains before a push
        before = q.descriptors_read
        chain = q.pop()
        assert q.descriptors_read - before <= MAX_DESCRIPTORS
        if chain is None:
            break
        pops += 1
        assert 0 <= chain.head < size
        if chain.error:
            failed += 1
            assert not chain.readable and not chain.writable
        for v in chain.readable + chain.writable:
            gpa = view_gpa(v)
            assert 0 <= gpa and gpa + len(v) <= MEM_SIZE
            assert (gpa, len(v)) in described
        assert chain.read_len == sum(map(len, chain.readable))
        assert chain.write_len == sum(map(len, chain.writable))
        assert chain.read_len + chain.write_len <= max_bytes
        q.push(chain, chain.write_len)
        q.should_notify()
        q.enable_notifications()
    assert pops <= size
    assert q.error_count == failed + (1 if q.broken else 0)


@settings(max_examples=150, deadline=None)
@given(table=st.lists(st.tuples(st.sampled_from([BUF, BUF + 0x100, TABLE, MEM_SIZE - 8, (1 << 64) - 8]),
                                st.sampled_from([0, 8, 16, 32, 64]),
                                st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                                                 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT]),
                                st.integers(0, 8)), min_size=8, max_size=8),
       indirect=st.lists(st.tuples(st.sampled_from([BUF, BUF + 0x100, TABLE]), st.sampled_from([8, 16, 0]),
                                   st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0,
                                                    VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT]),
                                   st.integers(0, 4)), min_size=4, max_size=4))
def test_chain_walks_are_bounded(table, indirect) -> None:
    """One chain per example, all the effort on its shape: loops, back edges, tables within tables."""
    mem = FUZZ_MEM
    ring = Ring(mem, 0x1000, 8)
    for i, d in enumerate(table):
        ring.write_desc(ring.desc, i, *d)
    for i, d in enumerate(indirect):
        ring.write_desc(TABLE, i, *d)
    ring.publish(0)
    q = device_queue(mem, ring, indirect=True)
    chain = q.pop()
    assert chain is not None and q.descriptors_read <= 8 + 4
    if chain.error is None:
        # A good chain: readable first, all views described, in RAM.
        described = {(a, n) for a, n, _, _ in table + indirect}
        for v in chain.readable + chain.writable:
            assert (view_gpa(v), len(v)) in described
    else:
        assert q.error_count == 1 and not q.broken
