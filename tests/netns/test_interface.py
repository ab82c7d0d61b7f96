"""Interface selection (--iface, --iface-regex, --iface-can-reach, default route) inside a fresh namespace.

select_interface() runs in a child process started with `ip netns exec`, exactly as the daemon would run
inside a host's namespace; nothing here reads or changes the host namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

REPO = str(Path(__file__).resolve().parents[2])

DRIVER = r"""
import asyncio, json, sys
from flannelpy.errors import InterfaceError
from flannelpy.host.interface import select_interface
a = json.loads(sys.argv[1])
try:
    r = asyncio.run(select_interface(a["ifaces"], a["regexes"], a["can_reach"], a["public_ip"]))
    out = {"name": r.name, "index": r.index, "ip": str(r.ip), "public_ip": str(r.public_ip), "mtu": r.mtu}
except InterfaceError as e:
    out = {"error": str(e), "exit_code": int(e.exit_code)}
print("RESULT " + json.dumps(out))
"""


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


def select(ns: str, ifaces: list[str] | None = None, regexes: list[str] | None = None,
           can_reach: str | None = None, public_ip: str | None = None) -> dict[str, Any]:
    args = {"ifaces": ifaces or [], "regexes": regexes or [], "can_reach": can_reach, "public_ip": public_ip}
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER, json.dumps(args)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"driver failed: {proc.stderr or proc.stdout}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    result["log"] = proc.stdout
    return result


def _prefix() -> str:
    return f"fp{os.getpid() % 10000}{random.randrange(100):02d}"


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[str, str]]:
    """A namespace with two links, like a host with two NICs:

    {p}a (10.77.0.2/24 and 10.77.0.3/24; default route via 10.77.0.1), {p}b (192.168.77.2/24, MTU 1400,
    route 172.30.0.0/16 via 192.168.77.1). Their veth peers have no address. Yields (namespace, prefix).
    """
    p = _prefix()
    ns = f"{p}ifsel"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        for name in ("a", "b"):
            ip("-n", ns, "link", "add", f"{p}{name}", "type", "veth", "peer", "name", f"{p}{name}p")
            ip("-n", ns, "link", "set", f"{p}{name}p", "up")
        ip("-n", ns, "addr", "add", "10.77.0.2/24", "dev", f"{p}a")
        ip("-n", ns, "addr", "add", "10.77.0.3/24", "dev", f"{p}a")
        ip("-n", ns, "addr", "add", "192.168.77.2/24", "dev", f"{p}b")
        ip("-n", ns, "link", "set", f"{p}b", "mtu", "1400")
        ip("-n", ns, "link", "set", f"{p}a", "up")
        ip("-n", ns, "link", "set", f"{p}b", "up")
        ip("-n", ns, "route", "add", "default", "via", "10.77.0.1")
        ip("-n", ns, "route", "add", "172.30.0.0/16", "via", "192.168.77.1")
        yield ns, p
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@contextlib.contextmanager
def one_link_namespace(name: str, link: str, *address: str) -> Iterator[tuple[str, str]]:
    """A namespace `<prefix><name>` with one veth end `<prefix><link>`, up, holding `ip addr add` *address;
    no routes of its own. Yields (namespace, prefix); deleted afterwards, whatever happened."""
    p = _prefix()
    ns = f"{p}{name}"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "add", f"{p}{link}", "type", "veth", "peer", "name", f"{p}{link}p")
        ip("-n", ns, "addr", "add", *address, "dev", f"{p}{link}")
        ip("-n", ns, "link", "set", f"{p}{link}", "up")
        yield ns, p
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def bare() -> Iterator[tuple[str, str]]:
    """A namespace with one addressed link and no default route."""
    with one_link_namespace("bare", "c", "10.88.0.2/24") as made:
        yield made


def test_default_route_interface_when_nothing_is_given(host):
    ns, p = host
    r = select(ns)
    assert (r["name"], r["ip"], r["public_ip"], r["mtu"]) == (f"{p}a", "10.77.0.2", "10.77.0.2", 1500)
    assert f"Using interface with name {p}a and address 10.77.0.2" in r["log"]


def test_iface_by_name(host):
    ns, p = host
    r = select(ns, ifaces=[f"{p}b"])
    assert (r["name"], r["ip"], r["mtu"]) == (f"{p}b", "192.168.77.2", 1400)
    assert f"Using interface with name {p}b and address 192.168.77.2" in r["log"]


def test_iface_by_ip_uses_that_address(host):
    ns, p = host
    r = select(ns, ifaces=["10.77.0.3"])
    assert (r["name"], r["ip"]) == (f"{p}a", "10.77.0.3")


def test_iface_list_is_tried_in_order(host):
    ns, p = host
    r = select(ns, ifaces=["nosuch0", "10.99.99.99", f"{p}ap", f"{p}b", f"{p}a"])
    assert r["name"] == f"{p}b"  # the first two do not exist, the peer has no address


def test_iface_wins_over_regex_and_can_reach(host):
    ns, p = host
    r = select(ns, ifaces=[f"{p}a"], regexes=[f"^{p}b$"], can_reach="192.168.77.9")
    assert r["name"] == f"{p}a"


def test_regex_on_names(host):
    ns, p = host
    r = select(ns, regexes=[f"^{p}b"])
    assert (r["name"], r["ip"]) == (f"{p}b", "192.168.77.2")


def test_regex_on_addresses_before_names(host):
    ns, p = host
    r = select(ns, regexes=[r"^192\.168\.77\."])
    assert (r["name"], r["ip"]) == (f"{p}b", "192.168.77.2")
    # "a" appears in no address, so the names are searched: the first named link with an address
    r = select(ns, regexes=[f"{p}a"])
    assert r["name"] == f"{p}a"


def test_regexes_after_unmatched_ifaces(host):
    ns, p = host
    r = select(ns, ifaces=["nosuch0"], regexes=["nomatch", f"{p}b$"])
    assert r["name"] == f"{p}b"


def test_can_reach_follows_the_route(host):
    ns, p = host
    assert select(ns, can_reach="192.168.77.50")["name"] == f"{p}b"  # connected
    r = select(ns, can_reach="172.30.4.4")  # via a gateway on b
    assert (r["name"], r["ip"]) == (f"{p}b", "192.168.77.2")
    assert select(ns, can_reach="8.8.8.8")["name"] == f"{p}a"  # default route; nothing is sent


def test_can_reach_after_unmatched_ifaces_and_regexes(host):
    ns, p = host
    r = select(ns, ifaces=["nosuch0"], regexes=["nomatch"], can_reach="192.168.77.50")
    assert r["name"] == f"{p}b"


def test_public_ip_overrides_the_announced_address(host):
    ns, p = host
    r = select(ns, ifaces=[f"{p}b"], public_ip="203.0.113.7")
    assert (r["ip"], r["public_ip"]) == ("192.168.77.2", "203.0.113.7")
    assert "Using 203.0.113.7 as external address" in r["log"]


def test_nothing_matches_is_an_error_naming_what_was_tried_and_what_exists(host):
    ns, p = host
    r = select(ns, ifaces=["nosuch0"], regexes=["nomatch"])
    assert r["exit_code"] == 1
    err = r["error"]
    assert "--iface nosuch0: no such interface" in err
    assert "--iface-regex 'nomatch'" in err
    assert f"{p}a(10.77.0.2, 10.77.0.3)" in err and f"{p}b(192.168.77.2)" in err


def test_bad_inputs_are_named(host):
    ns, _ = host
    assert "not an IPv4 address" in select(ns, public_ip="not-an-ip")["error"]
    assert "not a valid regular expression" in select(ns, regexes=["("])["error"]
    assert "--iface-can-reach 10.0.0: not an IPv4 address" in select(ns, can_reach="10.0.0")["error"]


def test_no_default_route_is_an_error_saying_what_to_do(bare):
    ns, p = bare
    err = select(ns)["error"]
    assert "no IPv4 default route" in err and "--iface" in err
    assert select(ns, ifaces=[f"{p}c"])["ip"] == "10.88.0.2"


def test_unreachable_can_reach_target_is_an_error(bare):
    ns, _ = bare
    err = select(ns, can_reach="172.31.0.1")["error"]
    assert "--iface-can-reach 172.31.0.1: no route to this address" in err


@pytest.fixture
def p2p() -> Iterator[tuple[str, str]]:
    """A namespace whose link has a point-to-point address (OpenVPN, GRE, PPP): 10.66.0.1 peer 10.66.0.2."""
    with one_link_namespace("p2p", "t", "10.66.0.1", "peer", "10.66.0.2/32") as made:
        yield made


def test_a_point_to_point_link_announces_its_own_address_not_the_far_end(p2p):
    ns, p = p2p
    for how in ({"ifaces": [f"{p}t"]}, {"ifaces": ["10.66.0.1"]}, {"regexes": [r"^10\.66\.0\.1$"]}):
        r = select(ns, **how)
        assert (r.get("name"), r.get("ip"), r.get("public_ip")) == (f"{p}t", "10.66.0.1", "10.66.0.1"), (how, r)
    assert "error" in select(ns, ifaces=["10.66.0.2"])  # the far end is not an address of this host
