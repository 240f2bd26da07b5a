"""The 9P2000.L share server, driven the way the guest's v9fs drives it, and attacked the way a hostile guest would.

A small client below builds T-messages with the codec and parses every
reply with it too, so each test also checks that the server only ever
sends well-formed replies with the request's tag.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.host import p9server
from kvmkit.host import p9wire as w
from kvmkit.host.p9server import P9Server, ShareError

MSIZE = 64 * 1024
ROOT_FID = 0


class P9Error(Exception):
    def __init__(self, ecode: int) -> None:
        super().__init__(f"Rlerror {errno.errorcode.get(ecode, ecode)}")
        self.errno = ecode


class Client:
    """Just enough of a 9P2000.L client to script a session; every call returns the parsed reply."""

    def __init__(self, server: P9Server) -> None:
        self.server = server
        self.tag = 0
        self.msize = MSIZE

    def rpc(self, mtype: int, **fields: Any) -> w.Message:
        self.tag = (self.tag + 1) % w.NOTAG
        reply = self.server.handle(w.build(mtype, self.tag, **fields))
        msg = w.parse_message(reply, self.msize)
        assert msg.tag == self.tag
        if msg.type == w.RLERROR:
            raise P9Error(msg["ecode"])
        assert msg.type == mtype + 1, (w.NAMES[mtype], w.NAMES.get(msg.type))
        return msg

    def error(self, mtype: int, **fields: Any) -> int:
        with pytest.raises(P9Error) as info:
            self.rpc(mtype, **fields)
        return info.value.errno

    def version(self, msize: int = MSIZE) -> w.Message:
        self.msize = 1 << 20
        reply = self.rpc(w.TVERSION, msize=msize, version="9P2000.L")
        self.msize = reply["msize"]
        return reply

    def attach(self, fid: int = ROOT_FID) -> w.Qid:
        return self.rpc(w.TATTACH, fid=fid, afid=w.NOFID, uname="root", aname="", n_uname=0)["qid"]

    def walk(self, fid: int, newfid: int, *names: str) -> list[w.Qid]:
        return self.rpc(w.TWALK, fid=fid, newfid=newfid, wnames=list(names))["wqids"]

    def lopen(self, fid: int, flags: int = w.DOTL_RDONLY) -> w.Message:
        return self.rpc(w.TLOPEN, fid=fid, flags=flags)

    def lcreate(self, fid: int, name: str, mode: int = 0o644, flags: int = w.DOTL_RDWR) -> w.Message:
        return self.rpc(w.TLCREATE, fid=fid, name=name, flags=flags | w.DOTL_CREATE, mode=mode, gid=0)

    def read(self, fid: int, offset: int = 0, count: int = 4096) -> bytes:
        return self.rpc(w.TREAD, fid=fid, offset=offset, count=count)["data"]

    def write(self, fid: int, data: bytes, offset: int = 0) -> int:
        return self.rpc(w.TWRITE, fid=fid, offset=offset, data=data)["count"]

    def readdir(self, fid: int, offset: int = 0, count: int = 8192) -> list[w.Dirent]:
        return w.parse_dirents(self.rpc(w.TREADDIR, fid=fid, offset=offset, count=count)["data"])

    def readdir_all(self, fid: int, count: int = 8192) -> tuple[list[w.Dirent], int]:
        """Every entry, resuming from the last cookie each time, and how many Treaddir it took."""
        entries: list[w.Dirent] = []
        offset, calls = 0, 0
        while True:
            calls += 1
            batch = self.readdir(fid, offset, count)
            if not batch:
                return entries, calls
            entries += batch
            offset = batch[-1].offset

    def getattr(self, fid: int) -> w.Message:
        return self.rpc(w.TGETATTR, fid=fid, request_mask=w.GETATTR_ALL)

    def setattr(self, fid: int, valid: int, **values: int) -> w.Message:
        fields = dict(mode=0, uid=0, gid=0, size=0, atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0)
        fields.update(values)
        return self.rpc(w.TSETATTR, fid=fid, valid=valid, **fields)

    def clunk(self, fid: int) -> None:
        self.rpc(w.TCLUNK, fid=fid)

    def mkdir(self, dfid: int, name: str, mode: int = 0o755) -> w.Qid:
        return self.rpc(w.TMKDIR, dfid=dfid, name=name, mode=mode, gid=0)["qid"]

    def symlink(self, dfid: int, name: str, target: str) -> w.Qid:
        return self.rpc(w.TSYMLINK, fid=dfid, name=name, symtgt=target, gid=0)["qid"]

    def readlink(self, fid: int) -> str:
        return self.rpc(w.TREADLINK, fid=fid)["target"]

    def mknod(self, dfid: int, name: str, mode: int, major: int = 0, minor: int = 0) -> w.Qid:
        return self.rpc(w.TMKNOD, dfid=dfid, name=name, mode=mode, major=major, minor=minor, gid=0)["qid"]


def names(entries: list[w.Dirent]) -> list[str]:
    return [d.name for d in entries]


def leaked_fds(before: set[str]) -> set[str]:
    """Descriptors open now that were not open at ``before``. Only new ones count: an fd some other
    test left to the garbage collector may close meanwhile, which is no leak of the server's."""
    return open_fds() - before


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything a modifying request could change below ``top``: names, types, modes, sizes, times, contents."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st_ = p.lstat()
            content = p.read_bytes() if stat.S_ISREG(st_.st_mode) else os.readlink(p) if p.is_symlink() else None
            out[str(p.relative_to(top))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_uid, content)
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/share (the root) beside tmp/outside, which no request may reach."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    share = tmp_path / "share"
    (share / "sub" / "deep").mkdir(parents=True)
    (share / "hello.txt").write_text("hello, guest\n")
    (share / "sub" / "inner.txt").write_text("inner\n")
    return share


