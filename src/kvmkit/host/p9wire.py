"""The 9P2000.L wire format: message numbers, field layouts, parsing and building.

Pure codec, no I/O. One table, :data:`FORMATS`, gives the body of every
9P2000.L message kvmkit speaks (T and R); :func:`parse_message` and
:func:`build` both walk it, so a reader and a writer cannot disagree about a
layout. Every message is ``size[4] type[1] tag[2]`` and a body, integers
little-endian, a string ``len[2]`` and that many UTF-8 bytes, a qid
``type[1] version[4] path[8]``.

The guest is the sender, and it is not trusted: :func:`parse_request`
checks the header against the buffer and the negotiated msize, every field
against the bytes left, and rejects what the server could only mishandle
(bad UTF-8, a NUL, which no host path can hold, more than 16 walk names)
with a :class:`P9ProtocolError` that carries the tag whenever the header
held one, so the server can still answer Rlerror to the right request.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

# Message types. 9P2000.L's own messages (6..77) and the 9P2000 ones it keeps (100..127).
TLERROR, RLERROR = 6, 7
TSTATFS, RSTATFS = 8, 9
TLOPEN, RLOPEN = 12, 13
TLCREATE, RLCREATE = 14, 15
TSYMLINK, RSYMLINK = 16, 17
TMKNOD, RMKNOD = 18, 19
TRENAME, RRENAME = 20, 21
TREADLINK, RREADLINK = 22, 23
TGETATTR, RGETATTR = 24, 25
TSETATTR, RSETATTR = 26, 27
TXATTRWALK, RXATTRWALK = 30, 31
TXATTRCREATE, RXATTRCREATE = 32, 33
TREADDIR, RREADDIR = 40, 41
TFSYNC, RFSYNC = 50, 51
TLOCK, RLOCK = 52, 53
TGETLOCK, RGETLOCK = 54, 55
TLINK, RLINK = 70, 71
TMKDIR, RMKDIR = 72, 73
TRENAMEAT, RRENAMEAT = 74, 75
TUNLINKAT, RUNLINKAT = 76, 77
TVERSION, RVERSION = 100, 101
TAUTH, RAUTH = 102, 103
TATTACH, RATTACH = 104, 105
TFLUSH, RFLUSH = 108, 109
TWALK, RWALK = 110, 111
TREAD, RREAD = 116, 117
TWRITE, RWRITE = 118, 119
TCLUNK, RCLUNK = 120, 121
TREMOVE, RREMOVE = 122, 123

NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
HEADER_SIZE = 7                  # size[4] type[1] tag[2]
QID_SIZE = 13
MAX_WELEM = 16                   # names in one Twalk, qids in one Rwalk
RREAD_HEADER = HEADER_SIZE + 4   # Rread and Rreaddir: + count[4]
TWRITE_HEADER = HEADER_SIZE + 16  # fid[4] offset[8] count[4]
IOHDRSZ = 24                     # what a client subtracts from msize for its iounit

# qid.type bits
QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00

# Tgetattr request_mask / Rgetattr valid
GETATTR_MODE = 0x0001
GETATTR_NLINK = 0x0002
GETATTR_UID = 0x0004
GETATTR_GID = 0x0008
GETATTR_RDEV = 0x0010
GETATTR_ATIME = 0x0020
GETATTR_MTIME = 0x0040
GETATTR_CTIME = 0x0080
GETATTR_INO = 0x0100
GETATTR_SIZE = 0x0200
GETATTR_BLOCKS = 0x0400
GETATTR_BASIC = 0x07FF
GETATTR_ALL = 0x3FFF

# Tsetattr valid
SETATTR_MODE = 0x0001
SETATTR_UID = 0x0002
SETATTR_GID = 0x0004
SETATTR_SIZE = 0x0008
SETATTR_ATIME = 0x0010
SETATTR_MTIME = 0x0020
SETATTR_CTIME = 0x0040
SETATTR_ATIME_SET = 0x0080
SETATTR_MTIME_SET = 0x0100

# Tunlinkat flags
AT_REMOVEDIR = 0x200

# Tlopen/Tlcreate flags: the Linux client's open(2) flags, in its own (x86) numbering.
DOTL_RDONLY, DOTL_WRONLY, DOTL_RDWR, DOTL_NOACCESS = 0, 1, 2, 3
DOTL_ACCMODE = 0o3
DOTL_CREATE = 0o100
DOTL_EXCL = 0o200
DOTL_TRUNC = 0o1000
DOTL_APPEND = 0o2000
DOTL_DSYNC = 0o10000
DOTL_DIRECTORY = 0o200000
DOTL_NOFOLLOW = 0o400000
DOTL_SYNC = 0o4000000

# Tlock / Tgetlock
LOCK_TYPE_RDLCK, LOCK_TYPE_WRLCK, LOCK_TYPE_UNLCK = 0, 1, 2
LOCK_SUCCESS = 0

# Field kinds: integers by width, s string, Q qid, W wnames, R wqids, D count[4] data[count].
_INT = {"1": struct.Struct("<B"), "2": struct.Struct("<H"), "4": struct.Struct("<I"), "8": struct.Struct("<Q")}
_QID = struct.Struct("<BIQ")
_HEADER = struct.Struct("<IBH")


def _fmt(spec: str) -> tuple[tuple[str, str], ...]:
    """'fid:4 name:s' -> (('fid', '4'), ('name', 's'))."""
    return tuple(tuple(item.split(":")) for item in spec.split())  # type: ignore[misc]


_STAT_BLOCK = ("valid:8 qid:Q mode:4 uid:4 gid:4 nlink:8 rdev:8 size:8 blksize:8 blocks:8 "
               "atime_sec:8 atime_nsec:8 mtime_sec:8 mtime_nsec:8 ctime_sec:8 ctime_nsec:8 "
               "btime_sec:8 btime_nsec:8 gen:8 data_version:8")

FORMATS: dict[int, tuple[tuple[str, str], ...]] = {
    RLERROR: _fmt("ecode:4"),
    TSTATFS: _fmt("fid:4"),
    RSTATFS: _fmt("type:4 bsize:4 blocks:8 bfree:8 bavail:8 files:8 ffree:8 fsid:8 namelen:4"),
    TLOPEN: _fmt("fid:4 flags:4"),
    RLOPEN: _fmt("qid:Q iounit:4"),
    TLCREATE: _fmt("fid:4 name:s flags:4 mode:4 gid:4"),
    RLCREATE: _fmt("qid:Q iounit:4"),
    TSYMLINK: _fmt("fid:4 name:s symtgt:s gid:4"),
    RSYMLINK: _fmt("qid:Q"),
    TMKNOD: _fmt("dfid:4 name:s mode:4 major:4 minor:4 gid:4"),
    RMKNOD: _fmt("qid:Q"),
    TRENAME: _fmt("fid:4 dfid:4 name:s"),
    RRENAME: (),
    TREADLINK: _fmt("fid:4"),
    RREADLINK: _fmt("target:s"),
    TGETATTR: _fmt("fid:4 request_mask:8"),
    RGETATTR: _fmt(_STAT_BLOCK),
    TSETATTR: _fmt("fid:4 valid:4 mode:4 uid:4 gid:4 size:8 atime_sec:8 atime_nsec:8 mtime_sec:8 mtime_nsec:8"),
    RSETATTR: (),
    TXATTRWALK: _fmt("fid:4 newfid:4 name:s"),
    RXATTRWALK: _fmt("size:8"),
    TXATTRCREATE: _fmt("fid:4 name:s attr_size:8 flags:4"),
    RXATTRCREATE: (),
    TREADDIR: _fmt("fid:4 offset:8 count:4"),
    RREADDIR: _fmt("data:D"),
    TFSYNC: _fmt("fid:4 datasync:4"),
    RFSYNC: (),
    TLOCK: _fmt("fid:4 type:1 flags:4 start:8 length:8 proc_id:4 client_id:s"),
    RLOCK: _fmt("status:1"),
    TGETLOCK: _fmt("fid:4 type:1 start:8 length:8 proc_id:4 client_id:s"),
    RGETLOCK: _fmt("type:1 start:8 length:8 proc_id:4 client_id:s"),
    TLINK: _fmt("dfid:4 fid:4 name:s"),
    RLINK: (),
    TMKDIR: _fmt("dfid:4 name:s mode:4 gid:4"),
    RMKDIR: _fmt("qid:Q"),
    TRENAMEAT: _fmt("olddirfid:4 oldname:s newdirfid:4 newname:s"),
    RRENAMEAT: (),
    TUNLINKAT: _fmt("dirfd:4 name:s flags:4"),
    RUNLINKAT: (),
    TVERSION: _fmt("msize:4 version:s"),
    RVERSION: _fmt("msize:4 version:s"),
    TAUTH: _fmt("afid:4 uname:s aname:s n_uname:4"),
    RAUTH: _fmt("aqid:Q"),
    TATTACH: _fmt("fid:4 afid:4 uname:s aname:s n_uname:4"),
    RATTACH: _fmt("qid:Q"),
    TFLUSH: _fmt("oldtag:2"),
    RFLUSH: (),
    TWALK: _fmt("fid:4 newfid:4 wnames:W"),
    RWALK: _fmt("wqids:R"),
    TREAD: _fmt("fid:4 offset:8 count:4"),
    RREAD: _fmt("data:D"),
    TWRITE: _fmt("fid:4 offset:8 data:D"),
    RWRITE: _fmt("count:4"),
    TCLUNK: _fmt("fid:4"),
    RCLUNK: (),
    TREMOVE: _fmt("fid:4"),
    RREMOVE: (),
}

NAMES: dict[int, str] = {v: k[0] + k[1:].lower() for k, v in dict(globals()).items()
                         if k[:1] in "TR" and k[1:].isalpha() and k[1:].isupper() and isinstance(v, int)}
REQUESTS = frozenset(t for t in FORMATS if t % 2 == 0)


class P9ProtocolError(Exception):
    """A message that breaks the 9P2000.L wire format.

    ``tag`` is the message's tag when the buffer was long enough to hold one
    (the server answers Rlerror to it), else None; ``errno`` is the errno that
    Rlerror should carry: EPROTO for a broken frame, EINVAL for a field whose
    value no server could accept, EOPNOTSUPP for a message type outside
    9P2000.L's requests.
    """

    def __init__(self, message: str, *, tag: int | None = None, errno: int = errno.EPROTO) -> None:
        super().__init__(message)
        self.tag = tag
        self.errno = errno


class Qid(NamedTuple):
    """The server's identity for a file: type (QT* bits), version, path (unique per file)."""

    type: int
    version: int
    path: int


