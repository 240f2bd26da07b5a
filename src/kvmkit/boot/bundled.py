"""The bundled guest: a small test kernel built from ``<repo>/guest``.

``kvmkit run`` boots it when no ``--kernel`` is given. It is an ELF64 entered
like a Linux vmlinux (64-bit boot protocol, RSI = boot_params), so the same
loader serves both. It is built on first use with the host's gcc, binutils
and make, into a cache directory keyed on a hash of its sources::

    ${KVMKIT_CACHE:-~/.cache/kvmkit}/guest/<hash>/kvmkit-guest.elf

Later calls return the cached file without running make. A build goes into
a temporary directory that is renamed into place, so concurrent callers and
interrupted builds never leave a half-written guest behind.

Environment:
    KVMKIT_GUEST_SRC  the guest source directory (default: <repo>/guest)
    KVMKIT_CACHE      the cache root (default: $XDG_CACHE_HOME/kvmkit or
                      ~/.cache/kvmkit)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvmkit.errors import KvmkitError

ELF_NAME = "kvmkit-guest.elf"

# Bump to force a rebuild when the way the guest is built changes outside
# the guest directory (for example the make command line below).
BUILD_FORMAT = "1"

_TOOLS = ("make", "gcc", "ld")
_SOURCE_SUFFIXES = (".c", ".h", ".S", ".s", ".ld", ".lds", ".mk")
_SOURCE_NAMES = ("Makefile",)
_SKIP_DIRS = {"build", "__pycache__"}


def guest_source_dir() -> Path:
    """The directory holding the guest's Makefile and sources."""
    override = os.environ.get("KVMKIT_GUEST_SRC")
    if override:
        return Path(override).expanduser()
    # src/kvmkit/boot/bundled.py -> parents[3] is the repository root
    return Path(__file__).resolve().parents[3] / "guest"


def cache_root() -> Path:
    """The root of kvmkit's cache (the guest lives under ``guest/``)."""
    override = os.environ.get("KVMKIT_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvmkit"


def _source_files(src: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name in _SOURCE_NAMES or name.endswith(_SOURCE_SUFFIXES):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def source_hash(src: Path | None = None) -> str:
    """A hash of every guest source file's path and contents (hex, 16 chars)."""
    src = guest_source_dir() if src is None else src
    h = hashlib.sha256(f"kvmkit-guest-build {BUILD_FORMAT}\0".encode())
    for path in _source_files(src):
        rel = path.relative_to(src).as_posix()
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _and_list(words: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: how a sentence lists names."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def missing_tools_message(missing: list[str]) -> str:
    """The one sentence for build tools that are not on PATH (grammar follows the count)."""
    verb = "is" if len(missing) == 1 else "are"
    return (f"cannot build the bundled guest because {_and_list(missing)} {verb} missing; "
            "install gcc, binutils and make (apt-get install build-essential).")


def _check_tools() -> None:
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise KvmkitError(missing_tools_message(missing))


def bundled_guest() -> Path:
    """Return the path of the built bundled guest ELF, building it if needed."""
    src = guest_source_dir()
    if not (src / "Makefile").is_file():
        raise KvmkitError(
            f"the bundled guest sources are not at {src}: set KVMKIT_GUEST_SRC "
            "to the guest/ directory of a kvmkit checkout, or pass --kernel"
        )
    digest = source_hash(src)
    parent = cache_root() / "guest"
    final_dir = parent / digest
    elf = final_dir / ELF_NAME
    if elf.is_file():
        return elf

    _check_tools()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=parent))
    except OSError as e:
        raise KvmkitError(
            f"cannot create the guest cache directory {parent} ({e.strerror}): "
            "set KVMKIT_CACHE to a writable directory"
        ) from None
    try:
        proc = subprocess.run(
            ["make", "-C", str(src), f"O={tmp}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        if proc.returncode != 0 or not (tmp / ELF_NAME).is_file():
            log = parent / f"build-{digest}.log"
            log.write_text(proc.stdout)
            last = next((l for l in reversed(proc.stdout.splitlines()) if l.strip()), "")
            raise KvmkitError(
                f"building the bundled guest failed (make exit status {proc.returncode}: "
                f"{last.strip()}); the full log is in {log}"
            )
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final_dir)
        except OSError:
            # Someone else finished the same build first: use theirs.
            if not elf.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return elf
