"""Split virtqueues (virtio 1.2 §2.7) over guest RAM, for a guest that may be hostile.

The device side of the ring only: :meth:`Virtqueue.pop` hands a device the
next available descriptor chain as zero-copy memoryviews of guest RAM,
split into the device-readable and the device-writable parts;
:meth:`Virtqueue.push` returns it through the used ring;
:meth:`Virtqueue.should_notify` and the enable/disable pair implement both
notification-suppression schemes (the ring flags, or EVENT_IDX's
used_event/avail_event with the ``vring_need_event`` arithmetic).

Ring memory is mapped once, when the driver enables the queue, as views of
guest RAM; every later ring access is an index into those views (or a
``struct.unpack_from`` on them), so it cannot leave the ring however the
guest sets its indices. The 16- and 32-bit ring fields the driver polls
(``used.idx``, used elements, ``avail_event``) are written through
native-order ``cast`` views: one aligned store each, never torn byte by
byte. That needs a little-endian host, which every KVM host kvmkit runs on
(x86-64) is.

Ordering. x86 keeps loads in order and stores in order, and CPython does
not reorder our calls, so "read avail.idx, then the ring entry, then the
descriptors" and "write the used element, then used.idx" need no fence.
The two store-then-load sequences do: publishing used.idx before reading
used_event/the NO_INTERRUPT flag, and publishing avail_event/clearing
NO_NOTIFY before re-reading avail.idx. Both take a full fence (a locked
instruction, see ``_full_fence``), as the driver's side does with its mb().

Hostile rings. Two outcomes, chosen by whether the ring itself can still be
trusted:

* **Request failed** -- the chain is bad but its head index is valid, so it
  can be completed and the ring stays consistent. ``pop`` returns a
  :class:`Chain` with ``error`` set and no buffers; the device completes it
  with ``push(chain, 0)`` (it cannot write a status it has no buffer for).
  Cases: a chain longer than the queue size (which is what a loop becomes),
  longer than its indirect table, or longer than ``max_descriptors`` in all
  (1024 by default, the limit vhost and QEMU apply; the spec allows "a
  reasonable limit", §2.7.4.1); a NEXT index outside its table; an INDIRECT
  descriptor inside an indirect table, with NEXT also set, or without
  VIRTIO_F_INDIRECT_DESC negotiated; an indirect table whose length is 0 or
  not a multiple of 16, or that is not in RAM; a buffer not in RAM or whose
  end wraps past 2^64; a total length over ``max_bytes`` (1 GiB by default:
  over what our devices advertise -- virtio-blk's seg_max * size_max is
  254 MiB -- and far under the spec's 2^32, so that the used ``len`` always
  fits); a device-readable descriptor after a device-writable one (§2.7.4.2
  says the driver MUST NOT; accepting it would let a device write into a
  buffer the driver meant to be read-only). Zero-length descriptors are
  legal and skipped (no view, no RAM check).
* **Queue broken** -- the ring's indices cannot be trusted, so nothing
  popped from it could be completed safely. The queue stops (``pop``
  returns None, pushes are ignored) and ``on_broken`` is called once; the
  transport then sets DEVICE_NEEDS_RESET and sends a configuration change
  notification (§2.1.2), and only a device reset revives the queue. Cases:
  avail.idx more than the queue size ahead of the last index seen; an
  available-ring entry naming a descriptor >= queue size (no chain head to
  complete); and, at enable, a size that is not a power of two in
  1..max_size, a misaligned part or a part not in RAM.

Each error is counted in :attr:`Virtqueue.errors` under a fixed reason key
(a bounded dict, whatever the guest does), with the last message kept in
:attr:`Virtqueue.last_error`. Nothing a guest writes makes a method here
raise; the work of one ``pop`` is bounded by ``max_descriptors`` descriptor
reads.

Threading: a Virtqueue is not locked. Its device uses it under the
device's lock; the transport configures it only while the device is not
active (before DRIVER_OK, or after the device's ``reset`` returned).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import Callable, Iterable, Protocol, Sequence

from ...errors import GuestMemoryError
from ..state import StateReader
from . import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

DESC_SIZE = 16
MAX_DESCRIPTORS = 1024       # descriptors walked per chain, direct and indirect together
MAX_BYTES = 1 << 30          # total buffer length per chain
_U64_END = 1 << 64
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next

_VQ_KEYS = ("size", "desc_addr", "avail_addr", "used_addr", "event_idx", "indirect", "ready", "broken",
            "last_avail_idx", "used_idx", "signalled_used_idx", "notifications_suppressed")

# A locked instruction (the uncontended lock's compare-and-swap) is a full
# barrier on x86: it orders our store to the ring before the load after it.
_FENCE = threading.Lock()


def _full_fence() -> None:
    with _FENCE:
        pass


class GuestRam(Protocol):
    """The part of :class:`kvmkit.memory.GuestMemory` a queue needs."""

    def view(self, gpa: int, size: int) -> memoryview: ...


class Chain:
    """One popped descriptor chain.

    ``readable``/``writable`` are views of guest RAM in chain order;
    ``read_len``/``write_len`` their totals. ``error`` is None for a good
    chain, else why it was refused (then both lists are empty).
    """

    __slots__ = ("head", "readable", "writable", "read_len", "write_len", "error")

    def __init__(self, head: int, readable: list[memoryview] | None = None,
                 writable: list[memoryview] | None = None, read_len: int = 0,
                 write_len: int = 0, error: str | None = None) -> None:
        self.head = head
        self.readable = readable if readable is not None else []
        self.writable = writable if writable is not None else []
        self.read_len = read_len
        self.write_len = write_len
        self.error = error

    def __repr__(self) -> str:
        if self.error:
            return f"Chain(head={self.head}, error={self.error!r})"
        return f"Chain(head={self.head}, read={self.read_len}, write={self.write_len})"


class Virtqueue:
    """The device side of one split virtqueue.

    The transport sets ``size``, ``desc_addr``, ``avail_addr``,
    ``used_addr``, ``event_idx`` and ``indirect`` and then calls
    :meth:`enable`; :meth:`reset` returns everything to its state at
    creation.
    """

    def __init__(self, mem: GuestRam, max_size: int = 256, *, index: int = 0,
                 max_descriptors: int = MAX_DESCRIPTORS, max_bytes: int = MAX_BYTES) -> None:
        if not (1 <= max_size <= MAX_QUEUE_SIZE and max_size & (max_size - 1) == 0):
            raise ValueError(f"virtqueue max_size must be a power of two up to {MAX_QUEUE_SIZE}, not {max_size}")
        self.mem = mem
        self.index = index
        self.max_size = max_size
        self.max_descriptors = max_descriptors
        self.max_bytes = max_bytes
        self.on_broken: Callable[[str], None] | None = None
        # statistics (never reset: they describe the VM's life)
        self.errors: dict[str, int] = {}
        self.last_error: str | None = None
        self.descriptors_read = 0
        self.popped = 0
        self.pushed = 0
        self.reset()

    # --- configuration (transport) ------------------------------------------------
    def reset(self) -> None:
        """Forget the ring: back to disabled, maximum size, addresses 0."""
        self.size = self.max_size
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.ready = False
        self.broken = False
        self.last_avail = 0           # free-running u16: next avail ring slot to read
        self.used_idx = 0             # free-running u16: next used ring slot to write
        self._signalled = 0           # used_idx at the last should_notify()
        self._suppressed = False      # between disable_notifications() and enable_notifications()
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None    # u16 view: flags, idx, ring[size], used_event
        self._used16: memoryview | None = None   # u16 view: flags, idx, ..., avail_event
        self._used32: memoryview | None = None   # u32 view of the used elements: id, len pairs
        self._used_event = 0                     # index of used_event in _avail
        self._avail_event = 0                    # index of avail_event in _used16

    def enable(self) -> bool:
        """Validate the driver's layout and map the ring; False (queue broken) if it is unusable."""
        size = self.size
        problem = self._layout_problem(size, self.desc_addr, self.avail_addr, self.used_addr)
        if problem is not None:
            return self._break(*problem)
        views = self._map(size, self.desc_addr, self.avail_addr, self.used_addr, self.event_idx)
        if views is None:
            return self._break("ring_outside_ram", "a ring part is not in guest RAM "
                               f"(desc {self.desc_addr:#x}, avail {self.avail_addr:#x}, used {self.used_addr:#x}, size {size})")
        self._install(size, views)
        self.ready = True
        # The device owns the used ring's flags and avail_event: start them clean.
        self._used16[0] = 0
        if self.event_idx:
            self._used16[self._avail_event] = self.last_avail
        return True

    def _layout_problem(self, size: int, desc: int, avail: int, used: int) -> tuple[str, str] | None:
        """(error key, message) for a ring the queue cannot use, else None."""
        if not (1 <= size <= self.max_size and size & (size - 1) == 0):
            return "bad_size", f"queue size {size} is not a power of two in 1..{self.max_size}"
        if desc % 16 or avail % 2 or used % 4:
            return "misaligned_ring", ("ring parts are not aligned to 16/2/4 bytes "
                                       f"(desc {desc:#x}, avail {avail:#x}, used {used:#x})")
        return None

    def _map(self, size: int, desc: int, avail: int, used: int,
             event_idx: bool) -> tuple[memoryview, memoryview, memoryview] | None:
        """Views of the three ring parts (nothing is read or written), or None if one is not in RAM."""
        extra = 2 if event_idx else 0
        try:
            return (self.mem.view(desc, DESC_SIZE * size), self.mem.view(avail, 4 + 2 * size + extra),
                    self.mem.view(used, 4 + 8 * size + extra))
        except (GuestMemoryError, ValueError, OverflowError):
            return None

    def _install(self, size: int, views: tuple[memoryview, memoryview, memoryview]) -> None:
        desc, avail, used = views
        self._desc = desc
        self._avail = avail.cast("H")
        self._used16 = used.cast("H")
        self._used32 = used[4:4 + 8 * size].cast("I")
        self._used_event = 2 + size
        self._avail_event = 2 + 4 * size

    # --- snapshot ---------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """The ring's layout and the device's side of it: the indices and the notification state.

        The ring itself is guest RAM. Not saved: the statistics, the error
        tallies and ``on_broken`` (the transport's callback).
        """
        return {"size": self.size, "desc_addr": self.desc_addr, "avail_addr": self.avail_addr,
                "used_addr": self.used_addr, "event_idx": self.event_idx, "indirect": self.indirect,
                "ready": self.ready, "broken": self.broken, "last_avail_idx": self.last_avail,
                "used_idx": self.used_idx, "signalled_used_idx": self._signalled,
                "notifications_suppressed": self._suppressed}

    def check_state(self, state: object) -> Callable[[], None]:
        """Validate a saved state without changing the queue; returns the function that loads it.

        Split from :meth:`load_state` so that a transport can check every
        queue before it changes any. A ready queue's ring must be mappable
        here (views only: no RAM is read or written, the ring is as saved).
        """
        r = StateReader(state, f"virtqueue {self.index}", _VQ_KEYS)
        size = r.take_int("size", 0, 0xFFFF)
        desc, avail, used = (r.take_int(k, 0, (1 << 64) - 1) for k in ("desc_addr", "avail_addr", "used_addr"))
        event_idx, indirect, ready, broken, suppressed = (r.take_bool(k) for k in (
            "event_idx", "indirect", "ready", "broken", "notifications_suppressed"))
        last_avail, used_idx, signalled = (r.take_int(k, 0, 0xFFFF) for k in (
            "last_avail_idx", "used_idx", "signalled_used_idx"))
        r.require(not (ready and broken), "ready", "a broken queue is never ready")
        views = None
        if ready:
            problem = self._layout_problem(size, desc, avail, used)
            r.require(problem is None, "ready", f"a ready queue has a usable ring, and {problem and problem[1]}")
            views = self._map(size, desc, avail, used, event_idx)
            r.require(views is not None, "ready", "a ready queue's ring is in guest RAM")

        def load() -> None:
            self.reset()
            self.size, self.desc_addr, self.avail_addr, self.used_addr = size, desc, avail, used
            self.event_idx, self.indirect, self.ready, self.broken = event_idx, indirect, ready, broken
            self.last_avail, self.used_idx, self._signalled, self._suppressed = last_avail, used_idx, signalled, suppressed
            if views is not None:
                self._install(size, views)
        return load

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the queue :meth:`save_state` described; StateError (and no change) if it is damaged."""
        self.check_state(state)()

    # --- device API -----------------------------------------------------------------
    def available(self) -> int:
        """How many chains the driver has made available and we have not popped (0 when not usable)."""
        if self._avail is None or self.broken:
            return 0
        return (self._avail[1] - self.last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next available chain, or None when there is none (or the queue is broken)."""
        avail = self._avail
        if avail is None or self.broken:
            return None
        idx = avail[1]
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            self._break("avail_idx_overrun", f"avail.idx {idx} is {pending} entries ahead of "
                        f"{self.last_avail} in a {self.size}-entry queue")
            return None
        head = avail[2 + (self.last_avail & (self.size - 1))]
        if head >= self.size:
            self._break("head_out_of_range", f"available ring entry {self.last_avail} names descriptor "
                        f"{head} of a {self.size}-entry table")
            return None
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx and not self._suppressed:
            # Ask for a kick at the next buffer the driver adds.
            self._used16[self._avail_event] = self.last_avail
        self.popped += 1
        return self._walk(head)

    def push(self, chain: Chain | int, written: int = 0) -> None:
        """Return a chain (or a head index) to the driver, saying ``written`` bytes were written."""
        used32 = self._used32
        if used32 is None or self.broken:
            return
        if isinstance(chain, Chain):
            head = chain.head
            written = min(max(written, 0), chain.write_len)
        else:
            head = chain
            written = min(max(written, 0), 0xFFFF_FFFF)
        if not 0 <= head < self.size:
            self._count("bad_push", f"device pushed head {head} to a {self.size}-entry queue")
            return
        slot = self.used_idx & (self.size - 1)
        used32[2 * slot] = head
        used32[2 * slot + 1] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx  # publishes the element written above (stores stay ordered)
        self.pushed += 1

    def should_notify(self) -> bool:
        """After a batch of pushes: does the driver want a used-buffer notification now?"""
        avail = self._avail
        if avail is None or self.broken:
            return False
        new, old = self.used_idx, self._signalled
        self._signalled = new
        if new == old:
            return False
        _full_fence()  # our used.idx store before the driver's suppression fields are read
        if self.event_idx:
            event = avail[self._used_event]
            # vring_need_event: did used.idx step past used_event during this batch?
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        """Tell the driver not to kick while the device is draining the ring anyway."""
        self._suppressed = True
        if self._used16 is not None and not self.event_idx and not self.broken:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY
        # With EVENT_IDX, leaving avail_event behind is the suppression.

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (pop them: no kick will come for them)."""
        self._suppressed = False
        used16 = self._used16
        if used16 is None or self.broken:
            return False
        if self.event_idx:
            used16[self._avail_event] = self.last_avail
        else:
            used16[0] = 0
        _full_fence()  # our store before the re-read of avail.idx, or a kick could be lost
        return self._avail[1] != self.last_avail

    # --- chain walking --------------------------------------------------------------
    def _walk(self, head: int) -> Chain:
        table = self._desc
        table_len = self.size
        index = head
        in_table = False          # walking an indirect table
        steps = 0                 # descriptors in the current table
        budget = self.max_descriptors
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        seen_write = False
        mem = self.mem
        while True:
            if budget == 0:
                return self._fail(head, "chain_too_long", f"chain from {head} has more than "
                                  f"{self.max_descriptors} descriptors")
            budget -= 1
            steps += 1
            if steps > table_len:
                return self._fail(head, "chain_too_long", f"chain from {head} loops or is longer than its "
                                  f"{table_len}-entry {'indirect table' if in_table else 'queue'}")
            addr, length, flags, nxt = _DESC.unpack_from(table, index * DESC_SIZE)
            self.descriptors_read += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_table:
                    return self._fail(head, "nested_indirect", "indirect descriptor inside an indirect table")
                if not self.indirect:
                    return self._fail(head, "indirect_not_negotiated", "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    return self._fail(head, "indirect_with_next", "descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    return self._fail(head, "indirect_bad_length", f"indirect table length {length} is not a "
                                      "non-zero multiple of 16")
                if addr + length > _U64_END:
                    return self._fail(head, "buffer_wraps", f"indirect table at {addr:#x} wraps past 2^64")
                try:
                    table = mem.view(addr, length)
                except (GuestMemoryError, ValueError, OverflowError):
                    return self._fail(head, "indirect_outside_ram", f"indirect table {addr:#x}+{length:#x} is not in RAM")
                table_len = length // DESC_SIZE
                index = 0
                steps = 0
                in_table = True
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                seen_write = True
                if length:
                    view = self._buffer(addr, length)
                    if view is None:
                        return self._fail(head, *self._buffer_error(addr, length))
                    writable.append(view)
                    write_len += length
            else:
                if seen_write:
                    return self._fail(head, "readable_after_writable", "device-readable descriptor after a "
                                      "device-writable one")
                if length:
                    view = self._buffer(addr, length)
                    if view is None:
                        return self._fail(head, *self._buffer_error(addr, length))
                    readable.append(view)
                    read_len += length
            if read_len + write_len > self.max_bytes:
                return self._fail(head, "chain_too_large", f"chain from {head} is longer than "
                                  f"{self.max_bytes} bytes")
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, read_len, write_len)
            if nxt >= table_len:
                return self._fail(head, "next_out_of_range", f"next index {nxt} outside a {table_len}-entry "
                                  f"{'indirect table' if in_table else 'queue'}")
            index = nxt
        # (the loop only ends by returning)

    def _buffer(self, addr: int, length: int) -> memoryview | None:
        if addr + length > _U64_END:
            return None
        try:
            return self.mem.view(addr, length)
        except (GuestMemoryError, ValueError, OverflowError):
            return None

    @staticmethod
    def _buffer_error(addr: int, length: int) -> tuple[str, str]:
        if addr + length > _U64_END:
            return "buffer_wraps", f"buffer {addr:#x}+{length:#x} wraps past 2^64"
        return "buffer_outside_ram", f"buffer {addr:#x}+{length:#x} is not in RAM"

    # --- errors -----------------------------------------------------------------------
    def _count(self, key: str, message: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1
        self.last_error = f"queue {self.index}: {message}"

    def _fail(self, head: int, key: str, message: str) -> Chain:
        self._count(key, message)
        return Chain(head, error=message)

    def _break(self, key: str, message: str) -> bool:
        self._count(key, message)
        if not self.broken:
            self.broken = True
            self.ready = False
            self._desc = self._avail = self._used16 = self._used32 = None
            if self.on_broken is not None:
                self.on_broken(self.last_error or message)
        return False

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# --- helpers for devices: byte ranges of a buffer list, without copying data ----------
def slice_bufs(bufs: Sequence[memoryview], start: int, stop: int | None = None) -> list[memoryview]:
    """The views covering bytes [start, stop) of the concatenation of ``bufs`` (zero-copy)."""
    out: list[memoryview] = []
    pos = 0
    for b in bufs:
        n = len(b)
        if stop is not None and pos >= stop:
            break
        if pos + n > start:
            lo = start - pos if start > pos else 0
            hi = n if stop is None else min(stop - pos, n)
            if hi > lo:
                out.append(b if (lo == 0 and hi == n) else b[lo:hi])
        pos += n
    return out


def gather(bufs: Iterable[memoryview], start: int, length: int) -> bytes:
    """Copy ``length`` bytes from offset ``start`` (for small headers; short if the buffers end)."""
    return b"".join(bytes(v) for v in slice_bufs(list(bufs), start, start + length))


def scatter(bufs: Iterable[memoryview], data: bytes | bytearray | memoryview) -> int:
    """Copy ``data`` into ``bufs`` in order; returns how many bytes fitted."""
    src = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    off = 0
    total = len(src)
    for b in bufs:
        if off >= total:
            break
        n = min(len(b), total - off)
        b[:n] = src[off:off + n]
        off += n
    return off


def total_len(bufs: Iterable[memoryview]) -> int:
    return sum(len(b) for b in bufs)
