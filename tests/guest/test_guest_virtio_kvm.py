"""kvmkit's own PCI bus and virtio devices, driven by the bundled guest through KVM.

The same guest commands that tests/guest/test_guest_virtio_qemu.py checks
against QEMU's devices (the reference) run here against kvmkit's: PCI
enumeration and BAR placement (kvmkit puts BAR 4 above RAM; the guest moves
it below 4 GiB, so the notify ioeventfds are re-bound on the way), MSI-X
through irqfds, virtio-blk with the bytes checked in the image file,
virtio-console with the bytes checked on the host end of its socket, and
virtio-rng.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from _virtio import DISK_BYTES, BLK, CONSOLE, LSPCI_FUNC, RNG, stream, summaries
from kvmkit import VirtualMachine
from kvmkit.errors import KvmkitError
from kvmkit.host.backends import SocketPairBackend

pytestmark = pytest.mark.kvm

REPO = Path(__file__).resolve().parents[2]


def run(script: str, timeout: float = 120, **kw) -> tuple[VirtualMachine, str]:
    with VirtualMachine(script=script, **kw) as vm:
        status = vm.wait(timeout)
        time.sleep(0.1)  # the console tap's reader takes the last bytes
        text = vm.console.text.replace("\r\n", "\n")
        assert status == 0, f"status {status}: {vm.stop_message}\n{text[-3000:]}"
        stats = vm.machine.stats_table()
    return vm, text + "\n" + stats


def test_lspci_finds_kvmkits_devices_and_the_guest_moves_bar4_below_4g(image):
    _, out = run("lspci; virtio-blk-test 8; lspci", disks=[f"{image},serial=kvmkit0"], rng=True,
                 virtio_console=SocketPairBackend())
    funcs = {m["device"]: m.groupdict() for m in LSPCI_FUNC.finditer(out) if m["vendor"] == "1af4"}
    assert set(funcs) == {"1042", "1043", "1044"}, out
    assert "00:00.0 8086:1237 class 060000" in out
    for kind in ("common", "notify", "isr", "device"):
        assert f" virtio {kind} bar4+0x" in out
    assert out.count(" msix table-size ") >= 3
    # kvmkit placed the 64-bit BARs above 4 GiB; the guest (which maps 4 GiB) moved them,
    # and the device kept working at the new address: its kicks went through the re-bound ioeventfds
    assert re.search(r"bar4 moved below 4 GiB to 0x[0-9a-f]+", out), out
    assert summaries(BLK, out, 1)[0]["result"] == "ok"
    assert re.search(r"^pci: \d+ configuration space accesses$", out, re.M), out
    assert re.search(r"^virtio-blk0 \(00:01\.0\): [1-9]\d* kicks, [1-9]\d* MSI-X, 0 INTx, 0 ring errors$", out, re.M), out


def test_a_share_is_a_virtio_9p_function_and_a_symlinked_share_is_refused(tmp_path):
    (tmp_path / "dir").mkdir()
    _, out = run("lspci", shares=[f"{tmp_path / 'dir'}:hostshare", f"{tmp_path}:other,ro"])
    funcs = [m.groupdict() for m in LSPCI_FUNC.finditer(out) if m["vendor"] == "1af4"]
    assert [(f["device"], f["cls"]) for f in funcs] == [("1049", "018000"), ("1049", "018000")], out
    assert re.search(r"^virtio-9p0 \(00:01\.0\): 0 kicks", out, re.M), out
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    with pytest.raises(KvmkitError, match="is a symlink"):
        VirtualMachine(shares=[str(tmp_path / "link")])


BLK_MODES = [("irq", "", 1, 1), ("irq", "no-event-idx", 0, 1), ("intx", "", 1, 1), ("poll", "no-event-idx no-indirect", 0, 0)]


@pytest.mark.parametrize("mode,flags,event_idx,indirect", BLK_MODES, ids=["irq", "irq-no-event-idx", "intx", "poll-plain"])
def test_blk_pattern_written_flushed_read_back_and_in_the_image(image, mode, flags, event_idx, indirect):
    start, sectors, seed = 777, 2048, 0x1234 + 2 * event_idx + indirect
    _, out = run(f"virtio-blk-test {mode} {flags} seed={seed} {sectors} {start}", disks=[f"{image},serial=kvmkit0"])
    s = summaries(BLK, out, 1)[0]
    assert s["result"] == "ok" and s["errors"] == "0", out
    assert (s["mode"], int(s["event_idx"]), int(s["indirect"])) == (mode, event_idx, indirect)
    assert s["serial"] == "kvmkit0" and s["ro"] == "0" and s["flush"] == "ok"
    assert int(s["capacity"]) == DISK_BYTES // 512
    assert int(s["requests"]) == 1 + 16 + 1 + 16          # get-id, writes, flush, reads
    expected = stream(sectors * 512, seed)
    assert int(s["crc"], 16) == zlib.crc32(expected)
    assert (int(s["irqs"]) > 0) == (mode != "poll"), out
    if mode == "intx":  # INTA# of slot 1 on ISA IRQ 11, level-triggered through the IOAPIC
        assert "virtio-blk-test: interrupts: intx pin 11 vector 0x4f" in out, out
        assert re.search(r"^virtio-blk0 \(00:01\.0\): \d+ kicks, 0 MSI-X, [1-9]\d* INTx", out, re.M), out
    data = image.read_bytes()
    assert data[start * 512:(start + sectors) * 512] == expected
    assert data[:start * 512].count(0) == start * 512
    assert data[(start + sectors) * 512:].count(0) == len(data) - (start + sectors) * 512


def test_blk_read_only_disk_answers_ioerr_and_the_file_is_untouched(image, tmp_path):
    ro = tmp_path / "ro.raw"
    content = stream(512 * 512, 9) + bytes(DISK_BYTES - 512 * 512)
    ro.write_bytes(content)
    before = os.stat(ro).st_mtime_ns
    _, out = run("virtio-blk-test dev=1 seed=9 512", disks=[str(image), f"{ro},ro,serial=kvmkit-ro"])
    s = summaries(BLK, out, 1)[0]
    assert s["result"] == "ok", out
    assert (s["dev"], s["ro"], s["serial"], s["ro_write"]) == ("1", "1", "kvmkit-ro", "ioerr")
    assert ro.read_bytes() == content and os.stat(ro).st_mtime_ns == before


def test_a_disk_locked_by_another_kvmkit_is_one_sentence(image):
    from kvmkit.errors import KvmkitError
    from kvmkit.host.blockfile import RawImage
    with RawImage(image):
        with pytest.raises(KvmkitError, match="in use by another process"):
            VirtualMachine(disks=[str(image)])


def test_rng_delivers_entropy():
    _, out = run("virtio-rng-test 65536; virtio-rng-test 1000 poll no-event-idx; virtio-rng-test 2000 intx", rng=True)
    big, small, intx = summaries(RNG, out, 3)
    assert big["result"] == "ok" and big["received"] == "65536" and int(big["distinct"]) == 256
    assert small["result"] == "ok" and small["irqs"] == "0"
    assert intx["result"] == "ok" and int(intx["irqs"]) > 0 and intx["mode"] == "intx"


def _collect(sock, n: int, timeout: float = 60) -> bytes:
    sock.settimeout(timeout)
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_console_tx_bytes_arrive_exactly_in_few_host_writes():
    hvc = SocketPairBackend()
    n = 300_000
    with VirtualMachine(script="virtio-console-test tx 300000; virtio-console-test tx 5000 poll seed=2 buf=1000",
                        virtio_console=hvc) as vm:
        got = _collect(hvc.peer, n + 5000)
        assert vm.wait(120) == 0, vm.stop_message
        end = vm.machine.hvc
        assert end is not None
        writes, out_bytes = end.counters.host_writes, end.counters.host_bytes_out
        time.sleep(0.1)
        text = vm.console.text
    a, b = summaries(CONSOLE, text, 2)
    assert a["result"] == "ok" and b["result"] == "ok", text
    assert got == stream(n) + stream(5000, 2)
    assert out_bytes == n + 5000
    assert writes * 1024 / out_bytes <= 4, (writes, out_bytes)


def test_console_rx_receives_exactly_what_the_host_sends():
    hvc = SocketPairBackend()
    first, second = stream(100_000, 4), stream(20_000, 5)
    with VirtualMachine(script="virtio-console-test rx 100000 seed=4; virtio-console-test rx 20000 poll seed=5",
                        virtio_console=hvc) as vm:
        hvc.peer.sendall(first + second)
        assert vm.wait(120) == 0, vm.stop_message
        time.sleep(0.1)
        text = vm.console.text
    a, b = summaries(CONSOLE, text, 2)
    for s, data in ((a, first), (b, second)):
        assert s["result"] == "ok" and s["extra"] == "0", text
        assert int(s["crc"], 16) == zlib.crc32(data)


def test_a_flushed_write_survives_sigkill_right_after(image):
    """The guest writes and flushes; kvmkit is killed the moment the guest says so; the data is in the image."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "run", "--disk", f"{image}",
                             "virtio-blk-test seed=77 256 100; halt"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = b""
    try:
        deadline = time.monotonic() + 120
        while b"flush=ok" not in out and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
        assert b"flush=ok" in out, out.decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert image.read_bytes()[100 * 512:356 * 512] == stream(256 * 512, 77)
