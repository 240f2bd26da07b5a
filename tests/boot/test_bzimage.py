"""Setup header parsing and payload extraction, on Debian's kernel and on crafted images."""

from __future__ import annotations

import importlib.util
import struct

import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from kvmkit.boot import bzimage, fetch
from kvmkit.boot.bzimage import (
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    decompress,
    detect_compression,
    open_bzimage,
    parse_setup_header,
    payload,
)
from kvmkit.boot.elf import linux_banner, parse_elf
from kvmkit.errors import BootError



# --- the real Debian kernel -------------------------------------------------

def test_stock_header_values(stock_image: bytes) -> None:
    hdr = parse_setup_header(stock_image)
    assert stock_image[0x202:0x206] == b"HdrS"
    assert hdr.version >= 0x020F
    assert hdr.protocol.startswith("2.")
    assert hdr.xloadflags & XLF_KERNEL_64
    assert hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G
    assert hdr.relocatable_kernel == 1
    assert hdr.kernel_alignment == 0x200000
    assert hdr.pref_address == 0x1000000
    assert hdr.cmdline_size == 2047
    assert hdr.initrd_addr_max == 0x7FFFFFFF
    assert hdr.init_size > 32 << 20
    assert hdr.setup_size == (hdr.setup_sects + 1) * 512
    assert hdr.setup_size + hdr.payload_offset + hdr.payload_length <= len(stock_image)
    assert hdr.kernel_version.startswith("6.1.")
    assert "amd64" in hdr.kernel_version
    assert hdr.raw[:1] == stock_image[0x1F1:0x1F2] and len(hdr.raw) == 0x202 + stock_image[0x201] - 0x1F1


def test_stock_payload_is_xz_and_decompresses_to_vmlinux(stock_image: bytes, stock_parsed) -> None:
    data = payload(stock_image)
    assert detect_compression(data) == "xz"
    assert stock_parsed.compression == "xz"
    vmlinux = stock_parsed.vmlinux
    # the build appends the uncompressed size after the stream
    assert struct.unpack("<I", data[-4:])[0] == len(vmlinux)
    elf = parse_elf(vmlinux)
    assert elf.entry == 0x1000000
    assert elf.phys_entry == 0x1000000
    assert elf.phys_start == 0x1000000
    assert elf.segments[0].paddr == 0x1000000
    assert elf.segments[0].vaddr == 0xFFFFFFFF81000000
    assert all(s.paddr >= 0x1000000 for s in elf.segments)
    banner = linux_banner(vmlinux)
    assert banner is not None and banner.startswith("Linux version 6.1.")


def test_stock_kernel_fetch_is_idempotent(stock_bzimage) -> None:
    again = fetch.stock_kernel(stock_bzimage.parent)
    assert again == stock_bzimage
    assert again.name.startswith("vmlinuz-6.1.0-") and again.name.endswith("-amd64")


# --- crafted images ------------------------------------------------------------

@pytest.mark.parametrize("how", ["gzip", "xz", "lzma", "bzip2"])
def test_each_compression_round_trips(how: str, make_elf, make_bzimage, compress_payload) -> None:
    elf = make_elf()
    bz = open_bzimage(make_bzimage(compress_payload(elf, how)))
    assert bz.compression == how
    assert bz.vmlinux == elf
    assert bz.header.kernel_version == "6.1.0-crafted (test@kvmkit) #1"


@pytest.mark.parametrize("module,magic", [("zstandard", b"\x28\xb5\x2f\xfd"), ("lz4", b"\x02\x21\x4c\x18")])
def test_optional_compressors_name_their_package(module: str, magic: bytes) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed, so the missing-package message cannot be shown")
    with pytest.raises(BootError, match=module):
        decompress(magic + b"\0" * 32)


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is None, reason="zstandard is not installed")
def test_zstd_round_trip(make_elf, make_bzimage) -> None:
    import zstandard

    elf = make_elf()
    data = zstandard.ZstdCompressor().compress(elf) + struct.pack("<I", len(elf))
    assert open_bzimage(make_bzimage(data)).vmlinux == elf