@pytest.fixture(params=["openat2", "fallback"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with openat2, and again with the O_NOFOLLOW fallback used where the kernel lacks it."""
    monkeypatch.setattr(p9server, "openat2_available", request.param == "openat2")
    return request.param


@pytest.fixture
def server(tree: Path) -> Iterator[P9Server]:
    with P9Server(tree) as srv:
        yield srv


@pytest.fixture
def c(server: P9Server) -> Client:
    client = Client(server)
    client.version()
    client.attach()
    return client


# -- session -------------------------------------------------------------------------

def test_version_negotiates_msize_and_names_the_protocol(server: P9Server) -> None:
    c = Client(server)
    assert c.version(1 << 20)["msize"] == p9server.DEFAULT_MSIZE
    assert c.version(8192)["msize"] == 8192
    assert server.msize == 8192
    c.msize = 1 << 20
    assert c.rpc(w.TVERSION, msize=8192, version="9P2000.u")["version"] == "unknown"
    assert c.rpc(w.TVERSION, msize=8192, version="9P2000.L")["version"] == "9P2000.L"
    assert c.error(w.TVERSION, msize=512, version="9P2000.L") == errno.EINVAL


def test_requests_before_version_are_refused(server: P9Server) -> None:
    c = Client(server)
    assert c.error(w.TATTACH, fid=0, afid=w.NOFID, uname="", aname="", n_uname=0) == errno.EPROTO


def test_version_clunks_every_fid(c: Client) -> None:
    c.walk(ROOT_FID, 1, "hello.txt")
    assert c.server.fid_count == 2
    c.version()
    assert c.server.fid_count == 0
    assert c.error(w.TGETATTR, fid=1, request_mask=w.GETATTR_ALL) == errno.EBADF


def test_attach_auth_and_fid_rules(c: Client, tree: Path) -> None:
    assert c.attach(5).path == tree.stat().st_ino
    assert c.error(w.TATTACH, fid=5, afid=w.NOFID, uname="", aname="", n_uname=0) == errno.EEXIST
    assert c.error(w.TATTACH, fid=6, afid=1, uname="", aname="", n_uname=0) == errno.EINVAL
    assert c.error(w.TAUTH, afid=7, uname="root", aname="", n_uname=0) == errno.EOPNOTSUPP
    assert c.error(w.TCLUNK, fid=99) == errno.EBADF


def test_create_write_read_back(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1)
    reply = c.lcreate(1, "new.txt", 0o640)
    assert reply["qid"].type == w.QTFILE and reply["iounit"] == c.msize - w.IOHDRSZ
    assert c.write(1, b"hello world") == 11
    assert c.write(1, b"W", offset=6) == 1
    assert c.read(1) == b"hello World"
    assert c.read(1, offset=6, count=3) == b"Wor"
    assert c.read(1, offset=100) == b""
    c.clunk(1)
    assert (tree / "new.txt").read_bytes() == b"hello World"
    assert stat.S_IMODE((tree / "new.txt").stat().st_mode) == 0o640
    assert c.error(w.TLCREATE, fid=ROOT_FID, name="new.txt", flags=w.DOTL_RDWR, mode=0o644, gid=0) == errno.EEXIST


def test_open_existing_file_with_truncate_and_append(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1, "hello.txt")
    c.lopen(1, w.DOTL_WRONLY | w.DOTL_TRUNC)
    c.write(1, b"one")
    c.clunk(1)
    c.walk(ROOT_FID, 1, "hello.txt")
    c.lopen(1, w.DOTL_WRONLY | w.DOTL_APPEND)
    c.write(1, b"two", offset=0)
    assert c.error(w.TREAD, fid=1, offset=0, count=10) == errno.EBADF
    assert c.error(w.TLOPEN, fid=1, flags=0) == errno.EINVAL
    assert (tree / "hello.txt").read_bytes() == b"onetwo"


def test_read_and_write_are_bounded_by_msize(server: P9Server, tree: Path) -> None:
    (tree / "big").write_bytes(bytes(range(256)) * 64)
    c = Client(server)
    c.version(8192)
    c.attach()
    c.walk(ROOT_FID, 1, "big")
    c.lopen(1, w.DOTL_RDWR)
    assert len(c.read(1, count=1 << 20)) == 8192 - w.RREAD_HEADER
    fits = 8192 - w.TWRITE_HEADER
    assert c.write(1, bytes(fits)) == fits
    assert c.error(w.TWRITE, fid=1, offset=0, data=bytes(fits + 1)) == errno.EPROTO
    assert server.malformed == 1


def test_walk_returns_a_qid_per_name_and_stops_at_the_first_missing(c: Client, tree: Path) -> None:
    qids = c.walk(ROOT_FID, 1, "sub", "deep")
    assert [q.type for q in qids] == [w.QTDIR, w.QTDIR]
    assert qids[1].path == (tree / "sub" / "deep").stat().st_ino
    assert c.error(w.TWALK, fid=ROOT_FID, newfid=2, wnames=["nope"]) == errno.ENOENT
    partial = c.walk(ROOT_FID, 2, "sub", "nope", "deeper")
    assert len(partial) == 1
    assert c.error(w.TCLUNK, fid=2) == errno.EBADF          # a partial walk makes no newfid
    assert c.walk(1, 1, "..", "inner.txt")[1].type == w.QTFILE   # newfid == fid moves the fid
    assert c.walk(1, 1) == []
    assert c.getattr(1)["size"] == len("inner\n")
    assert c.walk(ROOT_FID, 3, *["."] * 16)[-1] == c.getattr(ROOT_FID)["qid"]
    assert c.error(w.TWALK, fid=ROOT_FID, newfid=1, wnames=[]) == errno.EEXIST


def test_rename_and_renameat(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1, "hello.txt")
    c.walk(ROOT_FID, 2, "sub")
    c.rpc(w.TRENAME, fid=1, dfid=2, name="moved.txt")
    assert not (tree / "hello.txt").exists()
    assert (tree / "sub" / "moved.txt").read_text() == "hello, guest\n"
    c.rpc(w.TRENAME, fid=1, dfid=ROOT_FID, name="back.txt")       # the fid knows where its file went
    assert (tree / "back.txt").read_text() == "hello, guest\n"
    c.rpc(w.TRENAMEAT, olddirfid=ROOT_FID, oldname="back.txt", newdirfid=2, newname="again.txt")
    c.rpc(w.TREMOVE, fid=1)                                         # and followed the renameat too
    assert not (tree / "sub" / "again.txt").exists()
    c.walk(ROOT_FID, 5, "sub", "deep")
    c.rpc(w.TRENAMEAT, olddirfid=ROOT_FID, oldname="sub", newdirfid=ROOT_FID, newname="sub2")
    assert c.walk(5, 6, "..", "..", "sub2")[2].path == (tree / "sub2").stat().st_ino
    assert c.error(w.TRENAME, fid=ROOT_FID, dfid=2, name="x") == errno.EBUSY
    assert c.error(w.TRENAMEAT, olddirfid=ROOT_FID, oldname="nope", newdirfid=ROOT_FID, newname="x") == errno.ENOENT


def test_readdir_lists_everything_with_dot_and_dotdot(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1)
    c.lopen(1, w.DOTL_RDONLY | w.DOTL_DIRECTORY)
    entries, _ = c.readdir_all(1)
    assert names(entries) == [".", "..", "hello.txt", "sub"]
    by_name = {d.name: d for d in entries}
    assert by_name["sub"].type == stat.S_IFDIR >> 12 and by_name["hello.txt"].type == stat.S_IFREG >> 12
    assert by_name["sub"].qid.path == (tree / "sub").stat().st_ino
    assert by_name[".."].qid == by_name["."].qid       # the root's parent is the root
    assert c.error(w.TREADDIR, fid=ROOT_FID, offset=0, count=100) == errno.EBADF   # not opened


def test_readdir_resumes_across_many_small_calls(c: Client, tree: Path) -> None:
    many = tree / "many"
    many.mkdir()
    for i in range(25):
        (many / f"file{i:02}").write_text(str(i))
    c.walk(ROOT_FID, 1, "many")
    c.lopen(1)
    whole, calls = c.readdir_all(1, count=8192)
    assert calls == 2
    small, calls = c.readdir_all(1, count=70)   # two 31-byte entries per reply
    assert small == whole and calls > 12
    assert names(whole) == [".", ".."] + [f"file{i:02}" for i in range(25)]
    offsets = [d.offset for d in whole]
    assert offsets == sorted(set(offsets))
    assert c.readdir(1, whole[9].offset) == whole[10:]
    assert c.error(w.TREADDIR, fid=1, offset=0, count=20) == errno.EINVAL   # no room for one entry


def test_readdir_pass_is_stable_while_the_directory_changes(c: Client, tree: Path) -> None:
    for name in "abcd":
        (tree / name).write_text(name)
    c.walk(ROOT_FID, 1)
    c.lopen(1)
    first = c.readdir(1, 0, count=100)
    (tree / "zz").write_text("late")
    (tree / "d").unlink()
    rest: list[w.Dirent] = []
    offset = first[-1].offset
    while batch := c.readdir(1, offset, count=100):
        rest += batch
        offset = batch[-1].offset
    seen = names(first + rest)
    assert "zz" not in seen and "d" not in seen and len(seen) == len(set(seen))
    assert "zz" in names(c.readdir_all(1)[0])    # offset 0 starts a new pass


def test_getattr_fills_the_basic_fields(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1, "hello.txt")
    attr = c.getattr(1)
    st_ = (tree / "hello.txt").stat()
    assert attr["valid"] == w.GETATTR_BASIC
    assert (attr["mode"], attr["uid"], attr["gid"], attr["nlink"], attr["size"]) == \
        (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_nlink, st_.st_size)
    assert (attr["blksize"], attr["blocks"], attr["rdev"]) == (st_.st_blksize, st_.st_blocks, st_.st_rdev)
    assert attr["mtime_sec"] * 10**9 + attr["mtime_nsec"] == st_.st_mtime_ns
    assert attr["ctime_sec"] * 10**9 + attr["ctime_nsec"] == st_.st_ctime_ns
    assert attr["qid"].path == st_.st_ino
    assert c.rpc(w.TGETATTR, fid=1, request_mask=w.GETATTR_SIZE)["valid"] == w.GETATTR_SIZE


def test_setattr_truncate_mode_times_and_owner(c: Client, tree: Path) -> None:
    target = tree / "hello.txt"
    c.walk(ROOT_FID, 1, "hello.txt")
    c.setattr(1, w.SETATTR_SIZE, size=5)
    assert target.read_bytes() == b"hello"
    c.setattr(1, w.SETATTR_SIZE, size=8)
    assert target.read_bytes() == b"hello\0\0\0"
    c.setattr(1, w.SETATTR_MODE | w.SETATTR_CTIME, mode=stat.S_IFREG | 0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    c.setattr(1, w.SETATTR_ATIME | w.SETATTR_ATIME_SET | w.SETATTR_MTIME | w.SETATTR_MTIME_SET,
              atime_sec=1_000_000_000, atime_nsec=5, mtime_sec=1_200_000_000, mtime_nsec=7)
    assert (target.stat().st_atime_ns, target.stat().st_mtime_ns) == (1_000_000_000 * 10**9 + 5, 1_200_000_000 * 10**9 + 7)
    c.setattr(1, w.SETATTR_MTIME)   # without MTIME_SET: now
    assert target.stat().st_mtime > 1_700_000_000
    assert target.stat().st_atime_ns == 1_000_000_000 * 10**9 + 5   # atime left alone
    c.setattr(1, w.SETATTR_UID | w.SETATTR_GID, uid=os.getuid(), gid=os.getgid())
    if os.getuid() == 0:
        c.setattr(1, w.SETATTR_UID | w.SETATTR_GID, uid=4321, gid=8765)
        assert (target.stat().st_uid, target.stat().st_gid) == (4321, 8765)
    c.walk(ROOT_FID, 2, "sub")
    assert c.error(w.TSETATTR, fid=2, valid=w.SETATTR_SIZE, mode=0, uid=0, gid=0, size=0,
                   atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0) == errno.EISDIR


def test_no_set_id_bits_reach_the_host(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1)
    c.lcreate(1, "prog", 0o4755)
    assert stat.S_IMODE((tree / "prog").stat().st_mode) == 0o755
    c.setattr(1, w.SETATTR_MODE, mode=0o6755)
    assert stat.S_IMODE((tree / "prog").stat().st_mode) == 0o755
    c.mkdir(ROOT_FID, "shared", 0o2775)
    assert stat.S_IMODE((tree / "shared").stat().st_mode) == 0o2775   # a directory keeps set-group-ID


def test_mkdir_unlinkat_and_remove(c: Client, tree: Path) -> None:
    qid = c.mkdir(ROOT_FID, "made", 0o750)
    assert qid.type == w.QTDIR and stat.S_IMODE((tree / "made").stat().st_mode) == 0o750
    assert c.error(w.TMKDIR, dfid=ROOT_FID, name="made", mode=0o755, gid=0) == errno.EEXIST
    assert c.error(w.TUNLINKAT, dirfd=ROOT_FID, name="made", flags=0) == errno.EISDIR
    c.rpc(w.TUNLINKAT, dirfd=ROOT_FID, name="made", flags=w.AT_REMOVEDIR)
    assert not (tree / "made").exists()
    c.rpc(w.TUNLINKAT, dirfd=ROOT_FID, name="hello.txt", flags=0)
    assert not (tree / "hello.txt").exists()
    assert c.error(w.TUNLINKAT, dirfd=ROOT_FID, name="sub", flags=w.AT_REMOVEDIR) == errno.ENOTEMPTY
    assert c.error(w.TUNLINKAT, dirfd=ROOT_FID, name="sub", flags=0x100) == errno.EINVAL
    c.walk(ROOT_FID, 1, "sub", "inner.txt")
    c.rpc(w.TREMOVE, fid=1)
    assert not (tree / "sub" / "inner.txt").exists()
    assert c.server.fid_count == 1
    c.walk(ROOT_FID, 1)
    assert c.error(w.TREMOVE, fid=1) == errno.EBUSY     # the root stays; the fid is clunked all the same
    assert c.error(w.TCLUNK, fid=1) == errno.EBADF


def test_symlink_and_readlink(c: Client, tree: Path) -> None:
    qid = c.symlink(ROOT_FID, "link", "sub/inner.txt")
    assert qid.type == w.QTSYMLINK
    assert os.readlink(tree / "link") == "sub/inner.txt"
    assert c.walk(ROOT_FID, 1, "link")[0] == qid
    assert c.readlink(1) == "sub/inner.txt"
    assert stat.S_ISLNK(c.getattr(1)["mode"])
    c.walk(ROOT_FID, 2, "hello.txt")
    assert c.error(w.TREADLINK, fid=2) == errno.EINVAL


def test_hard_link(c: Client, tree: Path) -> None:
    c.walk(ROOT_FID, 1, "hello.txt")
    c.walk(ROOT_FID, 2, "sub")
    c.rpc(w.TLINK, dfid=2, fid=1, name="again.txt")
    assert (tree / "sub" / "again.txt").stat().st_ino == (tree / "hello.txt").stat().st_ino
    assert c.getattr(1)["nlink"] == 2
    assert c.error(w.TLINK, dfid=2, fid=1, name="again.txt") == errno.EEXIST


def test_mknod_makes_files_fifos_and_sockets_but_no_devices(c: Client, tree: Path) -> None:
    c.mknod(ROOT_FID, "plain", stat.S_IFREG | 0o600)
    c.mknod(ROOT_FID, "fifo", stat.S_IFIFO | 0o600)
    c.mknod(ROOT_FID, "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISREG((tree / "plain").stat().st_mode)
    assert stat.S_ISFIFO((tree / "fifo").stat().st_mode)
    assert stat.S_ISSOCK((tree / "sock").stat().st_mode)
    for fmt in (stat.S_IFCHR, stat.S_IFBLK):
        assert c.error(w.TMKNOD, dfid=ROOT_FID, name="dev", mode=fmt | 0o666, major=1, minor=3, gid=0) == errno.EPERM
    assert not (tree / "dev").exists()
    c.walk(ROOT_FID, 1, "fifo")
    assert c.error(w.TLOPEN, fid=1, flags=w.DOTL_RDONLY) == errno.EPERM   # and the server did not block


def test_statfs_fsync_flush_lock_and_xattrs(c: Client, tree: Path) -> None:
    fs = c.rpc(w.TSTATFS, fid=ROOT_FID)
    vfs = os.statvfs(tree)
    assert (fs["type"], fs["namelen"], fs["blocks"]) == (p9server.V9FS_MAGIC, vfs.f_namemax, vfs.f_blocks)
    c.walk(ROOT_FID, 1, "hello.txt")
    assert c.error(w.TFSYNC, fid=1, datasync=0) == errno.EBADF
    c.lopen(1, w.DOTL_RDWR)
    c.rpc(w.TFSYNC, fid=1, datasync=0)
    c.rpc(w.TFSYNC, fid=1, datasync=1)
    c.rpc(w.TFLUSH, oldtag=3)
    assert c.rpc(w.TLOCK, fid=1, type=w.LOCK_TYPE_WRLCK, flags=1, start=0, length=0, proc_id=7,
                 client_id="guest")["status"] == w.LOCK_SUCCESS
    got = c.rpc(w.TGETLOCK, fid=1, type=w.LOCK_TYPE_WRLCK, start=4, length=8, proc_id=7, client_id="guest")
    assert got.fields == dict(type=w.LOCK_TYPE_UNLCK, start=4, length=8, proc_id=7, client_id="guest")
    assert c.error(w.TXATTRWALK, fid=1, newfid=2, name="user.x") == errno.EOPNOTSUPP
    assert c.error(w.TXATTRCREATE, fid=1, name="user.x", attr_size=1, flags=0) == errno.EOPNOTSUPP


def test_fid_exhaustion(tree: Path) -> None:
    with P9Server(tree, max_fids=8) as server:
        c = Client(server)
        c.version()
        c.attach()
        for fid in range(1, 8):
            c.walk(ROOT_FID, fid, "sub")
        assert c.error(w.TWALK, fid=ROOT_FID, newfid=8, wnames=[]) == errno.ENFILE
        assert c.error(w.TATTACH, fid=8, afid=w.NOFID, uname="", aname="", n_uname=0) == errno.ENFILE
        c.walk(3, 3, "deep")                   # walking a fid onto itself needs no new one
        c.clunk(7)
        c.walk(ROOT_FID, 8, "sub")


def test_every_request_type_has_a_handler(server: P9Server) -> None:
    assert set(server._handlers) == w.REQUESTS


def test_malformed_requests_still_get_an_answer(server: P9Server) -> None:
    assert server.handle(b"\x03\x00") == b""
    assert server.handle(memoryview(b"")) == b""
    assert server.dropped == 2
    reply = w.parse_message(server.handle(b"\x09\x00\x00\x00\x78\x2a\x00\x01\x00"), MSIZE)
    assert (reply.type, reply.tag, reply["ecode"]) == (w.RLERROR, 0x2A, errno.EPROTO)
    reply = w.parse_message(server.handle(w.build(w.TVERSION, 5, msize=8192, version="9P2000.L")[:-1] + b"\xff"),
                            MSIZE)
    assert (reply.tag, reply["ecode"]) == (5, errno.EINVAL)
    reply = w.parse_message(server.handle(b"\x07\x00\x00\x00\x70\x09\x00"), MSIZE)    # Topen: 9P2000, not .L
    assert (reply.tag, reply["ecode"]) == (9, errno.EOPNOTSUPP)


def test_close_releases_every_fd(tree: Path) -> None:
    before = open_fds()
    server = P9Server(tree)
    c = Client(server)
    c.version()
    c.attach()
    c.walk(ROOT_FID, 1, "sub")
    c.lopen(1)
    c.readdir(1)
    c.walk(ROOT_FID, 2, "hello.txt")
    c.lopen(2)
    server.close()
    assert not leaked_fds(before)
    assert c.error(w.TVERSION, msize=8192, version="9P2000.L") == errno.ESHUTDOWN


def test_an_unusable_root_is_a_share_error(tmp_path: Path) -> None:
    with pytest.raises(ShareError, match="give an existing directory"):
        P9Server(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ShareError):
        P9Server(tmp_path / "file")


# -- escape attempts -----------------------------------------------------------------

def test_dotdot_stops_at_the_root(c: Client, tree: Path, lookup: str) -> None:
    root = c.getattr(ROOT_FID)["qid"]
    assert c.walk(ROOT_FID, 1, "..") == [root]
    assert c.walk(ROOT_FID, 2, "..", "..", "..")[-1] == root
    assert c.walk(ROOT_FID, 3, "sub", "deep", "..", "..", "..", "..")[-1] == root
    c.lopen(1)
    assert names(c.readdir_all(1)[0]) == [".", "..", "hello.txt", "sub"]   # not tmp/, no "outside"
    assert len(c.walk(2, 4, "..", "outside")) == 1
    assert c.error(w.TCLUNK, fid=4) == errno.EBADF


def test_names_with_a_slash_or_empty_are_refused(c: Client, tree: Path, lookup: str) -> None:
    for bad in ("../outside", "sub/inner.txt", "/", "", "../outside/secret"):
        assert c.error(w.TWALK, fid=ROOT_FID, newfid=1, wnames=[bad]) == errno.EINVAL
    for bad in ("../escaped", "a/b", ".", "..", ""):
        assert c.error(w.TLCREATE, fid=ROOT_FID, name=bad, flags=w.DOTL_RDWR, mode=0o644, gid=0) == errno.EINVAL
        assert c.error(w.TMKDIR, dfid=ROOT_FID, name=bad, mode=0o755, gid=0) == errno.EINVAL
        assert c.error(w.TSYMLINK, fid=ROOT_FID, name=bad, symtgt="x", gid=0) == errno.EINVAL
        assert c.error(w.TMKNOD, dfid=ROOT_FID, name=bad, mode=stat.S_IFREG, major=0, minor=0, gid=0) == errno.EINVAL
        assert c.error(w.TRENAMEAT, olddirfid=ROOT_FID, oldname="hello.txt", newdirfid=ROOT_FID,
                       newname=bad) == errno.EINVAL
        assert c.error(w.TUNLINKAT, dirfd=ROOT_FID, name=bad, flags=0) == errno.EINVAL
    assert sorted(p.name for p in tree.parent.iterdir()) == ["outside", "share"]
    assert (tree / "hello.txt").exists()


def test_symlink_to_etc_is_never_followed(c: Client, tree: Path, lookup: str) -> None:
    (tree / "etc").symlink_to("/etc")
    qids = c.walk(ROOT_FID, 1, "etc", "passwd")
    assert [q.type for q in qids] == [w.QTSYMLINK]       # stopped at the link itself
    assert c.error(w.TCLUNK, fid=1) == errno.EBADF
    c.walk(ROOT_FID, 1, "etc")
    assert c.readlink(1) == "/etc"                       # the guest resolves it, in its own tree
    assert c.error(w.TWALK, fid=1, newfid=2, wnames=["passwd"]) in (errno.ENOTDIR, errno.ELOOP)
    assert c.error(w.TWALK, fid=1, newfid=2, wnames=["."]) == errno.ENOTDIR
    assert c.error(w.TWALK, fid=1, newfid=2, wnames=[".."]) == errno.ENOTDIR
    assert c.error(w.TLOPEN, fid=1, flags=w.DOTL_RDONLY) == errno.ELOOP
    assert c.error(w.TLOPEN, fid=1, flags=w.DOTL_RDONLY | w.DOTL_DIRECTORY) == errno.ELOOP
    assert stat.S_ISLNK(c.getattr(1)["mode"])
    assert c.error(w.TMKDIR, dfid=1, name="x", mode=0o755, gid=0) == errno.ENOTDIR
    assert c.error(w.TLCREATE, fid=1, name="x", flags=w.DOTL_RDWR, mode=0o644, gid=0) == errno.ENOTDIR
    assert c.error(w.TSETATTR, fid=1, valid=w.SETATTR_SIZE, mode=0, uid=0, gid=0, size=0,
                   atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0) == errno.EINVAL


def test_symlinks_out_of_the_share_lead_nowhere(c: Client, tree: Path, lookup: str) -> None:
    outside = tree.parent / "outside"
    (tree / "abs").symlink_to(outside)
    (tree / "rel").symlink_to("../outside")
    (tree / "sub" / "up").symlink_to("../../outside/secret")
    before = snapshot(outside)
    for link in ("abs", "rel"):
        assert len(c.walk(ROOT_FID, 1, link, "secret")) == 1
        c.walk(ROOT_FID, 1, link)
        assert c.error(w.TLOPEN, fid=1, flags=w.DOTL_RDONLY) == errno.ELOOP
        c.clunk(1)
    c.walk(ROOT_FID, 1, "sub", "up")
    assert c.readlink(1) == "../../outside/secret"
    assert c.error(w.TLOPEN, fid=1, flags=w.DOTL_RDWR | w.DOTL_TRUNC) == errno.ELOOP
    c.setattr(1, w.SETATTR_ATIME | w.SETATTR_ATIME_SET | w.SETATTR_MTIME | w.SETATTR_MTIME_SET,
              atime_sec=1, mtime_sec=1)
    assert (tree / "sub" / "up").lstat().st_mtime == 1          # the link's own times
    assert c.error(w.TSETATTR, fid=1, valid=w.SETATTR_MODE, mode=0o777, uid=0, gid=0, size=0,
                   atime_sec=0, atime_nsec=0, mtime_sec=0, mtime_nsec=0) == errno.EOPNOTSUPP
    c.walk(ROOT_FID, 2, "rel")
    c.rpc(w.TLINK, dfid=ROOT_FID, fid=2, name="hard")           # links the symlink, not what it names
    assert os.readlink(tree / "hard") == "../outside"
    assert (outside / "secret").stat().st_nlink == 1
    c.rpc(w.TRENAME, fid=2, dfid=ROOT_FID, name="rel2")
    assert os.readlink(tree / "rel2") == "../outside"
    assert snapshot(outside) == before


@pytest.mark.parametrize("swapper", ["host", "guest"])
def test_directory_swapped_for_a_symlink_between_walks(c: Client, tree: Path, lookup: str, swapper: str) -> None:
    d = tree / "d"
    (d / "sub").mkdir(parents=True)
    (d / "inner").write_text("in the share")
    c.walk(ROOT_FID, 1, "d")
    c.walk(ROOT_FID, 2, "d", "sub")
    if swapper == "host":                   # the host (or a race) swaps d for a link to /
        d.rename(tree / "d.old")
        d.symlink_to("/")
    else:                                   # a hostile guest does it through the share itself
        c.rpc(w.TRENAMEAT, olddirfid=ROOT_FID, oldname="d", newdirfid=ROOT_FID, newname="d.old")
        c.symlink(ROOT_FID, "d", "/")
        c.walk(1, 9, "..", "d.old")         # the guest's own rename moved fid 1's names along
        c.clunk(9)
    assert os.readlink(d) == "/"
    qids = c.walk(ROOT_FID, 3, "d", "etc")
    assert [q.type for q in qids] == [w.QTSYMLINK]
    c.walk(ROOT_FID, 3, "d")
    assert c.error(w.TLOPEN, fid=3, flags=w.DOTL_RDONLY) == errno.ELOOP
    if swapper == "host":                   # fid 2 still thinks it is d/sub: its ".." meets the link
        assert c.error(w.TWALK, fid=2, newfid=4, wnames=[".."]) in (errno.ELOOP, errno.ENOTDIR)
        assert c.error(w.TWALK, fid=2, newfid=4, wnames=["..", "etc"]) in (errno.ELOOP, errno.ENOTDIR)
    else:
        assert c.walk(2, 4, "..")[0].path == (tree / "d.old").stat().st_ino
    c.walk(1, 5, "inner")                   # the fid still holds the directory it walked to
    c.lopen(5)
    assert c.read(5) == b"in the share"
    c.lopen(1)
    assert names(c.readdir_all(1)[0]) == [".", "..", "inner", "sub"]


def test_readonly_refuses_every_change(tree: Path, lookup: str) -> None:
    (tree / "link").symlink_to("hello.txt")
    before = snapshot(tree)
    with P9Server(tree, readonly=True) as server:
        c = Client(server)
        c.version()
        c.attach()
        c.walk(ROOT_FID, 1, "hello.txt")
        c.walk(ROOT_FID, 2, "sub")
        refused = [
            (w.TLCREATE, dict(fid=2, name="new", flags=w.DOTL_RDWR, mode=0o644, gid=0)),
            (w.TSETATTR, dict(fid=1, valid=w.SETATTR_SIZE, mode=0, uid=0, gid=0, size=0, atime_sec=0,
                              atime_nsec=0, mtime_sec=0, mtime_nsec=0)),
            (w.TSETATTR, dict(fid=1, valid=w.SETATTR_MODE, mode=0o777, uid=0, gid=0, size=0, atime_sec=0,
                              atime_nsec=0, mtime_sec=0, mtime_nsec=0)),
            (w.TMKDIR, dict(dfid=ROOT_FID, name="new", mode=0o755, gid=0)),
            (w.TUNLINKAT, dict(dirfd=ROOT_FID, name="hello.txt", flags=0)),
            (w.TUNLINKAT, dict(dirfd=2, name="deep", flags=w.AT_REMOVEDIR)),
            (w.TRENAMEAT, dict(olddirfid=ROOT_FID, oldname="hello.txt", newdirfid=2, newname="x")),
            (w.TRENAME, dict(fid=1, dfid=2, name="x")),
            (w.TSYMLINK, dict(fid=ROOT_FID, name="new", symtgt="x", gid=0)),
            (w.TLINK, dict(dfid=2, fid=1, name="x")),
            (w.TMKNOD, dict(dfid=ROOT_FID, name="new", mode=stat.S_IFIFO | 0o644, major=0, minor=0, gid=0)),
            (w.TLOPEN, dict(fid=1, flags=w.DOTL_WRONLY)),
            (w.TLOPEN, dict(fid=1, flags=w.DOTL_RDWR)),
            (w.TLOPEN, dict(fid=1, flags=w.DOTL_RDONLY | w.DOTL_TRUNC)),
        ]
        for mtype, fields in refused:
            assert c.error(mtype, **fields) == errno.EROFS, w.NAMES[mtype]
        c.lopen(1, w.DOTL_RDONLY)
        assert c.read(1) == b"hello, guest\n"
        assert c.error(w.TWRITE, fid=1, offset=0, data=b"x") == errno.EROFS
        c.walk(ROOT_FID, 3, "sub", "inner.txt")
        assert c.error(w.TREMOVE, fid=3) == errno.EROFS
        c.walk(ROOT_FID, 3, "link")
        assert c.readlink(3) == "hello.txt"
        c.lopen(2)
        assert names(c.readdir_all(2)[0]) == [".", "..", "deep", "inner.txt"]
        c.rpc(w.TSTATFS, fid=ROOT_FID)
        c.rpc(w.TFSYNC, fid=1, datasync=0)
    assert snapshot(tree) == before


# -- fuzz ------------------------------------------------------------------------------

_NAMES = st.sampled_from(["", ".", "..", "hello.txt", "sub", "deep", "link", "new", "new2", "x/y", "/",
                          "../outside", "outside", "secret"])
_FIDS = st.sampled_from([0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 9, w.NOFID])
_U64 = st.sampled_from([0, 1, 5, 4096, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]) | st.integers(0, 1 << 20)
_FIELD = {
    "1": st.integers(0, 0xFF), "2": st.integers(0, 0xFFFF),
    "4": st.sampled_from([0, 1, 2, 3, 0o644, 0o40755, stat.S_IFIFO | 0o600, stat.S_IFCHR | 0o600, 0x200,
                          w.DOTL_RDWR | w.DOTL_TRUNC, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF),
    "8": _U64, "s": _NAMES, "Q": st.builds(w.Qid, st.integers(0, 255), st.integers(0, 9), st.integers(0, 9)),
    "D": st.binary(max_size=32), "W": st.lists(_NAMES, max_size=w.MAX_WELEM),
    "R": st.lists(st.builds(w.Qid, st.just(0), st.just(0), st.just(0)), max_size=3),
}
_FID_FIELDS = {"fid", "newfid", "dfid", "afid", "dirfd", "olddirfid", "newdirfid"}


def some_fids(c: Client) -> None:
    """Fids 0-5 on whatever of the tree earlier examples left: root, its clone, sub, a file and both opened."""
    c.version()
    for step in (lambda: c.attach(), lambda: c.walk(ROOT_FID, 1), lambda: c.walk(ROOT_FID, 2, "sub"),
                 lambda: c.walk(ROOT_FID, 3, "hello.txt"), lambda: c.lopen(3, w.DOTL_RDWR),
                 lambda: c.walk(ROOT_FID, 4, "sub"), lambda: c.lopen(4), lambda: c.walk(ROOT_FID, 5, "link")):
        try:
            step()
        except P9Error:
            pass


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    mtype = draw(st.sampled_from(sorted(w.REQUESTS - {w.TVERSION})))
    fields = {name: draw(_FIDS if name in _FID_FIELDS else _FIELD[kind]) for name, kind in w.FORMATS[mtype]}
    return w.build(mtype, draw(st.integers(0, 0xFFFE)), **fields)


def check_reply(request: bytes, reply: bytes, msize: int) -> None:
    if len(request) < w.HEADER_SIZE:
        assert reply == b""
        return
    msg = w.parse_message(reply, msize)
    assert msg.tag == int.from_bytes(request[5:7], "little")
    assert msg.type == w.RLERROR or msg.type == request[4] + 1


def restore(top: Path) -> None:
    """Give the test's tmp dir back to pytest whatever modes the fuzz left."""
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                p.chmod(0o755)


@pytest.fixture
def fuzz_session(tree: Path) -> Iterator[tuple[P9Server, Client]]:
    (tree / "link").symlink_to("/")
    outside = snapshot(tree.parent / "outside")
    fds = open_fds()
    server = P9Server(tree, max_fids=64)
    yield server, Client(server)
    server.close()
    assert not leaked_fds(fds)
    assert snapshot(tree.parent / "outside") == outside
    assert sorted(p.name for p in tree.parent.iterdir()) == ["outside", "share"]
    tree.chmod(0o755)
    restore(tree)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_random_bytes_never_raise(fuzz_session: tuple[P9Server, Client], data: bytes) -> None:
    server, _ = fuzz_session
    check_reply(data, server.handle(data), server.msize)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=48))
