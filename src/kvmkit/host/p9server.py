"""A 9P2000.L file server for one host directory, the host half of ``--share``.

The virtio-9p device hands :meth:`P9Server.handle` one request message at a
time and puts the reply it returns on the queue. The server answers every
request: a malformed one gets Rlerror with its tag, and only a buffer too
short to hold a tag gets nothing (``dropped`` counts those).

The guest is untrusted, so the server never resolves a guest-supplied path
as a path. The root is held as an ``O_PATH`` directory fd; every fid holds
an ``O_PATH`` fd of its own and the tuple of names that led to it from the
root. A walk opens one name at a time relative to the parent's fd with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``
(or ``O_PATH|O_NOFOLLOW`` and a refusal of ".", ".." and "/" where the
kernel lacks openat2), so a symlink is reached as itself and never followed
on the host: the guest reads its text with Treadlink and resolves it in its
own namespace. ".." is the fid's names less the last, walked again from the
root, so it stops at the root and a directory swapped for a symlink since
the last walk fails the walk instead of leading out. Attributes are read
with fstat on the fid's fd and changed through ``/proc/self/fd/N`` (the
fid's very inode, after checking it is not a symlink) or ``*at`` calls with
``AT_EMPTY_PATH``; files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``.
docs/virtio.md has the whole model.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Callable

from ..errors import KvmkitError
from . import p9wire as w
from .p9wire import Message, P9ProtocolError, Qid, build, rlerror

log = logging.getLogger(__name__)

VERSION = "9P2000.L"
DEFAULT_MSIZE = 512 * 1024
MIN_MSIZE = 4096
V9FS_MAGIC = 0x01021997          # statfs f_type the guest sees, as for any 9p mount

_SYS_OPENAT2 = 437               # x86-64 (and every architecture's generic table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
_O_LOOKUP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_U64 = (1 << 64) - 1
_PROC_FD = "/proc/self/fd"
_INO_BITS = 56                   # qid.path: inode number, with the device's index above it

# Tlopen/Tlcreate flags that reach the host open(); the rest are the guest's own business.
_PASSED_FLAGS = ((w.DOTL_TRUNC, os.O_TRUNC), (w.DOTL_APPEND, os.O_APPEND),
                 (w.DOTL_DSYNC, os.O_DSYNC), (w.DOTL_SYNC, os.O_SYNC))


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
_fchownat.restype = ctypes.c_int
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int

# Whether openat2 is to be tried; set False by the first ENOSYS (and by tests of the fallback).
openat2_available = True


class ShareError(KvmkitError):
    """A host directory that cannot be shared."""


RESERVED_FDS = 1024    # kept for everything else kvmkit opens (disks, sockets, eventfds, ...)
MIN_FIDS = 64


def share_fid_limit(shares: int) -> int:
    """Fids each of ``shares`` servers may hold, so that the guest meets ENFILE before kvmkit meets EMFILE.

    A fid holds one fd, two once opened. The soft RLIMIT_NOFILE is raised to
    the hard limit first (the usual 1024 would leave a share a few hundred
    fids: a guest ``find`` or ``tar`` holds many directories open at once).
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ValueError, OSError):
            pass
    per_share = (soft - RESERVED_FDS) // (2 * max(1, shares))
    return max(MIN_FIDS, min(4096, per_share))


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e), what)


def _check_name(name: str) -> None:
    """One path component that names an entry: not empty, not "." or "..", no "/"."""
    if name in ("", ".", "..") or "/" in name:
        raise OSError(errno.EINVAL, "not a single file name", name)


# Kernel pseudo filesystems a share never enters (statfs f_type): a share of / would otherwise hand the
# guest the host's /proc (every process's memory and environment to the user kvmkit runs as), /sys and
# their kin. Their mount points stay visible (a guest mounts its own /proc over them), but nothing is
# walked to below one and it cannot be opened. Device nodes need no entry here: only regular files and
# directories are ever opened.
PSEUDO_FS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x1CD1: "devpts", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0x63677270: "cgroup2", 0x27E0EB: "cgroup", 0xCAFE4A11: "bpf",
    0x62656570: "configfs", 0xDE5E81E4: "efivarfs", 0x6E736673: "nsfs", 0x42494E4D: "binfmt_misc",
    0x50495045: "pipefs", 0x534F434B: "sockfs", 0x19800202: "mqueue", 0x67596969: "rpc_pipefs",
    0xF97CFF8C: "selinuxfs", 0x6165676C: "pstore",
}
_STATFS_SIZE = 120
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
_fstatfs.restype = ctypes.c_int


