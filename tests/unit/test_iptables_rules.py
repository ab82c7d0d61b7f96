"""Rule generation for flanneld's ip-masq and forward rules (pure; nothing touches a firewall here)."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from structlog.testing import capture_logs

from flannelpy.config import parse_config
from flannelpy.host import iptables
from flannelpy.host.iptables import (
    FirewallError,
    IptablesManager,
    forward_chain,
    masq_chain,
    nft_ruleset,
    restore_payload,
    supports_random_fully,
    wanted_chains,
)
from flannelpy.subnet.lease import Lease

NET = IPv4Network("10.5.0.0/16")
SUB = IPv4Network("10.5.58.0/24")


def test_masq_rules_are_flanneld_v0_20s_in_order():
    ch = masq_chain(NET, SUB, random_fully=True)
    assert (ch.table, ch.name, ch.hook) == ("nat", "FLANNEL-POSTRTG", "POSTROUTING")
    assert [r.restore_line() for r in ch.rules] == [
        '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
        "-j MASQUERADE --random-fully",
        '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.58.0/24 -m comment --comment "flanneld masq" -j RETURN',
        '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" '
        "-j MASQUERADE --random-fully",
    ]
    assert ch.jump.restore_line() == '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'


def test_masquerade_without_random_fully_on_old_iptables():
    lines = [r.restore_line() for r in masq_chain(NET, SUB, random_fully=False).rules]
    assert not any("--random-fully" in line for line in lines)
    assert lines[2].endswith("-j MASQUERADE") and lines[4].endswith("-j MASQUERADE")


def test_forward_rules():
    ch = forward_chain(NET)
    assert (ch.table, ch.name, ch.hook) == ("filter", "FLANNEL-FWD", "FORWARD")
    assert [r.restore_line() for r in ch.rules] == [
        '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    ]
    assert ch.jump.words("-D") == ["-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
                                   "-j", "FLANNEL-FWD"]


@pytest.mark.parametrize(("masq", "forward", "names"), [
    (True, True, ["FLANNEL-POSTRTG", "FLANNEL-FWD"]),
    (True, False, ["FLANNEL-POSTRTG"]),
    (False, True, ["FLANNEL-FWD"]),
    (False, False, []),
])
def test_which_chains(masq, forward, names):
    assert [c.name for c in wanted_chains(NET, SUB, masq, forward, True)] == names


def test_restore_payload_declares_fills_and_jumps_to_our_chains():
    chains = wanted_chains(NET, SUB, True, True, True)
    payload = restore_payload(chains, [False, False])
    assert payload == (
        "*nat\n"
        ":FLANNEL-POSTRTG - [0:0]\n"
        '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN\n'
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN\n'
        '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" '
        "-j MASQUERADE --random-fully\n"
        '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.58.0/24 -m comment --comment "flanneld masq" -j RETURN\n'
        '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" '
        "-j MASQUERADE --random-fully\n"
        '-I POSTROUTING 1 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG\n'
        "COMMIT\n"
        "*filter\n"
        ":FLANNEL-FWD - [0:0]\n"
        '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT\n'
        '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT\n'
        '-I FORWARD 1 -m comment --comment "flanneld forward" -j FLANNEL-FWD\n'
        "COMMIT\n"
    )


def test_restore_payload_does_not_duplicate_a_jump_that_is_there():
    chains = wanted_chains(NET, SUB, True, True, True)
    payload = restore_payload(chains, [True, False])
    assert "-I POSTROUTING" not in payload
    assert payload.count("-I FORWARD 1 ") == 1
    assert ":FLANNEL-POSTRTG - [0:0]" in payload  # the chain itself is still rewritten


def test_nft_ruleset_has_the_same_rules():
    text = nft_ruleset(NET, SUB, True, True)
    assert "type nat hook postrouting priority srcnat" in text
    assert "type filter hook forward priority filter" in text
    assert 'ip saddr != 10.5.0.0/16 ip daddr 10.5.58.0/24 return comment "flanneld masq"' in text
    assert 'ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment "flanneld masq"' in text
    assert 'ip daddr 10.5.0.0/16 accept comment "flanneld forward"' in text
    assert "forward" not in nft_ruleset(NET, SUB, True, False).replace("flanneld forward", "")


@pytest.mark.parametrize(("out", "ok"), [
    ("iptables v1.8.9 (nf_tables)", True),
    ("iptables v1.6.2", True),
    ("iptables v1.6.1", False),
    ("iptables v1.4.21", False),
    ("garbage", False),
])
def test_random_fully_support_by_version(out, ok):
    assert supports_random_fully(out) is ok


def test_manager_refuses_an_ipv6_only_config_and_bad_resync():
    lease = Lease.from_kv("10.5.58.0-24", b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    v6only = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:6::/56"}')
    with pytest.raises(FirewallError, match="IPv4 Network"):
        IptablesManager(v6only, lease, True, True)
    with pytest.raises(FirewallError, match="iptables-resync"):
        IptablesManager(parse_config('{"Network":"10.5.0.0/16"}'), lease, True, True, resync=0)


async def test_disabled_manager_runs_no_tool(monkeypatch):
    async def refuse(argv, stdin=None):
        raise AssertionError(f"ran {argv} although no rules were requested")

    monkeypatch.setattr(iptables, "_run", refuse)  # also keeps the host's firewall out of reach
    lease = Lease.from_kv("10.5.58.0-24", b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    mgr = IptablesManager(parse_config('{"Network":"10.5.0.0/16"}'), lease, False, False)
    await mgr.install()
    assert await mgr.ensure() is False
    await mgr.run()
    await mgr.remove()


@pytest.mark.parametrize(("out", "args", "restore"), [
    ("iptables v1.8.9 (nf_tables)", ["--wait", "5"], ["--wait", "5"]),
    ("iptables v1.6.2", ["--wait", "5"], ["--wait", "5"]),
    ("iptables v1.6.0", ["--wait", "5"], []),
    ("iptables v1.4.21", ["--wait"], []),
    ("iptables v1.4.19", [], []),
    ("garbage", [], []),
])
def test_lock_wait_option_by_version_as_go_iptables(out, args, restore):
    assert iptables.wait_args(out, 5) == args
    assert iptables.restore_wait_args(out, 5) == restore


@pytest.mark.parametrize(("rc", "err", "absent"), [
    (1, "iptables: Bad rule (does a matching rule exist in that chain?).", True),
    (1, "iptables: No chain/target/match by that name.", True),
    (2, "iptables v1.8.9 (legacy): Couldn't load target `FLANNEL-FWD':No such file or directory", True),
    (2, "iptables v1.8.9 (nf_tables): Chain 'FLANNEL-FWD' does not exist", True),
    (1, "Error: No such file or directory\nlist table ip flannel-ipv4", True),  # nft
    (4, "Another app is currently holding the xtables lock. Stopped waiting after 5s.", False),
    (1, "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied", False),
    (3, "can't initialize iptables table `nat': Table does not exist (do you need to insmod?)", False),
    (139, "", False),
])
def test_absent_is_an_answer_a_busy_lock_is_not(rc, err, absent):
    assert iptables.is_absent(rc, err) is absent


class FakeIptables:
    """Answers the manager's commands as iptables does; `busy` makes reads fail as under a held xtables lock."""

    def __init__(self) -> None:
        self.busy = False
        self.calls: list[list[str]] = []

    async def __call__(self, argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        self.calls.append(argv)
        if argv == ["iptables", "--version"]:
            return 0, "iptables v1.8.9 (legacy)\n", ""
        if argv[0] == "iptables-restore":
            return 0, "", ""
        if self.busy:
            return 4, "", "Another app is currently holding the xtables lock. Stopped waiting after 5s."
        if "-S" in argv:
            chain = argv[-1]
            return 0, f"-N {chain}\n-A {chain} -j RETURN\n", ""
        return 0, "", ""  # -C: the jump is there

    def restores(self) -> int:
        return sum(1 for a in self.calls if a[0] == "iptables-restore")


async def test_a_failed_read_is_retried_not_taken_for_a_change(monkeypatch):
    fake = FakeIptables()
    monkeypatch.setattr(iptables, "_run", fake)  # keeps the host's firewall out of reach
    lease = Lease.from_kv("10.5.58.0-24", b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    mgr = IptablesManager(parse_config('{"Network":"10.5.0.0/16"}'), lease, True, True)
    await mgr.install()
    assert fake.restores() == 1
    assert ["iptables", "--wait", "5", "-t", "nat", "-S", "FLANNEL-POSTRTG"] in fake.calls
    assert ["iptables-restore", "--wait", "5", "--noflush"] in fake.calls
    fake.busy = True
    with capture_logs() as logs:
        for _ in range(3):
            assert await mgr.ensure() is False
    assert fake.restores() == 1  # nothing rewritten on a failed read
    assert mgr.errors == {"read": 3, "write": 0}
    warnings = [e for e in logs if e["event"].startswith("Could not read")]
    assert len(warnings) == 1 and "xtables lock" in warnings[0]["error"]  # rate-limited
    fake.busy = False
    with capture_logs() as logs:
        assert await mgr.ensure() is False  # the rules are as installed
    assert fake.restores() == 1
    assert [e["event"] for e in logs] == ["ip-masq/forward rules readable again"]


async def test_install_under_a_busy_lock_is_retried_by_the_resync(monkeypatch):
    fake = FakeIptables()
    fake.busy = True
    monkeypatch.setattr(iptables, "_run", fake)
    lease = Lease.from_kv("10.5.58.0-24", b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    mgr = IptablesManager(parse_config('{"Network":"10.5.0.0/16"}'), lease, True, False)
    with pytest.raises(iptables.RulesUnreadable, match="xtables lock"):
        await mgr.install()  # cannot tell whether the jump is there: inserting it blindly could duplicate it
    assert fake.restores() == 0
    assert await mgr.ensure() is False and mgr.errors["read"] == 1
    fake.busy = False
    assert await mgr.ensure() is True and fake.restores() == 1