class Dirent(NamedTuple):
    """One Rreaddir entry; ``offset`` is the cookie that resumes after it."""

    qid: Qid
    offset: int
    type: int
    name: str


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed message: its type, tag and body fields by their 9P names (``msg["fid"]``)."""

    type: int
    tag: int
    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


def _bytes_view(buf: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Reader:
    """Little-endian reads from a byte buffer that never run past its end.

    Each read checks the bytes left first and raises P9ProtocolError (with
    the tag, once known) instead of struct.error or a short slice.
    """

    __slots__ = ("buf", "pos", "end", "tag")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, *, tag: int | None = None) -> None:
        self.buf = _bytes_view(buf)
        self.pos = pos
        self.end = len(self.buf)
        self.tag = tag

    def _need(self, n: int, what: str) -> int:
        pos = self.pos
        if n > self.end - pos:
            raise P9ProtocolError(f"{what} runs past the end of the message ({n} bytes at {pos}, "
                                  f"{self.end - pos} left)", tag=self.tag)
        self.pos = pos + n
        return pos

    def uint(self, width: str) -> int:
        s = _INT[width]
        return s.unpack_from(self.buf, self._need(s.size, f"a {width}-byte integer"))[0]

    def u8(self) -> int:
        return self.uint("1")

    def u16(self) -> int:
        return self.uint("2")

    def u32(self) -> int:
        return self.uint("4")

    def u64(self) -> int:
        return self.uint("8")

    def raw(self, n: int) -> bytes:
        pos = self._need(n, f"a {n}-byte block")
        return bytes(self.buf[pos:pos + n])

    def string(self) -> str:
        """A UTF-8 string without NUL: a NUL would cut the host's C path short, and names are compared as text."""
        n = self.u16()
        data = self.raw(n)
        if b"\0" in data:
            raise P9ProtocolError("string holds a NUL byte", tag=self.tag, errno=errno.EINVAL)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise P9ProtocolError("string is not UTF-8", tag=self.tag, errno=errno.EINVAL) from None

    def qid(self) -> Qid:
        return Qid(*_QID.unpack_from(self.buf, self._need(QID_SIZE, "a qid")))

    def data(self) -> bytes:
        return self.raw(self.u32())

    def counted(self, what: str) -> int:
        n = self.u16()
        if n > MAX_WELEM:
            raise P9ProtocolError(f"{n} {what} (9P allows at most {MAX_WELEM})", tag=self.tag, errno=errno.EINVAL)
        return n


