"""The network config rules of the compat notes (docs: flannel-compat.md, "Network config")."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannelpy.config import parse_config
from flannelpy.errors import ConfigError, ExitCode


def cfg(**obj: object) -> str:
    return json.dumps(obj)


def test_seed_config_runs_udp_with_defaults() -> None:
    c = parse_config('{"Network":"10.10.0.0/16"}')
    assert c.network == IPv4Network("10.10.0.0/16")
    assert c.backend_type == "udp"
    assert c.backend.port == 8285
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Address("10.10.1.0")  # the first subnet is never leased
    assert c.subnet_max == IPv4Address("10.10.255.0")
    assert c.enable_ipv4 is True and c.enable_ipv6 is False
    assert c.subnet_count() == 255


@pytest.mark.parametrize("text", [
    '{"network":"10.5.0.0/16"}',
    '{"NETWORK":"10.5.0.0/16","subnetlen":26}',
    '{"nEtWoRk":"10.5.0.0/16","backend":{"type":"vxlan","vni":7}}',
])
def test_keys_match_case_insensitively(text: str) -> None:
    c = parse_config(text)
    assert c.network == IPv4Network("10.5.0.0/16")


def test_lower_case_backend_keys_are_read() -> None:
    c = parse_config('{"network":"10.5.0.0/16","backend":{"type":"vxlan","vni":7,"port":4789}}')
    assert (c.backend_type, c.backend.vni, c.backend.port) == ("vxlan", 7, 4789)


def test_same_key_twice_in_different_case_is_rejected() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_config('{"Network":"10.5.0.0/16","network":"10.6.0.0/16"}')


def test_host_bits_of_network_are_masked_off() -> None:
    assert parse_config(cfg(Network="10.5.3.7/16")).network == IPv4Network("10.5.0.0/16")


@pytest.mark.parametrize(("network", "subnet_len"), [
    ("10.0.0.0/8", 24), ("10.5.0.0/16", 24), ("10.5.0.0/22", 24),  # /22 or shorter: /24
    ("10.5.0.0/23", 25), ("10.5.0.0/24", 26), ("10.5.0.0/28", 30),  # longer: prefix + 2
])
def test_default_subnet_len(network: str, subnet_len: int) -> None:
    assert parse_config(cfg(Network=network)).subnet_len == subnet_len
    assert parse_config(cfg(Network=network, SubnetLen=0)).subnet_len == subnet_len


def test_network_longer_than_28_is_too_small() -> None:
    with pytest.raises(ConfigError, match=r"network is too small\. Minimum useful network prefix is /28"):
        parse_config(cfg(Network="10.5.0.0/29"))


def test_subnet_len_above_30_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"SubnetLen=31.*30 or less"):
        parse_config(cfg(Network="10.5.0.0/16", SubnetLen=31))


@pytest.mark.parametrize("subnet_len", [8, 16, 17])
def test_subnet_len_must_leave_four_subnets(subnet_len: int) -> None:
    with pytest.raises(ConfigError, match=f"SubnetLen={subnet_len}.*at least four subnets"):
        parse_config(cfg(Network="10.5.0.0/16", SubnetLen=subnet_len))


def test_subnet_len_prefix_plus_two_is_the_smallest_allowed() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", SubnetLen=18))
    assert c.subnet_count() == 3  # four subnets, the first never leased


def test_explicit_subnet_min_max() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", SubnetLen=24, SubnetMin="10.5.10.0", SubnetMax="10.5.19.0"))
    assert (c.subnet_min, c.subnet_max, c.subnet_count()) == (
        IPv4Address("10.5.10.0"), IPv4Address("10.5.19.0"), 10)
    assert c.contains_subnet(IPv4Network("10.5.10.0/24"))
    assert not c.contains_subnet(IPv4Network("10.5.9.0/24"))
    assert not c.contains_subnet(IPv4Network("10.5.20.0/24"))
    assert not c.contains_subnet(IPv4Network("10.5.10.0/25"))


def test_default_bounds_for_other_subnet_len() -> None:
    c = parse_config(cfg(Network="10.5.0.0/24", SubnetLen=26))
    assert (c.subnet_min, c.subnet_max) == (IPv4Address("10.5.0.64"), IPv4Address("10.5.0.192"))


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("SubnetMin", "10.6.1.0", "must lie in Network"),
    ("SubnetMax", "10.6.1.0", "must lie in Network"),
    ("SubnetMin", "10.5.1.1", "boundary"),
    ("SubnetMax", "10.5.1.128", "boundary"),
    ("SubnetMin", "banana", "not an IPv4 address"),
])
def test_bad_subnet_bounds(key: str, value: str, rule: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(json.dumps({"Network": "10.5.0.0/16", key: value}))
    assert key in str(e.value) and value in str(e.value) and rule in str(e.value)


@pytest.mark.parametrize(("key", "value", "rule"), [
    ("IPv6SubnetMin", "fd00:7::", "must lie in IPv6Network"),
    ("IPv6SubnetMax", "fd00:6:0:1::1", "boundary (IPv6SubnetLen)"),
    ("IPv6SubnetMin", "10.5.1.0", "not an IPv6 address"),
])
def test_bad_ipv6_subnet_bounds(key: str, value: str, rule: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:6::/56",
                                 key: value}))
    assert key in str(e.value) and value in str(e.value) and rule in str(e.value)


def test_subnet_min_above_max_is_rejected() -> None:
    with pytest.raises(ConfigError, match="SubnetMin"):
        parse_config(cfg(Network="10.5.0.0/16", SubnetMin="10.5.20.0", SubnetMax="10.5.10.0"))


@pytest.mark.parametrize(("obj", "key"), [
    ({}, "Network"),
    ({"Network": "banana"}, "Network"),
    ({"Network": "10.5.0.0/16", "SubnetLen": "24"}, "SubnetLen"),
    ({"Network": "10.5.0.0/16", "SubnetLen": 24.5}, "SubnetLen"),
    ({"Network": "10.5.0.0/16", "EnableIPv4": "yes"}, "EnableIPv4"),
    ({"Network": "10.5.0.0/16", "Backend": "udp"}, "Backend"),
])
def test_invalid_values_name_the_key(obj: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(json.dumps(obj))
    assert key in str(e.value)
    assert e.value.exit_code == ExitCode.CONFIG


@pytest.mark.parametrize("text", ["", "not json", "[1,2]", '"10.5.0.0/16"', "[" * 100_000])
def test_not_a_json_object(text: str) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        parse_config(text)


def test_backend_without_type_is_unknown_backend_type() -> None:
    with pytest.raises(ConfigError, match="unknown backend type"):
        parse_config(cfg(Network="10.5.0.0/16", Backend={"Port": 8285}))


@pytest.mark.parametrize("btype", ["", "ipip", "wireguard"])
def test_unknown_backend_type(btype: str) -> None:
    with pytest.raises(ConfigError, match=r"Backend.Type.*unknown backend type"):
        parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": btype}))


def test_udp_backend_options() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": "udp"}))
    assert (c.backend.port, c.backend.mtu) == (8285, None)
    c = parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": "udp", "Port": 9000, "MTU": 1400}))
    assert (c.backend.port, c.backend.mtu) == (9000, 1400)


def test_vxlan_backend_defaults_and_options() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": "vxlan"}))
    assert (c.backend.vni, c.backend.port, c.backend.gbp, c.backend.learning, c.backend.direct_routing) == (
        1, 0, False, False, False)  # port 0 = the kernel's default, 8472
    c = parse_config(cfg(Network="10.5.0.0/16", Backend={
        "Type": "vxlan", "VNI": 42, "Port": 4789, "GBP": True, "Learning": True, "DirectRouting": True}))
    assert (c.backend.vni, c.backend.port, c.backend.gbp, c.backend.learning, c.backend.direct_routing) == (
        42, 4789, True, True, True)


def test_host_gw_and_alloc_backends() -> None:
    assert parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": "host-gw"})).backend_type == "host-gw"
    assert parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": "alloc"})).backend_type == "alloc"
    assert parse_config(cfg(Network="10.5.0.0/16", Backend={"Type": "host-gw", "MTU": 9000})).backend.mtu == 9000


@pytest.mark.parametrize(("opts", "key"), [
    ({"Type": "udp", "Port": 70000}, "Port"),
    ({"Type": "udp", "Port": -1}, "port"),
    ({"Type": "vxlan", "VNI": 1 << 24}, "VNI"),
    ({"Type": "vxlan", "GBP": "yes"}, "gbp"),
    ({"Type": "udp", "MTU": 20}, "MTU"),
])
def test_bad_backend_options(opts: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg(Network="10.5.0.0/16", Backend=opts))
    assert f"Backend.{key}" in str(e.value)


def test_ipv6_network_defaults() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00:6::/56"))
    assert c.ipv6_network == IPv6Network("fd00:6::/56")
    assert c.ipv6_subnet_len == 64  # /62 or shorter: /64
    assert c.ipv6_subnet_min == IPv6Address("fd00:6:0:1::")
    assert c.ipv6_subnet_max == IPv6Address("fd00:6:0:ff::")


@pytest.mark.parametrize(("network", "slen"), [("fd00::/62", 64), ("fd00::/100", 102), ("fd00::/124", 126)])
def test_ipv6_default_subnet_len(network: str, slen: int) -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network=network))
    assert c.ipv6_subnet_len == slen


def test_ipv6_rules() -> None:
    with pytest.raises(ConfigError, match="Minimum useful network prefix is /124"):
        parse_config(cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/125"))
    with pytest.raises(ConfigError, match="IPv6SubnetLen=127"):
        parse_config(cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56", IPv6SubnetLen=127))
    with pytest.raises(ConfigError, match=r"IPv6SubnetLen=57.*four subnets"):
        parse_config(cfg(Network="10.5.0.0/16", EnableIPv6=True, IPv6Network="fd00::/56", IPv6SubnetLen=57))
    with pytest.raises(ConfigError, match="IPv6Network is missing"):
        parse_config(cfg(Network="10.5.0.0/16", EnableIPv6=True))


def test_ipv6_only_network() -> None:
    c = parse_config(cfg(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00:6::/56"))
    assert c.network is None and c.ipv6_network == IPv6Network("fd00:6::/56")
    with pytest.raises(ConfigError, match="at least one must be true"):
        parse_config(cfg(EnableIPv4=False, EnableIPv6=False))


def test_ipv6_keys_are_ignored_when_ipv6_is_off() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", IPv6Network="fd00::/56"))
    assert c.enable_ipv6 is False and c.ipv6_network is None


def test_unknown_keys_are_kept_for_a_warning() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", Frobnicate=1))
    assert c.unknown_keys == ("Frobnicate",)


def test_round_trip_through_to_json() -> None:
    c = parse_config(cfg(Network="10.5.0.0/16", SubnetLen=26, Backend={"Type": "vxlan", "VNI": 3}))
    assert parse_config(c.to_json()) == c


@pytest.mark.parametrize("written", ["VXLAN", "Host-GW", "Udp"])
def test_backend_type_is_case_insensitive_as_in_flanneld(written: str) -> None:
    # flanneld lower-cases it; a mixed cluster with such a config had flannelpy hosts refuse to start.
    config = parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": written}}))
    assert config.backend.type == written.lower()


def test_a_zero_subnet_min_or_max_means_the_default_as_in_flanneld() -> None:
    # flanneld's CheckNetworkConfig takes 0.0.0.0 as "not set"; here it was an error (outside the Network).
    zero = parse_config(json.dumps({"Network": "10.5.0.0/16", "SubnetMin": "0.0.0.0", "SubnetMax": "0.0.0.0"}))
    plain = parse_config(json.dumps({"Network": "10.5.0.0/16"}))
    assert (zero.subnet_min, zero.subnet_max) == (plain.subnet_min, plain.subnet_max)
