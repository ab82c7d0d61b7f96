"""ip-masq and forward rules in a fresh namespace: installed as flanneld's, restored after a hand deletion,
removed on SIGTERM, stale rules of an earlier lease replaced; with iptables and with the nft fallback.

The manager runs in a child process started with `ip netns exec`, as the daemon runs inside a host; the
tests read and change rules only inside that namespace. The host's firewall is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables"),
]

REPO = str(Path(__file__).resolve().parents[2])
RESYNC = 0.3  # --iptables-resync for these tests (flanneld's default is 5 s)
DEADLINE = 30.0  # generous upper bound for anything to happen; the expected time is one RESYNC

# Runs IptablesManager like the daemon: install(), run() as a task, remove() on SIGTERM.
DRIVER = r"""
import asyncio, json, signal, sys
from flannelpy.config import parse_config
from flannelpy.host.iptables import IptablesManager
from flannelpy.subnet.lease import Lease
a = json.loads(sys.argv[1])

async def main():
    config = parse_config(json.dumps({"Network": a["network"]}))
    lease = Lease.from_kv(a["subnet"], b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    mgr = IptablesManager(config, lease, masq=a["masq"], forward=a["forward"], resync=a["resync"],
                          tool=a["tool"], lock_wait=a.get("lock_wait", 5))
    await mgr.install()
    if a["leave"]:  # a daemon that died without cleaning up
        print("LEFT", flush=True)
        return
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.ensure_future(mgr.run())
    print("READY", flush=True)
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await mgr.remove()
    print("REMOVED", flush=True)

asyncio.run(main())
"""

MASQ = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
    "-j MASQUERADE --random-fully",
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.58.0/24 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" '
    "-j MASQUERADE --random-fully",
]
FORWARD = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
]
# A rule of somebody else's (Docker's masquerade) that must survive us.
FOREIGN = "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE"


@pytest.fixture
def netns() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """A fresh namespace; yields `sh(*argv)` that runs a command inside it."""
    ns = f"fp{os.getpid() % 10000}{random.randrange(100):02d}ipt"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)

    def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": REPO})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {proc.stderr or proc.stdout}")
        return proc

    sh.ns = ns  # type: ignore[attr-defined]
    try:
        yield sh
    finally:
        # An iptables child of a killed driver may still run in there, and `ip netns del` fails while it
        # does: stop what is left (all started by this test), then delete until the name is gone.
        for _ in range(50):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                      timeout=30).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            if not os.path.exists(f"/run/netns/{ns}"):
                break
            time.sleep(0.1)


class Daemon:
    """The driver process inside the namespace."""

    def __init__(self, ns: str, tool: str, *, subnet: str = "10.5.58.0-24", masq: bool = True,
                 forward: bool = True, lock_wait: int = 5, env: dict[str, str] | None = None) -> None:
        args = {"network": "10.5.0.0/16", "subnet": subnet, "masq": masq, "forward": forward,
                "resync": RESYNC, "tool": tool, "leave": False, "lock_wait": lock_wait}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER, json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()  # None: end of output
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("READY")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed by kill()
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, marker: str, *, within_line: bool = False) -> None:
        """Read the driver's output up to the line `marker` (or a line containing it), at most DEADLINE s."""
        end = time.monotonic() + DEADLINE
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"driver exited before {marker}: {''.join(self.output)}")
            self.output.append(line)
            if line.strip() == marker or (within_line and marker in line):
                return
        raise AssertionError(f"no {marker!r} from the driver within {DEADLINE}s: {''.join(self.output)}")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.wait_for("REMOVED")
        return self.proc.wait(timeout=DEADLINE)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # as a daemon is stopped: its iptables calls finish first
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def start(netns) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def go(tool: str, **kw: object) -> Daemon:
        d = Daemon(netns.ns, tool, **kw)  # type: ignore[arg-type]
        daemons.append(d)
        return d

    try:
        yield go
    finally:
        for d in daemons:
            d.kill()


def rules(sh, table: str) -> list[str]:
    return [line for line in sh("iptables-save", "-t", table).stdout.splitlines() if line.startswith("-A ")]


def eventually(check: Callable[[], bool]) -> bool:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(RESYNC / 3)
    return check()


# -- iptables ------------------------------------------------------------------------------------------


def test_rules_are_flanneld_s_with_jumps_first_and_foreign_rules_kept(netns, start):
    netns("iptables", "-t", "nat", *FOREIGN.split())
    start("iptables")
    nat = rules(netns, "nat")
    assert nat[0] == MASQ[0]  # jumped to before anyone else's rules, as flanneld inserts it
    assert [r for r in nat if "flanneld" in r] == MASQ
    assert FOREIGN in nat
    assert [r for r in rules(netns, "filter") if "flanneld" in r] == FORWARD


def test_deleted_rules_come_back_within_a_resync(netns, start):
    d = start("iptables")
    # what an operator (or a firewall script) does: delete one rule, the jump, and flush a chain
    netns("iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "!", "-s", "10.5.0.0/16", "-d", "10.5.58.0/24",
          "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN")
    netns("iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
          "-j", "FLANNEL-FWD")
    netns("iptables", "-t", "filter", "-F", "FLANNEL-FWD")
    # (each deletion above succeeded, so the rules were there and gone; the manager may already be back)
    assert eventually(lambda: [r for r in rules(netns, "nat") if "flanneld" in r] == MASQ
                      and [r for r in rules(netns, "filter") if "flanneld" in r] == FORWARD)
    assert d.terminate() == 0
    assert any("restoring" in line for line in d.output)


