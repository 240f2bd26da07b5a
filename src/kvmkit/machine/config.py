"""One description of a VM, checked once: what the CLI and the Python API both build.

Everything a user can choose about a machine is a field of :class:`VmConfig`
(kernel, initrd, command line, memory, vCPUs, serial ports, host quirks,
devices). Parsing user words (``-m 1G``, ``--serial COM2=pty``,
``--cpuid-clear 1:ecx:13``) happens here and only here, so the two entry
points cannot disagree, and a bad value is one plain sentence before any
KVM object exists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import KvmkitError
from ..boot.mptable import MAX_CPUS  # APIC IDs 0..N-1 and the IOAPIC's must fit the MP table
from ..host.backends import backend_kind
from ..host.tap import valid_ifname
from ..devices.virtio.p9 import MAX_TAG, valid_tag
from ..memory import MiB

SERIAL_PORTS = 4                 # COM1..COM4
MIN_MEM = 64 << 10               # tiny real-mode test guests; a kernel needs more and the loader says so
MAX_MEM = 1 << 40                # 1 TiB: far beyond these hosts, well inside the 52-bit guest address space
QUIRK_PROFILES = ("auto", "nested-pvm", "none")
DEFAULT_SERIAL = ("stdio", "none", "none", "none")


def parse_size(text: str | int) -> int:
    """``256M``, ``1G``, ``512K`` or a bare number of MiB (as lkvm takes it) -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    bad = KvmkitError(f"cannot read memory size {text!r}; write it like 256M or 1G.")
    try:
        if t and t[-1] in units:
            value = float(t[:-1])
            if not math.isfinite(value) or value < 0 or value * units[t[-1]] > 1 << 63:
                raise bad
            return int(value * units[t[-1]])
        if not t.isdigit() or len(t) > 12:
            raise bad
        return int(t) * MiB
    except ValueError:
        raise bad from None


def parse_serial_specs(items: list[str]) -> list[str]:
    """``--serial`` words (in order, or ``COMn=SPEC``) -> one backend spec per port, COM1 first."""
    specs = list(DEFAULT_SERIAL)
    nxt = 0
    for item in items:
        if "=" in item and item.split("=", 1)[0].upper().startswith("COM"):
            name, spec = item.split("=", 1)
            try:
                idx = int(name[3:]) - 1
            except ValueError:
                raise KvmkitError(f"cannot read serial port name {name!r}; use COM1 to COM4.") from None
            if not 0 <= idx < SERIAL_PORTS:
                raise KvmkitError(f"serial port {name} does not exist; use COM1 to COM4.")
            specs[idx] = spec
            nxt = idx + 1
        else:
            if nxt >= SERIAL_PORTS:
                raise KvmkitError("more than four --serial options; a PC has COM1 to COM4.")
            specs[nxt] = item
            nxt += 1
    return specs


def parse_cpuid_clear(items: list[str]) -> dict[tuple[int, str], int]:
    """``LEAF:REG:BIT`` words (leaf in decimal or 0x hex) -> {(leaf, register): bits}."""
    out: dict[tuple[int, str], int] = {}
    for item in items:
        parts = item.lower().split(":")
        try:
            leaf, reg, bit = int(parts[0], 0), parts[1], int(parts[2], 0)
            if len(parts) != 3 or reg not in ("eax", "ebx", "ecx", "edx") or not 0 <= bit < 32 or leaf < 0:
                raise ValueError
        except (ValueError, IndexError):
            raise KvmkitError(f"cannot read --cpuid-clear {item!r}; write LEAF:REG:BIT, e.g. 1:ecx:13.") from None
        out[(leaf, reg)] = out.get((leaf, reg), 0) | (1 << bit)
    return out


CONSOLES = ("serial", "virtio")
MAX_DISKS = 16
SERIAL_ID_MAX = 20  # virtio-blk GET_ID returns at most 20 bytes


