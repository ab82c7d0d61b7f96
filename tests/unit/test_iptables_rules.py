"""Rule generation for flanneld's ip-masq and forward rules (pure; nothing touches a firewall here)."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

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
