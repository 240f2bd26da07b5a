"""The 9P2000.L codec: layouts pinned byte for byte, round trips of every message, and hostile input."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.host import p9wire as w
from kvmkit.host.p9wire import P9ProtocolError, Qid

MSIZE = 8192

u64 = st.one_of(st.integers(0, 1 << 16), st.sampled_from([(1 << 63) - 1, 1 << 63, (1 << 64) - 1]))
qids = st.builds(Qid, st.integers(0, 255), st.integers(0, 0xFFFFFFFF), u64)
texts = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=24)
_FIELD = {
    "1": st.integers(0, 0xFF), "2": st.integers(0, 0xFFFF), "4": st.integers(0, 0xFFFFFFFF), "8": u64,
    "s": texts, "Q": qids, "D": st.binary(max_size=64),
    "W": st.lists(texts, max_size=w.MAX_WELEM), "R": st.lists(qids, max_size=w.MAX_WELEM),
}


def fields_for(mtype: int) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({name: _FIELD[kind] for name, kind in w.FORMATS[mtype]})


def header(size: int, mtype: int, tag: int) -> bytes:
    return struct.pack("<IBH", size, mtype, tag)


def raw(mtype: int, tag: int, body: bytes) -> bytes:
    return header(w.HEADER_SIZE + len(body), mtype, tag) + body


def s(text: bytes) -> bytes:
    return struct.pack("<H", len(text)) + text


# -- layouts -------------------------------------------------------------------

def test_tversion_bytes_are_little_endian_and_sized() -> None:
    msg = w.build(w.TVERSION, w.NOTAG, msize=0x12345, version="9P2000.L")
    assert msg == bytes.fromhex("15000000" "64" "ffff" "45230100" "0800") + b"9P2000.L"


def test_qid_is_13_bytes_type_version_path() -> None:
    msg = w.build(w.RATTACH, 1, qid=Qid(0x80, 0x01020304, 0x1122334455667788))
    assert msg[w.HEADER_SIZE:] == bytes.fromhex("80" "04030201" "8877665544332211")


def test_rgetattr_stat_block_is_153_bytes() -> None:
    fields = {name: 0 for name, _ in w.FORMATS[w.RGETATTR]}
    fields["qid"] = Qid(0, 0, 0)
    fields["mode"] = 0o100644
    msg = w.build(w.RGETATTR, 7, **fields)
    assert len(msg) == w.HEADER_SIZE + 8 + 13 + 3 * 4 + 15 * 8
    assert w.parse_message(msg, MSIZE)["mode"] == 0o100644


def test_twalk_and_twrite_layouts() -> None:
    walk = w.build(w.TWALK, 3, fid=1, newfid=2, wnames=["a", "bc"])
    assert walk == raw(w.TWALK, 3, struct.pack("<IIH", 1, 2, 2) + s(b"a") + s(b"bc"))
    write = w.build(w.TWRITE, 4, fid=9, offset=1 << 40, data=b"xyz")
    assert write == raw(w.TWRITE, 4, struct.pack("<IQI", 9, 1 << 40, 3) + b"xyz")


def test_every_9p2000L_message_has_a_layout_and_a_name() -> None:
    for mtype in (w.TSTATFS, w.TLOPEN, w.TLCREATE, w.TSYMLINK, w.TMKNOD, w.TRENAME, w.TREADLINK,
                  w.TGETATTR, w.TSETATTR, w.TXATTRWALK, w.TXATTRCREATE, w.TREADDIR, w.TFSYNC, w.TLOCK,
                  w.TGETLOCK, w.TLINK, w.TMKDIR, w.TRENAMEAT, w.TUNLINKAT, w.TVERSION, w.TAUTH,
                  w.TATTACH, w.TFLUSH, w.TWALK, w.TREAD, w.TWRITE, w.TCLUNK, w.TREMOVE):
        assert mtype in w.REQUESTS and mtype + 1 in w.FORMATS
        assert w.NAMES[mtype].startswith("T") and w.NAMES[mtype + 1].startswith("R")
    assert w.NAMES[w.RLERROR] == "Rlerror" and w.RLERROR not in w.REQUESTS


# -- round trips -----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_round_trip_every_message(data: st.DataObject) -> None:
    mtype = data.draw(st.sampled_from(sorted(w.FORMATS)))
    fields = data.draw(fields_for(mtype))
    tag = data.draw(st.integers(0, 0xFFFF))
    msg = w.build(mtype, tag, **fields)
    back = w.parse_message(msg, len(msg))
    assert (back.type, back.tag, back.fields) == (mtype, tag, fields)
    assert w.parse_message(memoryview(bytearray(msg)), len(msg)).fields == fields
    if mtype in w.REQUESTS:
        assert w.parse_request(msg, len(msg)).fields == fields


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(w.Dirent, qids, u64, st.integers(0, 255), texts), max_size=8))
def test_dirents_round_trip(entries: list[w.Dirent]) -> None:
    data = w.pack_dirents(entries)
    assert len(data) == sum(w.dirent_size(d.name) for d in entries)
    assert w.parse_dirents(data) == entries


def test_integer_and_string_helpers_round_trip() -> None:
    out = bytearray()
    w.put_u8(out, 0xAB)
    w.put_u16(out, 0xBEEF)
    w.put_u32(out, 0xDEADBEEF)
    w.put_u64(out, 0x0123456789ABCDEF)
    w.put_string(out, "héllo")
    w.put_qid(out, Qid(2, 3, 4))
    w.put_data(out, b"\0\1")
    r = w.Reader(bytes(out))
    assert (r.u8(), r.u16(), r.u32(), r.u64(), r.string(), r.qid(), r.data()) == \
        (0xAB, 0xBEEF, 0xDEADBEEF, 0x0123456789ABCDEF, "héllo", Qid(2, 3, 4), b"\0\1")
    assert r.pos == r.end


def test_build_refuses_wrong_fields_and_values() -> None:
    with pytest.raises(TypeError):
        w.build(w.TCLUNK, 1)
    with pytest.raises(TypeError):
        w.build(w.TCLUNK, 1, fid=1, extra=2)
    with pytest.raises(ValueError):
        w.build(w.TCLUNK, 1, fid=1 << 32)
    with pytest.raises(ValueError):
        w.build(w.TWALK, 1, fid=1, newfid=2, wnames=["x"] * 17)
    with pytest.raises(ValueError):
        w.build(w.RREADLINK, 1, target="x" * 65536)


# -- malformed input ---------------------------------------------------------------

def rejected(buf: bytes, msize: int = MSIZE) -> P9ProtocolError:
    with pytest.raises(P9ProtocolError) as info:
        w.parse_request(buf, msize)
    return info.value


def test_too_short_for_a_tag_has_no_tag() -> None:
    for buf in (b"", b"\x07", bytes(6)):
        assert rejected(buf).tag is None


def test_size_field_must_match_the_buffer() -> None:
    good = w.build(w.TCLUNK, 42, fid=1)
    e = rejected(good[:-1])
    assert (e.tag, e.errno) == (42, errno.EPROTO)
    e = rejected(good + b"\0")
    assert e.tag == 42
    e = rejected(header(6, w.TCLUNK, 42) + b"\0" * 4)
    assert e.tag == 42


def test_trailing_bytes_after_the_last_field() -> None:
    body = struct.pack("<I", 1) + b"\0"
    assert rejected(raw(w.TCLUNK, 5, body)).errno == errno.EPROTO


def test_truncated_fields() -> None:
    assert rejected(raw(w.TCLUNK, 5, b"\1\0")).tag == 5
    assert rejected(raw(w.TREAD, 5, struct.pack("<IQ", 1, 0))).tag == 5
    assert rejected(raw(w.TVERSION, 5, struct.pack("<I", 8192))).tag == 5


def test_string_longer_than_the_message() -> None:
    body = struct.pack("<I", 8192) + struct.pack("<H", 100) + b"9P2000.L"
    assert rejected(raw(w.TVERSION, 6, body)).errno == errno.EPROTO


def test_twrite_count_must_match_the_data() -> None:
    body = struct.pack("<IQI", 1, 0, 10) + b"abc"
    assert rejected(raw(w.TWRITE, 6, body)).tag == 6
    body = struct.pack("<IQI", 1, 0, 2) + b"abc"
    assert rejected(raw(w.TWRITE, 6, body)).tag == 6


def test_message_larger_than_msize() -> None:
    msg = w.build(w.TWRITE, 9, fid=1, offset=0, data=bytes(100))
    assert w.parse_request(msg, len(msg))["data"] == bytes(100)
    e = rejected(msg, len(msg) - 1)
    assert (e.tag, e.errno) == (9, errno.EPROTO)


def test_seventeen_walk_names() -> None:
    body = struct.pack("<IIH", 0, 1, 17) + s(b"a") * 17
    e = rejected(raw(w.TWALK, 8, body))
    assert (e.tag, e.errno) == (8, errno.EINVAL)
    body = struct.pack("<IIH", 0, 1, 16) + s(b"a") * 16
    assert len(w.parse_request(raw(w.TWALK, 8, body), MSIZE)["wnames"]) == 16


def test_bad_utf8_and_nul_in_names() -> None:
    for name in (b"\xff\xfe", b"a\xc0", b"a\0b", b"\0"):
        body = struct.pack("<I", 1) + s(name) + struct.pack("<III", 0, 0o644, 0)
        e = rejected(raw(w.TLCREATE, 3, body))
        assert (e.tag, e.errno) == (3, errno.EINVAL)


def test_unknown_and_reply_types_are_not_requests() -> None:
    for mtype in (0, 112, 124, w.RVERSION, w.RLERROR, 255):
        e = rejected(raw(mtype, 11, b""))
        assert (e.tag, e.errno) == (11, errno.EOPNOTSUPP)


# -- fuzz ----------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=96))
def test_random_bytes_only_raise_protocol_errors(buf: bytes) -> None:
    try:
        w.parse_request(buf, MSIZE)
    except P9ProtocolError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(w.REQUESTS)), st.integers(0, 0xFFFF), st.binary(max_size=80))
def test_random_bodies_behind_a_valid_header(mtype: int, tag: int, body: bytes) -> None:
    """Deep into each layout: a correct frame around random fields."""
    try:
        msg = w.parse_request(raw(mtype, tag, body), MSIZE)
    except P9ProtocolError as e:
        assert e.tag == tag and e.errno in (errno.EPROTO, errno.EINVAL)
    else:
        assert (msg.type, msg.tag) == (mtype, tag)
        assert w.build(mtype, tag, **msg.fields) == raw(mtype, tag, body)
