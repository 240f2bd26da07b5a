"""The host end of a disk: a raw image file or a block device, for virtio-blk.

I/O goes straight between the file and the guest's buffers: ``readv`` and
``writev`` hand the memoryviews of guest RAM to ``preadv``/``pwritev``, so
no byte is copied in Python. The image is locked while it is open, the way
QEMU locks its images: an open file description (OFD) lock over the whole
file, exclusive for a writable disk and shared for a read-only one. Two
VMs can then share an image read-only, but never write one another's disk
under them; and because QEMU takes OFD locks on bytes of the same file, a
kvmkit and a QEMU on one image see each other's locks too. Where the
kernel has no OFD locks, ``flock`` stands in (between kvmkits only).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from ..errors import KvmkitError

BLKGETSIZE64 = 0x80081272       # _IOR(0x12, 114, size_t)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
SERIAL_MAX = 20                 # bytes in a virtio-blk ID string

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_ZERO_CHUNK = 1 << 20
_ZEROS = bytes(_ZERO_CHUNK)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class DiskImageError(KvmkitError):
    """A disk image that cannot be used as given."""


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after the first ``n`` bytes were transferred."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def _zero(view: memoryview) -> None:
    for start in range(0, len(view), _ZERO_CHUNK):
        chunk = view[start:start + _ZERO_CHUNK]
        chunk[:] = _ZEROS[:len(chunk)]


class RawImage:
    """A raw disk image, opened and locked; implements the virtio-blk ``BlockBackend``."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 serial: bytes | str | None = None) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        if isinstance(serial, str):
            try:
                serial = serial.encode("ascii")
            except UnicodeEncodeError:
                raise DiskImageError(f"disk serial {serial!r} is not ASCII; use letters, digits and punctuation") from None
        if serial is not None and len(serial) > SERIAL_MAX:
            raise DiskImageError(f"disk serial {serial.decode('ascii', 'replace')!r} is {len(serial)} bytes long; "
                                 f"virtio-blk allows at most {SERIAL_MAX}")
        self.serial = serial
        self.discard_supported = True
        self.fd = -1
        what = f"disk image {self.path}"
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DiskImageError(f"{what} does not exist; create it first (for example with truncate -s 1G) "
                                 "or correct the path") from None
        except OSError as e:
            raise DiskImageError(f"cannot examine {what}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskImageError(f"{what} is not a regular file or a block device; give a raw image file or a disk")
        # O_NONBLOCK: should the path turn into a FIFO between stat and open, the open must not hang.
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags)
        except PermissionError:
            mode = "read-only" if read_only else "for writing"
            raise DiskImageError(f"no permission to open {what} {mode}; fix its permissions"
                                 + ("" if read_only else " or attach it read-only")) from None
        except OSError as e:
            raise DiskImageError(f"cannot open {what}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DiskImageError(f"{what} is not a regular file or a block device; give a raw image file or a disk")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            self._lock(fd)
            if stat.S_ISBLK(st.st_mode):
                self.size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
            else:
                self.size = st.st_size
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _lock(self, fd: int) -> None:
        kind = fcntl.F_RDLCK if self.read_only else fcntl.F_WRLCK
        # struct flock: l_type, l_whence, l_start, l_len (0 = to the end, however it grows), l_pid (0 for OFD)
        arg = struct.pack("@hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, arg)
            return
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise self._in_use() from None
            if e.errno != errno.EINVAL:  # EINVAL: a kernel without OFD locks
                raise DiskImageError(f"cannot lock disk image {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use() from None
        except OSError as e:
            raise DiskImageError(f"cannot lock disk image {self.path}: {e.strerror}") from None

    def _in_use(self) -> DiskImageError:
        return DiskImageError(f"disk image {self.path} is in use by another process (locked); stop the VM "
                              "that has it open, or attach it read-only everywhere")

    # --- BlockBackend ----------------------------------------------------------------
    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        """Fill ``bufs`` from ``offset``; what lies past the end of the file reads as zeros."""
        pending = [b for b in bufs if len(b)]
        done = 0
        while pending:
            n = os.preadv(self.fd, pending[:_IOV_MAX], offset + done)
            if n == 0:  # end of file (it shrank under us): the rest is zeros
                for b in pending:
                    _zero(b)
                    done += len(b)
                break
            done += n
            pending = _advance(pending, n)
        return done

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        pending = [b for b in bufs if len(b)]
        self._check(offset, sum(len(b) for b in pending))
        done = 0
        while pending:
            n = os.pwritev(self.fd, pending[:_IOV_MAX], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "write made no progress")
            done += n
            pending = _advance(pending, n)
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if length == 0:
            return
        if not self.discard_supported:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        try:
            self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                self.discard_supported = False
            raise

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check(offset, length)
        if length == 0:
            return
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if unmap and self.discard_supported:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)  # a hole reads as zeros
        for mode in modes:
            try:
                self._fallocate(mode, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                    raise
        # No fallocate mode for it here (tmpfs has no ZERO_RANGE, for one): write zeros.
        done = 0
        while done < length:
            n = os.pwrite(self.fd, memoryview(_ZEROS)[:min(_ZERO_CHUNK, length - done)], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "write made no progress")
            done += n

    # --- helpers --------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is attached read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset}+{length} is outside the {self.size}-byte image")

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        """Close the image, which also drops its lock."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "RawImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RawImage({self.path!r}, size={getattr(self, 'size', '?')}, read_only={self.read_only})"