@dataclass(frozen=True)
class DiskSpec:
    """One ``--disk``: a raw image file or block device, read-only or not, with the serial GET_ID reports."""

    path: Path
    read_only: bool = False
    serial: str | None = None


def parse_disk(text: str) -> DiskSpec:
    """``PATH[,ro][,serial=ID]`` -> DiskSpec (options are the trailing comma words; a path may hold commas)."""
    parts = text.split(",")
    read_only = False
    serial = None
    while len(parts) > 1:
        word = parts[-1]
        if word in ("ro", "rw"):
            read_only = word == "ro"
        elif word.startswith("serial="):
            serial = word[len("serial="):]
        else:
            break
        parts.pop()
    path = ",".join(parts)
    if not path:
        raise KvmkitError(f"--disk {text!r} names no file; write PATH[,ro][,serial=ID].")
    if serial is not None and (len(serial.encode()) > SERIAL_ID_MAX or not serial.isprintable()):
        raise KvmkitError(f"disk serial {serial!r} must be at most {SERIAL_ID_MAX} printable bytes.")
    return DiskSpec(Path(path), read_only, serial)


MAX_SHARES = 8


@dataclass(frozen=True)
class ShareSpec:
    """One ``--share``: a host directory served over virtio-9p under a mount tag, read-only or not."""

    path: Path
    tag: str
    read_only: bool = False


def parse_share(text: str, index: int = 0) -> ShareSpec:
    """``HOSTDIR[:TAG][,ro]`` -> ShareSpec; the tag defaults to ``share0``, ``share1``, ... by position.

    The tag is what the guest mounts (``mount -t 9p -o trans=virtio TAG /mnt``).
    """
    body, read_only = text, None
    while True:
        head, sep, word = body.rpartition(",")
        if not (sep and word in ("ro", "rw")):
            break
        if read_only is None:  # the last word given wins
            read_only = word == "ro"
        body = head
    path, sep, tag = body.rpartition(":")
    if not sep or "/" in tag:  # no tag given (a ':' inside the path is part of it)
        path, tag = body, f"share{index}"
    if not path:
        raise KvmkitError(f"--share {text!r} names no directory; write HOSTDIR[:TAG][,ro].")
    if not valid_tag(tag):
        raise KvmkitError(f"--share tag {tag!r} must be 1 to {MAX_TAG} letters, digits, '_', '.' or '-'.")
    return ShareSpec(Path(path), tag, bool(read_only))


MAX_NETS = 4
NET_MODES = ("user", "tap")


@dataclass(frozen=True)
class NetSpec:
    """One ``--net``: user-mode networking through passt, or a host tap interface, and the guest's MAC.

    ``socket``: for ``user``, a passt the user started (None: kvmkit starts
    one). ``ifname``: for ``tap``, the interface (None: the kernel names it).
    ``mac``: ``xx:xx:xx:xx:xx:xx``; None until the VmConfig picks one.
    """

    mode: str
    socket: Path | None = None
    ifname: str | None = None
    mac: str | None = None


def parse_mac(text: str) -> str:
    """A unicast MAC address, written ``02:00:00:aa:bb:cc`` -> its lower-case canonical form."""
    parts = text.strip().split(":")
    bad = KvmkitError(f"cannot read MAC address {text!r}; write six hex bytes like 02:00:00:12:34:56.")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise bad
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise bad from None
    if raw[0] & 1:
        raise KvmkitError(f"MAC address {text} is a multicast address; a network card needs a unicast one "
                          "(an even first byte, e.g. 02:...).")
    if not any(raw):
        raise KvmkitError("MAC address 00:00:00:00:00:00 is not a card's address; give another.")
    return ":".join(f"{b:02x}" for b in raw)


def random_mac() -> str:
    """A random locally administered unicast address (first byte 02): no vendor's, and two VMs on one
    bridge do not collide. It is chosen once per VM and a snapshot keeps it."""
    return ":".join(f"{b:02x}" for b in b"\x02" + os.urandom(5))


