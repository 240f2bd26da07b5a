"""Reading the files a user names (kernel, initrd) without trusting them.

A path may name a FIFO, a device such as /dev/zero, or a file far larger
than the VM: each would make a plain ``read_bytes()`` block or take the
host's memory. The file is opened once, checked to be a regular file of a
size that can be used, and read from that same descriptor, so a file
swapped in between the check and the read changes nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import KvmkitError


def read_user_file(path: str | Path, what: str, limit: int, error: type[KvmkitError] = KvmkitError) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes; one sentence (``error``) for anything else."""
    try:
        return _read(path, what, limit)
    except KvmkitError as e:
        raise error(str(e)) from None


def _read(path: str | Path, what: str, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KvmkitError(f"{what} file {path} does not exist; check the path.") from None
    except PermissionError:
        raise KvmkitError(f"cannot read {what} file {path}: permission denied.") from None
    except OSError as e:
        raise KvmkitError(f"cannot open {what} file {path}: {e.strerror}.") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise KvmkitError(f"{what} {path} is a directory, not a file; give the image file.")
        if not stat.S_ISREG(st.st_mode):
            raise KvmkitError(f"{what} {path} is not a regular file (a device, FIFO or socket); give an image file.")
        if st.st_size > limit:
            raise KvmkitError(f"{what} file {path} is {st.st_size / (1 << 20):.1f} MiB, more than the "
                              f"{limit / (1 << 20):.0f} MiB it may take here; give the VM more memory with --mem or use a smaller file.")
        chunks = []
        left = st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break  # the file shrank while we read: use what is there
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise KvmkitError(f"cannot read {what} file {path}: {e.strerror}.") from None
    finally:
        os.close(fd)