def fs_type(fd: int) -> int:
    """statfs f_type of the filesystem ``fd`` is on."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _fstatfs(fd, buf) != 0:
        raise _oserror("fstatfs")
    return int.from_bytes(buf.raw[:8], "little", signed=True) & 0xFFFFFFFF


def open_beneath(dirfd: int, name: str) -> int:
    """An O_PATH fd for entry ``name`` of the directory ``dirfd``, the entry itself even if it is a symlink.

    openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS is the kernel's own
    guarantee that resolution stays under ``dirfd`` and follows no link; the
    name check in front makes the ENOSYS fallback (plain openat with
    O_NOFOLLOW) just as tight, since one plain component can only name an
    entry of ``dirfd``.
    """
    global openat2_available
    _check_name(name)
    if openat2_available:
        how = _OpenHow(_O_LOOKUP, 0, _RESOLVE)
        fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(name)),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        if ctypes.get_errno() != errno.ENOSYS:
            raise _oserror(name)
        openat2_available = False
    return os.open(name, _O_LOOKUP, dir_fd=dirfd)


def _proc(fd: int) -> str:
    """The magic link that reopens exactly the inode ``fd`` holds (never a name that could be swapped)."""
    return f"{_PROC_FD}/{fd}"


def _s64(value: int) -> int:
    """A u64 from the wire as the signed time_t the guest meant (times before 1970 are negative)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _perm(mode: int, is_dir: bool) -> int:
    """Permission bits a guest may set: no set-user-ID, and set-group-ID only on directories.

    A set-ID file the guest made would be a set-ID program on the host,
    owned by whoever runs kvmkit (often root); on a directory set-group-ID
    only picks the group of new entries.
    """
    mode &= 0o7777 & ~stat.S_ISUID
    return mode if is_dir else mode & ~stat.S_ISGID


class _Fid:
    """What one fid names: an O_PATH fd, the names from the root, and, once opened, the I/O fd."""

    __slots__ = ("fd", "parts", "file", "is_dir", "listing")

    def __init__(self, fd: int, parts: tuple[str, ...]) -> None:
        self.fd = fd
        self.parts = parts
        self.file: int | None = None
        self.is_dir = False
        self.listing: list[str] | None = None   # the Treaddir snapshot; a cookie indexes it

    def close(self) -> None:
        if self.file is not None:
            os.close(self.file)
            self.file = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.listing = None


