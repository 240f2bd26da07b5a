"""virtio-net cards on a running machine, with the bundled guest: it enumerates them (it has no network
driver, so no frame crosses: the frame paths are tested in tests/machine/test_net_end.py and against a real
passt in tests/host/test_netuser.py), a snapshot keeps their MACs and a restore starts a new passt, and
every passt kvmkit started is gone once the VM is closed."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from kvmkit import VirtualMachine
from kvmkit.machine.control import format_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from _virtio import LSPCI_FUNC  # noqa: E402
from test_netuser import gone  # noqa: E402

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed (Debian package passt)")]


def net_functions(text: str) -> list[tuple[str, str, str]]:
    return [(m["dev"], m["device"], m["cls"]) for m in LSPCI_FUNC.finditer(text) if m["vendor"] == "1af4"]


def passt_pids(vm: VirtualMachine) -> list[int]:
    return [end.backend.passt.pid for end in vm.machine.net_ends]  # type: ignore[attr-defined]


def test_cards_enumerate_survive_a_snapshot_and_their_passts_go_with_the_vm(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    vm = VirtualMachine(script="lspci; shell", net=["user", "user,mac=02:00:00:00:00:42"], rng=True)
    try:
        vm.start()
        text = vm.console.wait_for("kvmkit> ", 60)
        # after every other PCI device (here the entropy device), a network controller each
        assert net_functions(text) == [("01", "1044", "ff0000"), ("02", "1041", "020000"), ("03", "1041", "020000")]
        pids = passt_pids(vm)
        assert len(pids) == 2 and not any(gone(p) for p in pids)
        macs = [n.mac for n in vm.machine.config.nets]
        assert macs[1] == "02:00:00:00:00:42" and macs[0].startswith("02:")  # type: ignore[union-attr]
        assert re.search(r"^virtio-net0 \(02:[0-9a-f:]{14}, passt \(pid \d+, started by kvmkit\)\): tx 0 frames",
                         vm.machine.stats_table(), re.M)
        stats = vm.machine.stats_dict()
        assert stats["net"]["virtio-net1"]["mac"] == "02:00:00:00:00:42"  # type: ignore[index]
        assert re.search(r"^virtio-net1 \(02:00:00:00:00:42, passt .*\): tx 0 frames, rx 0 frames, 0 dropped$",
                         format_stats(stats), re.M)
        vm.snapshot(snap)
        vm.stop(0)
    finally:
        vm.close()
    assert all(gone(p) for p in pids)
    again = VirtualMachine.restore(snap)
    try:
        assert [n.mac for n in again.machine.config.nets] == macs
        new = passt_pids(again)
        assert len(new) == 2 and not set(new) & set(pids)
        again.start()
        again.console.send("lspci\n")
        again.console.wait_for("00:03.0 1af4:1041", 30)
        again.stop(0)
    finally:
        again.close()
    assert all(gone(p) for p in new)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="making a tap needs root")
def test_a_tap_card_makes_its_interface_for_the_life_of_the_vm() -> None:
    vm = VirtualMachine(script="lspci", net="tap")
    try:
        name = vm.machine.net_ends[0].backend.ifname  # type: ignore[attr-defined]
        assert Path(f"/sys/class/net/{name}").exists()
        vm.start()
        assert vm.wait(60) == 0
        assert net_functions(vm.console.text) == [("01", "1041", "020000")]
    finally:
        vm.close()
    assert not Path(f"/sys/class/net/{name}").exists()
