"""timerfd(2) through ctypes: the host timer behind the PV clock event device.

Python's standard library has no timerfd, and the device needs an absolute
CLOCK_MONOTONIC expiry (TFD_TIMER_ABSTIME): the guest hands over a deadline,
not a delay, and converting it to a relative time would add the very drift
the device exists to avoid.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_timerfd_create = _libc.timerfd_create
_timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_timerfd_create.restype = ctypes.c_int
_timerfd_settime = _libc.timerfd_settime
_timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_timerfd_settime.restype = ctypes.c_int


class TimerFd:
    """A non-blocking one-shot CLOCK_MONOTONIC timerfd armed at absolute times (ns)."""

    def __init__(self) -> None:
        fd = _timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self._spec = _itimerspec()
        self._ptr = ctypes.addressof(self._spec)

    def set_abs(self, ns: int) -> None:
        """Arm for CLOCK_MONOTONIC time ``ns``; 0 disarms (a past time > 0 expires at once)."""
        v = self._spec.it_value
        v.tv_sec, v.tv_nsec = divmod(max(ns, 0), 1_000_000_000)
        if _timerfd_settime(self.fd, TFD_TIMER_ABSTIME, self._ptr, None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def read(self) -> int:
        """Expirations since the last read; 0 when none (the timer was re-armed meanwhile)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
