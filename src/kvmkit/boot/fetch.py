"""Fetch the stock Debian 12 kernel (and its modules) for tests and examples.

The loader is only worth trusting if it boots the kernel people actually run,
so the tests use Debian's own signed bzImage rather than a home-built one. It
is downloaded with apt (the distribution's ordinary client), unpacked with
``dpkg-deb`` into a cache directory, and never committed.

The cache directory is ``$KVMKIT_KERNEL_CACHE`` if set, else ``kernels/``
under kvmkit's cache root (``$KVMKIT_CACHE``, else
``$XDG_CACHE_HOME/kvmkit``, else ``~/.cache/kvmkit``). It holds the
extracted ``vmlinuz-<version>`` files and, for :func:`kernel_package`, one
unpacked ``linux-image-<version>/`` tree per package, whose modules a root
disk needs because Debian builds every virtio driver as a module.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BootError
from .bundled import cache_root

DEFAULT_CACHE = Path.home() / ".cache" / "kvmkit" / "kernels"  # without any of the variables below
META_PACKAGE = "linux-image-amd64"
_PKG_RE = re.compile(r"^\s*Depends:\s*(linux-image-6\.1\.0-\d+-amd64)\s*$", re.M)
_SEARCH_RE = re.compile(r"^(linux-image-6\.1\.0-(\d+)-amd64)\s", re.M)
# A Debian package name's characters; also keeps a "version" from reaching apt as an option.
_VERSION_RE = re.compile(r"[0-9][0-9A-Za-z.+~-]{0,100}")
COMPLETE = ".complete"


def kernel_cache() -> Path:
    """Where downloaded kernels live, computed at call time so the environment can redirect it."""
    override = os.environ.get("KVMKIT_KERNEL_CACHE")
    if override:
        return Path(override).expanduser()
    return cache_root() / "kernels"  # $KVMKIT_CACHE, $XDG_CACHE_HOME/kvmkit, ~/.cache/kvmkit, in that order


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise BootError(
            f"{argv[0]} is not available, so the stock kernel cannot be downloaded; "
            "run on a Debian system with apt or pass a kernel image yourself."
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise BootError(f"{argv[0]} took longer than 10 minutes; check the network and apt sources and try again.") from exc


def _resolve_package() -> str | None:
    """Name of the versioned kernel package the meta package currently depends on.

    Asking the meta package (rather than picking the highest ABI number from a
    search) gives the kernel Debian currently ships, which is what a user
    would have installed.
    """
    out = _run(["apt-cache", "depends", META_PACKAGE])
    if out.returncode == 0:
        m = _PKG_RE.search(out.stdout)
        if m:
            return m.group(1)
    out = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
    if out.returncode == 0:
        found = sorted(_SEARCH_RE.findall(out.stdout), key=lambda t: int(t[1]))
        if found:
            return found[-1][0]
    return None


def _cached(cache: Path) -> Path | None:
    """Newest previously extracted vmlinuz in the cache, so repeat calls stay offline."""
    found = sorted(cache.glob("vmlinuz-6.1.0-*-amd64"), key=lambda p: (len(p.name), p.name))
    return found[-1] if found else None


def _require_apt(what: str) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise BootError(f"apt-get and dpkg-deb are needed to download {what}; run on Debian 12 or pass the files yourself.")


def _download_unpack(package: str, work: Path) -> Path:
    """``apt-get download`` one package into ``work`` and unpack it with dpkg-deb; return the unpacked root."""
    out = _run(["apt-get", "download", package], cwd=work)
    debs = list(work.glob("*.deb"))
    if out.returncode != 0 or not debs:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise BootError(
            f"apt-get download {package} failed ({msg[-1] if msg else 'no output'}); check the network and apt sources."
        )
    root = work / "root"
    out = _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    if out.returncode != 0:
        raise BootError(f"dpkg-deb could not unpack {debs[0].name}; delete {work.parent} and try again.")
    debs[0].unlink()  # the unpacked tree is what is kept; the .deb would double the space
    return root


def stock_kernel(cache: Path | None = None) -> Path:
    """Return the path of Debian 12's stock bzImage, downloading it on first use."""
    cache = Path(cache) if cache is not None else kernel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    hit = _cached(cache)
    if hit is not None:
        return hit
    _require_apt("the stock Debian kernel")
    package = _resolve_package()
    if package is None and os.geteuid() == 0:
        _run(["apt-get", "update"])
        package = _resolve_package()
    if package is None:
        raise BootError(
            f"apt knows no {META_PACKAGE} package; run 'apt-get update' (as root) with the Debian 12 sources enabled and try again."
        )
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        root = _download_unpack(package, Path(tmp))
        images = sorted((root / "boot").glob("vmlinuz-*"))
        if not images:
            raise BootError(f"package {package} contains no /boot/vmlinuz-*; pass a kernel image with --kernel instead.")
        dest = cache / images[0].name
        partial = cache / (images[0].name + ".partial")
        shutil.copyfile(images[0], partial)
        partial.replace(dest)  # atomic, so a crash never leaves a half-written cache hit
    return dest


def kernel_package(version: str, cache: Path | None = None) -> Path:
    """The unpacked root of Debian's ``linux-image-<version>`` package, downloading it on first use.

    The modules are under ``<root>/lib/modules/<version>/``. The tree is
    kept (about 400 MB) so later calls stay offline; it is renamed into place
    only when complete, so an interrupted download is never mistaken for one.
    """
    if not _VERSION_RE.fullmatch(version):
        raise BootError(f"{version!r} is not a kernel version like 6.1.0-50-amd64; pass the version 'uname -r' prints.")
    cache = Path(cache) if cache is not None else kernel_cache()
    package = f"linux-image-{version}"
    dest = cache / package
    if (dest / COMPLETE).is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    _require_apt(f"the {package} package")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        root = _download_unpack(package, Path(tmp))
        if not (root / "lib" / "modules" / version).is_dir():
            raise BootError(f"package {package} has no /lib/modules/{version}; pass a module tree of that kernel instead.")
        (root / COMPLETE).write_text("ok\n")
        if dest.exists():  # a partial tree from an older kvmkit, or a concurrent download
            if (dest / COMPLETE).is_file():
                return dest
            shutil.rmtree(dest)
        root.rename(dest)
    return dest
