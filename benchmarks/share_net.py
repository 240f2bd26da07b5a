#!/usr/bin/env python3
"""A 9P host share and virtio-net, with the stock Debian kernel, in one boot.

One boot of the stock kernel (cached after its first download; minutes on
an emulating host) with kvmkit's module initramfs, a ``--share`` of a
temporary directory, ``--net user`` (passt) and, when the machine allows
taps (root, /dev/net/tun, iproute2), ``--net tap``. At the guest's shell:

  9P read    ``cat /mnt/big > /dev/null`` of a 64 MiB host file: MiB/s
  9P tree    ``tar cf - -C /mnt tree | wc -c`` of 2,000 files of 1 KiB in
             20 directories: files/s
  net user   guest to host TCP through passt: ``dd | nc GATEWAY PORT`` into a
             receiver on the host's 127.0.0.1 (passt maps the gateway there);
             the receiver trickles a byte a second back (see Receiver)
  net tap    the same to the host's end of the tap

Each figure is timed on the host clock from the command's start to its end
marker (or the receiver's last byte), with CPU: the whole kvmkit process
(this one: the VM runs in-process), the device's serving thread (the 9P
worker, or the host loop for the network) and the vCPU thread's time in
kvmkit's exit handlers. "kvmkit's share" is (serving thread + exit handlers)
/ process CPU: how much of the work's host CPU is kvmkit's Python rather
than the emulated guest and the kernel.

    python3 benchmarks/share_net.py [--big-mib 64] [--files 2000] [--net-mib 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvmkit import VirtualMachine  # noqa: E402
from virtio import thread_cpu_ns  # noqa: E402  (benchmarks/virtio.py: a thread's on-CPU time)

DOC = HERE.parent / "docs" / "virtio.md"
TAP_HOST, TAP_GUEST = "10.213.1.1", "10.213.1.2"


class Guest:
    """The booted guest's shell on the VM's console: one command at a time, each timed with its CPU."""

    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.n = 0
        self.last_output = ""   # the end of what a command timed with ``done`` printed

    def run(self, command: str, timeout: float = 600) -> str:
        self.n += 1
        tag = f"@@end-$(({self.n} + 0))@@"
        self.vm.console.send(f"{command}; echo {tag}\n")
        return self.vm.console.wait_for(re.compile(rf"@@end-{self.n}@@\r?\n".encode()), timeout)

    def timed(self, command: str, serving: threading.Thread | None, done: Callable[[], None] | None = None,
              timeout: float = 900) -> dict[str, float]:
        """Run ``command``; wall and CPU seconds until its end marker (or until ``done`` returns, if given)."""
        machine = self.vm.machine
        a = (time.perf_counter(), time.process_time(), thread_cpu_ns(serving), sum(s.handler_ns for s in machine.exit_stats()))
        if done is None:
            self.run(command, timeout)
        else:
            self.n += 1
            self.vm.console.send(f"{command}; echo @@end-$(({self.n} + 0))@@\n")
            done()
        machine.kick_all()          # the vCPU loops hand over their exit tallies when kicked
        time.sleep(0.05)
        b = (time.perf_counter(), time.process_time(), thread_cpu_ns(serving), sum(s.handler_ns for s in machine.exit_stats()))
        if done is not None:
            text = self.vm.console.wait_for(re.compile(rf"@@end-{self.n}@@\r?\n".encode()), timeout)
            self.last_output = text[-400:]
        wall, proc = b[0] - a[0], b[1] - a[1]
        ours = (b[2] - a[2] + b[3] - a[3]) / 1e9
        return {"wall_s": wall, "process_cpu_s": proc, "kvmkit_cpu_s": ours,
                "kvmkit_share": round(ours / proc, 3) if proc else 0.0}


class Receiver:
    """A TCP server on the host that counts ``expect`` bytes from one connection, then closes it.

    It sends the sender one byte a second meanwhile (the guest's ``nc``
    writes them to /dev/null). Debian 12's passt (0.0~git20230309) resets a
    connection the guest opened once it has run about 24 s without the host
    side ever sending: it waits for an acknowledgement of its SYN-ACK that
    already came, counts retransmissions of nothing, and gives up (fixed in
    passt by "tcp: Don't special case the handling of the ack of a syn",
    2023-03-27). A transfer at the emulated guest's pace takes minutes, so
    without the trickle the figure would measure that bug, not the link;
    docs/virtio.md has the details.
    """

    TRICKLE_S = 1.0

    def __init__(self, host: str, expect: int) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.expect = expect
        self.got = 0
        self.first: float | None = None
        self.last: float | None = None
        self.finished = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()
        with conn:
            while self.got < self.expect:
                data = conn.recv(1 << 16)
                if not data:
                    break
                now = time.perf_counter()
                self.first = self.first or now
                self.last = now
                self.got += len(data)
            self.finished.set()
            # Close only after the sender's end of stream: closing while its FIN is on the way races
            # with it, and Debian 12's passt can then leave the guest's nc waiting for a close forever.
            conn.settimeout(60)
            try:
                while conn.recv(1 << 16):
                    pass
            except OSError:
                pass

    def _trickle(self, conn: socket.socket) -> None:
        while not self.finished.wait(self.TRICKLE_S):
            try:
                conn.send(b".")
            except OSError:
                return

    def wait(self, timeout: float = 900) -> None:
        if not self.finished.wait(timeout):
            raise TimeoutError(f"the receiver got {self.got} of {self.expect} bytes in {timeout} s")


def prepare_share(root: Path, big_mib: int, files: int) -> None:
    with open(root / "big", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))
    for i in range(files):
        d = root / "tree" / f"d{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(os.urandom(1024))
    script = re.search(r"```sh\n(#!/bin/sh\n# udhcpc's script.*?)```", DOC.read_text(), re.S)
    assert script, "the udhcpc script is missing from docs/virtio.md"
    (root / "udhcpc.script").write_text(script.group(1))
    (root / "udhcpc.script").chmod(0o755)


def net_case(guest: Guest, host: str, target: str, mib: int, serving: threading.Thread | None) -> dict[str, Any]:
    rx = Receiver(host, mib << 20)
    t = guest.timed(f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | busybox nc {target} {rx.port} >/dev/null; "
                    "echo nc=$?", serving, done=rx.wait)
    span = (rx.last or 0) - (rx.first or 0)
    return {**t, "bytes": rx.got, "complete": rx.got == mib << 20, "guest_said": guest.last_output,
            "mib_per_s": round(rx.got / (1 << 20) / span, 2) if span > 0 else None}


def tap_allowed() -> bool:
    return os.geteuid() == 0 and Path("/dev/net/tun").exists() and shutil.which("ip") is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--net-mib", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from kvmkit.boot.fetch import stock_kernel
    from kvmkit.boot.initramfs import busybox_initramfs
    from kvmkit.boot.modules import NET_MODULES, SHARE_MODULES, find_modules, resolve_modules
    kernel = stock_kernel()
    version = kernel.name.removeprefix("vmlinuz-")
    result: dict[str, Any] = {"kernel": version}
    with tempfile.TemporaryDirectory(prefix="kvmkit-sharenet-") as tmp:
        work = Path(tmp)
        share = work / "share"
        share.mkdir()
        prepare_share(share, args.big_mib, args.files)
        initrd = work / "initrd.img"
        initrd.write_bytes(busybox_initramfs(modules=resolve_modules(find_modules(version),
                                                                     ["virtio_pci", *SHARE_MODULES, *NET_MODULES])))
        tap = f"kvmkitb{os.getpid() % 10000}" if tap_allowed() else None
        nets = ["user"] + ([f"tap,ifname={tap}"] if tap else [])
        t0 = time.monotonic()
        with VirtualMachine(kernel=kernel, initrd=initrd, mem="512M", shares=[f"{share}:bench,ro"], net=nets) as vm:
            vm.console.wait_for(re.compile(rb"\n[^\n]*# "), 1200)
            result["boot_to_prompt_s"] = round(time.monotonic() - t0, 1)
            g = Guest(vm)
            g.run("mkdir -p /mnt && mount -t 9p -o trans=virtio,version=9p2000.L,ro bench /mnt")
            p9 = next(d for d in vm.machine.virtio if d.name.startswith("virtio-9p"))
            serving = p9.worker.thread if p9.worker else None
            read = g.timed("cat /mnt/big > /dev/null", serving)
            result["9p_read"] = {**read, "mib": args.big_mib, "mib_per_s": round(args.big_mib / read["wall_s"], 2)}
            tree = g.timed("tar cf - -C /mnt tree | wc -c", serving)
            result["9p_tree"] = {**tree, "files": args.files, "files_per_s": round(args.files / tree["wall_s"], 1)}
            out = g.run("busybox udhcpc -i eth0 -s /mnt/udhcpc.script -q -f -n -t 10 >/dev/null 2>&1; "
                        "ip route | sed -n 's/^default via \\([^ ]*\\).*/gw=\\1/p'", 300)
            gw = re.search(r"gw=(\d+\.\d+\.\d+\.\d+)", out)
            if gw:
                result["net_user"] = net_case(g, "127.0.0.1", gw.group(1), args.net_mib, vm.machine.loop.thread)
            else:
                result["net_user"] = {"error": f"no DHCP lease: {out[-300:]}"}
            if tap:
                import subprocess
                subprocess.run(["ip", "addr", "add", f"{TAP_HOST}/24", "dev", tap], check=True)
                subprocess.run(["ip", "link", "set", "dev", tap, "up"], check=True)
                g.run(f"ip addr add {TAP_GUEST}/24 dev eth1 && ip link set dev eth1 up")
                result["net_tap"] = net_case(g, TAP_HOST, TAP_HOST, args.net_mib, vm.machine.loop.thread)
            result["cards"] = {end.name: end.counters() for end in vm.machine.net_ends}   # drops, link state
            vm.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    print(f"\nstock kernel {version}, booted in {result['boot_to_prompt_s']} s (host seconds; CPU is kvmkit's process):")
    print(f"{'case':>10} {'figure':>16} {'wall s':>8} {'cpu s':>7} {'kvmkit share':>13}")
    rows = [("9p read", f"{result['9p_read']['mib_per_s']} MiB/s", result["9p_read"]),
            ("9p tree", f"{result['9p_tree']['files_per_s']} files/s", result["9p_tree"])]
    for key in ("net_user", "net_tap"):
        r = result.get(key)
        if r and "wall_s" in r:
            rows.append((key.replace("_", " "), f"{r['mib_per_s']} MiB/s", r))
    for name, fig, r in rows:
        print(f"{name:>10} {fig:>16} {r['wall_s']:8.2f} {r['process_cpu_s']:7.2f} {r['kvmkit_share']:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
