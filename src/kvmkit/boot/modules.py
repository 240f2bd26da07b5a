"""Find a kernel's modules and the order to load them in, without depmod.

A distribution kernel builds its virtio drivers and ext4 as modules, so a
guest with a root disk needs them in its initramfs, loaded dependencies
first. Debian's ``linux-image-*`` package ships no ``modules.dep`` (depmod
runs when the package is installed), so the dependencies are read where
depmod reads them: the ``.modinfo`` ELF section of each ``.ko``, a run of
NUL-terminated ``key=value`` strings (``depends=a,b``, ``softdep=pre: x
post: y``, ``alias=...``; see include/linux/module.h's MODULE_INFO and
kmod's modinfo(8)).

Names follow the kernel's rule that ``-`` and ``_`` are the same in a
module name (``virtio-rng.ko`` is module ``virtio_rng``). A ``softdep``
may name an alias rather than a module (ext4's ``crypto-crc32c``), which is
looked up in ``modules.alias`` when the tree has one and otherwise in the
``alias=`` entries of the tree's modules, read only when needed.
"""

from __future__ import annotations

import fnmatch
import lzma
import mmap
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..errors import BootError
from .bzimage import zstd_bounded
from .elf import ELF_MAGIC, ELFCLASS64, ELFDATA2LSB
from .fetch import kernel_package

# The modules a Linux guest needs to find a virtio-pci root disk (ext4), its
# virtio console and its virtio entropy source.
VIRTIO_ROOT_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio-rng", "ext4")
# And what it needs to mount a ``--share`` (virtio-9p; 9p pulls in 9pnet, netfs and fscache).
SHARE_MODULES = ("9p", "9pnet_virtio")
# And what it needs for a ``--net`` card (virtio_net pulls in net_failover and failover).
NET_MODULES = ("virtio_net",)

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
SHDR_SIZE = 64
SHN_UNDEF = 0
SHN_XINDEX = 0xFFFF
SHT_NOBITS = 8
MAX_SECTIONS = 1 << 16  # real modules have a few dozen; this bounds the work on junk
MAX_MODULE_SIZE = 256 << 20  # a decompressed module larger than this is not a module


def normalize(name: str) -> str:
    """A module name as the kernel compares it: ``-`` and ``_`` are equal."""
    return name.replace("-", "_")


def _strip_suffix(filename: str) -> str | None:
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return None


# ---------------------------------------------------------------------------
# .modinfo: a bounds-checked ELF64 section reader


def elf_section(data: bytes | memoryview | mmap.mmap, name: str, what: str = "the ELF file") -> bytes | None:
    """The bytes of section ``name`` of a little-endian ELF64 file, or None if it has none.

    Every offset comes from the file, so each is checked against its length:
    a damaged module is a :class:`BootError` naming ``what``, never an
    IndexError or a read of the wrong bytes.
    """
    size = len(data)
    if size < 64 or bytes(data[:4]) != ELF_MAGIC:
        raise BootError(f"{what} is not an ELF file; replace it with the kernel's own module.")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise BootError(f"{what} is not a little-endian 64-bit ELF file, so it is not an x86-64 module; use the x86-64 kernel's modules.")
    e_shoff, = struct.unpack_from("<Q", data, 40)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 58)
    if e_shoff == 0:
        return None
    if e_shentsize != SHDR_SIZE or e_shoff + SHDR_SIZE > size:
        raise BootError(f"{what} has a malformed section header table; the file is damaged, so fetch the module again.")

    def header(i: int) -> tuple[int, int, int, int]:
        off = e_shoff + i * SHDR_SIZE
        sh_name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link = struct.unpack_from("<IIQQQQI", data, off)
        return sh_name, sh_type, sh_offset, sh_size if sh_type != SHT_NOBITS else 0, sh_link

    # ELF extended numbering: counts too large for the header live in section 0.
    zero = header(0)
    count = e_shnum or zero[3]
    strndx = zero[4] if e_shstrndx == SHN_XINDEX else e_shstrndx
    if count > MAX_SECTIONS or e_shoff + count * SHDR_SIZE > size:
        raise BootError(f"{what} has {count} section headers running past the end of the file; the file is damaged, so fetch the module again.")
    if strndx == SHN_UNDEF or strndx >= count:
        raise BootError(f"{what} has no section name table; the file is damaged, so fetch the module again.")
    _, _, str_off, str_size, _ = header(strndx)
    if str_off + str_size > size:
        raise BootError(f"{what} has a section name table past the end of the file; the file is damaged, so fetch the module again.")
    wanted = name.encode() + b"\0"
    for i in range(1, count):
        sh_name, _type, off, length, _ = header(i)
        if sh_name + len(wanted) > str_size:
            continue
        if bytes(data[str_off + sh_name:str_off + sh_name + len(wanted)]) != wanted:
            continue
        if off + length > size:
            raise BootError(f"{what}'s {name} section runs past the end of the file; the file is damaged, so fetch the module again.")
        return bytes(data[off:off + length])
    return None