def test_random_frames_never_raise(fuzz_session: tuple[P9Server, Client], mtype: int, tag: int, body: bytes) -> None:
    server, c = fuzz_session
    c.version()
    c.attach()
    data = (w.HEADER_SIZE + len(body)).to_bytes(4, "little") + bytes([mtype]) + tag.to_bytes(2, "little") + body
    check_reply(data, server.handle(data), server.msize)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests(), min_size=1, max_size=12))
def test_random_sessions_never_raise_nor_escape(fuzz_session: tuple[P9Server, Client], batch: list[bytes]) -> None:
    server, c = fuzz_session
    some_fids(c)
    for request in batch:
        check_reply(request, server.handle(request), server.msize)
    assert server.fid_count <= server.max_fids



def test_a_share_of_the_host_root_does_not_enter_proc_or_sys() -> None:
    """`--share /:hostroot,ro` hands the guest the host's files, not the kernel's pseudo filesystems:
    /proc would show every host process's memory and environment to the user kvmkit runs as."""
    with P9Server("/", readonly=True) as server:
        c = Client(server)
        c.version()
        c.attach()
        assert c.walk(ROOT_FID, 1, "etc")                      # an ordinary directory: fine
        for i, name in enumerate(("proc", "sys")):
            # The mount point is there (the guest mounts its own over it), but not what is below it.
            assert c.walk(ROOT_FID, 10 + i, name)
            assert c.error(w.TWALK, fid=10 + i, newfid=20, wnames=["self" if name == "proc" else "kernel"]) == errno.EACCES
            assert c.error(w.TLOPEN, fid=10 + i, flags=w.DOTL_RDONLY) == errno.EACCES
            assert c.rpc(w.TGETATTR, fid=10 + i, request_mask=w.GETATTR_BASIC).type == w.RGETATTR
        assert len(c.walk(1, 2, "..", "proc", "self")) == 2    # a partial walk: it stops below /proc
