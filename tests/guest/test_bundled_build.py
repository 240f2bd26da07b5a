"""The bundled guest builder: caching, rebuilds, errors, and the ELF it makes."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmkit.boot import bundled
from kvmkit.errors import KvmkitError

GUEST_SRC = Path(__file__).resolve().parents[2] / "guest"

needs_toolchain = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("make", "gcc", "ld")),
    reason="gcc, binutils and make are needed to build the bundled guest",
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KVMKIT_CACHE", str(root))
    monkeypatch.delenv("KVMKIT_GUEST_SRC", raising=False)
    return root


@pytest.fixture
def src_copy(tmp_path, monkeypatch):
    dst = tmp_path / "guest-src"
    shutil.copytree(GUEST_SRC, dst, ignore=shutil.ignore_patterns("build", "*.o", "*.d", "*.elf"))
    monkeypatch.setenv("KVMKIT_GUEST_SRC", str(dst))
    return dst


def test_default_source_dir_is_repo_guest(monkeypatch):
    monkeypatch.delenv("KVMKIT_GUEST_SRC", raising=False)
    assert bundled.guest_source_dir() == GUEST_SRC


@needs_toolchain
def test_builds_once_then_uses_the_cache(cache, monkeypatch):
    elf = bundled.bundled_guest()
    assert elf == cache / "guest" / bundled.source_hash() / "kvmkit-guest.elf"
    assert elf.is_file()
    mtime = elf.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("second call must not run make")

    monkeypatch.setattr(subprocess, "run", no_build)
    assert bundled.bundled_guest() == elf
    assert elf.stat().st_mtime_ns == mtime
    # nothing but the finished build is left in the cache
    assert [p.name for p in (cache / "guest").iterdir()] == [elf.parent.name]


@needs_toolchain
def test_source_change_rebuilds_under_new_hash(cache, src_copy):
    first = bundled.bundled_guest()
    main_c = src_copy / "main.c"
    main_c.write_text(main_c.read_text() + "\n/* changed */\n")
    second = bundled.bundled_guest()
    assert second != first
    assert first.is_file() and second.is_file()


def test_hash_ignores_build_outputs(src_copy):
    before = bundled.source_hash(src_copy)
    (src_copy / "build").mkdir()
    (src_copy / "build" / "main.o").write_bytes(b"junk")
    (src_copy / "stray.o").write_bytes(b"junk")
    assert bundled.source_hash(src_copy) == before


def test_missing_tools_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KvmkitError, match=r"apt-get install build-essential") as info:
        bundled.bundled_guest()
    assert "because make, gcc and ld are missing; install" in str(info.value)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


def test_one_missing_tool_is_singular(cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "ld" else f"/usr/bin/{name}")
    with pytest.raises(KvmkitError, match=r"because ld is missing; install gcc, binutils and make"):
        bundled.bundled_guest()
    assert bundled.missing_tools_message(["make", "gcc"]).startswith(
        "cannot build the bundled guest because make and gcc are missing;")


@needs_toolchain
def test_build_failure_is_a_clear_error(cache, src_copy):
    (src_copy / "lib.c").write_text("this is not C\n")
    with pytest.raises(KvmkitError, match=r"building the bundled guest failed") as info:
        bundled.bundled_guest()
    assert "\n" not in str(info.value)
    # no half-built directory left behind
    assert all(p.suffix == ".log" for p in (cache / "guest").iterdir())


def test_missing_sources_is_a_clear_error(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("KVMKIT_GUEST_SRC", str(tmp_path / "nowhere"))
    with pytest.raises(KvmkitError, match=r"KVMKIT_GUEST_SRC"):
        bundled.bundled_guest()


# ---------------------------------------------------------------- the ELF

PT_LOAD, PT_NOTE = 1, 4
PF_X = 1


def read_elf(path: Path):
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2, "ELFCLASS64"
    assert data[5] == 1, "little endian"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    (e_entry, e_phoff) = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    phdrs = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize
        )
        phdrs.append(dict(type=p_type, flags=p_flags, offset=p_offset, vaddr=p_vaddr,
                          paddr=p_paddr, filesz=p_filesz, memsz=p_memsz, align=p_align))
    return data, e_type, e_machine, e_entry, phdrs


def notes(data: bytes, ph: dict):
    off, end = ph["offset"], ph["offset"] + ph["filesz"]
    while off + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        name = data[off + 12: off + 12 + namesz].rstrip(b"\0")
        desc_off = off + 12 + ((namesz + 3) & ~3)
        yield name, ntype, data[desc_off: desc_off + descsz]
        off = desc_off + ((descsz + 3) & ~3)


@needs_toolchain
def test_elf_layout(cache):
    data, e_type, e_machine, entry, phdrs = read_elf(bundled.bundled_guest())
    assert e_type == 2, "ET_EXEC"
    assert e_machine == 62, "EM_X86_64"
    loads = [p for p in phdrs if p["type"] == PT_LOAD]
    assert loads
    for p in loads:
        assert p["vaddr"] == p["paddr"], "identity mapped: vaddr == paddr"
        assert p["paddr"] >= 0x100000
        assert p["paddr"] + p["memsz"] <= 0x4000_0000, "fits in the first GiB"
        assert p["filesz"] <= p["memsz"]
    text = [p for p in loads if p["flags"] & PF_X]
    assert any(p["vaddr"] <= entry < p["vaddr"] + p["filesz"] for p in text), "entry in code"
    # Xen PVH entry note (QEMU's -kernel path): 32-bit entry inside the code
    xen = [
        desc for ph in phdrs if ph["type"] == PT_NOTE
        for name, ntype, desc in notes(data, ph) if name == b"Xen" and ntype == 18
    ]
    assert len(xen) == 1
    (pvh_entry,) = struct.unpack("<Q", xen[0].ljust(8, b"\0")[:8])
    assert any(p["vaddr"] <= pvh_entry < p["vaddr"] + p["filesz"] for p in text)
    assert pvh_entry != entry
