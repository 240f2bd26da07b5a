"""A host tap device as a network backend: the guest's frames on a host interface (``--net tap``).

``/dev/net/tun`` opened with TUNSETIFF ``IFF_TAP | IFF_NO_PI``: each
read() is one Ethernet frame from the host, each write() one frame to it,
with no packet-information prefix and no virtio-net header (IFF_VNET_HDR
would only carry offloads, and kvmkit offers none). The descriptor is
non-blocking and lives on the host loop.

The interface is the user's to configure (address, bridge, ``ip link set
dev NAME up``). kvmkit creates it if it does not exist, and the kernel
removes an interface created that way when kvmkit closes it; a persistent
tap made beforehand (``ip tuntap add dev NAME mode tap user USER``) stays
and needs no privilege to open. Creating one needs CAP_NET_ADMIN.

Transmit writes each frame straight from the guest's buffers (``writev``
on the views, no copy). If the kernel ever answers EAGAIN, frames are
copied into an output queue bounded by ``out_limit`` bytes, and once that
is full :meth:`TapBackend.write_frames` takes fewer frames than offered
(back pressure). A frame the kernel refuses (for one, an interface that is
down answers EIO) is dropped and counted in ``tx_errors``; a frame from the
host larger than ``max_frame`` is dropped and counted in ``rx_oversize``.
If the interface is deleted under kvmkit (EBADFD) the backend goes down.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import struct
from typing import Sequence

from ..errors import KvmkitError
from .netstream import MAX_FRAME, OUT_LIMIT

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA        # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags, the rest of the union


def valid_ifname(name: str) -> bool:
    """A name the kernel accepts for an interface (dev_valid_name): 1 to 15 bytes, no '/', ':' or space."""
    raw = name.encode()
    return (0 < len(raw) < IFNAMSIZ and name not in (".", "..") and name.isprintable()
            and not any(c in name for c in "/:") and not any(c.isspace() for c in name))


class TapBackend:
    """A network backend over a tap interface (non-blocking; its owner serialises calls)."""

    kind = "tap"

    def __init__(self, ifname: str | None = None, *, name: str = "net", max_frame: int = MAX_FRAME,
                 out_limit: int = OUT_LIMIT, path: str = TUN_PATH) -> None:
        if ifname is not None and not valid_ifname(ifname):
            raise KvmkitError(f"tap name {ifname!r} is not an interface name; use 1 to 15 letters, digits, '-' or '_'.")
        self.name = name
        self.max_frame = max_frame
        self.out_limit = max(out_limit, max_frame)
        self.fd, self.ifname = _open_tap(ifname, path)
        self._rx = bytearray(max_frame + 1)  # one byte more than a frame may have: a longer one shows
        self._rx_view = memoryview(self._rx)
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self.down: str | None = None
        self.rx_frames = 0
        self.rx_bytes = 0
        self.rx_oversize = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.tx_errors = 0
        self.tx_dropped = 0
        self.last_error: str | None = None

    def fileno(self) -> int:
        return self.fd

    def describe(self) -> str:
        return f"tap {self.ifname}"

    def why_down(self) -> str | None:
        return self.down

    # --- receive ------------------------------------------------------------------------
    def read_frame(self) -> memoryview | None:
        """The next frame the host sent to the interface, or None (valid until the next call)."""
        while self.down is None:
            try:
                n = os.readv(self.fd, [self._rx])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
                    self._go_down(f"the interface went away ({e.strerror})")
                else:
                    self.last_error = f"read: {e.strerror}"
                return None
            if n == 0:
                return None
            if n > self.max_frame:
                self.rx_oversize += 1
                continue
            self.rx_frames += 1
            self.rx_bytes += n
            return self._rx_view[:n]
        return None

    def buffered_frame(self) -> bool:
        return False  # frames wait in the kernel, which makes the fd readable

    # --- transmit -----------------------------------------------------------------------
    @property
    def output_pending(self) -> bool:
        return bool(self._out)

    def write_frames(self, frames: Sequence[Sequence[memoryview]]) -> int:
        """Write frames in order (one writev each) or queue them while the bound allows; returns frames taken."""
        if self.down is not None:
            self.tx_dropped += len(frames)
            return len(frames)
        taken = 0
        if not self._out:
            for frame in frames:
                try:
                    self._write(frame)
                except BlockingIOError:
                    break
                taken += 1
                if self.down is not None:  # the interface went away: the rest is dropped, and counted
                    self.tx_dropped += len(frames) - taken
                    return len(frames)
        while taken < len(frames):
            size = sum(len(v) for v in frames[taken])
            if self._out_bytes + size > self.out_limit:
                break
            self._out.append(b"".join(frames[taken]))
            self._out_bytes += size
            taken += 1
        return taken

    def _write(self, frame: Sequence[memoryview | bytes]) -> None:
        """One frame to the interface; a refusal other than EAGAIN drops it (counted)."""
        size = sum(len(v) for v in frame)
        while True:
            try:
                os.writev(self.fd, frame)
            except InterruptedError:
                continue
            except BlockingIOError:
                raise
            except OSError as e:
                if e.errno in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
                    self._go_down(f"the interface went away ({e.strerror})")
                self.tx_errors += 1
                self.last_error = f"write: {e.strerror}"
                return
            self.tx_frames += 1
            self.tx_bytes += size
            return

    def flush(self) -> bool:
        """Write queued frames; True once none is left."""
        while self._out and self.down is None:
            frame = self._out[0]
            try:
                self._write([frame])
            except BlockingIOError:
                return False
            self._out.popleft()
            self._out_bytes -= len(frame)
        if self.down is not None:
            self.tx_dropped += len(self._out)
            self._out.clear()
            self._out_bytes = 0
        return not self._out

    def _go_down(self, why: str) -> None:
        if self.down is None:
            self.down = why

    def counters(self) -> dict[str, int]:
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes, "tx_errors": self.tx_errors,
                "tx_dropped": self.tx_dropped, "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
                "rx_oversize": self.rx_oversize}

    def close(self) -> None:
        if self.fd >= 0:
            if self.down is None:
                self.down = "closed by kvmkit"
            os.close(self.fd)
            self.fd = -1


def _open_tap(ifname: str | None, path: str) -> tuple[int, str]:
    """Open ``path`` (/dev/net/tun) as tap ``ifname`` (None: the kernel names it tapN); (fd, its name)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmkitError(f"{path} does not exist, so no tap device can be made; load the tun module "
                          "(modprobe tun), or use --net user.") from None
    except PermissionError:
        raise KvmkitError(f"cannot open {path}: permission denied; --net tap needs CAP_NET_ADMIN or a tap "
                          "made for your user, or use --net user.") from None
    except OSError as e:
        raise KvmkitError(f"cannot open {path}: {e.strerror}; use --net user instead.") from None
    label = ifname or "a new tap"
    try:
        reply = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack((ifname or "").encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise KvmkitError(f"creating {label} needs CAP_NET_ADMIN; run kvmkit as root, or make the tap for "
                              "your user first (ip tuntap add dev NAME mode tap user USER) and give ifname=NAME, "
                              "or use --net user.") from None
        if e.errno == errno.EBUSY:
            raise KvmkitError(f"the tap device {ifname} is in use by another process; give another ifname=.") from None
        if e.errno == errno.EINVAL:
            raise KvmkitError(f"{ifname} exists and is not a tap device kvmkit can use; give another "
                              "ifname=.") from None
        raise KvmkitError(f"cannot set up {label}: {e.strerror}.") from None
    name = _IFREQ.unpack(reply)[0].rstrip(b"\0").decode(errors="replace")
    return fd, name