@pytest.mark.skipif(importlib.util.find_spec("lz4") is None, reason="lz4 is not installed")
def test_lz4_legacy_round_trip(make_elf, make_bzimage) -> None:
    import lz4.block

    elf = make_elf()
    block = lz4.block.compress(elf, store_size=False)
    data = b"\x02\x21\x4c\x18" + struct.pack("<I", len(block)) + block + struct.pack("<I", len(elf))
    assert open_bzimage(make_bzimage(data)).vmlinux == elf


def test_not_a_kernel() -> None:
    with pytest.raises(BootError, match="HdrS"):
        parse_setup_header(b"\0" * 4096)
    with pytest.raises(BootError, match="too short"):
        parse_setup_header(b"hello")


def test_protocol_too_old(make_bzimage) -> None:
    with pytest.raises(BootError, match=r"protocol 2\.04.*2\.06"):
        parse_setup_header(make_bzimage(version=0x0204))


def test_bad_boot_flag(make_bzimage) -> None:
    img = bytearray(make_bzimage())
    img[0x1FE:0x200] = b"\0\0"
    with pytest.raises(BootError, match="boot_flag"):
        parse_setup_header(bytes(img))


def test_truncated_payload(make_bzimage) -> None:
    img = make_bzimage()
    with pytest.raises(BootError, match="truncated"):
        open_bzimage(img[: len(img) - 200])


def test_truncated_compressed_stream(make_elf, make_bzimage, compress_payload) -> None:
    # payload_length consistent with the file, but the xz stream itself is cut short
    data = compress_payload(make_elf(), "xz")
    with pytest.raises(BootError, match="truncated"):
        open_bzimage(make_bzimage(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["gzip", "xz", "lzma", "bzip2"])
def test_corrupt_compressed_data(how: str, make_elf, make_bzimage, compress_payload) -> None:
    data = bytearray(compress_payload(make_elf(segments=[(0x200000, 0x200000, bytes(range(256)) * 64, 0x8000)]), how))
    for i in range(len(data) // 3, len(data) // 3 + 24):
        data[i] ^= 0x5A
    with pytest.raises(BootError, match="corrupt|truncated|ELF"):
        open_bzimage(make_bzimage(bytes(data)))


def test_unknown_compression(make_bzimage) -> None:
    with pytest.raises(BootError, match="no known compression"):
        open_bzimage(make_bzimage(b"JUNKJUNKJUNK" * 10))


def test_payload_that_is_not_elf(make_bzimage, compress_payload) -> None:
    with pytest.raises(BootError, match="ELF"):
        open_bzimage(make_bzimage(compress_payload(b"not an elf at all", "gzip")))


def test_fields_newer_than_protocol_read_as_zero(make_bzimage) -> None:
    hdr = parse_setup_header(make_bzimage(version=0x0206))
    assert hdr.payload_offset == 0 and hdr.init_size == 0 and hdr.xloadflags == 0
    with pytest.raises(BootError, match="2.08"):
        payload(make_bzimage(version=0x0206))


def test_setup_sects_zero_means_four(make_bzimage) -> None:
    img = bytearray(make_bzimage(setup_sects=4))
    img[0x1F1] = 0
    assert parse_setup_header(bytes(img)).setup_sects == 4


def test_decompression_bomb_is_refused(monkeypatch, compress_payload) -> None:
    monkeypatch.setattr(bzimage, "MAX_DECOMPRESSED", 1024)
    with pytest.raises(BootError, match="more than"):
        decompress(compress_payload(b"\0" * 100000, "gzip"))


# --- fuzzing: any bytes give a header or a BootError, nothing else -----------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        open_bzimage(data)
    except BootError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0x1F0, 0x26F), st.integers(0, 255)), min_size=1, max_size=12),
       st.integers(0, 4000))
def test_fuzz_mutated_header(make_bzimage, make_elf, compress_payload, mutations: list[tuple[int, int]], cut: int) -> None:
    img = bytearray(make_bzimage(compress_payload(make_elf(), "gzip")))
    for off, val in mutations:
        img[off] = val
    try:
        bz = open_bzimage(bytes(img[:cut]))
        assert bz.vmlinux.startswith(b"\x7fELF")
    except BootError as exc:
        assert str(exc).endswith(".")
