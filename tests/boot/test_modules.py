"""Kernel modules: .modinfo from ELF sections, load order from depends=/softdep=, the trees they come from."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.boot import fetch
from kvmkit.boot.initramfs import busybox_initramfs, init_script, read_cpio
from kvmkit.boot.modules import (
    VIRTIO_ROOT_MODULES,
    ModuleTree,
    elf_section,
    find_modules,
    normalize,
    parse_modinfo,
    read_modinfo,
    resolve_modules,
)
from kvmkit.errors import BootError

VERSION = "6.1.0-99-amd64"
BUSYBOX = next((p for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")) if p.exists()), None)


def build_module(name: str, depends: str = "", softdep: str | None = None, aliases: tuple[str, ...] = (),
                 extra_sections: int = 0) -> bytes:
    """A relocatable ELF64 like a .ko: section headers for .text, .modinfo, .shstrtab (and filler)."""
    info = ["license=GPL", f"depends={depends}", *(f"alias={a}" for a in aliases), f"name={name}",
            f"vermagic={VERSION} SMP mod_unload modversions"]
    if softdep is not None:
        info.insert(1, f"softdep={softdep}")
    modinfo = b"".join(s.encode() + b"\0" for s in info) + b"\0" * 3  # padding, as the linker leaves it
    names = [b"", b".text", b".modinfo", b".shstrtab"] + [f".filler{i}".encode() for i in range(extra_sections)]
    shstrtab = b"".join(n + b"\0" for n in names)
    name_off = [shstrtab.index(n + b"\0") if n else 0 for n in names]
    text = b"\xc3" * 16
    body = bytearray(b"\0" * 64)
    offsets = {}
    for key, blob in ((".text", text), (".modinfo", modinfo), (".shstrtab", shstrtab)):
        offsets[key] = len(body)
        body += blob + b"\0" * ((8 - len(blob) % 8) % 8)
    shoff = len(body)
    shdrs = bytearray(64)  # SHN_UNDEF
    for i, n in enumerate(names[1:], start=1):
        key = n.decode()
        off, size = (offsets[key], len({".text": text, ".modinfo": modinfo, ".shstrtab": shstrtab}[key])) \
            if key in offsets else (0, 0)
        sh_type = 3 if key == ".shstrtab" else 1
        shdrs += struct.pack("<IIQQQQIIQQ", name_off[i], sh_type, 0, 0, off, size, 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(names), 3)
    body[:64] = ehdr
    return bytes(body + shdrs)


def make_tree(root: Path, modules: dict[str, dict], builtin: tuple[str, ...] = ()) -> ModuleTree:
    """Write ``{relpath: build_module kwargs}`` under root/lib/modules/VERSION and open it."""
    base = root / "lib" / "modules" / VERSION
    for rel, kwargs in modules.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        stem = path.name.split(".ko")[0]
        data = build_module(normalize(stem), **kwargs)
        if rel.endswith(".xz"):
            data = lzma.compress(data, format=lzma.FORMAT_XZ)
        elif rel.endswith(".gz"):
            data = gzip.compress(data)
        elif rel.endswith(".zst"):
            zstandard = pytest.importorskip("zstandard")
            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
    if builtin:
        (base / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    return ModuleTree.open(base)


# A miniature of Debian 6.1's virtio and ext4 modules, with the same metadata.
VIRTIO_TREE = {
    "kernel/drivers/virtio/virtio.ko": {},
    "kernel/drivers/virtio/virtio_ring.ko": {},
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko": {},
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko": {},
    "kernel/drivers/virtio/virtio_pci.ko": {"depends": "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio"},
    "kernel/drivers/block/virtio_blk.ko": {"depends": "virtio,virtio_ring"},
    "kernel/drivers/char/virtio_console.ko": {"depends": "virtio,virtio_ring"},
    "kernel/drivers/char/hw_random/virtio-rng.ko": {"depends": "virtio,virtio_ring"},
    "kernel/fs/ext4/ext4.ko": {"depends": "jbd2,mbcache,crc16", "softdep": "pre: crypto-crc32c"},
    "kernel/fs/jbd2/jbd2.ko": {"softdep": "pre: crypto-crc32c"},
    "kernel/fs/mbcache.ko": {},
    "kernel/lib/crc16.ko": {},
    "kernel/crypto/crc32c_generic.ko": {"aliases": ("crypto-crc32c-generic", "crc32c-generic", "crypto-crc32c", "crc32c")},
    "kernel/arch/x86/crypto/crc32c-intel.ko": {"aliases": ("crypto-crc32c-intel", "crypto-crc32c", "crc32c")},
    "kernel/drivers/net/virtio_net.ko": {"depends": "net_failover,virtio,virtio_ring"},
}
VIRTIO_ORDER = ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci",
                "virtio_blk", "virtio_console", "virtio_rng", "crc32c_generic", "crc32c_intel",
                "jbd2", "mbcache", "crc16", "ext4"]


# --- .modinfo ---------------------------------------------------------------

def test_modinfo_from_synthetic_module() -> None:
    data = build_module("virtio_blk", depends="virtio,virtio_ring", aliases=("virtio:d00000002v*",))
    info = read_modinfo(data)
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["name"] == ["virtio_blk"]
    assert info["alias"] == ["virtio:d00000002v*"]
    assert elf_section(data, ".nonexistent") is None


def test_parse_modinfo_repeats_and_padding() -> None:
    info = parse_modinfo(b"alias=a\0alias=b\0\0\0depends=\0junk\0=x\0softdep=pre: c d\0")
    assert info == {"alias": ["a", "b"], "depends": [""], "softdep": ["pre: c d"]}


def test_modinfo_with_many_sections() -> None:
    data = build_module("big", depends="x", extra_sections=300)
    assert read_modinfo(data)["depends"] == ["x"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"\x7fELG" + d[4:], "not an ELF"),
    (lambda d: d[:4] + b"\x01" + d[5:], "64-bit"),
    (lambda d: d[:-20], "damaged"),  # the section headers are the file's tail
    (lambda d: d[:40] + struct.pack("<Q", 1 << 40) + d[48:], "damaged"),
    (lambda d: d[:62] + struct.pack("<H", 0) + d[64:], "name table"),  # e_shstrndx = SHN_UNDEF
])
def test_damaged_module_is_one_sentence(damage, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BootError, match=message):
        read_modinfo(damage(build_module("m", depends="a")), "module m.ko")


def test_module_without_modinfo() -> None:
    data = build_module("m").replace(b".modinfo\0", b".modinfX\0")
    with pytest.raises(BootError, match="no .modinfo"):
        read_modinfo(data, "module m.ko")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_fuzz_section_reader(pos: int, junk: bytes) -> None:
    """Any corruption is a BootError or some answer, never an IndexError or struct.error."""
    data = bytearray(build_module("m", depends="a,b", softdep="pre: c"))
    pos %= len(data)
    data[pos:pos + len(junk)] = junk
    try:
        read_modinfo(bytes(data))
    except BootError:
        pass


# --- resolution ---------------------------------------------------------------

def test_virtio_root_order(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, VIRTIO_TREE)
    mods = resolve_modules(tree, VIRTIO_ROOT_MODULES)
    assert [m.name for m in mods] == VIRTIO_ORDER
    by_name = {m.name: m for m in mods}
    assert by_name["virtio_rng"].relpath == "kernel/drivers/char/hw_random/virtio-rng.ko"
    assert by_name["virtio_rng"].dest == f"lib/modules/{VERSION}/kernel/drivers/char/hw_random/virtio-rng.ko"
    assert by_name["crc32c_generic"].soft and by_name["crc32c_intel"].soft
    assert not any(by_name[n].soft for n in ("ext4", "jbd2", "virtio", "virtio_pci"))
    assert by_name["ext4"].softdep_pre == ("crypto-crc32c",)


def test_order_invariants(tmp_path: Path) -> None:
    """Every hard dependency comes before its module; nothing twice; names in either spelling."""
    tree = make_tree(tmp_path, VIRTIO_TREE)
    mods = resolve_modules(tree, ["ext4", "virtio-blk", "virtio_rng", "virtio-pci", "ext4"])
    names = [m.name for m in mods]
    assert len(names) == len(set(names))
    for i, m in enumerate(mods):
        assert set(m.depends) <= set(names[:i]), m.name


def test_softdep_that_is_missing_is_skipped(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/a.ko": {"softdep": "pre: nothere post: b"}, "kernel/b.ko": {}})
    assert [(m.name, m.soft) for m in resolve_modules(tree, ["a"])] == [("a", False), ("b", True)]


def test_softdep_that_becomes_hard_is_not_soft(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/a.ko": {"softdep": "pre: c"}, "kernel/b.ko": {"depends": "c"},
                                "kernel/c.ko": {}})
    assert [(m.name, m.soft) for m in resolve_modules(tree, ["a", "b"])] == [("c", False), ("a", False), ("b", False)]


def test_dependency_cycle_is_one_sentence(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/a.ko": {"depends": "b"}, "kernel/b.ko": {"depends": "c"},
                                "kernel/c.ko": {"depends": "a"}})
    with pytest.raises(BootError, match=r"modules a -> b -> c -> a depend on each other in a cycle") as exc:
        resolve_modules(tree, ["a"])
    assert "\n" not in str(exc.value) and str(exc.value).endswith("fix or replace that module tree.")


def test_softdep_cycle_is_dropped(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/a.ko": {"softdep": "pre: b"}, "kernel/b.ko": {"softdep": "pre: a"}})
    assert [m.name for m in resolve_modules(tree, ["a"])] == ["b", "a"]


def test_missing_module_names_it_and_the_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, VIRTIO_TREE)
    with pytest.raises(BootError, match=rf"kernel module virtio_scsi is not in {tree.root}"):
        resolve_modules(tree, ["virtio_scsi"])
    with pytest.raises(BootError, match=r"kernel module net_failover \(needed by virtio_net\) is not in"):
        resolve_modules(tree, ["virtio_net"])


def test_builtin_needs_nothing(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/a.ko": {}}, builtin=("drivers/char/hw_random/rng-core",))
    assert resolve_modules(tree, ["rng_core", "a"])[0].name == "a"


def test_alias_by_name_and_modules_alias_file(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/crc32c_generic.ko": {"aliases": ("crypto-crc32c",)}, "kernel/other.ko": {}})
    assert [m.name for m in resolve_modules(tree, ["crypto-crc32c"])] == ["crc32c_generic"]
    (tree.root / "modules.alias").write_text("# Aliases extracted from modules themselves.\nalias crypto-crc* other\n")
    fresh = ModuleTree.open(tree.root)
    assert [m.name for m in resolve_modules(fresh, ["crypto-crc32c"])] == ["other"]


@pytest.mark.parametrize("suffix", [".ko.xz", ".ko.gz", ".ko.zst"])
def test_compressed_modules_come_out_plain(tmp_path: Path, suffix: str) -> None:
    tree = make_tree(tmp_path, {f"kernel/fs/b{suffix}": {}, f"kernel/fs/a{suffix}": {"depends": "b"}})
    mods = resolve_modules(tree, ["a"])
    assert [m.relpath for m in mods] == ["kernel/fs/b.ko", "kernel/fs/a.ko"]
    assert read_modinfo(mods[1].read())["depends"] == ["b"]


@pytest.mark.parametrize("suffix, pack", [(".ko.xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)),
                                          (".ko.gz", gzip.compress)])
def test_truncated_compressed_module(tmp_path: Path, suffix: str, pack) -> None:  # type: ignore[no-untyped-def]
    base = tmp_path / VERSION / "kernel"
    base.mkdir(parents=True)
    blob = pack(build_module("a"))
    (base / f"a{suffix}").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BootError, match="truncated|not a valid"):
        resolve_modules(ModuleTree.open(tmp_path / VERSION), ["a"])


def test_corrupt_compressed_module(tmp_path: Path) -> None:
    base = tmp_path / VERSION / "kernel"
    base.mkdir(parents=True)
    (base / "a.ko.xz").write_bytes(b"\xfd7zXZ\0 not really")
    with pytest.raises(BootError, match="not a valid compressed module"):
        resolve_modules(ModuleTree.open(tmp_path / VERSION), ["a"])


# --- where trees come from ----------------------------------------------------

def test_find_modules_accepts_tree_or_package_root(tmp_path: Path) -> None:
    make_tree(tmp_path, {"kernel/a.ko": {}})
    for source in (tmp_path, tmp_path / "lib" / "modules" / VERSION):
        tree = find_modules(source)
        assert tree.version == VERSION and "a" in tree


def test_find_modules_errors(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="not a directory of kernel modules"):
        find_modules(tmp_path / "nope" / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BootError, match="holds no kernel modules"):
        find_modules(tmp_path / "empty")


def test_find_modules_by_version_uses_the_kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version fetches linux-image-<version> into the kernel cache; a complete tree there is reused offline."""
    monkeypatch.setenv("KVMKIT_KERNEL_CACHE", str(tmp_path))
    pkg = tmp_path / f"linux-image-{VERSION}"
    make_tree(pkg, {"kernel/a.ko": {}})
    (pkg / fetch.COMPLETE).write_text("ok\n")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # apt would be an error now
    tree = find_modules(VERSION)
    assert tree.root == pkg / "lib" / "modules" / VERSION and "a" in tree


