"""IPv4/IPv6 network values and the subnet key format that flanneld uses in etcd (pure)."""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

# flanneld's own regex (pkg/subnet/subnet.go); the dot before the third octet is unescaped there too.
SUBNET_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


class SubnetKeyError(ValueError):
    """A key under <prefix>/subnets/ that is not a flannel subnet key."""


def subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """`10.5.58.0-24`, or `10.6.85.0-24&fd00:6:0:2f::-64` for dual stack."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Inverse of subnet_key; accepts a full etcd key (the last path element is parsed)."""
    name = key.rsplit("/", 1)[-1]
    m = SUBNET_KEY_RE.fullmatch(name)
    if m is None:
        raise SubnetKeyError(f"not a subnet key: {name!r} (expected like 10.5.58.0-24)")
    try:
        v4 = IPv4Network(f"{m.group(1)}/{m.group(2)}", strict=True)
        v6 = IPv6Network(f"{m.group(3)}/{m.group(4)}", strict=True) if m.group(3) else None
    except ValueError as e:
        raise SubnetKeyError(f"not a subnet key: {name!r}: {e}") from None
    return v4, v6


def ip4_to_int(addr: IPv4Address | str) -> int:
    return int(IPv4Address(addr))


def int_to_ip4(value: int) -> IPv4Address:
    return IPv4Address(value)


def first_host(subnet: IPv4Network) -> IPv4Address:
    """The address Docker's --bip takes: the subnet's first address (10.5.58.1 of 10.5.58.0/24)."""
    return subnet.network_address + 1


def parse_ip(value: str) -> IPv4Address | IPv6Address:
    return ipaddress.ip_address(value)
