"""``--share HOSTDIR[:TAG][,ro]``: parsing, the checks a VmConfig makes, and the snapshot's copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.machine.config import MAX_SHARES, ShareSpec, VmConfig, parse_share
from kvmkit.machine.snapshot import config_from_dict, config_to_dict


@pytest.mark.parametrize("text, spec", [
    ("/srv/x", ShareSpec(Path("/srv/x"), "share3", False)),
    ("/srv/x:src", ShareSpec(Path("/srv/x"), "src", False)),
    ("/srv/x:src,ro", ShareSpec(Path("/srv/x"), "src", True)),
    ("/srv/x,ro,rw", ShareSpec(Path("/srv/x"), "share3", False)),
    ("/:hostroot,ro", ShareSpec(Path("/"), "hostroot", True)),
    ("/srv/a:b/c", ShareSpec(Path("/srv/a:b/c"), "share3", False)),   # a ':' inside the path stays in it
])
def test_parse_share(text: str, spec: ShareSpec) -> None:
    assert parse_share(text, 3) == spec


@pytest.mark.parametrize("text, says", [(":tag", "names no directory"), ("/x:two words", "must be 1 to 64"),
                                        ("/x:" + "t" * 65, "must be 1 to 64")])
def test_bad_shares_are_one_sentence(text: str, says: str) -> None:
    with pytest.raises(KvmkitError, match=says):
        parse_share(text)


def test_vm_config_checks_tags_and_count(tmp_path: Path) -> None:
    cfg = VmConfig(shares=[str(tmp_path), f"{tmp_path}:b,ro"])  # type: ignore[list-item]
    assert [s.tag for s in cfg.shares] == ["share0", "b"] and cfg.has_pci
    with pytest.raises(KvmkitError, match="same tag"):
        VmConfig(shares=[f"{tmp_path}:a", f"{tmp_path}:a"])  # type: ignore[list-item]
    with pytest.raises(KvmkitError, match="at most"):
        VmConfig(shares=[str(tmp_path)] * (MAX_SHARES + 1))  # type: ignore[list-item]


def test_a_snapshot_keeps_the_shares(tmp_path: Path) -> None:
    cfg = VmConfig(shares=[f"{tmp_path}:src,ro"])  # type: ignore[list-item]
    back = config_from_dict(config_to_dict(cfg), None)
    assert back.shares == [ShareSpec(tmp_path, "src", True)]
    old = config_to_dict(VmConfig())
    del old["shares"]                                   # a snapshot from before shares existed
    assert config_from_dict(old, None).shares == []