def parse_modinfo(section: bytes) -> dict[str, list[str]]:
    """``key=value`` strings of a .modinfo section, values in file order (keys such as alias repeat)."""
    info: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        key, sep, value = raw.partition(b"=")
        if not sep or not key:
            continue  # padding between entries, or junk
        info.setdefault(key.decode("utf-8", "replace"), []).append(value.decode("utf-8", "replace"))
    return info


def read_modinfo(data: bytes | memoryview | mmap.mmap, what: str = "the module") -> dict[str, list[str]]:
    """The .modinfo of an (uncompressed) module; a module without one is damaged."""
    section = elf_section(data, ".modinfo", what)
    if section is None:
        raise BootError(f"{what} has no .modinfo section, so it is not a kernel module; replace it with the kernel's own module.")
    return parse_modinfo(section)


def _depends(info: dict[str, list[str]]) -> tuple[str, ...]:
    return tuple(normalize(d) for v in info.get("depends", ()) for d in v.split(",") if d.strip())


def _softdeps(info: dict[str, list[str]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``softdep=pre: a b post: c`` as (pre, post); several softdep entries add up."""
    pre: list[str] = []
    post: list[str] = []
    for value in info.get("softdep", ()):
        bucket: list[str] | None = None
        for word in value.split():
            if word == "pre:":
                bucket = pre
            elif word == "post:":
                bucket = post
            elif bucket is not None:
                bucket.append(word)
    return tuple(pre), tuple(post)


# ---------------------------------------------------------------------------
# Compressed modules


def _bounded(decompressor, blob: bytes, what: str) -> bytes:  # type: ignore[no-untyped-def]
    out = decompressor.decompress(blob, max_length=MAX_MODULE_SIZE + 1)
    if len(out) > MAX_MODULE_SIZE:
        raise BootError(f"{what} decompresses to more than {MAX_MODULE_SIZE >> 20} MiB, so it is not a module; replace it.")
    if not decompressor.eof:  # a cut-off stream decompresses "successfully" to a prefix
        raise BootError(f"{what} is truncated, so it is not a whole module; fetch the module tree again.")
    return out


def decompress_module(blob: bytes, filename: str) -> bytes:
    """A .ko.xz/.ko.zst/.ko.gz as a plain .ko: busybox insmod may not read compressed modules."""
    try:
        if filename.endswith(".ko.xz"):
            return _bounded(lzma.LZMADecompressor(), blob, filename)
        if filename.endswith(".ko.gz"):
            return _bounded(zlib.decompressobj(16 + zlib.MAX_WBITS), blob, filename)
        if filename.endswith(".ko.zst"):
            return _unzstd(blob, filename)
    except (lzma.LZMAError, zlib.error) as exc:
        raise BootError(f"{filename} is not a valid compressed module ({exc}); fetch the module tree again.") from exc
    return blob


def _unzstd(blob: bytes, filename: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        return zstd_bounded(blob, MAX_MODULE_SIZE, filename)
    if shutil.which("zstd") is None:
        raise BootError(f"{filename} is zstd-compressed and neither the zstandard Python package nor the zstd tool is here; run 'apt-get install zstd'.")
    out = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True, timeout=120)
    if out.returncode != 0:
        raise BootError(f"{filename} is not a valid zstd module ({out.stderr.decode(errors='replace').strip()}); fetch the module tree again.")
    return out.stdout


# ---------------------------------------------------------------------------
# A module tree


MODULE_SIG_MAGIC = b"~Module signature appended~\n"
_MODULE_SIGNATURE = struct.Struct(">BBBBB3xI")  # algo, hash, id_type, signer_len, key_id_len, pad, sig_len


def strip_signature(data: bytes) -> bytes:
    """The module without its appended signature (include/linux/module_signature.h); unchanged if unsigned.

    Why: the kernel hashes every signed module it loads before it finds that
    it has no key to check the signature with (kvmkit's guests load no
    certificates, and signatures are not enforced). Emulated, hashing
    Debian's 2 MiB ext4.ko costs about a minute; without a signature the
    kernel skips straight to the "signature and/or required key missing"
    taint it would reach anyway.
    """
    if not data.endswith(MODULE_SIG_MAGIC):
        return data
    end = len(data) - len(MODULE_SIG_MAGIC)
    if end < _MODULE_SIGNATURE.size:
        return data
    _algo, _hash, _id, signer_len, key_id_len, sig_len = _MODULE_SIGNATURE.unpack_from(data, end - _MODULE_SIGNATURE.size)
    start = end - _MODULE_SIGNATURE.size - sig_len - signer_len - key_id_len
    return data[:start] if start > 0 else data


@dataclass(frozen=True)
class ModuleFile:
    """One module to load: where it is, where it goes, what it needs.

    ``relpath`` is relative to ``/lib/modules/<version>`` and always ends in
    ``.ko``, since compressed modules are stored decompressed. ``soft`` is
    true for a module that only a ``softdep`` asked for: the kernel does not
    need it to link, so failing to load it is worth a line, not a stop.
    """

    name: str
    path: Path
    relpath: str
    version: str
    depends: tuple[str, ...] = ()
    softdep_pre: tuple[str, ...] = ()
    softdep_post: tuple[str, ...] = ()
    soft: bool = False

    @property
    def dest(self) -> str:
        """Its path inside the initramfs."""
        return f"lib/modules/{self.version}/{self.relpath}"

    def read(self) -> bytes:
        """The module as insmod takes it (decompressed; its signature stripped, see :func:`strip_signature`)."""
        try:
            blob = self.path.read_bytes()
        except OSError as exc:
            raise BootError(f"cannot read module {self.path} ({exc.strerror}); check the module tree's permissions.") from exc
        return strip_signature(decompress_module(blob, self.path.name))


@dataclass
class ModuleTree:
    """The modules of one kernel: ``root`` is its ``/lib/modules/<version>`` directory."""

    root: Path
    version: str
    _files: dict[str, Path] = field(default_factory=dict, repr=False)
    _builtin: set[str] = field(default_factory=set, repr=False)
    _info: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)
    _aliases: list[tuple[str, str]] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, root: Path, version: str | None = None) -> "ModuleTree":
        """Index the ``*.ko[.xz|.zst|.gz]`` files under ``root`` by module name."""
        root = Path(root)
        if not root.is_dir():
            raise BootError(f"{root} is not a directory of kernel modules; pass /lib/modules/<version> or a kernel version.")
        tree = cls(root, version or root.name)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for filename in sorted(filenames):
                stem = _strip_suffix(filename)
                if stem is not None:
                    tree._files.setdefault(normalize(stem), Path(dirpath) / filename)
        if not tree._files:
            raise BootError(f"{root} holds no kernel modules (*.ko); pass /lib/modules/<version> of a kernel built with modules.")
        builtin = root / "modules.builtin"
        if builtin.is_file():
            for line in builtin.read_text(errors="replace").splitlines():
                stem = _strip_suffix(Path(line.strip()).name)
                if stem:
                    tree._builtin.add(normalize(stem))
        return tree

    def __contains__(self, name: str) -> bool:
        return normalize(name) in self._files

    def is_builtin(self, name: str) -> bool:
        """Built into the kernel (listed in modules.builtin): nothing to load."""
        return normalize(name) in self._builtin

    def modinfo(self, name: str) -> dict[str, list[str]]:
        """The parsed .modinfo of module ``name`` (cached)."""
        key = normalize(name)
        if key not in self._info:
            path = self._files[key]
            self._info[key] = _file_modinfo(path)
        return self._info[key]

    def module(self, name: str) -> ModuleFile:
        key = normalize(name)
        path = self._files[key]
        info = self.modinfo(key)
        pre, post = _softdeps(info)
        rel = path.relative_to(self.root).as_posix()
        rel = rel[: -len(path.name)] + _strip_suffix(path.name) + ".ko"  # type: ignore[operator]
        # The file's name is the module's (KBUILD_MODNAME); .modinfo's name= says the same.
        return ModuleFile(key, path, rel, self.version,
                          _depends(info), pre, post)

    def lookup_alias(self, alias: str) -> list[str]:
        """Module names whose ``alias=`` patterns match ``alias``, sorted (modprobe loads them all)."""
        if self._aliases is None:
            self._aliases = self._read_aliases()
        return sorted({mod for pattern, mod in self._aliases if fnmatch.fnmatchcase(alias, pattern)})

    def _read_aliases(self) -> list[tuple[str, str]]:
        index = self.root / "modules.alias"
        if index.is_file():  # an installed system's depmod output
            out = []
            for line in index.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "alias":
                    out.append((words[1], normalize(words[2])))
            return out
        # A package's tree: read every module's .modinfo (mmap'd, so only headers are read).
        out = []
        for name in sorted(self._files):
            try:
                info = self.modinfo(name)
            except BootError:
                continue  # a damaged module unrelated to this lookup
            out += [(pattern, name) for pattern in info.get("alias", ())]
        return out


def _file_modinfo(path: Path) -> dict[str, list[str]]:
    what = f"module {path}"
    try:
        if path.name.endswith(".ko"):
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise BootError(f"{what} is empty; replace it with the kernel's own module.")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    return read_modinfo(m, what)
        return read_modinfo(decompress_module(path.read_bytes(), path.name), what)
    except OSError as exc:
        raise BootError(f"cannot read {what} ({exc.strerror}); check the module tree's permissions.") from exc


def find_modules(source: str | os.PathLike[str], cache: Path | None = None) -> ModuleTree:
    """The module tree of ``source``: a /lib/modules/<version> directory, an unpacked package root, or a version.

    A version string (``6.1.0-50-amd64``) that is not a directory fetches
    Debian's ``linux-image-<version>`` into the stock kernel's cache.
    """
    path = Path(source)
    if path.is_dir():
        nested = path / "lib" / "modules"
        if nested.is_dir():  # the root of an unpacked package or of a system
            versions = sorted(p for p in nested.iterdir() if p.is_dir())
            if len(versions) != 1:
                raise BootError(f"{nested} holds {len(versions)} kernel versions; pass the /lib/modules/<version> directory you mean.")
            return ModuleTree.open(versions[0])
        return ModuleTree.open(path)
    if isinstance(source, str) and "/" not in source:
        return ModuleTree.open(kernel_package(source, cache) / "lib" / "modules" / source)
    raise BootError(f"{source} is not a directory of kernel modules; pass /lib/modules/<version> or a kernel version.")


# ---------------------------------------------------------------------------
# Load order


def resolve_modules(tree: ModuleTree | str | os.PathLike[str], names: Iterable[str] = VIRTIO_ROOT_MODULES) -> list[ModuleFile]:
    """The modules ``names`` need, in load order: every module after what it depends on, each once.

    ``depends=`` must be satisfied: a missing module or a dependency cycle is
    a :class:`BootError`. ``softdep=`` names (modules or aliases) are loaded
    before (``pre:``) or after (``post:``) their module when the tree has
    them, as modprobe does, and skipped when it does not; a soft dependency
    that would close a cycle is dropped, because it is only advice. Names
    that are built into the kernel need nothing and are left out.
    """
    if not isinstance(tree, ModuleTree):
        tree = find_modules(tree)
    order: list[ModuleFile] = []
    done: set[str] = set()
    stack: list[str] = []  # modules being resolved, for cycle reports

    def targets(name: str, soft: bool, required_by: str | None) -> list[str]:
        """The module names ``name`` stands for: itself, the modules of an alias, or none (built in, soft)."""
        key = normalize(name)
        if key in tree:
            return [key]
        if tree.is_builtin(key):
            return []
        aliased = tree.lookup_alias(name)
        if aliased or soft:
            return aliased
        needed = f" (needed by {required_by})" if required_by else ""
        raise BootError(f"kernel module {name}{needed} is not in {tree.root}; pass the module tree of the kernel you boot, or drop the module.")

    def visit(name: str, soft: bool, required_by: str | None) -> None:
        for key in targets(name, soft, required_by):
            if key in done:
                continue
            if key in stack:
                if soft:
                    continue
                cycle = stack[stack.index(key):] + [key]
                raise BootError(f"modules {' -> '.join(cycle)} depend on each other in a cycle in {tree.root}, so none can be loaded; fix or replace that module tree.")
            mod = tree.module(key)
            stack.append(key)
            for dep in mod.softdep_pre:
                visit(dep, True, mod.name)
            for dep in mod.depends:
                visit(dep, soft, mod.name)
            if key not in done:  # a soft dependency may have pulled it in meanwhile
                done.add(key)
                order.append(mod)
            for dep in mod.softdep_post:
                visit(dep, True, mod.name)
            stack.pop()

    for name in names:
        visit(name, False, None)

    # Which modules hard edges reach from the names asked for; the rest came only through a softdep.
    hard: set[str] = set()
    todo = [key for name in names for key in targets(name, False, None)]
    by_name = {m.name: m for m in order}
    while todo:
        key = todo.pop()
        if key not in hard and key in by_name:
            hard.add(key)
            todo += [k for dep in by_name[key].depends for k in targets(dep, True, key)]
    return [m if m.name in hard else replace(m, soft=True) for m in order]