def put_u8(out: bytearray, value: int) -> None:
    out += _INT["1"].pack(value)


def put_u16(out: bytearray, value: int) -> None:
    out += _INT["2"].pack(value)


def put_u32(out: bytearray, value: int) -> None:
    out += _INT["4"].pack(value)


def put_u64(out: bytearray, value: int) -> None:
    out += _INT["8"].pack(value)


def put_string(out: bytearray, value: str) -> None:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"a 9P string holds at most 65535 bytes, not {len(data)}")
    put_u16(out, len(data))
    out += data


def put_qid(out: bytearray, qid: Qid | tuple[int, int, int]) -> None:
    out += _QID.pack(*qid)


def put_data(out: bytearray, data: bytes | bytearray | memoryview) -> None:
    put_u32(out, len(data))
    out += data


def _read_field(r: Reader, kind: str) -> Any:
    if kind in _INT:
        return r.uint(kind)
    if kind == "s":
        return r.string()
    if kind == "Q":
        return r.qid()
    if kind == "D":
        return r.data()
    if kind == "W":
        return [r.string() for _ in range(r.counted("walk names"))]
    if kind == "R":
        return [r.qid() for _ in range(r.counted("walk qids"))]
    raise AssertionError(kind)


def _write_field(out: bytearray, kind: str, value: Any) -> None:
    if kind in _INT:
        out += _INT[kind].pack(value)
    elif kind == "s":
        put_string(out, value)
    elif kind == "Q":
        put_qid(out, value)
    elif kind == "D":
        put_data(out, value)
    elif kind in "WR":
        items = list(value)
        if len(items) > MAX_WELEM:
            raise ValueError(f"{len(items)} walk elements (9P allows at most {MAX_WELEM})")
        put_u16(out, len(items))
        for item in items:
            (put_string if kind == "W" else put_qid)(out, item)
    else:
        raise AssertionError(kind)