def test_kernel_package_refuses_odd_versions(tmp_path: Path) -> None:
    for bad in ("-o=APT::Get", "6.1 0", "../../etc", ""):
        with pytest.raises(BootError, match="not a kernel version"):
            fetch.kernel_package(bad, tmp_path)


def test_kernel_package_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BootError, match="apt-get and dpkg-deb are needed"):
        fetch.kernel_package(VERSION, tmp_path)


def test_kernel_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KVMKIT_KERNEL_CACHE", "KVMKIT_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert fetch.kernel_cache() == fetch.DEFAULT_CACHE  # today's place, unchanged
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.kernel_cache() == tmp_path / "xdg" / "kvmkit" / "kernels"
    monkeypatch.setenv("KVMKIT_CACHE", str(tmp_path / "kc"))
    assert fetch.kernel_cache() == tmp_path / "kc" / "kernels"
    monkeypatch.setenv("KVMKIT_KERNEL_CACHE", str(tmp_path / "kk"))
    assert fetch.kernel_cache() == tmp_path / "kk"


# --- the initramfs that loads them ------------------------------------------------

def test_init_loads_in_order_then_mounts_root(tmp_path: Path) -> None:
    mods = resolve_modules(make_tree(tmp_path, VIRTIO_TREE), VIRTIO_ROOT_MODULES)
    text = init_script(modules=mods)
    loads = [line for line in text.splitlines() if line.startswith("load ")]
    assert loads[0] == "load 'kernel/drivers/virtio/virtio_ring.ko'"
    assert loads[-1] == "load 'kernel/fs/ext4/ext4.ko'"
    assert "load 'kernel/crypto/crc32c_generic.ko' 'a soft dependency'" in loads
    assert len(loads) == len(VIRTIO_ORDER)
    assert f"KVER='{VERSION}'" in text
    for piece in ("root=*)", "rootfstype=*)", "init=*)", "usleep 100000", "exec switch_root /newroot",
                  "staying in the initramfs shell", "going on"):
        assert piece in text
    # The shell (today's body) follows, so a failed root leaves the user at a prompt.
    assert text.index("exec switch_root") < text.index("setsid cttyhack sh") < text.index("poweroff -f")


