"""virtio-blk (virtio 1.2 §5.2): a disk on one request queue.

Requests are served synchronously, on the thread that delivered the kick,
straight between the backend and guest RAM: ``readv``/``writev`` get the
chain's memoryviews, so data is never copied in Python. A kick drains the
ring in passes of at most one queue's worth, with notifications disabled
meanwhile, and sends one used-buffer notification per pass when the driver
asks for it; after a pass notifications are re-enabled and the ring is
checked again, so a buffer added in between is not left waiting for a kick
that will not come.

Request checks (each fails the request, never the device): the header must
be 16 device-readable bytes and the status the last device-writable byte
(no status byte: the chain is completed with 0 bytes written, as there is
nothing to report into); data must go in the direction of the request (IN:
device-writable only; OUT, DISCARD, WRITE_ZEROES: device-readable only),
be a whole number of 512-byte sectors and lie inside the capacity
(computed on Python integers, so ``sector * 512`` cannot wrap) -- else
IOERR. A write to a read-only disk is IOERR with the disk untouched
(§5.2.6.2 MUST). Unknown types, and DISCARD/WRITE_ZEROES when not
negotiated, are UNSUPP; so are unknown segment flags and ``unmap`` on a
discard (§5.2.6.2 MUSTs), and a backend that cannot discard (EOPNOTSUPP).
Any other backend OSError is IOERR.

When the driver did not accept VIRTIO_BLK_F_FLUSH, every write is made
stable (flushed) before it completes: §5.2.6.2 case 1 makes writes stable
on completion when FLUSH was offered but not negotiated.
"""

from __future__ import annotations

import errno
import struct
from typing import Callable, Protocol

from ...errors import KvmkitError
from ..state import StateReader
from . import VIRTIO_ID_BLOCK
from .device import VirtioDeviceBase
from .queue import Chain, gather, scatter, slice_bufs

# --- feature bits (§5.2.3) ------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- requests (§5.2.6) ------------------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

SECTOR_SIZE = 512
HEADER_SIZE = 16
SEGMENT_SIZE = 16
_HEADER = struct.Struct("<IIQ")    # type, reserved, sector
_SEGMENT = struct.Struct("<QII")   # sector, num_sectors, flags
# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (0x3C bytes)
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")

QUEUE_SIZE = 256
SIZE_MAX = 1 << 20                  # bytes per segment
SEG_MAX = QUEUE_SIZE - 2            # data segments per request (header and status take two)
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR_SIZE
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = (1 << 30) // SECTOR_SIZE
MAX_WRITE_ZEROES_SEG = 1
DISCARD_SECTOR_ALIGNMENT = 4096 // SECTOR_SIZE  # a page: what a file system can punch


class BlockBackend(Protocol):
    """The host end of a disk. Methods raise OSError on failure; ``offset`` and lengths are bytes."""

    size: int
    read_only: bool

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """Fill ``bufs`` from ``offset`` (zeros past the end of the file); returns bytes read."""
        ...

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        """Write ``bufs`` at ``offset`` entirely; returns bytes written."""
        ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (OSError EOPNOTSUPP when the backend cannot)."""
        ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeros; ``unmap`` allows deallocating it."""
        ...


