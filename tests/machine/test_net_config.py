"""``--net user[,socket=PATH]|tap[,ifname=NAME][,mac=MAC]``: parsing, the checks a VmConfig makes, the MAC it
picks, the snapshot's copy, the CLI's option and the initramfs's default modules."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvmkit.cli import main as cli
from kvmkit.errors import KvmkitError
from kvmkit.machine.config import MAX_NETS, NetSpec, VmConfig, parse_mac, parse_net
from kvmkit.machine.snapshot import config_from_dict, config_to_dict


@pytest.mark.parametrize("text, spec", [
    ("user", NetSpec("user")),
    ("user,socket=run/passt.socket", NetSpec("user", Path("run/passt.socket"))),
    ("tap", NetSpec("tap")),
    ("tap,ifname=tap7,mac=02:AA:bb:0c:dd:ee", NetSpec("tap", None, "tap7", "02:aa:bb:0c:dd:ee")),
    ("user,mac=52:54:00:12:34:56", NetSpec("user", mac="52:54:00:12:34:56")),
])
def test_parse_net(text: str, spec: NetSpec) -> None:
    assert parse_net(text) == spec


@pytest.mark.parametrize("text, says", [
    ("slirp", "names no backend"), ("user,ifname=tap0", "has no option 'ifname'"),
    ("tap,socket=/x", "has no option 'socket'"), ("tap,ifname=a/b", "is not an interface name"),
    ("tap,ifname=" + "x" * 16, "is not an interface name"), ("user,mac=01:00:5e:00:00:01", "multicast"),
    ("user,mac=02:00:00:00:00", "cannot read MAC"), ("user,mac=00:00:00:00:00:00", "not a card's address"),
    ("user,socket", "KEY=VALUE"), ("user,socket=", "KEY=VALUE"),
])
def test_bad_nets_are_one_sentence(text: str, says: str) -> None:
    with pytest.raises(KvmkitError, match=says):
        parse_net(text)


def test_the_config_picks_distinct_locally_administered_macs() -> None:
    cfg = VmConfig(nets=["user", "tap,ifname=tap3", NetSpec("user", mac="02:00:00:00:00:07")])  # type: ignore[list-item]
    assert cfg.has_pci and [n.mode for n in cfg.nets] == ["user", "tap", "user"]
    macs = [bytes.fromhex(n.mac.replace(":", "")) for n in cfg.nets]  # type: ignore[union-attr]
    assert all(m[0] & 0x03 == 0x02 for m in macs[:2])                # locally administered, unicast
    assert len(set(macs)) == 3 and macs[2] == bytes.fromhex("020000000007")
    assert parse_mac("02:0A:0b:0C:0d:0E") == "02:0a:0b:0c:0d:0e"


def test_the_config_refuses_too_many_cards_clashes_and_odd_specs() -> None:
    with pytest.raises(KvmkitError, match=f"at most {MAX_NETS}"):
        VmConfig(nets=["user"] * (MAX_NETS + 1))  # type: ignore[list-item]
    with pytest.raises(KvmkitError, match="same MAC"):
        VmConfig(nets=["user,mac=02:00:00:00:00:01", "tap,mac=02:00:00:00:00:01"])  # type: ignore[list-item]
    with pytest.raises(KvmkitError, match="same interface"):
        VmConfig(nets=["tap,ifname=t0", "tap,ifname=t0"])  # type: ignore[list-item]
    with pytest.raises(KvmkitError, match="neither user"):
        VmConfig(nets=[NetSpec("vde")])
    with pytest.raises(KvmkitError, match="multicast"):
        VmConfig(nets=[NetSpec("user", mac="03:00:00:00:00:01")])
    with pytest.raises(KvmkitError, match="--net"):
        VmConfig(nets=["user"], irqchip=False)  # type: ignore[list-item]


def test_a_snapshot_keeps_the_cards_and_their_macs() -> None:
    cfg = VmConfig(nets=["user,socket=run/p.sock", "tap,ifname=tap9"])  # type: ignore[list-item]
    back = config_from_dict(config_to_dict(cfg), None)
    assert back.nets == cfg.nets and back.nets[0].mac is not None
    old = config_to_dict(VmConfig())
    del old["nets"]                                                  # a snapshot from before --net
    assert config_from_dict(old, None).nets == []


def run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_cli_option() -> None:
    cfg = cli.run_config(run_args("--net", "user", "--net", "tap,ifname=tap5,mac=02:00:00:00:00:05"))
    assert [(n.mode, n.ifname) for n in cfg.nets] == [("user", None), ("tap", "tap5")]
    assert cfg.nets[1].mac == "02:00:00:00:00:05"
    with pytest.raises(KvmkitError, match="drop --net"):
        cli._check_restore_options(run_args("--restore", "snap", "--net", "user"))


def test_the_initramfs_packs_virtio_net_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmkit.boot import initramfs, modules
    asked: list[str] = []
    monkeypatch.setattr(modules, "find_modules", lambda where: where)
    monkeypatch.setattr(modules, "resolve_modules", lambda tree, names: asked.extend(names) or [])
    monkeypatch.setattr(initramfs, "busybox_initramfs", lambda *a, **k: b"archive")
    assert cli.main(["initramfs", "--modules", "6.1.0-99-amd64", "-o", str(tmp_path / "i.img")]) == 0
    assert "virtio_net" in asked and "9pnet_virtio" in asked and "virtio_blk" in asked
    assert modules.NET_MODULES == ("virtio_net",)
