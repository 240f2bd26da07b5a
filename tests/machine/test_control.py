"""The control socket's commands: the table against a fake machine, then a real VM and the CLI verbs end to end.

The fake machine pins down the protocol (replies, argument checks, a
machine that cannot snapshot) without KVM. The KVM tests run the bundled
guest in a port-I/O loop, so its exit count is a clock that runs only
while the vCPU does: pause must stop it, resume restart it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from kvmkit.boot.bundled import cache_root
from kvmkit.errors import KvmkitError
from kvmkit.host.control import call, check_private_dir, running
from kvmkit.machine.control import ControlServer, format_stats, format_uptime, format_vm_table

SRC = str(Path(__file__).resolve().parents[2] / "src")
KVMKIT = [sys.executable, "-m", "kvmkit"]
SCRIPT = "pio-loop 100000000; poweroff 0"  # minutes of port exits: it ends only when told to


class FakeMachine:
    """What ControlServer uses of a Machine, recorded."""

    def __init__(self, state: str = "running") -> None:
        self.config = SimpleNamespace(cpus=2, mem_size=512 << 20, kernel=None)
        self.name: str | None = None
        self.started_at: float | None = None if state == "created" else time.time() - 65
        self._state = state
        self.calls: list[tuple] = []
        self.kicks = 0

    @property
    def state(self) -> str:
        return self._state

    def pause(self, timeout: float = 5.0) -> None:
        self.calls.append(("pause",))
        self._state = "paused"

    def resume(self) -> None:
        self.calls.append(("resume",))
        self._state = "running"

    def request_stop(self, status: int, message: str = "") -> None:
        self.calls.append(("stop", status, message))
        if self._state != "stopped":
            self.stop_message = message
        self._state = "stopped"

    stop_message = ""

    def kick_all(self) -> None:
        self.kicks += 1

    def stats_dict(self) -> dict[str, Any]:
        return {"vcpus": [{"vcpu": 0, "exits": {"IO": 7, "HLT": 2}, "pio": {"0x80/out": 6, "0x3f8/out": 1},
                           "mmio": {}, "run_ns": 1_500_000_000, "handler_ns": 2_000_000, "kicks": self.kicks}],
                "kvm": {}, "ports": {"COM1": {"host_bytes_out": 10, "host_writes": 2, "host_bytes_in": 0}}}


class ShuttingDownMachine(FakeMachine):
    """A guest with a keyboard driver: Ctrl-Alt-Del ends it after ``delay`` seconds (never, if None)."""

    def __init__(self, delay: float | None) -> None:
        super().__init__()
        self.delay = delay

    def request_shutdown(self) -> bool:
        self.calls.append(("ctrl-alt-del",))
        if self.delay is not None:
            threading.Timer(self.delay, lambda: self.request_stop(0, "guest requested a reset (i8042)")).start()
        return True


class SnapshottingMachine(FakeMachine):
    def snapshot(self, path: Path) -> dict[str, Any]:
        self.calls.append(("snapshot", path))
        return {"dir": path, "ram_bytes": 4096}


@pytest.fixture
def ctl_dir(tmp_path: Path) -> Path:
    d = tmp_path / "xdg" / "kvmkit"
    d.parent.mkdir(mode=0o700)
    check_private_dir(d, create=True)
    return d


@pytest.fixture
def fake(ctl_dir: Path) -> Iterator[tuple[FakeMachine, ControlServer]]:
    m = SnapshottingMachine()
    srv = ControlServer(m, "fake", directory=ctl_dir)  # type: ignore[arg-type]
    srv.start()
    yield m, srv
    srv.close()


def raw(path: Path, obj: object) -> dict[str, Any]:
    import socket
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(str(path))
        c.sendall(json.dumps(obj).encode() + b"\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = c.recv(65536)
            assert chunk
            got += chunk
    return json.loads(got)


# --- the command table, against a fake machine ---------------------------------------------------
def test_the_commands_call_the_machine(fake: tuple[FakeMachine, ControlServer], ctl_dir: Path) -> None:
    m, srv = fake
    assert m.name == "fake" and srv.path == ctl_dir / "fake.sock"
    info = call("fake", "info", directory=ctl_dir)
    assert info == {"ok": True, "name": "fake", "pid": os.getpid(), "state": "running", "cpus": 2,
                    "memory": 512 << 20, "uptime_s": info["uptime_s"], "kernel": "bundled guest"}
    assert 64 < info["uptime_s"] < 70
    assert call("fake", "pause", directory=ctl_dir) == {"ok": True, "state": "paused"}
    stats = call("fake", "stats", directory=ctl_dir)["stats"]
    assert stats["vcpus"][0]["exits"] == {"IO": 7, "HLT": 2}
    assert m.kicks == 0  # a paused VM's figures are already flushed
    assert call("fake", "resume", directory=ctl_dir) == {"ok": True, "state": "running"}
    call("fake", "stats", directory=ctl_dir)
    assert m.kicks >= 1  # a running one is kicked until its tallies move
    assert call("fake", "stop", directory=ctl_dir) == {"ok": True, "state": "stopped", "by": "host",
                                                       "message": "stopped by 'kvmkit stop'"}
    assert m.calls == [("pause",), ("resume",), ("stop", 0, "stopped by 'kvmkit stop'")]
    assert call("fake", "stop", directory=ctl_dir)["by"] == "already stopped"
    with pytest.raises(KvmkitError, match="the VM has stopped; there is nothing to resume"):
        call("fake", "resume", directory=ctl_dir)


def test_stop_asks_the_guest_first_then_forces(ctl_dir: Path) -> None:
    for delay, timeout, by in ((0.2, 30, "guest"), (None, 1, "host")):
        m = ShuttingDownMachine(delay)
        srv = ControlServer(m, "cad", directory=ctl_dir)
        srv.start()
        try:
            t0 = time.monotonic()
            reply = call("cad", "stop", directory=ctl_dir, timeout=timeout + 10, params={"timeout": timeout})
            took = time.monotonic() - t0
        finally:
            srv.close()
        assert reply["by"] == by and m.calls[0] == ("ctrl-alt-del",), reply
        if by == "guest":
            assert reply["message"] == "guest requested a reset (i8042)" and took < 5
        else:
            assert reply["message"] == "stopped by 'kvmkit stop' (the guest did not shut down within 1 s of Ctrl-Alt-Del)"
            assert 1 <= took < 5
    m = ShuttingDownMachine(0.1)
    srv = ControlServer(m, "cad", directory=ctl_dir)
    srv.start()
    try:
        assert call("cad", "stop", directory=ctl_dir, force=True)["by"] == "host"
        assert ("ctrl-alt-del",) not in m.calls
        for bad, error in (({"timeout": -1}, "must be 0 to 600"),
                           ({"timeout": True}, "'timeout' of 'stop' must be an integer, not a boolean"),
                           ({"timeout": 1.5}, "must be an integer, not a number with a fraction"),
                           ({"force": 1}, "'force' of 'stop' must be true or false, not an integer"),
                           ({"wait": 1}, "'stop' has no argument 'wait'; it takes timeout, force")):
            with pytest.raises(KvmkitError, match=re.escape(error)):
                call("cad", "stop", directory=ctl_dir, params=bad)
    finally:
        srv.close()


def test_bad_commands_and_arguments_are_error_replies(fake: tuple[FakeMachine, ControlServer]) -> None:
    m, srv = fake
    assert srv.path is not None
    cases: list[tuple[object, str]] = [
        ({}, 'the request has no "cmd" string'),
        ({"cmd": 5}, 'the request has no "cmd" string'),
        ({"cmd": "reboot"}, "unknown command 'reboot'; the commands are info, pause, resume, stop, stats, snapshot."),
        ({"cmd": "x" * 1000}, "unknown command 'xxxxxxxx"),
        ({"cmd": "pause", "force": True}, "'pause' has no argument 'force'; it takes none."),
        ({"cmd": "snapshot"}, "'snapshot' needs the argument 'dir'."),
        ({"cmd": "snapshot", "dir": 3}, "the argument 'dir' of 'snapshot' must be a string, not an integer."),
        ({"cmd": "snapshot", "dir": "/tmp/s", "x": 1}, "'snapshot' has no argument 'x'; it takes dir."),
        ({"cmd": "snapshot", "dir": "relative/s"}, '"dir" must be an absolute path'),
        ([{"cmd": "stop"}], "not a JSON object"),
    ]
    for req, error in cases:
        reply = raw(srv.path, req)
        assert reply["ok"] is False and error in reply["error"], (req, reply)
        assert len(reply["error"]) < 300
    assert m.calls == []  # the VM was never touched
    assert raw(srv.path, {"cmd": "info"})["state"] == "running"


def test_snapshot_hands_the_machine_an_absolute_path(fake: tuple[FakeMachine, ControlServer], ctl_dir: Path,
                                                     tmp_path: Path) -> None:
    m, _ = fake
    reply = call("fake", "snapshot", directory=ctl_dir, dir=str(tmp_path / "snap"))
    assert reply == {"ok": True, "snapshot": {"dir": str(tmp_path / "snap"), "ram_bytes": 4096}}
    assert m.calls == [("snapshot", tmp_path / "snap")]


def test_a_machine_that_cannot_snapshot_says_so(ctl_dir: Path, tmp_path: Path) -> None:
    srv = ControlServer(FakeMachine(), "old", directory=ctl_dir)  # type: ignore[arg-type]
    srv.start()
    try:
        with pytest.raises(KvmkitError, match=r"^this kvmkit cannot snapshot\.$"):
            call("old", "snapshot", directory=ctl_dir, dir=str(tmp_path / "s"))
        assert call("old", "info", directory=ctl_dir)["ok"] is True
    finally:
        srv.close()


def test_a_vm_not_started_yet_refuses_what_needs_vcpus(ctl_dir: Path) -> None:
    m = FakeMachine(state="created")
    srv = ControlServer(m, "new", directory=ctl_dir)  # type: ignore[arg-type]
    srv.start()
    try:
        for cmd in ("pause", "resume", "stats"):
            with pytest.raises(KvmkitError, match="the VM has not started yet; try again in a moment"):
                call("new", cmd, directory=ctl_dir)
        assert call("new", "info", directory=ctl_dir)["uptime_s"] is None
        assert m.calls == []
    finally:
        srv.close()


def test_a_generated_name_is_unused_and_given_to_the_machine(ctl_dir: Path) -> None:
    servers = []
    try:
        for _ in range(5):
            m = FakeMachine()
            srv = ControlServer(m, directory=ctl_dir)  # type: ignore[arg-type]
            srv.start()
            servers.append(srv)
            assert srv.name is not None and re.fullmatch(r"vm-[0-9a-f]{4}", srv.name)
            assert m.name == srv.name and (ctl_dir / f"{srv.name}.sock").exists()
        assert len({s.name for s in servers}) == 5
        assert sorted(i["name"] for i in running(ctl_dir)) == sorted(s.name for s in servers)
    finally:
        for s in servers:
            s.close()
    assert list(ctl_dir.iterdir()) == []
    srv = ControlServer(FakeMachine(), "fresh", directory=ctl_dir)  # type: ignore[arg-type]
    srv.close()  # before start: nothing to do, no error


def test_what_the_cli_prints() -> None:
    table = format_vm_table([{"name": "web", "pid": 4242, "state": "paused", "cpus": 2, "memory": 1 << 30,
                              "uptime_s": 3725.2, "kernel": "bundled guest"},
                             {"name": "a-much-longer-name", "pid": 7, "state": "running", "cpus": 1,
                              "memory": 256 << 20, "uptime_s": 5.0}])
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME"]
    assert lines[1].split() == ["web", "4242", "paused", "2", "1G", "1h02m"]
    assert lines[2].split() == ["a-much-longer-name", "7", "running", "1", "256M", "5s"]
    assert lines[1].index("4242") == lines[0].index("PID")  # columns line up
    assert format_vm_table([]) == "NAME  PID  STATE  CPUS  MEMORY  UPTIME"
    assert [format_uptime(s) for s in (None, 0, 59.9, 61, 86400 + 7200)] == ["-", "0s", "59s", "1m01s", "1d02h"]
    text = format_stats(FakeMachine().stats_dict())
    assert "vCPU 0: 9 userspace exits, 0 kicks; in KVM_RUN 1.500 s, in kvmkit 0.002 s" in text
    assert re.search(r"IO +7\n +HLT +2\n +top ports +count\n +0x80 out +6\n +0x3f8 out +1", text), text
    assert "COM1: 10 bytes out in 2 host writes, 0 bytes in" in text


def kvmkit(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KVMKIT, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def cli_env(tmp_path: Path) -> dict[str, str]:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700, exist_ok=True)
    return {**os.environ, "PYTHONPATH": SRC, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(xdg),
            "KVMKIT_CACHE": str(cache_root())}


def test_the_cli_verbs_against_a_fake_vm(fake: tuple[FakeMachine, ControlServer], tmp_path: Path) -> None:
    m, _ = fake
    env = cli_env(tmp_path)
    p = kvmkit(env, "list")
    assert p.returncode == 0, p.stderr
    row = p.stdout.splitlines()[1].split()
    assert row[:5] == ["fake", str(os.getpid()), "running", "2", "512M"] and re.fullmatch(r"1m0\ds", row[5]), row
    assert json.loads(kvmkit(env, "list", "--json").stdout)[0]["name"] == "fake"
    p = kvmkit(env, "stats", "fake")
    assert p.returncode == 0 and "top ports" in p.stdout, p.stderr
    assert json.loads(kvmkit(env, "stats", "fake", "--json").stdout)["vcpus"][0]["exits"]["IO"] == 7
    p = kvmkit(env, "snapshot", "fake", "-o", "snapdir", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert m.calls == [("snapshot", tmp_path / "snapdir")]  # the client's relative path, made absolute
    for verb in ("pause", "resume", "stop", "stats", "snapshot"):
        extra = ["-o", "x"] if verb == "snapshot" else []
        p = kvmkit(env, verb, "nosuch", *extra)
        assert p.returncode == 1
        assert p.stderr == "kvmkit: no VM named nosuch is running (kvmkit list shows the running ones).\n"
    p = kvmkit(env, "pause", "../etc")
    assert p.returncode == 1 and "is not a usable VM name" in p.stderr
    (tmp_path / "xdg" / "kvmkit").chmod(0o755)
    p = kvmkit(env, "list")
    assert p.returncode == 1 and "other users have access (mode 0755)" in p.stderr


# --- a real VM --------------------------------------------------------------------------------------
def exits(name: str, directory: Path) -> int:
    return sum(call(name, "stats", directory=directory)["stats"]["vcpus"][0]["exits"].values())


def grows(name: str, directory: Path, timeout: float = 5.0) -> bool:
    first = exits(name, directory)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if exits(name, directory) > first:
            return True
    return False


@pytest.mark.kvm
def test_pause_resume_stats_and_stop_on_a_real_vm(ctl_dir: Path) -> None:
    from kvmkit.machine.config import VmConfig
    from kvmkit.machine.machine import Machine

    machine = Machine(VmConfig(serial=["none", "off", "off", "off"], script=SCRIPT))
    srv = ControlServer(machine, "real", directory=ctl_dir)
    try:
        machine.load()
        srv.start()
        machine.start()
        [info] = running(ctl_dir)
        assert info["name"] == "real" and info["state"] == "running" and info["pid"] == os.getpid()
        assert info["cpus"] == 1 and info["memory"] == 256 << 20 and info["kernel"] == "bundled guest"
        assert grows("real", ctl_dir)

        assert call("real", "pause", directory=ctl_dir)["state"] == "paused"
        assert machine.state == "paused"
        frozen = exits("real", ctl_dir)
        time.sleep(0.3)
        assert exits("real", ctl_dir) == frozen, "the exit count grew while paused"

        assert call("real", "resume", directory=ctl_dir)["state"] == "running"
        assert grows("real", ctl_dir), "the exit count did not grow after resume"

        vcpu = call("real", "stats", directory=ctl_dir)["stats"]["vcpus"][0]
        assert vcpu["vcpu"] == 0 and vcpu["exits"]["IO"] > 1000 and vcpu["pio"]["0x80/out"] > 1000

        assert machine.request_shutdown() is False  # the bundled guest has no keyboard driver to press keys for
        reply = call("real", "stop", directory=ctl_dir)
        assert reply["state"] == "stopped" and reply["by"] == "host"  # so the stop is the host's, at once
        assert machine.wait(10) == 0
        assert machine.stop_message == "stopped by 'kvmkit stop'"
        assert call("real", "info", directory=ctl_dir)["state"] == "stopped"
    finally:
        machine.request_stop(0, "test over")
        machine.shutdown()
        srv.close()
        machine.close()
    assert not (ctl_dir / "real.sock").exists()


def start_vm(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([*KVMKIT, "run", "-v", "--serial", "none", *args, *SCRIPT.replace(";", " ;").split()],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_listed(env: dict[str, str], proc: subprocess.Popen, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        listed = json.loads(kvmkit(env, "list", "--json").stdout)
        if listed and listed[0]["state"] == "running":
            return listed[0]
        time.sleep(0.1)
    raise AssertionError("the VM never showed up in kvmkit list")


@pytest.mark.kvm
def test_the_cli_verbs_end_to_end(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    sock = tmp_path / "xdg" / "kvmkit" / "e2e.sock"
    proc = start_vm(env, "--name", "e2e")
    try:
        info = wait_listed(env, proc)
        assert info["name"] == "e2e" and info["pid"] == proc.pid
        table = kvmkit(env, "list").stdout.splitlines()
        assert table[0].split() == ["NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME"]
        assert table[1].split()[:5] == ["e2e", str(proc.pid), "running", "1", "256M"]

        clash = kvmkit(env, "run", "--name", "e2e", "--serial", "none", "poweroff", "0")
        assert clash.returncode == 1
        assert clash.stderr == (f"kvmkit: a VM named e2e is already running (pid {proc.pid}); "
                                "choose another --name.\n")

        assert kvmkit(env, "pause", "e2e").returncode == 0
        assert json.loads(kvmkit(env, "list", "--json").stdout)[0]["state"] == "paused"
        frozen = json.loads(kvmkit(env, "stats", "e2e", "--json").stdout)["vcpus"][0]["exits"]["IO"]
        time.sleep(0.2)
        assert json.loads(kvmkit(env, "stats", "e2e", "--json").stdout)["vcpus"][0]["exits"]["IO"] == frozen
        assert kvmkit(env, "resume", "e2e").returncode == 0
        assert grows("e2e", sock.parent)
        p = kvmkit(env, "stats", "e2e")
        assert p.returncode == 0 and "vCPU 0:" in p.stdout and "0x80 out" in p.stdout, p.stderr

        assert kvmkit(env, "pause", "e2e").returncode == 0  # and a paused VM stops too
        p = kvmkit(env, "stop", "e2e")
        assert p.returncode == 0, p.stderr
        assert not sock.exists()  # kvmkit stop waits for the VM to be gone
        assert proc.wait(15) == 0
        assert f"kvmkit: control socket {sock}" in proc.stderr.read()  # type: ignore[union-attr]
        p = kvmkit(env, "stop", "e2e")
        assert p.returncode == 1 and "no VM named e2e is running" in p.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.kvm
def test_sigterm_removes_the_socket_of_a_generated_name(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    proc = start_vm(env)
    try:
        info = wait_listed(env, proc)
        assert re.fullmatch(r"vm-[0-9a-f]{4}", info["name"])
        sock = tmp_path / "xdg" / "kvmkit" / f"{info['name']}.sock"
        assert sock.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 143
        assert not sock.exists()
        assert json.loads(kvmkit(env, "list", "--json").stdout) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