def read_header(buf: bytes | bytearray | memoryview, msize: int) -> tuple[int, int]:
    """(type, tag) of one whole message, after checking size[4] against the buffer and msize."""
    view = _bytes_view(buf)
    if len(view) < HEADER_SIZE:
        raise P9ProtocolError(f"{len(view)} bytes cannot hold a 9P header ({HEADER_SIZE} bytes)")
    size, mtype, tag = _HEADER.unpack_from(view)
    if size != len(view):
        raise P9ProtocolError(f"size field says {size} bytes, the message has {len(view)}", tag=tag)
    if size > msize:
        raise P9ProtocolError(f"{size}-byte message exceeds msize {msize}", tag=tag)
    return mtype, tag


def _parse(buf: bytes | bytearray | memoryview, msize: int, requests_only: bool) -> Message:
    mtype, tag = read_header(buf, msize)
    if mtype not in (REQUESTS if requests_only else FORMATS):
        kind = "request" if requests_only else "message"
        raise P9ProtocolError(f"message type {mtype} is not a 9P2000.L {kind}", tag=tag, errno=errno.EOPNOTSUPP)
    r = Reader(buf, HEADER_SIZE, tag=tag)
    fields = {name: _read_field(r, kind) for name, kind in FORMATS[mtype]}
    if r.pos != r.end:
        raise P9ProtocolError(f"{NAMES[mtype]} has {r.end - r.pos} bytes after its last field", tag=tag)
    return Message(mtype, tag, fields)


def parse_message(buf: bytes | bytearray | memoryview, msize: int) -> Message:
    """Any 9P2000.L message kvmkit knows (T or R), checked field by field; the body must be used exactly."""
    return _parse(buf, msize, requests_only=False)


def parse_request(buf: bytes | bytearray | memoryview, msize: int) -> Message:
    """One T-message from the guest; anything else raises P9ProtocolError (EOPNOTSUPP for a type not served)."""
    return _parse(buf, msize, requests_only=True)


def build(mtype: int, tag: int, **fields: Any) -> bytes:
    """One whole message of type ``mtype``: every field of its layout must be given, and no other."""
    layout = FORMATS[mtype]
    names = [name for name, _ in layout]
    if set(fields) != set(names):
        raise TypeError(f"{NAMES[mtype]} takes fields {names}, not {sorted(fields)}")
    out = bytearray(HEADER_SIZE)
    for name, kind in layout:
        try:
            _write_field(out, kind, fields[name])
        except struct.error as e:
            raise ValueError(f"{NAMES[mtype]} field {name}={fields[name]!r}: {e}") from None
    _HEADER.pack_into(out, 0, len(out), mtype, tag)
    return bytes(out)


def rlerror(tag: int, ecode: int) -> bytes:
    """Rlerror: a Linux errno in place of the reply."""
    return build(RLERROR, tag, ecode=ecode)


def dirent_size(name: str) -> int:
    """Bytes one Rreaddir entry for ``name`` takes: qid[13] offset[8] type[1] name[s]."""
    return QID_SIZE + 8 + 1 + 2 + len(name.encode("utf-8"))


def put_dirent(out: bytearray, qid: Qid, offset: int, dtype: int, name: str) -> None:
    put_qid(out, qid)
    put_u64(out, offset)
    put_u8(out, dtype)
    put_string(out, name)


def parse_dirents(data: bytes | bytearray | memoryview) -> list[Dirent]:
    """The entries of an Rreaddir's data, as a client reads them."""
    r = Reader(data)
    out = []
    while r.pos < r.end:
        out.append(Dirent(r.qid(), r.u64(), r.u8(), r.string()))
    return out


def pack_dirents(entries: Iterable[Dirent]) -> bytes:
    out = bytearray()
    for d in entries:
        put_dirent(out, d.qid, d.offset, d.type, d.name)
    return bytes(out)
