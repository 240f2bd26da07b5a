"""Snapshots: a paused machine saved to a directory, and a new machine that continues from one.

A snapshot is a directory (docs/snapshot.md)::

    manifest.json   format name and version, kvmkit version, the machine's configuration,
                    and for every other file its size and SHA-256
    state.json      KVM's state (each vCPU, the irqchips, PIT and clock), every device's
                    state, the CPUID the guest saw, the quirk profile's state
    memory-N.raw    guest RAM region N, a sparse file: pages the guest never touched are holes

Saving pauses the vCPUs at an instruction boundary (machine/lifecycle.py),
stops the disk workers between requests, and collects everything on the
host loop thread, so that no timer expiry, serial byte or console request
lands between two parts of the state. Only pages the guest has touched are
read and written, so a snapshot costs what the guest used, not its RAM size.

Restoring maps each memory file MAP_PRIVATE: the guest's writes stay in the
new process, the snapshot never changes, any number of VMs can run from one
snapshot at once, and mapping costs the same for 256 MiB and 4 GiB (pages
come from the file when first touched). The restored machine uses the
devices and console backends its new run names; the guest continues at the
instruction it was paused at, its clock (kvmclock and TSC) from where it
stood, so it sees the time between as time it did not run.

A snapshot is untrusted input: every size and field is checked, and one
from another format version, a host CPU lacking features the guest saw, a
damaged file or a disk image changed since is refused in one sentence.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import importlib.metadata
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import KvmkitError
from ..kvm import structs as ks
from ..kvm.state import VcpuState, VmState
from ..host.loop import EventLoop
from ..memory import GuestMemory, MemoryRegion, ram_layout
from .config import DiskSpec, NetSpec, ShareSpec, VmConfig
from .lifecycle import call_elsewhere

FORMAT = "kvmkit-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
BLOCK = 64 << 10                 # memory is compared, hashed and written in 64 KiB blocks
PAGE = 4096
MAX_MANIFEST = 1 << 20
MAX_STATE = 64 << 20
_ZERO = bytes(BLOCK)
# CPUID (leaf, subleaf, register) whose feature bits a guest may rely on without asking again.
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                 (0xD, 1, "eax"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))


class SnapshotError(KvmkitError):
    """A snapshot that cannot be written or restored."""


class Source(Protocol):
    """The machine as a snapshot sees it (machine/machine.py's Machine)."""

    config: VmConfig
    mem: GuestMemory | None
    loop: EventLoop

    def collect_state(self) -> dict[str, object]:
        """Everything but memory, with the vCPUs parked, on the host loop thread."""
        ...


# --- memory ----------------------------------------------------------------------------

def _present_pages(region: MemoryRegion) -> bytes:
    """One byte per page of ``region``: non-zero where the page is mapped or swapped in this process
    (/proc/self/pagemap bits 63 and 62), i.e. where the guest or a loader ever touched it."""
    pages = region.size // PAGE
    first = region.host_address // PAGE
    out = bytearray(pages)
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        step = 1 << 16
        for i in range(0, pages, step):
            n = min(step, pages - i)
            raw = os.pread(f.fileno(), n * 8, (first + i) * 8)
            words = memoryview(raw).cast("Q")
            for j in range(len(words)):
                if words[j] >> 62:
                    out[i + j] = 1
    return bytes(out)


def _file_data(fd: int, size: int) -> list[tuple[int, int]]:
    """The data (non-hole) ranges of a sparse file, as SEEK_DATA/SEEK_HOLE report them."""
    ranges = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            return [(0, size)]  # a file system without SEEK_DATA: all of it may be data
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        pos = end
    return ranges


def _candidate_blocks(region: MemoryRegion) -> list[int]:
    """Offsets of the BLOCK-sized blocks that may hold non-zero bytes."""
    present = _present_pages(region)
    per_block = BLOCK // PAGE
    blocks = {i // per_block for i in range(len(present)) if present[i]} if present.count(0) != len(present) else set()
    if region.backing_fd is not None:  # a restored VM: pages it never touched are still the file's
        for start, end in _file_data(region.backing_fd, region.size):
            blocks.update(range(start // BLOCK, (end + BLOCK - 1) // BLOCK))
    return sorted(b * BLOCK for b in blocks if b * BLOCK < region.size)


def block_digest() -> "hashlib._Hash":
    return hashlib.sha256(b"kvmkit-memory-v1")


def save_region(region: MemoryRegion, path: Path) -> dict[str, Any]:
    """Write ``region`` to a new sparse file: each non-zero block at its offset, holes elsewhere.

    The digest covers (offset, block) for every non-zero block, so the same
    memory gives the same digest however the file system lays out holes.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    digest = block_digest()
    written = 0
    try:
        os.ftruncate(fd, region.size)
        mm = region.mm
        run_start = -1
        run: list[bytes] = []
        for off in _candidate_blocks(region):
            block = mm[off:off + BLOCK]
            if block == _ZERO[:len(block)]:
                continue
            digest.update(off.to_bytes(8, "little"))
            digest.update(block)
            if run and off != run_start + BLOCK * len(run):
                os.pwrite(fd, b"".join(run), run_start)
                run = []
            if not run:
                run_start = off
            run.append(block)
            written += len(block)
            if len(run) >= 64:
                os.pwrite(fd, b"".join(run), run_start)
                run = []
        if run:
            os.pwrite(fd, b"".join(run), run_start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"file": path.name, "gpa": region.gpa, "size": region.size, "data_bytes": written,
            "sha256": digest.hexdigest()}


def region_digest(fd: int, size: int) -> str:
    """The digest :func:`save_region` wrote, recomputed from a memory file (reads only its data ranges)."""
    digest = block_digest()
    blocks: set[int] = set()
    for start, end in _file_data(fd, size):
        blocks.update(range(start // BLOCK, (end + BLOCK - 1) // BLOCK))
    for b in sorted(blocks):
        off = b * BLOCK
        block = os.pread(fd, min(BLOCK, size - off), off)
        if block != _ZERO[:len(block)]:
            digest.update(off.to_bytes(8, "little"))
            digest.update(block)
    return digest.hexdigest()


# --- configuration and CPUID ------------------------------------------------------------

def config_to_dict(cfg: VmConfig) -> dict[str, Any]:
    return {
        "kernel": str(cfg.kernel) if cfg.kernel else None, "initrd": str(cfg.initrd) if cfg.initrd else None,
        "cmdline": cfg.cmdline, "script": cfg.script, "mem_size": cfg.mem_size, "cpus": cfg.cpus,
        "serial": list(cfg.serial), "serial_fifo": cfg.serial_fifo, "serial_pace": cfg.serial_pace,
        "irqchip": cfg.irqchip, "cpuid_clear": [[leaf, reg, bits] for (leaf, reg), bits in sorted(cfg.cpuid_clear.items())],
        "quirks": cfg.quirks, "pv_clockevent": cfg.pv_clockevent,
        "disks": [{"path": str(d.path), "read_only": d.read_only, "serial": d.serial} for d in cfg.disks],
        "console": cfg.console, "virtio_console": cfg.virtio_console, "rng": cfg.rng,
        "shares": [{"path": str(x.path), "tag": x.tag, "read_only": x.read_only} for x in cfg.shares],
        "nets": [{"mode": x.mode, "socket": str(x.socket) if x.socket is not None else None, "ifname": x.ifname,
                  "mac": x.mac} for x in cfg.nets],
    }


def config_from_dict(d: Any, serial: list[str] | None) -> VmConfig:
    """The saved configuration, with the new run's serial backends (``serial``) where given."""
    try:
        disks = [DiskSpec(Path(_typed(x["path"], str)), bool(_typed(x["read_only"], bool)),
                          None if x["serial"] is None else _typed(x["serial"], str)) for x in _typed(d["disks"], list)]
        shares = [ShareSpec(Path(_typed(x["path"], str)), _typed(x["tag"], str), bool(_typed(x["read_only"], bool)))
                  for x in _typed(d.get("shares", []), list)]
        nets = [NetSpec(_typed(x["mode"], str), None if x["socket"] is None else Path(_typed(x["socket"], str)),
                        _opt_str(x["ifname"]), _typed(x["mac"], str))
                for x in _typed(d.get("nets", []), list)]   # snapshots from before --net have none
        clear = {(_typed(leaf, int), _typed(reg, str)): _typed(bits, int) for leaf, reg, bits in _typed(d["cpuid_clear"], list)}
        saved_serial = [_typed(x, str) for x in _typed(d["serial"], list)]
        if serial is not None:
            # A port the snapshot had stays present (its state is in the snapshot); one it lacked stays off.
            serial = [("off" if old == "off" else new) for old, new in zip(saved_serial, serial)]
        return VmConfig(
            kernel=None if d["kernel"] is None else Path(_typed(d["kernel"], str)),
            initrd=None if d["initrd"] is None else Path(_typed(d["initrd"], str)),
            cmdline=_opt_str(d["cmdline"]), script=_opt_str(d["script"]), mem_size=_typed(d["mem_size"], int),
            cpus=_typed(d["cpus"], int), serial=serial if serial is not None else saved_serial,
            serial_fifo=_typed(d["serial_fifo"], bool), serial_pace=_typed(d["serial_pace"], bool),
            irqchip=_typed(d["irqchip"], bool), cpuid_clear=clear, quirks=_typed(d["quirks"], str),
            pv_clockevent=_typed(d["pv_clockevent"], bool), disks=disks, console=_typed(d["console"], str),
            virtio_console=_typed(d["virtio_console"], bool), rng=_typed(d["rng"], bool), shares=shares,
            nets=nets)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's machine configuration is damaged ({e}); take the snapshot again.") from None


def _typed(v: Any, kind: type) -> Any:
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise TypeError(f"{v!r} is not {kind.__name__}")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _typed(v, str)


def cpuid_rows(entries: list[ks.kvm_cpuid_entry2]) -> list[list[int]]:
    return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in entries]


def cpuid_entries(rows: Any) -> list[ks.kvm_cpuid_entry2]:
    out = []
    for row in _typed(rows, list):
        vals = [_typed(v, int) for v in _typed(row, list)]
        if len(vals) != 7 or any(not 0 <= v < 1 << 32 for v in vals):
            raise TypeError("a CPUID row must be 7 32-bit numbers")
        out.append(ks.kvm_cpuid_entry2(function=vals[0], index=vals[1], flags=vals[2], eax=vals[3], ebx=vals[4],
                                       ecx=vals[5], edx=vals[6]))
    if len(out) > 256:
        raise TypeError("more than 256 CPUID rows")
    return out


def missing_features(saved: list[ks.kvm_cpuid_entry2], here: list[ks.kvm_cpuid_entry2]) -> list[str]:
    """Feature bits the saved guest saw that this host's KVM would not give it ("leaf.sub reg: bits")."""
    def word(entries: list[ks.kvm_cpuid_entry2], leaf: int, sub: int, reg: str) -> int:
        for e in entries:
            if e.function == leaf and e.index == sub:
                return int(getattr(e, reg))
        return 0
    def vendor(entries: list[ks.kvm_cpuid_entry2]) -> tuple[int, int, int]:
        return (word(entries, 0, 0, "ebx"), word(entries, 0, 0, "edx"), word(entries, 0, 0, "ecx"))
    out = []
    if vendor(saved) != vendor(here):
        out.append("the CPU vendor")
    for leaf, sub, reg in FEATURE_WORDS:
        lacking = word(saved, leaf, sub, reg) & ~word(here, leaf, sub, reg)
        if lacking:
            out.append(f"CPUID {leaf:#x}.{sub} {reg} bits {lacking:#x}")
    return out


# --- the state file -----------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(v: Any, what: str, limit: int = 1 << 20) -> bytes:
    try:
        raw = base64.b64decode(_typed(v, str), validate=True)
    except (TypeError, ValueError):
        raise SnapshotError(f"the snapshot's {what} is damaged; take the snapshot again.") from None
    if len(raw) > limit:
        raise SnapshotError(f"the snapshot's {what} is too large; take the snapshot again.")
    return raw


def vcpu_to_dict(st: VcpuState) -> dict[str, Any]:
    return {"mp_state": st.mp_state, "regs": _b64(st.regs), "sregs": _b64(st.sregs), "xsave": _b64(st.xsave),
            "xcrs": _b64(st.xcrs), "debugregs": _b64(st.debugregs), "lapic": _b64(st.lapic),
            "events": _b64(st.events), "msrs": [[i, v] for i, v in st.msrs]}


def vcpu_from_dict(d: Any) -> VcpuState:
    try:
        msrs = [(_typed(i, int), _typed(v, int)) for i, v in _typed(d["msrs"], list)]
        if len(msrs) > 4096 or any(not 0 <= i < 1 << 32 or not 0 <= v < 1 << 64 for i, v in msrs):
            raise ValueError("MSR out of range")
        return VcpuState(mp_state=_typed(d["mp_state"], int), regs=_unb64(d["regs"], "registers"),
                         sregs=_unb64(d["sregs"], "special registers"), xsave=_unb64(d["xsave"], "XSAVE area"),
                         xcrs=_unb64(d["xcrs"], "XCRs"), debugregs=_unb64(d["debugregs"], "debug registers"),
                         lapic=_unb64(d["lapic"], "local APIC"), events=_unb64(d["events"], "vCPU events"), msrs=msrs)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's vCPU state is damaged ({e}); take the snapshot again.") from None


def vm_to_dict(st: VmState) -> dict[str, Any]:
    return {"irqchips": [_b64(c) for c in st.irqchips], "pit": _b64(st.pit), "clock_ns": st.clock_ns}


def vm_from_dict(d: Any) -> VmState:
    try:
        return VmState(irqchips=[_unb64(c, "interrupt controller") for c in _typed(d["irqchips"], list)][:8],
                       pit=_unb64(d["pit"], "PIT"), clock_ns=_typed(d["clock_ns"], int))
    except (KeyError, TypeError) as e:
        raise SnapshotError(f"the snapshot's VM state is damaged ({e}); take the snapshot again.") from None


# --- files ------------------------------------------------------------------------------

def _write_new(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def _open_in(directory: Path, name: str) -> int:
    """Open a file of the snapshot read-only, refusing symlinks and anything but a regular file."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        what = "is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise SnapshotError(f"cannot open {directory / name}: {what}; is {directory} a kvmkit snapshot?") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(f"{directory / name} is not a regular file; is {directory} a kvmkit snapshot?")
    return fd


def _read_small(directory: Path, name: str, limit: int) -> bytes:
    fd = _open_in(directory, name)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise SnapshotError(f"{directory / name} is {size} bytes, more than a snapshot's {limit}; it is not a kvmkit snapshot file.")
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                break
            data += chunk
        return data
    finally:
        os.close(fd)


def prepare_directory(directory: Path) -> None:
    """Create the snapshot directory (0700: it holds guest memory), or take an empty one the user owns."""
    try:
        os.mkdir(directory, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise SnapshotError(f"cannot create the snapshot directory {directory}: {e.strerror}; choose another place.") from None
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SnapshotError(f"{directory} exists and is not a directory; name a new directory for the snapshot.")
    if any(directory.iterdir()):
        raise SnapshotError(f"{directory} is not empty; name a new or empty directory for the snapshot.")
    if st.st_uid != os.geteuid():
        raise SnapshotError(f"{directory} belongs to another user; name a directory of your own for the snapshot.")
    os.chmod(directory, 0o700)


@dataclass
class Snapshot:
    """A snapshot read back and checked: its manifest, its state and its open memory files."""

    directory: Path
    manifest: dict[str, Any]
    state: dict[str, Any]
    memory_fds: list[int]

    def close(self) -> None:
        for fd in self.memory_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.memory_fds = []


def read_snapshot(directory: Path, verify_memory: bool = False) -> Snapshot:
    """Read and check a snapshot directory: format, version, checksums, sizes; open its memory files.

    The memory files' digests are checked only with ``verify_memory``: it
    reads every page, which is what mapping them is designed to avoid.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SnapshotError(f"{directory} is not a directory; name a snapshot made by 'kvmkit snapshot'.")
    try:
        manifest = json.loads(_read_small(directory, MANIFEST, MAX_MANIFEST))
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"{directory / MANIFEST} is not valid JSON; the snapshot is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{directory} is not a kvmkit snapshot (no '{FORMAT}' manifest).")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"{directory} is a version {manifest.get('version')!r} kvmkit snapshot and this kvmkit "
                            f"reads version {VERSION}; restore it with the kvmkit that made it.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(files.get(STATE), dict):
        raise SnapshotError(f"{directory / MANIFEST} lists no state file; the snapshot is damaged.")
    raw = _read_small(directory, STATE, MAX_STATE)
    if hashlib.sha256(raw).hexdigest() != files[STATE].get("sha256"):
        raise SnapshotError(f"{directory / STATE} does not match its checksum; the snapshot is damaged.")
    try:
        state = json.loads(raw)
        if not isinstance(state, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"{directory / STATE} is not valid JSON; the snapshot is damaged.") from None
    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("mem_size"), int):
        raise SnapshotError(f"{directory / MANIFEST} has no machine configuration; the snapshot is damaged.")
    layout = ram_layout(config["mem_size"])
    regions = manifest.get("memory")
    if not isinstance(regions, list) or len(regions) != len(layout):
        raise SnapshotError(f"{directory / MANIFEST} does not describe the guest's memory; the snapshot is damaged.")
    fds: list[int] = []
    try:
        for (gpa, size), entry in zip(layout, regions):
            if not isinstance(entry, dict) or entry.get("gpa") != gpa or entry.get("size") != size:
                raise SnapshotError(f"{directory / MANIFEST} describes memory that does not fit its size; the snapshot is damaged.")
            name = entry.get("file")
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise SnapshotError(f"{directory / MANIFEST} names a bad memory file; the snapshot is damaged.")
            fd = _open_in(directory, name)
            fds.append(fd)
            if os.fstat(fd).st_size != size:
                raise SnapshotError(f"{directory / name} is not {size} bytes long; the snapshot is damaged.")
            if verify_memory and region_digest(fd, size) != entry.get("sha256"):
                raise SnapshotError(f"{directory / name} does not match its checksum; the snapshot is damaged.")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Snapshot(directory, manifest, state, fds)


def disk_identity(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_disks(manifest: dict[str, Any]) -> None:
    """Refuse a snapshot whose disk images changed since: the guest's page cache and the disk would disagree."""
    disks = manifest.get("disks", [])
    if not isinstance(disks, list):
        raise SnapshotError("the snapshot's disk list is damaged; take the snapshot again.")
    for entry in disks:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise SnapshotError("the snapshot's disk list is damaged; take the snapshot again.")
        path = Path(entry["path"])
        try:
            now = disk_identity(path)
        except OSError as e:
            raise SnapshotError(f"the snapshot's disk {path} cannot be read ({e.strerror}); restore where it is.") from None
        if now != {"size": entry.get("size"), "mtime_ns": entry.get("mtime_ns")}:
            raise SnapshotError(f"the disk image {path} changed since the snapshot was taken; the guest's view of it "
                                "would be inconsistent. Restore from a copy of the disk as it was, or take a new snapshot.")


def kvmkit_version() -> str:
    try:
        return importlib.metadata.version("kvmkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --- saving -------------------------------------------------------------------------------

def on_loop(machine: Source, fn: Callable[[], Any], timeout: float = 600.0) -> Any:
    """Run ``fn`` on the machine's host loop thread (so no host event lands mid-way) and return its result."""
    loop_thread = machine.loop.thread
    if loop_thread is None or not loop_thread.is_alive() or loop_thread is threading.current_thread():
        return fn()
    return call_elsewhere(machine.loop.call_soon, fn, timeout, lambda: SnapshotError(
        "the host loop did not answer while saving the snapshot; the VM may be overloaded."))


def write_snapshot(machine: Source, directory: Path) -> dict[str, Any]:
    """Save a paused machine (vCPUs parked, workers quiet) into ``directory``; on the host loop thread.

    The manifest is written last: a directory without one is an unfinished
    snapshot, and restore refuses it.
    """
    t0 = time.monotonic()
    state = machine.collect_state()
    t_state = time.monotonic()
    memory = []
    assert machine.mem is not None
    for region in machine.mem.regions:
        memory.append(save_region(region, directory / f"memory-{region.slot}.raw"))
    t_mem = time.monotonic()
    raw = json.dumps(state, separators=(",", ":")).encode()
    files = {STATE: {"size": len(raw), "sha256": _write_new(directory / STATE, raw)}}
    manifest = {
        "format": FORMAT, "version": VERSION, "kvmkit": kvmkit_version(), "created": time.time(),
        "config": config_to_dict(machine.config), "memory": memory, "files": files,
        "disks": [{"path": str(d.path.resolve()), **disk_identity(d.path)} for d in machine.config.disks],
    }
    tmp = directory / (MANIFEST + ".tmp")
    _write_new(tmp, json.dumps(manifest, indent=1).encode())
    os.rename(tmp, directory / MANIFEST)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {"dir": str(directory), "memory_bytes": sum(m["data_bytes"] for m in memory),
            "state_bytes": len(raw), "state_s": round(t_state - t0, 4), "memory_s": round(t_mem - t_state, 4),
            "total_s": round(time.monotonic() - t0, 4)}