class _Fail(Exception):
    """A request refused with a status (internal: never leaves this module)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


class VirtioBlk(VirtioDeviceBase):
    device_type = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max_size = QUEUE_SIZE

    def __init__(self, backend: BlockBackend, *, serial: bytes | str | None = None,
                 block_size: int = SECTOR_SIZE) -> None:
        super().__init__()
        if block_size < SECTOR_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two of at least 512, not {block_size}")
        if serial is None:
            serial = getattr(backend, "serial", None)
        if isinstance(serial, str):
            serial = serial.encode("ascii", "replace")
        if serial is not None and len(serial) > VIRTIO_BLK_ID_BYTES:
            raise KvmkitError(f"a virtio-blk serial is at most {VIRTIO_BLK_ID_BYTES} bytes, "
                              f"and {serial!r} has {len(serial)}; shorten it")
        self.backend = backend
        self.serial = serial or b""
        self.block_size = block_size
        self.read_only = bool(backend.read_only)
        self.capacity = backend.size // SECTOR_SIZE  # a partial last sector is not addressable
        features = (1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX) | \
                   (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        self.features = features
        # statistics, by request type and by outcome
        self.stats: dict[str, int] = {}
        self.last_error: str | None = None

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,                                  # geometry (not offered)
            self.block_size,
            0, 0, 0, 0,                               # topology (not offered)
            0,                                        # writeback (CONFIG_WCE not offered)
            1,                                        # num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
            1)                                        # write_zeroes_may_unmap

    # --- snapshot (VirtioDeviceBase.save_state: taken under the lock) ----------------------
    _state_name = "the virtio disk"

    def _save_state(self) -> dict[str, object]:
        """What the guest learnt of the disk, so that a restore onto another disk is refused.

        A request is served to the end under the device lock, so none is in
        flight here. The disk's contents are the backend's, not saved.
        """
        return {"capacity": self.capacity, "block_size": self.block_size, "read_only": self.read_only,
                "serial": self.serial.hex()}

    def _check_state(self, state: object) -> Callable[[], None]:
        r = StateReader(state, self._state_name, ("capacity", "block_size", "read_only", "serial"))
        for key, saved, have in (("capacity", r.take_int("capacity", 0, (1 << 64) - 1), self.capacity),
                                 ("block_size", r.take_int("block_size", 0, 1 << 32), self.block_size),
                                 ("read_only", r.take_bool("read_only"), self.read_only),
                                 ("serial", r.take_hex_bytes("serial", VIRTIO_BLK_ID_BYTES), self.serial)):
            r.require(saved == have, key, f"the guest knows {saved!r} and this disk has {have!r}")
        return lambda: None

    # --- queue service (device lock held) -----------------------------------------------
    def _notify(self, index: int) -> None:
        self._serve(index, self._request)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _request(self, chain: Chain) -> int:
        """Serve one request; returns the used length (bytes written into the chain)."""
        if chain.error is not None:
            self._count("bad_chain")
            return 0
        if chain.write_len < 1:
            self._count("no_status")
            self.last_error = "request without a status byte"
            return 0
        status_view = slice_bufs(chain.writable, chain.write_len - 1)[0]
        try:
            status, data_written = self._execute(chain)
        except _Fail as e:
            status, data_written = e.status, 0
            self.last_error = e.reason
        except OSError as e:
            status, data_written = VIRTIO_BLK_S_IOERR, 0
            self.last_error = f"backend error: {e}"
        self._count({VIRTIO_BLK_S_OK: "ok", VIRTIO_BLK_S_IOERR: "ioerr"}.get(status, "unsupp"))
        status_view[0] = status
        return data_written + 1

    def _execute(self, chain: Chain) -> tuple[int, int]:
        if chain.read_len < HEADER_SIZE:
            raise _Fail(VIRTIO_BLK_S_IOERR, "request header shorter than 16 bytes")
        rtype, _reserved, sector = _HEADER.unpack(gather(chain.readable, 0, HEADER_SIZE))
        out_len = chain.read_len - HEADER_SIZE     # device-readable payload
        in_len = chain.write_len - 1               # device-writable payload before the status
        if rtype == VIRTIO_BLK_T_IN:
            self._count("in")
            if out_len:
                raise _Fail(VIRTIO_BLK_S_IOERR, "read request with device-readable data")
            offset = self._range(sector, in_len)
            bufs = slice_bufs(chain.writable, 0, in_len)
            if self.backend.readv(offset, bufs) != in_len:
                raise _Fail(VIRTIO_BLK_S_IOERR, "short read from the backend")
            return VIRTIO_BLK_S_OK, in_len
        if rtype == VIRTIO_BLK_T_OUT:
            self._count("out")
            self._writable_check(in_len, "write")
            offset = self._range(sector, out_len)
            bufs = slice_bufs(chain.readable, HEADER_SIZE)
            if self.backend.writev(offset, bufs) != out_len:
                raise _Fail(VIRTIO_BLK_S_IOERR, "short write to the backend")
            if not self.has(VIRTIO_BLK_F_FLUSH):
                self.backend.flush()
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self._count("flush")
            if not self.read_only:
                self.backend.flush()
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            self._count("get_id")
            if out_len:
                raise _Fail(VIRTIO_BLK_S_IOERR, "GET_ID with device-readable data")
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:in_len]
            return VIRTIO_BLK_S_OK, scatter(slice_bufs(chain.writable, 0, in_len), ident)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            discard = rtype == VIRTIO_BLK_T_DISCARD
            self._count("discard" if discard else "write_zeroes")
            feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
            if not self.has(feature):
                raise _Fail(VIRTIO_BLK_S_UNSUPP, "discard/write-zeroes not negotiated")
            self._writable_check(in_len, "discard/write-zeroes")
            self._ranges(chain, out_len, discard)
            return VIRTIO_BLK_S_OK, 0
        self._count("other")
        raise _Fail(VIRTIO_BLK_S_UNSUPP, f"request type {rtype} is not supported")

    def _writable_check(self, in_len: int, what: str) -> None:
        if self.read_only:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"{what} on a read-only disk")
        if in_len:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"{what} request with device-writable data")

    def _range(self, sector: int, length: int) -> int:
        """Byte offset of a sector range, after checking it is whole sectors inside the disk."""
        if length % SECTOR_SIZE:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"data length {length} is not a multiple of 512")
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{length // SECTOR_SIZE} are past the "
                        f"capacity of {self.capacity}")
        return sector * SECTOR_SIZE

    def _ranges(self, chain: Chain, out_len: int, discard: bool) -> None:
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if out_len == 0 or out_len % SEGMENT_SIZE or out_len // SEGMENT_SIZE > max_seg:
            raise _Fail(VIRTIO_BLK_S_IOERR, f"{out_len} bytes are not 1..{max_seg} segments")
        raw = gather(chain.readable, HEADER_SIZE, out_len)
        segments = [_SEGMENT.unpack_from(raw, i) for i in range(0, out_len, SEGMENT_SIZE)]
        for sector, count, flags in segments:  # validate all before touching the disk
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _Fail(VIRTIO_BLK_S_UNSUPP, f"unknown segment flags {flags:#x}")
            if discard and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                raise _Fail(VIRTIO_BLK_S_UNSUPP, "unmap flag on a discard")
            if count > max_sectors:
                raise _Fail(VIRTIO_BLK_S_IOERR, f"segment of {count} sectors exceeds {max_sectors}")
            self._range(sector, count * SECTOR_SIZE)
        for sector, count, flags in segments:
            if count == 0:
                continue
            try:
                if discard:
                    self.backend.discard(sector * SECTOR_SIZE, count * SECTOR_SIZE)
                else:
                    self.backend.write_zeroes(sector * SECTOR_SIZE, count * SECTOR_SIZE,
                                              bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise _Fail(VIRTIO_BLK_S_UNSUPP, "the backend cannot discard") from None
                raise
        if not self.has(VIRTIO_BLK_F_FLUSH) and not discard:
            self.backend.flush()
