"""A corrupt-image corpus, made at test time, against `kvmkit inspect` and `kvmkit run` in a memory cage.

Truncations and bit flips of a crafted bzImage, setup-header fields at their
limits, ELF headers that lie, decompression bombs in every format the
loader reads, and files that are not files (a FIFO, /dev/zero, a sparse
multi-GiB initrd). Each case must end in one sentence on stderr and a
non-zero status, never a traceback, while kvmkit runs under
``prlimit --as`` (an address-space cap: a decoder that allocates its whole
output blindly, or a whole-file read of /dev/zero, dies of it). The peak
resident set of each case is printed (``pytest -s``) for the issue note.
"""

from __future__ import annotations

import bz2
import lzma
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from functools import lru_cache
from pathlib import Path

import pytest

from _images import build_bzimage, build_elf, compress

SRC = str(Path(__file__).resolve().parents[2] / "src")
PRLIMIT = shutil.which("prlimit")
AS_LIMIT = 1536 << 20      # address space for the whole kvmkit process (Python, KVM, 64 MiB of guest RAM)
BOMB = 320 << 20           # what each bomb expands to: past every cap kvmkit has (256 MiB at most)
pytestmark = pytest.mark.skipif(PRLIMIT is None, reason="prlimit (util-linux) is needed")


def run_caged(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """kvmkit under prlimit --as (which execs it: same pid); (result, its peak RSS in KiB)."""
    proc = subprocess.Popen([PRLIMIT, f"--as={AS_LIMIT}", sys.executable, "-m", "kvmkit", *args],  # type: ignore[list-item]
                            env={**os.environ, "PYTHONPATH": SRC}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda n=n, f=f: chunks.__setitem__(n, f.read()), daemon=True)
               for n, f in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the running max of all
    finally:
        timer.cancel()
    for t in readers:
        t.join(10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (subprocess.CompletedProcess(proc.args, proc.returncode, chunks.get("out", b"").decode(errors="replace"),
                                        chunks.get("err", b"").decode(errors="replace")), usage.ru_maxrss)


def one_sentence(p: subprocess.CompletedProcess, case: str) -> str:
    assert p.returncode not in (0, None), f"{case}: status {p.returncode}\n{p.stderr}"
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr, f"{case}:\n{p.stderr}"
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvmkit: "), f"{case}:\n{p.stderr}"
    return lines[0]


def zeros_stream(compressobj, total: int) -> bytes:
    """``total`` zero bytes through a streaming compressor, 1 MiB at a time (never all in memory)."""
    chunk = bytes(1 << 20)
    out = bytearray()
    for _ in range(total >> 20):
        out += compressobj.compress(chunk)
    out += compressobj.flush()
    return bytes(out)


@lru_cache(maxsize=1)
def bombs() -> dict[str, bytes]:
    """A payload per format that expands to BOMB bytes of zeros."""
    out = {
        "gzip": zeros_stream(zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), BOMB),
        "xz": zeros_stream(lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), BOMB),
        "bzip2": zeros_stream(bz2.BZ2Compressor(9), BOMB),
    }
    try:
        import zstandard
        c = zstandard.ZstdCompressor(level=3).compressobj()
        out["zstd"] = zeros_stream(c, BOMB)
    except ImportError:
        pass
    try:
        import lz4.frame
        c = lz4.frame.LZ4FrameCompressor()
        out["lz4"] = c.begin() + zeros_stream(c, BOMB)
    except ImportError:
        pass
    return {k: v + struct.pack("<I", BOMB & 0xFFFFFFFF) for k, v in out.items()}


def corpus(tmp: Path) -> dict[str, Path]:
    rng = random.Random(0xBAD1)
    good = build_bzimage(compress(build_elf(), "xz"))
    cases: dict[str, bytes] = {}
    for cut in (0, 1, 0x1F1, 0x200, 0x203, 0x26C, len(good) // 2, len(good) - 70):
        cases[f"truncated at {cut}"] = good[:cut]
    for i in range(12):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(0x1F0, len(b))
            b[pos] ^= 1 << rng.randrange(8)
        cases[f"bit flips {i}"] = bytes(b)
    for field, off, fmt, value in (("setup_sects 255", 0x1F1, "<B", 255), ("payload_length huge", 0x24C, "<I", 0xFFFFFFFF),
                                   ("payload_offset huge", 0x248, "<I", 0xFFFFFFF0), ("init_size 4 GiB", 0x260, "<I", 0xFFFFFFFF),
                                   ("version 0xffff", 0x206, "<H", 0xFFFF), ("cmdline_size 0", 0x238, "<I", 0),
                                   ("kernel_version pointer out", 0x20E, "<H", 0xFFFF)):
        b = bytearray(good)
        struct.pack_into(fmt, b, off, value)
        cases[f"header {field}"] = bytes(b)
    cases["elf phnum 65535"] = build_elf()[:0x38] + struct.pack("<H", 0xFFFF) + build_elf()[0x3A:]
    cases["elf segment past 2^64"] = build_elf(segments=[(0xFFFFFFFFFFFFF000, 0xFFFFFFFFFFFFF000, b"\xf4", 0x10000)])
    cases["elf memsz 1 TiB"] = build_elf(segments=[(0x200000, 0x200000, b"\xf4", 1 << 40)])
    for name, payload in bombs().items():
        cases[f"{name} bomb"] = build_bzimage(payload)
    paths = {}
    for i, (name, data) in enumerate(cases.items()):
        p = tmp / f"case{i}.img"
        p.write_bytes(data)
        paths[name] = p
    return paths


def test_corrupt_kernels_are_one_sentence_in_bounded_memory(tmp_path: Path) -> None:
    results = []
    for case, path in corpus(tmp_path).items():
        p, rss = run_caged("inspect", str(path))
        if p.returncode == 0:  # a flip that left the image valid (padding, a version string): fine
            assert "Traceback" not in p.stderr
            continue
        results.append((case, one_sentence(p, case), rss))
    for case in ("gzip bomb", "xz bomb", "bzip2 bomb"):
        assert any(c == case and "MiB" in msg for c, msg, _ in results), results
    print("\npeak RSS of `kvmkit inspect` (KiB) and its message, per hostile image:",
          file=sys.stderr)
    for case, msg, rss in results:
        print(f"  {case:28} {rss:>8}  {msg[:110]}", file=sys.stderr)


@pytest.mark.kvm
def test_run_refuses_bombs_and_non_files_in_one_sentence(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.img"
    bomb.write_bytes(build_bzimage(bombs()["xz"]))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.initrd"
    with open(sparse, "wb") as f:
        f.truncate(5 << 30)  # 5 GiB of holes: must not be read before the size check
    kernel = tmp_path / "k.img"
    kernel.write_bytes(build_bzimage())
    for case, args, expect in (
        ("bomb kernel", ["-k", str(bomb)], "MiB"),
        ("/dev/zero kernel", ["-k", "/dev/zero"], "not a regular file"),
        ("FIFO kernel", ["-k", str(fifo)], "not a regular file"),
        ("/dev/zero initrd", ["-k", str(kernel), "-i", "/dev/zero"], "not a regular file"),
        ("5 GiB sparse initrd", ["-k", str(kernel), "-i", str(sparse)], "MiB"),
    ):
        p, rss = run_caged("run", "-m", "64M", *args)
        msg = one_sentence(p, case)
        assert expect in msg, (case, msg)
        print(f"  {case:24} peak RSS {rss} KiB: {msg[:110]}", file=sys.stderr)