def parse_net(text: str) -> NetSpec:
    """``user[,socket=PATH][,mac=MAC]`` or ``tap[,ifname=NAME][,mac=MAC]`` -> NetSpec."""
    mode, *words = text.split(",")
    if mode not in NET_MODES:
        raise KvmkitError(f"--net {text!r} names no backend; write user[,socket=PATH] or tap[,ifname=NAME], "
                          "with ,mac=MAC if you like.")
    socket: Path | None = None
    ifname: str | None = None
    mac: str | None = None
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not value:
            raise KvmkitError(f"cannot read {word!r} in --net {text!r}; options are written KEY=VALUE.")
        if key == "mac":
            mac = parse_mac(value)
        elif key == "socket" and mode == "user":
            socket = Path(value)
        elif key == "ifname" and mode == "tap":
            if not valid_ifname(value):
                raise KvmkitError(f"tap name {value!r} is not an interface name; use 1 to 15 letters, digits, "
                                  "'-' or '_'.")
            ifname = value
        else:
            allowed = "socket=, mac=" if mode == "user" else "ifname=, mac="
            raise KvmkitError(f"--net {mode} has no option {key!r}; it takes {allowed}.")
    return NetSpec(mode, socket, ifname, mac)


def _checked_net(spec: NetSpec) -> NetSpec:
    """A NetSpec built in code (the API, a snapshot) gets the checks ``parse_net`` makes."""
    if spec.mode not in NET_MODES or (spec.mode == "tap" and spec.socket is not None) or (
            spec.mode == "user" and spec.ifname is not None):
        raise KvmkitError(f"network card {spec} is neither user[,socket=PATH] nor tap[,ifname=NAME].")
    if spec.ifname is not None and not valid_ifname(spec.ifname):
        raise KvmkitError(f"tap name {spec.ifname!r} is not an interface name; use 1 to 15 letters, digits, '-' or '_'.")
    return spec if spec.mac is None else replace(spec, mac=parse_mac(spec.mac))


