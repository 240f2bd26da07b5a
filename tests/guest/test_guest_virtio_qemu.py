"""The bundled guest's PCI and virtio-pci drivers against QEMU's own devices.

QEMU's virtio-blk-pci, virtio-rng-pci and virtio-serial-pci (+ virtconsole),
modern only (``disable-legacy=on``), are the reference implementation the
guest's commands are developed against; the same commands later test
kvmkit's devices. Each test boots the guest under TCG with one script and
checks the summary lines (formats in guest/README.md) and, where the data
leaves the guest, the bytes on the host side: the disk image file and the
console's socket.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import threading
import zlib
from pathlib import Path

import pytest

from _virtio import DISK_BYTES, BENCH, BLK, CONSOLE, LSPCI_FUNC, RNG, stream, summaries  # noqa: F401
from _qemu import QEMU, QEMU_GUEST, qemu_status
from kvmkit.boot.bundled import bundled_guest

pytestmark = QEMU_GUEST

TIMEOUT = 60


def qemu_cmd(script: str, devices: list[str]) -> list[str]:
    return [
        QEMU, "-machine", "pc", "-accel", "tcg", "-m", "128", "-nic", "none",
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0x501,iosize=1",
        "-kernel", str(bundled_guest()), "-append", f"console=ttyS0 -- {script}",
        *devices,
    ]


def blk_devices(image: Path, ro_image: Path | None = None) -> list[str]:
    devs = ["-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=kvmkit0",
            "-drive", f"if=none,id=d0,file={image},format=raw"]
    if ro_image is not None:
        devs += ["-device", "virtio-blk-pci,drive=d1,disable-legacy=on,serial=kvmkit-ro",
                 "-drive", f"if=none,id=d1,file={ro_image},format=raw,readonly=on"]
    return devs


RNG_DEVICE = ["-device", "virtio-rng-pci,disable-legacy=on"]


def console_devices(chardev: str) -> list[str]:
    """Port 0 (a virtconsole: the guest does not negotiate MULTIPORT) on chardev c1."""
    return ["-device", "virtio-serial-pci,disable-legacy=on", "-device", "virtconsole,chardev=c1",
            "-chardev", f"{chardev},id=c1"]


def boot(script: str, devices: list[str]) -> tuple[int, str]:
    proc = subprocess.run(qemu_cmd(script, devices), stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=TIMEOUT)
    out = proc.stdout.decode(errors="replace").replace("\r\n", "\n")
    return proc.returncode, out + proc.stderr.decode(errors="replace")


# ----------------------------------------------------------------- lspci

def test_lspci_lists_the_virtio_functions_with_their_capabilities(image):
    rc, out = boot("lspci", blk_devices(image) + RNG_DEVICE + ["-device", "virtio-serial-pci,disable-legacy=on"])
    assert rc == qemu_status(0), out
    funcs = {m["device"]: m.groupdict() for m in LSPCI_FUNC.finditer(out) if m["vendor"] == "1af4"}
    assert set(funcs) == {"1042", "1043", "1044"}, out
    assert funcs["1042"]["cls"] == "010000"
    assert "00:00.0 8086:1237 class 060000" in out
    # each virtio function: a 64-bit BAR with the four structures, MSI-X in another BAR
    for kind in ("common", "notify", "isr", "device"):
        assert out.count(f" virtio {kind} bar4+0x") == 3, out
    assert out.count("notify-off-multiplier ") == 3
    assert out.count(" msix table-size ") == 3
    assert re.search(r"  bar4 mem64 pref 0x[0-9a-f]+ size 0x4000 cache \w+\n", out), out
    assert "lspci: 8 functions on bus 0, 3 virtio, 0 bars assigned by the guest" in out


def test_zeroed_bars_are_assigned_from_the_window_mapped_uncached_and_used(image):
    rc, out = boot("lspci clear-virtio-bars; virtio-blk-test 256 seed=5; virtio-rng-test 512; lspci",
                   blk_devices(image) + RNG_DEVICE)
    assert rc == qemu_status(0), out
    first, second = out.split("+ virtio-blk-test", 1)
    assigned = [int(a, 16) for a in re.findall(r"bar\d was 0, assigned 0x([0-9a-f]+)", first)]
    assert len(assigned) == 4, out          # BAR1 (MSI-X) and BAR4 of each device
    assert all(0xC0000000 <= a < 0xFE000000 for a in assigned), out
    assert "lspci: 7 functions on bus 0, 2 virtio, 4 bars assigned by the guest" in first
    # the drivers worked through the new addresses and mapped them uncached
    assert summaries(BLK, second, 1)[0]["result"] == "ok"
    assert summaries(RNG, second, 1)[0]["result"] == "ok"
    for a in assigned:
        assert re.search(rf"bar\d mem(32|64)( pref)? 0x{a:x} size 0x\w+ cache uc\n", second), (hex(a), out)
    assert image.read_bytes()[:256 * 512] == stream(256 * 512, 5)


# ------------------------------------------------------------ virtio-blk

BLK_MODES = [
    ("irq", "", 1, 1),
    ("irq", "no-event-idx", 0, 1),
    ("irq", "no-indirect", 1, 0),
    ("poll", "", 1, 1),
    ("poll", "no-event-idx no-indirect", 0, 0),
]


@pytest.mark.parametrize("mode,flags,event_idx,indirect", BLK_MODES,
                         ids=["irq", "irq-no-event-idx", "irq-no-indirect", "poll", "poll-plain"])
def test_blk_pattern_written_flushed_read_back_and_on_the_host(image, mode, flags, event_idx, indirect):
    # 2048 sectors at a misaligned start: 16 requests of 64 KiB each way, all in flight
    start, sectors, seed = 777, 2048, 0x1234 + 2 * event_idx + indirect
    rc, out = boot(f"virtio-blk-test {mode} {flags} seed={seed} {sectors} {start}", blk_devices(image))
    assert rc == qemu_status(0), out
    s = summaries(BLK, out, 1)[0]
    assert s["result"] == "ok" and s["errors"] == "0", out
    assert (s["mode"], int(s["event_idx"]), int(s["indirect"])) == (mode, event_idx, indirect)
    assert s["serial"] == "kvmkit0" and s["ro"] == "0" and s["flush"] == "ok"
    assert int(s["capacity"]) == DISK_BYTES // 512
    assert int(s["bytes"]) == sectors * 512
    assert int(s["requests"]) == 1 + 16 + 1 + 16          # get-id, writes, flush, reads
    expected = stream(sectors * 512, seed)
    assert int(s["crc"], 16) == zlib.crc32(expected)
    if mode == "irq":
        assert int(s["irqs"]) > 0, out
    else:
        assert int(s["irqs"]) == 0, out
    data = image.read_bytes()
    assert data[start * 512:(start + sectors) * 512] == expected
    assert data[:start * 512].count(0) == start * 512      # nothing written elsewhere
    assert data[(start + sectors) * 512:].count(0) == len(data) - (start + sectors) * 512


def test_blk_runs_back_to_back_reset_and_reinitialise_the_device(image):
    script = "; ".join(f"virtio-blk-test {m} seed={i + 1} 64 {i * 64}"
                       for i, m in enumerate(["irq", "poll", "irq no-event-idx", "poll no-indirect"]))
    rc, out = boot(script, blk_devices(image))
    assert rc == qemu_status(0), out
    found = summaries(BLK, out, 4)
    assert [f["result"] for f in found] == ["ok"] * 4, out
    data = image.read_bytes()
    for i in range(4):
        assert data[i * 64 * 512:(i + 1) * 64 * 512] == stream(64 * 512, i + 1)


def test_blk_read_only_device_refuses_writes_with_ioerr(image, tmp_path):
    ro_image = tmp_path / "ro.raw"
    content = stream(512 * 512, 9) + bytes(DISK_BYTES - 512 * 512)
    ro_image.write_bytes(content)
    rc, out = boot("virtio-blk-test dev=1 seed=9 512; virtio-blk-test dev=1 poll no-indirect seed=9 512",
                   blk_devices(image, ro_image))
    assert rc == qemu_status(0), out
    for s in summaries(BLK, out, 2):
        assert s["result"] == "ok", out
        assert (s["dev"], s["ro"], s["serial"]) == ("1", "1", "kvmkit-ro")
        assert s["ro_write"] == "ioerr" and s["flush"] == "-"
        assert int(s["crc"], 16) == zlib.crc32(stream(512 * 512, 9))
    assert ro_image.read_bytes() == content


def test_blk_reports_a_missing_device_and_a_range_beyond_capacity(image):
    rc, out = boot("-virtio-blk-test dev=3; -virtio-blk-test 64 32760; echo still here", blk_devices(image))
    assert rc == qemu_status(0), out
    assert "virtio-blk: no device #3 on PCI bus 0 (1 found)" in out
    assert "virtio-blk-test: sectors 32760-32823 beyond the capacity (32768)" in out
    assert "\nstill here\n" in out


def test_blk_bench_sequential_write_and_read(image):
    rc, out = boot("virtio-blk-bench write 4 seed=3; virtio-blk-bench read 4; "
                   "virtio-blk-bench read 4 64 8 poll; virtio-blk-bench read 1 4 128 no-indirect",
                   blk_devices(image))
    assert rc == qemu_status(0), out
    w, r, p, small = summaries(BENCH, out, 4)
    for s in (w, r, p):
        assert s["result"] == "ok" and s["errors"] == "0", out
        assert int(s["bytes"]) == 4 << 20 and int(s["tsc"]) > 0
    assert (w["op"], w["requests"], w["req_bytes"], w["depth"]) == ("write", "32", "131072", "32")
    assert (p["mode"], p["requests"], p["req_bytes"], p["depth"], p["irqs"]) == ("poll", "64", "65536", "8", "0")
    assert small["result"] == "ok" and small["requests"] == "256" and small["indirect"] == "0"
    # with event-idx the guest kicks far less often than once per request
    assert int(small["kicks"]) < 256, out
    # the write bench writes its per-slot buffers in turn (32 x 128 KiB of the stream)
    assert image.read_bytes()[:128 * 1024] == stream(32 * 128 * 1024, 3)[:128 * 1024]


# ------------------------------------------------------------ virtio-rng

def test_rng_delivers_entropy_in_both_modes():
    rc, out = boot("virtio-rng-test 65536; virtio-rng-test 1000 poll no-event-idx", RNG_DEVICE)
    assert rc == qemu_status(0), out
    big, small = summaries(RNG, out, 2)
    assert big["result"] == "ok" and big["received"] == "65536" and big["mode"] == "irq"
    assert int(big["distinct"]) == 256 and int(big["zero"]) < 65536 // 64
    assert small["result"] == "ok" and small["received"] == "1000" and small["irqs"] == "0"
    assert int(small["distinct"]) > 100


# -------------------------------------------------------- virtio-console

class ConsoleSocket:
    """The host end of the virtconsole for input: a unix socket QEMU connects to.

    QEMU reads from it only as the guest posts receive buffers, so the
    guest's first command cannot take bytes meant for the next one.
    (Output goes to a file instead: a virtconsole drops what a full
    socket does not take, where a file always takes everything.)
    """

    def __init__(self, send: bytes):
        self.dir = tempfile.mkdtemp(prefix="kvq")     # short: sun_path has 108 bytes
        self.path = str(Path(self.dir) / "c")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.to_send = send
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                conn.sendall(self.to_send)
                while conn.recv(65536):        # until QEMU exits
                    pass
            except OSError:
                pass

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_console_tx_bytes_arrive_exactly(tmp_path):
    out_file = tmp_path / "console.out"
    rc, out = boot("virtio-console-test tx 300000; virtio-console-test tx 5000 poll seed=2 buf=1000; "
                   "virtio-console-test tx 70000 no-event-idx no-indirect seed=3",
                   console_devices(f"file,path={out_file}"))
    assert rc == qemu_status(0), out
    a, b, c = summaries(CONSOLE, out, 3)
    assert [s["result"] for s in (a, b, c)] == ["ok"] * 3, out
    assert (a["moved"], a["buffers"], a["buf_bytes"]) == ("300000", "10", "32768")
    assert (b["moved"], b["buffers"], b["mode"], b["irqs"]) == ("5000", "5", "poll", "0")
    assert (c["moved"], c["event_idx"], c["indirect"]) == ("70000", "0", "0")
    assert int(a["crc"], 16) == zlib.crc32(stream(300000))
    got = out_file.read_bytes()
    expected = stream(300000) + stream(5000, 2) + stream(70000, 3)
    assert len(got) == len(expected)
    assert got == expected


def test_console_rx_receives_exactly_the_bytes_asked_for():
    first, second = stream(100000, 4), stream(20000, 5)
    con = ConsoleSocket(send=first + second)
    try:
        rc, out = boot("virtio-console-test rx 100000 seed=4; virtio-console-test rx 20000 poll seed=5",
                       console_devices(f"socket,path={con.path}"))
    finally:
        con.close()
    assert rc == qemu_status(0), out
    a, b = summaries(CONSOLE, out, 2)
    for s, data in ((a, first), (b, second)):
        assert s["result"] == "ok" and s["errors"] == "0", out
        assert int(s["moved"]) == len(data) and s["extra"] == "0"
        assert int(s["crc"], 16) == zlib.crc32(data)
    assert int(a["irqs"]) > 0 and b["irqs"] == "0"


def test_console_rx_without_input_times_out_and_fails_the_script():
    con = ConsoleSocket(send=b"")
    try:
        rc, out = boot("virtio-console-test rx 100; echo after", console_devices(f"socket,path={con.path}"))
    finally:
        con.close()
    assert rc == qemu_status(1), out
    assert "virtio-console: timeout: no progress for 20000000000 tsc cycles while receiving" in out
    s = summaries(CONSOLE, out, 1)[0]
    assert s["result"] == "FAILED" and s["moved"] == "0", out
    assert "'virtio-console-test' failed with status 1, so the script stops" in out and "\nafter\n" not in out