def test_a_rule_added_into_our_chain_is_dropped(netns, start):
    start("iptables")
    netns("iptables", "-t", "nat", "-I", "FLANNEL-POSTRTG", "1", "-s", "10.9.0.0/16", "-j", "ACCEPT")
    assert eventually(lambda: [r for r in rules(netns, "nat") if "FLANNEL-POSTRTG" in r] == MASQ)


def test_clean_shutdown_removes_everything_and_only_ours(netns, start):
    netns("iptables", "-t", "nat", *FOREIGN.split())
    d = start("iptables")
    assert d.terminate() == 0
    saved = netns("iptables-save").stdout
    assert "FLANNEL" not in saved and "flanneld" not in saved
    assert FOREIGN in saved


@pytest.fixture
def legacy_iptables(tmp_path) -> Iterator[dict[str, str]]:
    """Environment for a driver that runs iptables-legacy, which takes the xtables lock (iptables-nft has none),
    with a lock file of this test's own (XTABLES_LOCKFILE): holding it blocks nobody else's iptables."""
    if shutil.which("iptables-legacy") is None or shutil.which("flock") is None:
        pytest.skip("needs iptables-legacy and flock")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("iptables", "iptables-restore", "iptables-save"):
        legacy = shutil.which(name.replace("iptables", "iptables-legacy", 1))
        assert legacy is not None, f"{name.replace('iptables', 'iptables-legacy', 1)} is not installed"
        (bin_dir / name).symlink_to(legacy)
    yield {"PATH": f"{bin_dir}:{os.environ['PATH']}", "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}


def test_a_busy_xtables_lock_delays_the_check_and_rewrites_nothing(netns, start, legacy_iptables):
    env = legacy_iptables

    def sh(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns.ns, *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, **env}, check=True)

    def ours(table: str) -> list[str]:
        return [r for r in sh("iptables-save", "-t", table).stdout.splitlines() if "flanneld" in r]

    d = start("iptables", lock_wait=1, env=env)
    assert ours("nat") == MASQ and ours("filter") == FORWARD
    # Another program holds the xtables lock for several resyncs (as a long iptables-restore would).
    with open(env["XTABLES_LOCKFILE"], "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what iptables-legacy takes, from this process: no helper to stop
        d.wait_for("Could not read ip-masq/forward rules", within_line=True)
        time.sleep(4 * (1 + RESYNC))  # a few more checks, each waiting 1 s for the lock
    d.wait_for("ip-masq/forward rules readable again", within_line=True)
    assert ours("nat") == MASQ and ours("filter") == FORWARD
    # Still watching: a deleted jump comes back.
    sh("iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
       "-j", "FLANNEL-FWD")
    assert eventually(lambda: ours("filter") == FORWARD)
    assert d.terminate() == 0
    out = "".join(d.output)
    assert out.count("Could not read ip-masq/forward rules") == 1  # logged once, not per resync
    assert "status 4" in out and "xtables lock" in out
    # The only rewrite was for the deleted jump: none while the rules could not be read.
    assert out.count("restoring them") == 1 and "chains=FLANNEL-FWD" in out
    assert "Failed to ensure" not in out
    assert not ours("nat") and not ours("filter")


def test_forward_rules_alone(netns, start):
    start("iptables", masq=False, forward=True)
    assert not [r for r in rules(netns, "nat") if "flanneld" in r]
    assert [r for r in rules(netns, "filter") if "flanneld" in r] == FORWARD


def test_rules_of_an_earlier_lease_are_replaced(netns, start):
    """A daemon that died without cleaning up, then a restart with another lease."""
    args = {"network": "10.5.0.0/16", "subnet": "10.5.7.0-24", "masq": True, "forward": True,
            "resync": RESYNC, "tool": "iptables", "leave": True}
    assert "LEFT" in netns(sys.executable, "-c", DRIVER, json.dumps(args)).stdout
    assert any("10.5.7.0/24" in r for r in rules(netns, "nat"))
    start("iptables")
    nat = rules(netns, "nat")
    assert [r for r in nat if "flanneld" in r] == MASQ  # one jump, and only the new lease's subnet
    assert not any("10.5.7.0/24" in r for r in nat)


# -- nft fallback ----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_nft_fallback_installs_restores_and_removes(netns, start):
    d = start("nft")
    listing = netns("nft", "list", "table", "ip", "flannel-ipv4").stdout
    for rule in (
        'ip saddr 10.5.0.0/16 ip daddr 10.5.0.0/16 return comment "flanneld masq"',
        'ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment "flanneld masq"',
        'ip saddr != 10.5.0.0/16 ip daddr 10.5.58.0/24 return comment "flanneld masq"',
        'ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random comment "flanneld masq"',
        'ip saddr 10.5.0.0/16 accept comment "flanneld forward"',
        'ip daddr 10.5.0.0/16 accept comment "flanneld forward"',
    ):
        assert rule in listing
    netns("nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg")
    assert eventually(lambda: netns("nft", "list", "table", "ip", "flannel-ipv4").stdout == listing)
    assert d.terminate() == 0
    assert netns("nft", "list", "table", "ip", "flannel-ipv4", check=False).returncode != 0