@dataclass
class VmConfig:
    """A machine as the user asked for it. Validated when built; plain values only.

    ``kernel`` None boots the bundled guest, whose command script is
    ``script``. ``cmdline`` is the user's kernel command line (``-p``): the
    machine's command-line builder adds its defaults around it
    (machine/cmdline.py).
    """

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    script: str | None = None
    mem_size: int = 256 * MiB
    cpus: int = 1
    serial: list[str] = field(default_factory=lambda: list(DEFAULT_SERIAL))
    serial_fifo: bool = True
    serial_pace: bool = False
    # The in-kernel PIC/IOAPIC/LAPIC and PIT. Without them HLT exits to user
    # space (KVM_EXIT_HLT) and no interrupt can be delivered: only for tiny
    # test guests.
    irqchip: bool = True
    cpuid_clear: dict[tuple[int, str], int] = field(default_factory=dict)
    quirks: str = "auto"           # host quirk profile (machine/quirks.py)
    pv_clockevent: bool = True     # paravirtual clock event device (docs/pv-clockevent.md); needs irqchip
    disks: list[DiskSpec] = field(default_factory=list)   # virtio-blk, vda, vdb, ... (docs/virtio.md)
    console: str = "serial"        # where the guest's console is: COM1, or virtio-console (hvc0)
    virtio_console: bool = False   # a virtio-console device (always with console="virtio")
    rng: bool = False              # virtio-rng, fed from getrandom()
    shares: list[ShareSpec] = field(default_factory=list)  # virtio-9p host directories (docs/virtio.md)
    nets: list[NetSpec] = field(default_factory=list)      # virtio-net cards, after every other PCI device

    @property
    def has_pci(self) -> bool:
        """Whether the machine gets a PCI bus (it does as soon as it has a PCI device)."""
        return bool(self.disks) or self.virtio_console or self.rng or bool(self.shares) or bool(self.nets)

    def __post_init__(self) -> None:
        if isinstance(self.mem_size, str):
            self.mem_size = parse_size(self.mem_size)
        if self.kernel is not None:
            self.kernel = Path(self.kernel)
        if self.initrd is not None:
            self.initrd = Path(self.initrd)
        if not 1 <= self.cpus <= MAX_CPUS:
            raise KvmkitError(f"--cpus {self.cpus} is out of range; choose 1 to {MAX_CPUS}.")
        if self.mem_size < MIN_MEM:
            raise KvmkitError(f"--mem {self.mem_size} bytes is too small; give the VM at least {MIN_MEM >> 10} KiB (a kernel needs MiBs).")
        if self.mem_size > MAX_MEM:
            raise KvmkitError(f"--mem {self.mem_size >> 30} GiB is more than kvmkit supports; give it at most {MAX_MEM >> 30} GiB.")
        if self.mem_size % 4096:
            raise KvmkitError(f"--mem {self.mem_size} bytes is not a whole number of 4 KiB pages; round it, e.g. to {self.mem_size // MiB}M.")
        if len(self.serial) > SERIAL_PORTS:
            raise KvmkitError("more than four serial ports; a PC has COM1 to COM4.")
        self.serial = list(self.serial) + ["none"] * (SERIAL_PORTS - len(self.serial))
        for spec in self.serial:
            backend_kind(spec)
        if self.quirks not in QUIRK_PROFILES:
            raise KvmkitError(f"unknown quirk profile {self.quirks!r}; choose one of {', '.join(QUIRK_PROFILES)}.")
        self.disks = [parse_disk(d) if isinstance(d, str) else d for d in self.disks]
        if len(self.disks) > MAX_DISKS:
            raise KvmkitError(f"{len(self.disks)} disks is more than kvmkit supports; give at most {MAX_DISKS}.")
        self.shares = [parse_share(x, i) if isinstance(x, str) else x for i, x in enumerate(self.shares)]
        if len(self.shares) > MAX_SHARES:
            raise KvmkitError(f"{len(self.shares)} shares is more than kvmkit supports; give at most {MAX_SHARES}.")
        tags = [x.tag for x in self.shares]
        if len(set(tags)) != len(tags):
            raise KvmkitError(f"two --share directories have the same tag ({', '.join(tags)}); give each its own "
                              "with HOSTDIR:TAG.")
        nets = [parse_net(x) if isinstance(x, str) else _checked_net(x) for x in self.nets]
        if len(nets) > MAX_NETS:
            raise KvmkitError(f"{len(nets)} network cards is more than kvmkit supports; give at most {MAX_NETS}.")
        self.nets = [x if x.mac is not None else replace(x, mac=random_mac()) for x in nets]
        macs = [x.mac for x in self.nets]
        if len(set(macs)) != len(macs):
            raise KvmkitError(f"two --net cards have the same MAC address ({', '.join(map(str, macs))}); give "
                              "each its own.")
        taps = [x.ifname for x in self.nets if x.mode == "tap" and x.ifname is not None]
        if len(set(taps)) != len(taps):
            raise KvmkitError("two --net tap cards name the same interface; a tap serves one card.")
        if self.console not in CONSOLES:
            raise KvmkitError(f"unknown console {self.console!r}; choose {' or '.join(CONSOLES)}.")
        if self.console == "virtio":
            self.virtio_console = True
            if self.serial[0] == "off":
                raise KvmkitError("--console virtio takes COM1's backend (and keeps COM1 for early boot messages); "
                                  "do not turn COM1 off.")
        if self.has_pci and not self.irqchip:
            raise KvmkitError("PCI devices need the in-kernel irqchip; drop --disk/--share/--net/--rng/--console virtio or enable it.")
        if self.script is not None and self.kernel is not None:
            raise KvmkitError("guest command words are for the bundled guest; with --kernel put them in --append.")
