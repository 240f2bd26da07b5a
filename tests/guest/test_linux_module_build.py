"""guest/linux/pvce.ko builds against the headers of Debian's stock kernel.

The kernel version is the one :func:`kvmkit.boot.fetch.stock_kernel` boots
(6.1.0-NN-amd64). Its headers come from Debian's own packages, fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into
``~/.cache/kvmkit/linux-headers/<version>/`` (nothing is installed):
linux-headers-<version>, linux-headers-<version>-common's generic part, and
linux-kbuild-6.1 with the host tools. The module is built in a copy of
guest/linux, so the source tree stays clean.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_SRC = REPO / "guest" / "linux"
CACHE = Path(os.environ.get("KVMKIT_CACHE", Path.home() / ".cache" / "kvmkit")) / "linux-headers"


def _stock_version() -> str:
    from kvmkit.boot.fetch import stock_kernel

    name = stock_kernel().name  # vmlinuz-6.1.0-NN-amd64
    m = re.fullmatch(r"vmlinuz-(6\.1\.0-\d+-amd64)", name)
    assert m, f"unexpected stock kernel name {name}"
    return m.group(1)


def kernel_headers(version: str) -> Path:
    """The kbuild directory for ``version`` (…/usr/src/linux-headers-<version>), fetched on first use."""
    root = CACHE / version
    kdir = root / "usr" / "src" / f"linux-headers-{version}"
    if (root / ".complete").is_file():
        return kdir
    for tool in ("apt-get", "dpkg-deb", "make", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to fetch and use Debian's kernel headers")
    common = version.removesuffix("-amd64") + "-common"
    packages = [f"linux-headers-{version}", f"linux-headers-{common}", "linux-kbuild-6.1"]
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".download-") as tmp:
        work = Path(tmp)
        out = subprocess.run(["apt-get", "download", *packages], cwd=work, capture_output=True, text=True, timeout=600)
        debs = sorted(work.glob("*.deb"))
        if out.returncode != 0 or len(debs) != len(packages):
            pytest.fail(f"apt-get download {' '.join(packages)} failed: {out.stderr.strip()[-500:]}")
        stage = work / "root"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(stage)], check=True, timeout=600)
        # The arch package's Makefile includes the common tree by absolute
        # path (/usr/src/...); point it into the cache instead.
        top = stage / "usr" / "src" / f"linux-headers-{version}" / "Makefile"
        text = top.read_text()
        top.write_text(text.replace("/usr/src/", f"{root}/usr/src/"))
        if root.exists():
            shutil.rmtree(root)
        stage.rename(root)
    (root / ".complete").write_text("ok\n")
    return kdir


def test_pvce_module_builds_against_stock_debian_headers(tmp_path: Path) -> None:
    version = _stock_version()
    kdir = kernel_headers(version)
    assert (kdir / ".config").is_file()
    build = tmp_path / "pvce"
    shutil.copytree(MODULE_SRC, build)
    out = subprocess.run(["make", f"KDIR={kdir}"], cwd=build, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "warning:" not in out.stderr, out.stderr
    ko = build / "pvce.ko"
    assert ko.is_file()

    modinfo = subprocess.run(["objcopy", "-O", "binary", "--only-section=.modinfo", str(ko), "/dev/stdout"],
                             capture_output=True, timeout=60).stdout
    fields = dict(f.split("=", 1) for f in modinfo.decode(errors="replace").split("\0") if "=" in f)
    assert fields["vermagic"].split()[0] == version
    assert fields["license"] == "GPL"
    assert "shared" in modinfo.decode(errors="replace")  # module parameters are described

    undefined = subprocess.run(["nm", "-u", str(ko)], capture_output=True, text=True, timeout=60).stdout
    for sym in ("clockevents_register_device", "request_threaded_irq", "__cpuhp_setup_state", "ktime_get"):
        assert sym in undefined, f"{sym} not referenced; undefined symbols: {undefined}"
    # Every symbol the module needs is exported by the stock kernel.
    exported = {line.split("\t")[1] for line in (kdir / "Module.symvers").read_text().splitlines() if "\t" in line}
    missing = [s.split()[-1] for s in undefined.splitlines()
               if s.split()[-1] not in exported and not s.split()[-1].startswith("__fentry__")]
    missing = [s for s in missing if s not in ("__fentry__", "__x86_return_thunk")
               and not s.startswith("__x86_indirect_thunk")]
    assert not missing, f"not exported by {version}: {missing}"


_DEFINE_RE = re.compile(r"^#define\s+PVCE_(\w+)\s+(0x[0-9a-fA-F]+|\d+|\(1U?L*\s*<<\s*\d+\))", re.M)


def c_constants(path: Path) -> dict[str, int]:
    """PVCE_* #defines of a C file whose value is a number or (1 << n)."""
    out = {}
    for name, text in _DEFINE_RE.findall(path.read_text()):
        m = re.fullmatch(r"\(1U?L*\s*<<\s*(\d+)\)", text)
        out[name] = 1 << int(m.group(1)) if m else int(text, 0)
    return out


def abi_names() -> dict[str, int]:
    """The same names in the Python model's spelling (docs/pv-clockevent.md)."""
    from kvmkit.devices import pvclockevent as p

    names = {f"{n}": getattr(p, f"REG_{n}") for n in ("ID", "VERSION", "FEATURES", "TSC_KHZ", "CONTROL", "DEADLINE",
                                                       "STATUS", "SYNC", "SYNC_END", "SYNC_ERROR", "GUEST_NOW",
                                                       "SHARED_GPA", "DOORBELL")}
    names.update(WINDOW=p.WINDOW_SIZE, BASE=0xFEA00000, MAGIC=p.PVCE_MAGIC, MAJOR=p.PVCE_VERSION >> 16,
                 NEVER=p.NEVER, FEAT_SHARED=p.FEAT_SHARED, CTRL_ENABLE=p.CTRL_ENABLE, CTRL_SHARED=p.CTRL_SHARED,
                 CTRL_ROUTE_GSI=p.CTRL_ROUTE_GSI, CTRL_GSI_SHIFT=p.CTRL_GSI_SHIFT)
    return names


def test_guest_drivers_use_the_models_register_map() -> None:
    from kvmkit.machine.pc import PVCE_BASE

    expected = abi_names()
    assert expected["BASE"] == PVCE_BASE
    for src in (MODULE_SRC / "pvce.c", REPO / "guest" / "timer.c"):
        if not src.is_file():
            continue
        found = c_constants(src)
        assert len(found) >= 8, f"{src}: no PVCE_* constants found"
        for name, value in found.items():
            if name in expected:
                assert value == expected[name], f"{src.name}: PVCE_{name} = {value:#x}, the model says {expected[name]:#x}"
