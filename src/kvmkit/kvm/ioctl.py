"""ioctl request numbers, computed the way <asm-generic/ioctl.h> encodes them.

Numbers are derived from direction, type, number and the ctypes size of the
argument structure, so a mistake in a structure shows up as a wrong request
number too (and the ABI test compares both against the C headers).
"""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit the size field")
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _size(arg: type | int) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def IO(nr: int, typ: int = KVMIO) -> int:
    return _ioc(_IOC_NONE, typ, nr, 0)


def IOR(nr: int, arg: type | int, typ: int = KVMIO) -> int:
    return _ioc(_IOC_READ, typ, nr, _size(arg))


def IOW(nr: int, arg: type | int, typ: int = KVMIO) -> int:
    return _ioc(_IOC_WRITE, typ, nr, _size(arg))


def IOWR(nr: int, arg: type | int, typ: int = KVMIO) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, _size(arg))