class P9Server:
    """Serves ``root`` to one 9P2000.L client (the guest's v9fs) one message at a time.

    ``readonly`` refuses every request that would change the tree with
    EROFS; ``max_fids`` bounds the fds the guest can make kvmkit hold
    (ENFILE beyond it; each fid holds one fd, two once opened, so keep
    twice ``max_fids`` under RLIMIT_NOFILE or the guest meets EMFILE
    first); ``max_msize`` is the largest msize Tversion may settle on. ``handle`` is safe to call from any thread (one request at a
    time); ``close`` releases every fd.
    """

    def __init__(self, root: str | Path, *, readonly: bool = False, max_fids: int = 4096,
                 max_msize: int = DEFAULT_MSIZE) -> None:
        if max_msize < MIN_MSIZE:
            raise ValueError(f"max_msize {max_msize} is below kvmkit's minimum {MIN_MSIZE}")
        if max_fids < 1:
            raise ValueError("max_fids must be at least 1")
        self.root = os.fspath(root)
        self.readonly = readonly
        self.max_fids = max_fids
        self.max_msize = max_msize
        if not os.path.isdir(_PROC_FD):
            raise ShareError("sharing a directory needs /proc mounted (kvmkit reopens files through /proc/self/fd)")
        try:
            # O_NOFOLLOW: a symlink planted at the name the user gave must not
            # hand the guest whatever it points to (the host's / for one).
            self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(self.root):
                raise ShareError(f"cannot share {self.root}: it is a symlink; give the directory's own path "
                                 f"({os.path.realpath(self.root)}) if you mean to share it") from None
            raise ShareError(f"cannot share {self.root}: {e.strerror}; give an existing directory") from None
        self._devs = {os.fstat(self._root_fd).st_dev: 0}
        self._root_dev = os.fstat(self._root_fd).st_dev
        self._walls: dict[int, str | None] = {}   # st_dev -> the pseudo filesystem it is, or None
        self._fids: dict[int, _Fid] = {}
        self.msize = max_msize
        self._negotiated = False
        self._closed = False
        self._lock = threading.Lock()
        self.dropped = 0     # requests too short to carry a tag: no reply possible
        self.malformed = 0   # requests answered Rlerror for breaking the wire format
        self._handlers: dict[int, Callable[[Message], bytes]] = {
            w.TVERSION: self._tversion, w.TAUTH: self._tauth, w.TATTACH: self._tattach,
            w.TFLUSH: self._tflush, w.TWALK: self._twalk, w.TCLUNK: self._tclunk,
            w.TREMOVE: self._tremove, w.TLOPEN: self._tlopen, w.TLCREATE: self._tlcreate,
            w.TREAD: self._tread, w.TWRITE: self._twrite, w.TREADDIR: self._treaddir,
            w.TGETATTR: self._tgetattr, w.TSETATTR: self._tsetattr, w.TSTATFS: self._tstatfs,
            w.TFSYNC: self._tfsync, w.TMKDIR: self._tmkdir, w.TMKNOD: self._tmknod,
            w.TSYMLINK: self._tsymlink, w.TREADLINK: self._treadlink, w.TLINK: self._tlink,
            w.TRENAME: self._trename, w.TRENAMEAT: self._trenameat, w.TUNLINKAT: self._tunlinkat,
            w.TXATTRWALK: self._unsupported, w.TXATTRCREATE: self._unsupported,
            w.TLOCK: self._tlock, w.TGETLOCK: self._tgetlock,
        }

    # -- the entry points ------------------------------------------------------

    def handle(self, request: bytes | bytearray | memoryview) -> bytes:
        """The reply to one request message; b"" only when the request is too short to hold a tag."""
        with self._lock:
            return self._handle(request)

    def close(self) -> None:
        """Clunk every fid and let go of the root; later requests get Rlerror ESHUTDOWN."""
        with self._lock:
            self._clunk_all()
            if not self._closed:
                self._closed = True
                os.close(self._root_fd)

    def __enter__(self) -> P9Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fid_count(self) -> int:
        """Fids in use (each holds one or two host fds)."""
        return len(self._fids)

    def _handle(self, request: bytes | bytearray | memoryview) -> bytes:
        try:
            msg = w.parse_request(request, self.msize)
        except P9ProtocolError as e:
            if e.tag is None:
                self.dropped += 1
                return b""
            if e.errno != errno.EOPNOTSUPP:
                self.malformed += 1
            return rlerror(e.tag, e.errno)
        except Exception:   # not a buffer at all: nothing to answer
            self.dropped += 1
            return b""
        tag = msg.tag
        try:
            if self._closed:
                reply = rlerror(tag, errno.ESHUTDOWN)
            elif not self._negotiated and msg.type != w.TVERSION:
                reply = rlerror(tag, errno.EPROTO)
            else:
                reply = self._handlers[msg.type](msg)
        except OSError as e:
            reply = rlerror(tag, e.errno or errno.EIO)
        except (ValueError, OverflowError):   # a u64 offset or time beyond what the host call takes
            reply = rlerror(tag, errno.EINVAL)
        except Exception:
            log.exception("9P %s failed", w.NAMES.get(msg.type, msg.type))
            reply = rlerror(tag, errno.EIO)
        if len(reply) > self.msize:
            reply = rlerror(tag, errno.EMSGSIZE)
        return reply

    # -- fids and names --------------------------------------------------------

    def _fid(self, number: int) -> _Fid:
        fid = self._fids.get(number)
        if fid is None:
            raise OSError(errno.EBADF, f"fid {number} is not in use")
        return fid

    def _check_new(self, number: int) -> None:
        if number == w.NOFID:
            raise OSError(errno.EBADF, "NOFID cannot name a file")
        if number in self._fids:
            raise OSError(errno.EEXIST, f"fid {number} is in use")
        if len(self._fids) >= self.max_fids:
            raise OSError(errno.ENFILE, f"{self.max_fids} fids in use")

    def _install(self, number: int, fd: int, parts: tuple[str, ...]) -> _Fid:
        old = self._fids.pop(number, None)
        if old is not None:
            old.close()
        fid = self._fids[number] = _Fid(fd, parts)
        return fid

    def _clunk_all(self) -> None:
        for fid in self._fids.values():
            fid.close()
        self._fids.clear()

    def _wall(self, fd: int) -> str | None:
        """The kernel pseudo filesystem ``fd`` is on (other than the share's own), which the share does not enter."""
        dev = os.fstat(fd).st_dev
        if dev == self._root_dev:
            return None
        if dev not in self._walls:
            self._walls[dev] = PSEUDO_FS.get(fs_type(fd))
        return self._walls[dev]

    def _enter(self, fd: int, name: str) -> int:
        """``open_beneath(fd, name)``, refused (EACCES) below a pseudo filesystem's mount point."""
        kind = self._wall(fd)
        if kind is not None:
            raise OSError(errno.EACCES, f"the host's {kind} is not shared", name)
        return open_beneath(fd, name)

    def _open_parts(self, parts: tuple[str, ...]) -> int:
        """The O_PATH fd of ``parts`` walked afresh from the root, one name and no symlink at a time."""
        fd = os.dup(self._root_fd)
        try:
            for name in parts:
                next_fd = self._enter(fd, name)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _walk_step(self, fd: int, parts: tuple[str, ...], name: str) -> tuple[int, tuple[str, ...]]:
        if name in (".", ".."):
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTDIR, "walk from a non-directory", name)
            if name == ".":
                return os.dup(fd), parts
            parent = self._open_parts(parts[:-1])
            if not stat.S_ISDIR(os.fstat(parent).st_mode):   # swapped for a symlink since: stop here
                os.close(parent)
                raise OSError(errno.ENOTDIR, "the parent is no longer a directory", name)
            return parent, parts[:-1]
        return self._enter(fd, name), parts + (name,)

    def _parent_of(self, fid: _Fid) -> tuple[int, str]:
        """The fid's directory (fd) and its name there, checked to still be the fid's inode."""
        if not fid.parts:
            raise OSError(errno.EBUSY, "the share's root cannot be moved or removed")
        parent = self._open_parts(fid.parts[:-1])
        try:
            here = os.stat(fid.parts[-1], dir_fd=parent, follow_symlinks=False)
            mine = os.fstat(fid.fd)
            if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                raise OSError(errno.ESTALE, "the name now holds another file", fid.parts[-1])
        except BaseException:
            os.close(parent)
            raise
        return parent, fid.parts[-1]

    def _moved(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Keep every fid's names true after the guest renamed ``old`` to ``new``, for later ".." walks."""
        n = len(old)
        for fid in self._fids.values():
            if fid.parts[:n] == old:
                fid.parts = new + fid.parts[n:]

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "the share is read-only")

    def _qid(self, st: os.stat_result) -> Qid:
        fmt = stat.S_IFMT(st.st_mode)
        qtype = w.QTDIR if fmt == stat.S_IFDIR else w.QTSYMLINK if fmt == stat.S_IFLNK else w.QTFILE
        dev = self._devs.setdefault(st.st_dev, min(len(self._devs), 255))
        path = st.st_ino if dev == 0 else (dev << _INO_BITS) | (st.st_ino & ((1 << _INO_BITS) - 1))
        version = (st.st_mtime_ns ^ (st.st_size << 8)) & 0xFFFFFFFF if fmt == stat.S_IFREG else 0
        return Qid(qtype, version, path & _U64)

    def _new_entry(self, dirfd: int, name: str, fmt: int, perm: int | None) -> Qid:
        """The qid of an entry just made, with its permissions set despite kvmkit's umask."""
        fd = open_beneath(dirfd, name)
        try:
            st = os.fstat(fd)
            if perm is not None and stat.S_IFMT(st.st_mode) == fmt and stat.S_IMODE(st.st_mode) != perm:
                os.chmod(_proc(fd), perm)
                st = os.fstat(fd)
            return self._qid(st)
        finally:
            os.close(fd)

    # -- session ---------------------------------------------------------------

    def _tversion(self, msg: Message) -> bytes:
        """Version: start over (every fid clunked) at min(client msize, ours)."""
        self._clunk_all()
        self._negotiated = False
        self.msize = self.max_msize
        msize = min(msg["msize"], self.max_msize)
        version = msg["version"]
        if version != VERSION and not version.startswith(VERSION + "."):
            return build(w.RVERSION, msg.tag, msize=msize, version="unknown")
        if msize < MIN_MSIZE:
            raise OSError(errno.EINVAL, f"msize {msize} is below {MIN_MSIZE}")
        self.msize = msize
        self._negotiated = True
        return build(w.RVERSION, msg.tag, msize=msize, version=VERSION)

    def _tauth(self, msg: Message) -> bytes:
        """No authentication: the share is the guest's by construction, so attach needs no afid."""
        raise OSError(errno.EOPNOTSUPP, "no authentication")

    def _tattach(self, msg: Message) -> bytes:
        """Attach: fid names the root. uname, n_uname and aname are ignored: one user, one tree."""
        if msg["afid"] != w.NOFID:
            raise OSError(errno.EINVAL, "no authentication: afid must be NOFID")
        self._check_new(msg["fid"])
        fid = self._install(msg["fid"], os.dup(self._root_fd), ())
        return build(w.RATTACH, msg.tag, qid=self._qid(os.fstat(fid.fd)))

    def _tflush(self, msg: Message) -> bytes:
        """Every request is answered before the next is read, so there is never one left to cancel."""
        return build(w.RFLUSH, msg.tag)

    def _tclunk(self, msg: Message) -> bytes:
        self._fid(msg["fid"])
        self._fids.pop(msg["fid"]).close()
        return build(w.RCLUNK, msg.tag)

    def _twalk(self, msg: Message) -> bytes:
        """Walk up to 16 names; a walk that fails after the first name returns the qids it got, newfid untouched."""
        fid = self._fid(msg["fid"])
        newfid, names = msg["newfid"], msg["wnames"]
        if newfid == msg["fid"] and not names:
            return build(w.RWALK, msg.tag, wqids=[])   # a clone onto itself changes nothing
        if newfid != msg["fid"]:
            self._check_new(newfid)
        fd, parts = os.dup(fid.fd), fid.parts
        qids: list[Qid] = []
        try:
            for name in names:
                try:
                    next_fd, next_parts = self._walk_step(fd, parts, name)
                except OSError:
                    if not qids:
                        raise
                    return build(w.RWALK, msg.tag, wqids=qids)
                os.close(fd)
                fd, parts = next_fd, next_parts
                qids.append(self._qid(os.fstat(fd)))
            self._install(newfid, fd, parts)
            fd = -1
            return build(w.RWALK, msg.tag, wqids=qids)
        finally:
            if fd >= 0:
                os.close(fd)

    # -- I/O -------------------------------------------------------------------

    def _open_file(self, fid: _Fid) -> int:
        if fid.file is None:
            raise OSError(errno.EBADF, "fid is not open for I/O (Tlopen first)")
        return fid.file

    def _tlopen(self, msg: Message) -> bytes:
        """Open for I/O: only a regular file or a directory, reopened through the fid's own inode."""
        fid = self._fid(msg["fid"])
        if fid.file is not None:
            raise OSError(errno.EINVAL, "fid is already open")
        kind = self._wall(fid.fd)
        if kind is not None:
            raise OSError(errno.EACCES, f"the host's {kind} is not shared")
        flags = msg["flags"]
        access = flags & w.DOTL_ACCMODE
        if access == w.DOTL_NOACCESS:
            raise OSError(errno.EINVAL, "no access mode")
        writes = access != w.DOTL_RDONLY or flags & w.DOTL_TRUNC
        if writes:
            self._writable()
        st = os.fstat(fid.fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "a symlink is resolved by the guest, not opened")
        if stat.S_ISDIR(st.st_mode):
            if writes:
                raise OSError(errno.EISDIR, "a directory opens read-only")
            oflags = os.O_RDONLY | os.O_DIRECTORY
        elif stat.S_ISREG(st.st_mode):
            if flags & w.DOTL_DIRECTORY:
                raise OSError(errno.ENOTDIR, "not a directory")
            oflags = access
            for dotl, host in _PASSED_FLAGS:
                if flags & dotl:
                    oflags |= host
        else:
            raise OSError(errno.EPERM, "only regular files and directories open through the share")
        fid.file = os.open(_proc(fid.fd), oflags | os.O_CLOEXEC | os.O_NOCTTY)
        fid.is_dir = stat.S_ISDIR(st.st_mode)
        fid.listing = None
        return build(w.RLOPEN, msg.tag, qid=self._qid(st), iounit=self.msize - w.IOHDRSZ)

    def _tlcreate(self, msg: Message) -> bytes:
        """Create and open a regular file; the fid moves from the directory to the new file."""
        fid = self._fid(msg["fid"])
        name = msg["name"]
        _check_name(name)
        self._writable()
        if fid.file is not None:
            raise OSError(errno.EINVAL, "fid is open")
        flags = msg["flags"]
        access = flags & w.DOTL_ACCMODE
        if access == w.DOTL_NOACCESS:
            raise OSError(errno.EINVAL, "no access mode")
        oflags = access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        for dotl, host in _PASSED_FLAGS:
            if flags & dotl and dotl != w.DOTL_TRUNC:   # the file is new: nothing to truncate
                oflags |= host
        perm = _perm(msg["mode"], False)
        file = os.open(name, oflags, perm, dir_fd=fid.fd)
        try:
            os.fchmod(file, perm)   # what the guest asked for, not what kvmkit's umask left
            path_fd = os.open(_proc(file), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(file)
            raise
        os.close(fid.fd)
        fid.fd, fid.parts, fid.file, fid.is_dir, fid.listing = path_fd, fid.parts + (name,), file, False, None
        return build(w.RLCREATE, msg.tag, qid=self._qid(os.fstat(path_fd)), iounit=self.msize - w.IOHDRSZ)

    def _tread(self, msg: Message) -> bytes:
        file = self._open_file(self._fid(msg["fid"]))
        count = min(msg["count"], self.msize - w.RREAD_HEADER)
        return build(w.RREAD, msg.tag, data=os.pread(file, count, msg["offset"]))

    def _twrite(self, msg: Message) -> bytes:
        file = self._open_file(self._fid(msg["fid"]))
        self._writable()
        return build(w.RWRITE, msg.tag, count=os.pwrite(file, msg["data"], msg["offset"]))

    def _tfsync(self, msg: Message) -> bytes:
        file = self._open_file(self._fid(msg["fid"]))
        (os.fdatasync if msg["datasync"] else os.fsync)(file)
        return build(w.RFSYNC, msg.tag)

    # -- directories -----------------------------------------------------------

    def _listing(self, fid: _Fid, file: int) -> list[str]:
        """The names a Treaddir pass walks: ".", "..", then the entries sorted, those whose name is not UTF-8 left out.

        9P2000.L strings are UTF-8 and the codec refuses anything else, so a
        name the guest could never send back is not shown to it.
        """
        names = []
        for name in os.listdir(file):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue
            names.append(name)
        names.sort()
        return [".", ".."] + names

    def _dirent(self, fid: _Fid, file: int, name: str) -> tuple[Qid, int] | None:
        """(qid, d_type) of one listed name, None if it went away since the listing."""
        try:
            if name == ".":
                st = os.fstat(fid.fd)
            elif name == "..":
                st = self._parent_stat(fid)
            else:
                st = os.stat(name, dir_fd=file, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return self._qid(st), stat.S_IFMT(st.st_mode) >> 12   # S_IFMT >> 12 is the DT_* value

    def _parent_stat(self, fid: _Fid) -> os.stat_result:
        """".." as the walk rules see it: the root's own parent is the root."""
        try:
            parent = self._open_parts(fid.parts[:-1])
        except OSError:
            return os.fstat(fid.fd)
        try:
            return os.fstat(parent)
        finally:
            os.close(parent)

    def _treaddir(self, msg: Message) -> bytes:
        """Entries from cookie ``offset`` on, as many as fit ``count``.

        The cookie is an index into a listing taken when a pass starts
        (offset 0, as after rewinddir) and kept with the fid, so a pass
        resumes exactly where the last reply ended even while the directory
        changes; an entry removed meanwhile is skipped.
        """
        fid = self._fid(msg["fid"])
        file = self._open_file(fid)
        if not fid.is_dir:
            raise OSError(errno.ENOTDIR, "Treaddir on a file")
        offset = msg["offset"]
        if offset == 0 or fid.listing is None:
            fid.listing = self._listing(fid, file)
        listing = fid.listing
        limit = min(msg["count"], self.msize - w.RREAD_HEADER)
        out = bytearray()
        i = offset
        while i < len(listing):
            name = listing[i]
            if len(out) + w.dirent_size(name) > limit:
                break
            info = self._dirent(fid, file, name)
            i += 1
            if info is not None:
                w.put_dirent(out, info[0], i, info[1], name)
        if not out and i < len(listing):
            raise OSError(errno.EINVAL, f"count {msg['count']} cannot hold the next entry")
        return build(w.RREADDIR, msg.tag, data=bytes(out))

    def _tmkdir(self, msg: Message) -> bytes:
        dfid = self._fid(msg["dfid"])
        name = msg["name"]
        _check_name(name)
        self._writable()
        perm = _perm(msg["mode"], True)
        os.mkdir(name, perm, dir_fd=dfid.fd)
        return build(w.RMKDIR, msg.tag, qid=self._new_entry(dfid.fd, name, stat.S_IFDIR, perm))

    def _tmknod(self, msg: Message) -> bytes:
        """Regular files, FIFOs and sockets; a device node would hand the guest a host device: EPERM."""
        dfid = self._fid(msg["dfid"])
        name = msg["name"]
        _check_name(name)
        self._writable()
        fmt = stat.S_IFMT(msg["mode"]) or stat.S_IFREG
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EPERM, "no device nodes on a share")
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EINVAL, "mknod makes files, FIFOs and sockets")
        perm = _perm(msg["mode"], False)
        os.mknod(name, fmt | perm, 0, dir_fd=dfid.fd)
        return build(w.RMKNOD, msg.tag, qid=self._new_entry(dfid.fd, name, fmt, perm))

    def _tsymlink(self, msg: Message) -> bytes:
        """The target is stored as text; the host never follows it, the guest resolves it in its own tree."""
        dfid = self._fid(msg["fid"])
        name = msg["name"]
        _check_name(name)
        self._writable()
        os.symlink(msg["symtgt"], name, dir_fd=dfid.fd)
        return build(w.RSYMLINK, msg.tag, qid=self._new_entry(dfid.fd, name, stat.S_IFLNK, None))

    def _treadlink(self, msg: Message) -> bytes:
        fid = self._fid(msg["fid"])
        if not stat.S_ISLNK(os.fstat(fid.fd).st_mode):
            raise OSError(errno.EINVAL, "not a symlink")
        target = os.readlink("", dir_fd=fid.fd)   # readlinkat(fd, "") reads the O_PATH fd's own link
        try:
            size = len(target.encode("utf-8"))
        except UnicodeEncodeError:
            raise OSError(errno.EILSEQ, "symlink target is not UTF-8") from None
        if w.HEADER_SIZE + 2 + size > self.msize:
            raise OSError(errno.ENAMETOOLONG, "symlink target does not fit msize")
        return build(w.RREADLINK, msg.tag, target=target)

    def _tlink(self, msg: Message) -> bytes:
        """A hard link to the fid's inode (through /proc, so no name is looked up twice) as ``name`` in dfid."""
        dfid = self._fid(msg["dfid"])
        fid = self._fid(msg["fid"])
        name = msg["name"]
        _check_name(name)
        self._writable()
        os.link(_proc(fid.fd), name, dst_dir_fd=dfid.fd, follow_symlinks=True)
        return build(w.RLINK, msg.tag)

    def _trename(self, msg: Message) -> bytes:
        fid = self._fid(msg["fid"])
        dfid = self._fid(msg["dfid"])
        name = msg["name"]
        _check_name(name)
        self._writable()
        parent, leaf = self._parent_of(fid)
        try:
            os.rename(leaf, name, src_dir_fd=parent, dst_dir_fd=dfid.fd)
        finally:
            os.close(parent)
        self._moved(fid.parts, dfid.parts + (name,))
        return build(w.RRENAME, msg.tag)

    def _trenameat(self, msg: Message) -> bytes:
        old_dir = self._fid(msg["olddirfid"])
        new_dir = self._fid(msg["newdirfid"])
        old, new = msg["oldname"], msg["newname"]
        _check_name(old)
        _check_name(new)
        self._writable()
        os.rename(old, new, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)
        self._moved(old_dir.parts + (old,), new_dir.parts + (new,))
        return build(w.RRENAMEAT, msg.tag)

    def _tunlinkat(self, msg: Message) -> bytes:
        dfid = self._fid(msg["dirfd"])
        name, flags = msg["name"], msg["flags"]
        _check_name(name)
        if flags & ~w.AT_REMOVEDIR:
            raise OSError(errno.EINVAL, "unlinkat takes only AT_REMOVEDIR")
        self._writable()
        (os.rmdir if flags & w.AT_REMOVEDIR else os.unlink)(name, dir_fd=dfid.fd)
        return build(w.RUNLINKAT, msg.tag)

    def _tremove(self, msg: Message) -> bytes:
        """Remove the fid's file; the fid is clunked whether or not that worked, as 9P says."""
        fid = self._fid(msg["fid"])
        try:
            self._writable()
            parent, leaf = self._parent_of(fid)
            try:
                is_dir = stat.S_ISDIR(os.fstat(fid.fd).st_mode)
                (os.rmdir if is_dir else os.unlink)(leaf, dir_fd=parent)
            finally:
                os.close(parent)
        finally:
            self._fids.pop(msg["fid"]).close()
        return build(w.RREMOVE, msg.tag)

    # -- attributes ------------------------------------------------------------

    def _tgetattr(self, msg: Message) -> bytes:
        """Every basic field, from fstat of the fid's own fd (a symlink describes itself)."""
        st = os.fstat(self._fid(msg["fid"]).fd)
        times = {}
        for which in ("atime", "mtime", "ctime"):
            sec, nsec = divmod(getattr(st, f"st_{which}_ns"), 1_000_000_000)
            times[f"{which}_sec"], times[f"{which}_nsec"] = sec & _U64, nsec
        return build(w.RGETATTR, msg.tag, valid=msg["request_mask"] & w.GETATTR_BASIC, qid=self._qid(st),
                     mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, nlink=st.st_nlink, rdev=st.st_rdev & _U64,
                     size=st.st_size, blksize=st.st_blksize, blocks=st.st_blocks,
                     btime_sec=0, btime_nsec=0, gen=0, data_version=0, **times)

    def _tsetattr(self, msg: Message) -> bytes:
        """Mode, owner, size, then times (so a truncate's mtime does not undo the one asked for)."""
        fid = self._fid(msg["fid"])
        self._writable()
        valid = msg["valid"]
        st = os.fstat(fid.fd)
        link = stat.S_ISLNK(st.st_mode)
        if valid & w.SETATTR_MODE:
            if link:
                raise OSError(errno.EOPNOTSUPP, "a symlink has no mode of its own")
            os.chmod(_proc(fid.fd), _perm(msg["mode"], stat.S_ISDIR(st.st_mode)))
        if valid & (w.SETATTR_UID | w.SETATTR_GID):
            uid = msg["uid"] if valid & w.SETATTR_UID else 0xFFFFFFFF
            gid = msg["gid"] if valid & w.SETATTR_GID else 0xFFFFFFFF
            if _fchownat(fid.fd, b"", uid, gid, AT_EMPTY_PATH) != 0:
                raise _oserror("chown")
        if valid & w.SETATTR_SIZE:
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "a directory has no size to set")
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "only a regular file can be truncated")
            os.truncate(_proc(fid.fd), msg["size"])
        if valid & (w.SETATTR_ATIME | w.SETATTR_MTIME):
            self._set_times(fid.fd, link, msg)
        return build(w.RSETATTR, msg.tag)

    def _set_times(self, fd: int, link: bool, msg: Message) -> None:
        valid = msg["valid"]
        times = (_Timespec * 2)()
        for i, (bit, set_bit, which) in enumerate(((w.SETATTR_ATIME, w.SETATTR_ATIME_SET, "atime"),
                                                   (w.SETATTR_MTIME, w.SETATTR_MTIME_SET, "mtime"))):
            if not valid & bit:
                times[i] = _Timespec(0, UTIME_OMIT)
            elif not valid & set_bit:
                times[i] = _Timespec(0, UTIME_NOW)
            else:
                nsec = msg[f"{which}_nsec"]
                if nsec >= 1_000_000_000:
                    raise OSError(errno.EINVAL, "nanoseconds out of range")
                times[i] = _Timespec(_s64(msg[f"{which}_sec"]), nsec)
        if link:   # the link itself, by its O_PATH fd
            rc = _utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
        else:
            rc = _utimensat(AT_FDCWD, _proc(fd).encode(), times, 0)
        if rc != 0:
            raise _oserror("utimensat")

    def _tstatfs(self, msg: Message) -> bytes:
        sv = os.fstatvfs(self._fid(msg["fid"]).fd)
        return build(w.RSTATFS, msg.tag, type=V9FS_MAGIC, bsize=sv.f_frsize or sv.f_bsize,
                     blocks=sv.f_blocks, bfree=sv.f_bfree, bavail=sv.f_bavail, files=sv.f_files,
                     ffree=sv.f_ffree, fsid=sv.f_fsid & _U64, namelen=sv.f_namemax)

    # -- what the share does not do ---------------------------------------------

    def _unsupported(self, msg: Message) -> bytes:
        """Extended attributes are not shared: the guest sees EOPNOTSUPP, as on a filesystem without them."""
        raise OSError(errno.EOPNOTSUPP, "not supported")

    def _tlock(self, msg: Message) -> bytes:
        """Granted without a host lock.

        The guest's VFS records the POSIX lock before it sends Tlock, so
        processes in the guest already exclude one another; a host lock
        would only matter against host processes, and a blocking one would
        stall this synchronous server (and with it the whole share).
        """
        self._fid(msg["fid"])
        return build(w.RLOCK, msg.tag, status=w.LOCK_SUCCESS)

    def _tgetlock(self, msg: Message) -> bytes:
        """Unlocked: the host holds no lock for the guest (see _tlock), so none conflicts."""
        self._fid(msg["fid"])
        return build(w.RGETLOCK, msg.tag, type=w.LOCK_TYPE_UNLCK, start=msg["start"], length=msg["length"],
                     proc_id=msg["proc_id"], client_id=msg["client_id"])