def test_init_without_modules_is_unchanged() -> None:
    text = init_script()
    assert "insmod" not in text and "switch_root" not in text and "/proc/cmdline" not in text


@pytest.mark.skipif(shutil.which("busybox") is None and BUSYBOX is None, reason="busybox is not installed")
def test_init_is_valid_shell(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(init_script(modules=resolve_modules(make_tree(tmp_path, VIRTIO_TREE), ["ext4"])))
    out = os.system(f"{BUSYBOX or 'busybox'} sh -n {script}")
    assert out == 0


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
def test_initramfs_packs_modules_decompressed(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, {"kernel/drivers/virtio/virtio.ko.xz": {},
                                "kernel/drivers/block/virtio_blk.ko": {"depends": "virtio"}})
    mods = resolve_modules(tree, ["virtio_blk"])
    entries = read_cpio(busybox_initramfs(BUSYBOX, modules=mods))
    names = [e.name for e in entries]
    by_name = {e.name: e for e in entries}
    ko = f"lib/modules/{VERSION}/kernel/drivers/virtio/virtio.ko"
    assert by_name[ko].is_file and by_name[ko].data[:4] == b"\x7fELF"
    for i, name in enumerate(names):  # every directory before what is in it
        parent = name.rsplit("/", 1)[0] if "/" in name else None
        assert parent is None or names.index(parent) < i, name
    assert by_name["newroot"].is_dir
    for applet in ("insmod", "switch_root", "findfs", "usleep"):
        assert by_name[f"bin/{applet}"].is_symlink
    assert "load 'kernel/drivers/block/virtio_blk.ko'" in by_name["init"].data.decode()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
def test_initramfs_without_modules_has_no_module_tree() -> None:
    names = {e.name for e in read_cpio(busybox_initramfs(BUSYBOX))}
    assert "lib" not in names and "newroot" not in names


def test_strip_signature_removes_exactly_the_appended_signature() -> None:
    from kvmkit.boot.modules import MODULE_SIG_MAGIC, strip_signature
    body = b"\x7fELF" + bytes(100)
    pkcs7 = bytes(range(200)) * 2
    sig = pkcs7 + bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(pkcs7).to_bytes(4, "big") + MODULE_SIG_MAGIC
    assert strip_signature(body + sig) == body
    assert strip_signature(body) == body                       # unsigned: unchanged
    assert strip_signature(MODULE_SIG_MAGIC) == MODULE_SIG_MAGIC  # too short to hold a signature: unchanged
    huge = bytes(12) + MODULE_SIG_MAGIC
    huge = huge[:8] + (1 << 30).to_bytes(4, "big") + huge[12:]
    assert strip_signature(body + huge) == body + huge         # a length past the start: left alone
