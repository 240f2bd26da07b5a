"""Describe a kernel image without booting it, for `kvmkit inspect KERNEL`.

When a boot fails, the first questions are what the file is, which boot
protocol and compression it uses, where it wants to be loaded and how much
memory it claims; this answers them from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BootError
from ..host.files import read_user_file
from .bzimage import MAX_DECOMPRESSED, XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64, is_bzimage, open_bzimage
from .elf import ElfImage, is_elf, linux_banner, parse_elf


def _elf_facts(elf: ElfImage) -> dict[str, Any]:
    return {
        "entry": elf.entry,
        "entry_phys": elf.phys_entry,
        "load_start": elf.phys_start,
        "load_end": elf.phys_end,
        "segments": [
            {"paddr": s.paddr, "vaddr": s.vaddr, "offset": s.offset, "filesz": s.filesz, "memsz": s.memsz}
            for s in elf.segments
        ],
    }


def describe_kernel(path: Path | str) -> dict[str, Any]:
    """Facts about a bzImage or ELF kernel as a JSON-friendly dict (numbers stay numbers)."""
    path = Path(path)
    data = read_user_file(path, "kernel", MAX_DECOMPRESSED, BootError)  # a regular file of a sane size, checked first
    info: dict[str, Any] = {"path": str(path), "file_size": len(data)}
    if is_bzimage(data):
        bz = open_bzimage(data)
        hdr = bz.header
        elf = parse_elf(bz.vmlinux)
        info.update(
            format="bzImage",
            protocol=hdr.protocol,
            protocol_version=hdr.version,
            kernel_version=hdr.kernel_version or None,
            banner=linux_banner(bz.vmlinux),
            compression=bz.compression,
            setup_size=hdr.setup_size,
            payload_size=bz.payload_size,
            vmlinux_size=len(bz.vmlinux),
            init_size=hdr.init_size,
            pref_address=hdr.pref_address,
            kernel_alignment=hdr.kernel_alignment,
            relocatable=bool(hdr.relocatable_kernel),
            kernel_64=bool(hdr.xloadflags & XLF_KERNEL_64),
            can_load_above_4g=bool(hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G),
            cmdline_size=hdr.cmdline_size,
            initrd_addr_max=hdr.initrd_addr_max,
            **_elf_facts(elf),
        )
        return info
    if is_elf(data):
        elf = parse_elf(data)
        banner = linux_banner(data)
        info.update(
            format="elf",
            protocol=None,
            kernel_version=banner[len("Linux version "):] if banner else None,
            banner=banner,
            compression=None,
            init_size=elf.phys_end - elf.phys_start,
            **_elf_facts(elf),
        )
        return info
    raise BootError(f"{path} is neither a bzImage nor an ELF kernel; pass a Linux bzImage, a vmlinux or the bundled guest.")
