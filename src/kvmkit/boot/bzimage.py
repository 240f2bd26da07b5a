"""The x86 Linux setup header of a bzImage, and its compressed payload.

kvmkit does not run the kernel's real-mode setup code or its decompressor:
both would execute as emulated CPL0 code, which is slow here. Instead the
loader reads the setup header (Documentation/arch/x86/boot.rst), takes the
compressed vmlinux out of the image (payload_offset/payload_length) and
decompresses it in Python, then loads that ELF. Every header field comes from
an untrusted file, so each is bounds-checked and every failure is a
:class:`BootError` with one sentence the user can act on.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass

from ..errors import BootError

# Offsets inside the image (and inside boot_params: the header is copied as is).
SETUP_HEADER_START = 0x1F1
BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x0206  # first version with cmdline_size; 64-bit entry needs a modern header
PAYLOAD_PROTOCOL = 0x0208  # payload_offset/payload_length appear here
BOOT_PARAMS_HDR_END = 0x290  # edd_mbr_sig_buffer follows the header in boot_params

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80

# xloadflags
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
XLF_EFI_HANDOVER_32 = 0x04
XLF_EFI_HANDOVER_64 = 0x08
XLF_EFI_KEXEC = 0x10

# A vmlinux is tens of MiB (Debian's 6.1: 62 MiB); anything past this is a
# decompression bomb or junk. Loading a kernel caps it further at the guest's RAM.
MAX_DECOMPRESSED = 256 << 20


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header that a 64-bit loader needs, already validated."""

    version: int
    setup_sects: int
    syssize: int
    loadflags: int
    xloadflags: int
    relocatable_kernel: int
    min_alignment: int
    kernel_alignment: int
    pref_address: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    code32_start: int
    handover_offset: int
    kernel_version: str
    raw: bytes  # bytes 0x1f1..end of header, copied verbatim into boot_params

    @property
    def protocol(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel (boot sector included)."""
        return (self.setup_sects + 1) * 512

    @property
    def is_64bit(self) -> bool:
        # xloadflags exists from 2.12; older 64-bit kernels cannot say so.
        return self.version < 0x020C or bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def can_load_above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)


def is_bzimage(data: bytes) -> bool:
    """Cheap format sniff, so callers can tell a bzImage from an ELF before parsing."""
    return len(data) >= 0x206 and data[0x202:0x206] == HDRS_MAGIC


def _u8(d: bytes, off: int) -> int:
    return d[off]


def _u16(d: bytes, off: int) -> int:
    return struct.unpack_from("<H", d, off)[0]


def _u32(d: bytes, off: int) -> int:
    return struct.unpack_from("<I", d, off)[0]


def _u64(d: bytes, off: int) -> int:
    return struct.unpack_from("<Q", d, off)[0]


def parse_setup_header(image: bytes) -> SetupHeader:
    """Validate and decode the setup header of ``image`` (a whole bzImage file)."""
    if len(image) < 0x270:
        raise BootError(f"the kernel file is only {len(image)} bytes, too short to be a bzImage; pass a Linux bzImage or vmlinux ELF.")
    if image[0x202:0x206] != HDRS_MAGIC:
        raise BootError("the kernel file has no 'HdrS' setup header, so it is not a Linux bzImage; pass a bzImage or a vmlinux ELF.")
    version = _u16(image, 0x206)
    if version < MIN_PROTOCOL:
        raise BootError(
            f"the kernel uses boot protocol {version >> 8}.{version & 0xFF:02d}, older than the 2.06 that 64-bit loading needs; use a newer kernel."
        )
    boot_flag = _u16(image, 0x1FE)
    if boot_flag != BOOT_FLAG_MAGIC:
        raise BootError(f"the bzImage boot_flag is {boot_flag:#06x} instead of 0xaa55, so the image is damaged; download the kernel again.")
    setup_sects = _u8(image, 0x1F1) or 4  # 0 means 4 for historical reasons
    header_end = min(0x202 + _u8(image, 0x201), BOOT_PARAMS_HDR_END)
    if header_end < 0x23C:
        raise BootError("the bzImage setup header is shorter than its protocol version requires, so the image is damaged; download the kernel again.")
    if (setup_sects + 1) * 512 > len(image):
        raise BootError(
            f"the bzImage says its setup code is {setup_sects} sectors but the file is only {len(image)} bytes, so it is truncated; download the kernel again."
        )

    def field(off: int, size: int, since: int) -> int:
        # Fields newer than the kernel's protocol are undefined; read them as 0.
        if version < since or off + size > header_end:
            return 0
        return {1: _u8, 2: _u16, 4: _u32, 8: _u64}[size](image, off)

    kernel_version = ""
    kv_ptr = _u16(image, 0x20E)
    if kv_ptr:
        start = kv_ptr + 0x200
        end = min(start + 256, (setup_sects + 1) * 512, len(image))
        if start < end:
            raw = image[start:end].split(b"\0", 1)[0]
            kernel_version = raw.decode("ascii", "replace")
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        syssize=_u32(image, 0x1F4),
        loadflags=_u8(image, 0x211),
        xloadflags=field(0x236, 2, 0x020C),
        relocatable_kernel=field(0x234, 1, 0x0205),
        min_alignment=field(0x235, 1, 0x020A),
        kernel_alignment=field(0x230, 4, 0x0205),
        pref_address=field(0x258, 8, 0x020A),
        init_size=field(0x260, 4, 0x020A),
        initrd_addr_max=field(0x22C, 4, 0x0203) or 0x37FFFFFF,
        cmdline_size=field(0x238, 4, 0x0206),
        payload_offset=field(0x248, 4, PAYLOAD_PROTOCOL),
        payload_length=field(0x24C, 4, PAYLOAD_PROTOCOL),
        code32_start=_u32(image, 0x214),
        handover_offset=field(0x264, 4, 0x020B),
        kernel_version=kernel_version,
        raw=bytes(image[SETUP_HEADER_START:header_end]),
    )


def payload(image: bytes, hdr: SetupHeader | None = None) -> bytes:
    """The compressed vmlinux inside the protected-mode part of the image."""
    hdr = hdr or parse_setup_header(image)
    if hdr.version < PAYLOAD_PROTOCOL:
        raise BootError(f"boot protocol {hdr.protocol} has no payload_offset, so kvmkit cannot extract the kernel; use a kernel with protocol 2.08 or newer.")
    start = hdr.setup_size + hdr.payload_offset
    end = start + hdr.payload_length
    if hdr.payload_length == 0 or end > len(image):
        raise BootError(
            f"the bzImage payload ({hdr.payload_length} bytes at offset {start:#x}) runs past the end of the {len(image)}-byte file, so it is truncated; download the kernel again."
        )
    return bytes(image[start:end])


# (name, magic) in the order Linux's compressors write them.
_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", b"\x02\x21\x4c\x18"),  # lz4 legacy format, which the kernel uses
    ("lz4", b"\x04\x22\x4d\x18"),  # lz4 frame format
    ("lzo", b"\x89LZO"),
    ("lzma", b"\x5d\x00\x00"),
)


def detect_compression(data: bytes) -> str:
    """Name of the compressor that produced ``data``, from its magic bytes."""
    for name, magic in _MAGICS:
        if data.startswith(magic):
            return name
    raise BootError(
        f"the kernel payload starts with bytes {data[:6].hex()} that match no known compression (gzip, xz, lzma, bzip2, zstd, lz4); the image is damaged or unsupported."
    )


STEP = 16 << 20  # a decoder produces at most this much per call: the peak stays near the output's size


def _stream(name: str, dec, data: bytes, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Run a streaming decompressor in bounded steps, with an output cap and a truncation check."""
    out = bytearray()
    try:
        chunk = dec.decompress(data, STEP)
        while True:
            out += chunk
            if len(out) > limit:
                raise BootError(f"the {name} kernel payload decompresses to more than {limit >> 20} MiB, which no kernel needs; the image is damaged.")
            if dec.eof:
                break
            if isinstance(dec, type(zlib.decompressobj())):
                if not dec.unconsumed_tail and len(chunk) < STEP:
                    break
                chunk = dec.decompress(dec.unconsumed_tail, STEP)
            else:
                if dec.needs_input:
                    break
                chunk = dec.decompress(b"", STEP)
    except (lzma.LZMAError, zlib.error, OSError, ValueError, EOFError) as exc:
        raise BootError(f"the {name} kernel payload is corrupt ({exc}); download the kernel again.") from exc
    if not dec.eof:
        raise BootError(f"the {name} kernel payload ends before its compressed stream does, so the image is truncated; download the kernel again.")
    return bytes(out)


def zstd_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress zstd data, never producing more than ``limit`` bytes (a decompression bomb
    is refused in one sentence, not allocated); a truncated stream is refused too."""
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BootError(f"{what} is zstd-compressed and the Python package 'zstandard' is not installed; "
                        "run 'pip install zstandard'.") from exc
    out = bytearray()
    try:
        dobj = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        for pos in range(0, len(data), 256):  # in slices: a zstd block (3 bytes) expands to at most 128 KiB, so 256 bytes to 11 MiB
            out += dobj.decompress(data[pos:pos + 256])
            if len(out) > limit:
                raise BootError(f"{what} decompresses to more than {limit >> 20} MiB, more than it can need; it is damaged.")
            if dobj.eof:
                break
    except zstandard.ZstdError as exc:
        raise BootError(f"{what} is corrupt zstd data ({exc}); download it again.") from exc
    if not getattr(dobj, "eof", True):
        raise BootError(f"{what} ends before its zstd stream does, so it is truncated; download it again.")
    return bytes(out)


def _zstd(data: bytes, limit: int = MAX_DECOMPRESSED) -> bytes:
    return zstd_bounded(data, limit, "the zstd kernel payload")


def _lz4(data: bytes, limit: int = MAX_DECOMPRESSED) -> bytes:
    try:
        import lz4.block  # type: ignore[import-not-found]
        import lz4.frame  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BootError("this kernel is lz4-compressed and the Python package 'lz4' is not installed; run 'pip install lz4'.") from exc
    if data.startswith(b"\x04\x22\x4d\x18"):
        try:
            dec = lz4.frame.LZ4FrameDecompressor()
            out = dec.decompress(data, max_length=limit + 1)
        except RuntimeError as exc:
            raise BootError(f"the lz4 kernel payload is corrupt ({exc}); download the kernel again.") from exc
        if len(out) > limit:
            raise BootError(f"the lz4 kernel payload decompresses to more than {limit >> 20} MiB, which no kernel needs; the image is damaged.")
        if not dec.eof:
            raise BootError("the lz4 kernel payload ends before its compressed stream does, so the image is truncated; download the kernel again.")
        return out
    # Legacy format: magic, then [u32 compressed size][block] until the data
    # ends; each block expands to at most 8 MiB. The trailing size word that
    # the kernel build appends reads as one more block header, so stop when a
    # "block" would run past the end.
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        n = _u32(data, pos)
        if n == 0x184C2102:  # a second concatenated stream
            pos += 4
            continue
        if pos + 4 + n > len(data):
            if pos + 4 == len(data):
                break  # the appended size word
            raise BootError("the lz4 kernel payload ends inside a block, so the image is truncated; download the kernel again.")
        try:
            out += lz4.block.decompress(data[pos + 4:pos + 4 + n], uncompressed_size=8 << 20)
        except Exception as exc:  # lz4.block raises LZ4BlockError, a plain Exception subclass
            raise BootError(f"the lz4 kernel payload is corrupt ({exc}); download the kernel again.") from exc
        if len(out) > limit:
            raise BootError(f"the lz4 kernel payload decompresses to more than {limit >> 20} MiB, which no kernel needs; the image is damaged.")
        pos += 4 + n
    return bytes(out)


def decompress(data: bytes, compression: str | None = None, limit: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress a kernel payload to at most ``limit`` bytes (every decoder is capped: a
    payload that would expand past it is refused, never allocated); trailing bytes after the
    stream (the build's size word) are ignored."""
    name = compression or detect_compression(data)
    limit = min(limit, MAX_DECOMPRESSED)
    if name == "gzip":
        return _stream(name, zlib.decompressobj(16 + zlib.MAX_WBITS), data, limit)
    if name == "xz":
        return _stream(name, lzma.LZMADecompressor(format=lzma.FORMAT_XZ), data, limit)
    if name == "lzma":
        return _stream(name, lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), data, limit)
    if name == "bzip2":
        return _stream(name, bz2.BZ2Decompressor(), data, limit)
    if name == "zstd":
        return _zstd(data, limit)
    if name == "lz4":
        return _lz4(data, limit)
    raise BootError(f"{name}-compressed kernels are not supported by kvmkit; rebuild the kernel with xz, gzip or zstd compression.")


@dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: header, payload compression and the decompressed vmlinux."""

    header: SetupHeader
    compression: str
    payload_size: int
    vmlinux: bytes


def open_bzimage(image: bytes, limit: int = MAX_DECOMPRESSED) -> BzImage:
    """Parse the header and extract the vmlinux ELF in one step."""
    hdr = parse_setup_header(image)
    data = payload(image, hdr)
    name = detect_compression(data)
    vmlinux = decompress(data, name, limit)
    if not vmlinux.startswith(b"\x7fELF"):
        raise BootError("the bzImage payload does not decompress to an ELF vmlinux; the image is damaged or unsupported.")
    return BzImage(header=hdr, compression=name, payload_size=len(data), vmlinux=vmlinux)
