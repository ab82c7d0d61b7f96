"""udp backend between two hosts in namespaces (root): ping, TCP bytes, ICMP net unreachable, ingress checks.

The hosts run real UdpBackends (flannel0 TUN, UDP :8285); "containers" sit behind them as with Docker's
--bip. Everything is checked the way a user would: ping, socket errors, bytes received, counters.
Each behaviour runs with the compiled data path's offloads on (TSO/GSO/GRO; both directions in one thread,
"compiled@1", and one thread each, "compiled@2") and off ("compiled-0"); ping and the TCP transfer also
with the Python data path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.netns.conftest import Pair, kill_netns, new_prefix, nsexec, sh

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def ping(ns: str, dst: str, count: int = 3, size: int = 56, interval: str = "0.2") -> subprocess.CompletedProcess[str]:
    return nsexec(ns, "ping", "-c", str(count), "-i", interval, "-W", "2", "-s", str(size), dst, check=False)


def py(ns: str, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return nsexec(ns, sys.executable, "-c", code, *args, check=False, timeout=timeout)


# Offloads on with both directions in one thread and with one thread each; offloads off (threads as the
# backend chooses for this machine).
MODES = ["compiled@1", "compiled@2", "compiled-0"]


def spawn_py(ns: str, code: str, *args: str) -> subprocess.Popen[str]:
    """A Python process in ns that prints "ready" once set up; returns after that line."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"helper in {ns} did not start: {line} {proc.stderr.read() if proc.stderr else ''}")
    return proc


@pytest.mark.parametrize("udp_pair", [*MODES, "python"], indirect=True)
def test_containers_ping_across_hosts(udp_pair: Pair) -> None:
    c1, c2 = udp_pair.containers
    if "@" in udp_pair.mode:
        assert udp_pair.nodes[0].ready["threads"] == int(udp_pair.mode.rpartition("@")[2])
    before = udp_pair.nodes[0].counters()
    assert ping(c1, udp_pair.container_ips[1]).returncode == 0
    assert ping(c2, udp_pair.container_ips[0], size=1444).returncode == 0  # fills the 1472 MTU
    counts = udp_pair.nodes[0].counters()
    assert counts["encap_packets"] - before["encap_packets"] >= 6
    assert counts["decap_packets"] - before["decap_packets"] >= 6


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_host_reaches_remote_container(udp_pair: Pair) -> None:
    # The host's own traffic leaves from flannel0's address (10.10.1.0) and the answer comes back to it.
    assert ping(udp_pair.hosts[0], udp_pair.container_ips[1]).returncode == 0


SERVER = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[2]))
s = socket.create_connection((sys.argv[1], 5201), timeout=30); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""


@pytest.mark.parametrize("udp_pair", [*MODES, "python"], indirect=True)
def test_tcp_transfer_arrives_intact(udp_pair: Pair) -> None:
    c1, c2 = udp_pair.containers
    size = 32 << 20 if udp_pair.datapath == "compiled" else 4 << 20
    server = spawn_py(c2, SERVER, udp_pair.container_ips[1])
    try:
        sent = py(c1, CLIENT, udp_pair.container_ips[1], str(size), timeout=120)
        assert sent.returncode == 0, sent.stderr
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert out.split() == sent.stdout.split()
    assert int(out.split()[0]) == size


UNREACH = r"""
import errno, socket, sys
# Linux reports ICMP net unreachable (type 3 code 0, a "soft" error) to a connected UDP socket only
# with IP_RECVERR, which resolvers set (glibc's res_send does); TCP's connect() gets it regardless.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
s.connect((sys.argv[1], 9999)); s.settimeout(0.3)
for _ in range(20):
    try:
        s.send(b"hello?")
        s.recv(100)
    except socket.timeout:
        continue
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno)); break
else:
    print("no error")
"""

CONNECT = r"""
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], 80), timeout=10)
    print("connected")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_connected_udp_socket_gets_enetunreach_for_a_subnet_without_lease(udp_pair: Pair) -> None:
    c1 = udp_pair.containers[0]
    before = udp_pair.nodes[0].counters()
    out = py(c1, UNREACH, "10.10.77.7")
    assert out.stdout.strip() == "ENETUNREACH", out.stderr
    counts = udp_pair.nodes[0].counters()
    assert counts["icmp_unreachable_sent"] > before["icmp_unreachable_sent"]
    assert counts["icmp_unreachable_write_error"] == 0
    # ping (an ICMP query) gets the error too, as from a Linux router (flanneld answers no ICMP: ping timed out).
    out = ping(c1, "10.10.77.7", count=1)
    assert out.returncode != 0 and "Destination Net Unreachable" in out.stdout, out.stdout
    after = udp_pair.nodes[0].counters()
    assert after["encap_drop_no_route"] > counts["encap_drop_no_route"]
    assert after["icmp_unreachable_sent"] > counts["icmp_unreachable_sent"]


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_tcp_connect_to_a_subnet_without_lease_fails_at_once(udp_pair: Pair) -> None:
    # Without the ICMP reaching the sender (flanneld's bug) this connect would hang until the timeout.
    out = py(udp_pair.containers[0], CONNECT, "10.10.77.7")
    assert out.stdout.strip() == "ENETUNREACH", out.stderr


LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7777)); s.settimeout(3)
print("ready", flush=True)
got = []
try:
    while True:
        data = s.recv(100); got.append(data.decode())
        if data == b"good": break
except socket.timeout:
    pass
print(" ".join(got), flush=True)
"""

INJECT = r"""
import socket, struct, sys

def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s & 0xFFFF) + (s >> 16); s += s >> 16
    return ~s & 0xFFFF

def inner(src, dst, payload):
    udp = struct.pack("!HHHH", 40000, 7777, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + udp

for outer_src, inner_src, payload in [a.split(",") for a in sys.argv[2:]]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((outer_src, 0))
    s.sendto(inner(inner_src, sys.argv[1], payload.encode()), ("10.99.0.1", 8285)); s.close()
"""


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_datagrams_from_a_host_without_lease_never_reach_the_tun(udp_pair: Pair) -> None:
    h2 = udp_pair.hosts[1]
    sh("ip", "-n", h2, "addr", "replace", "10.99.0.9/24", "dev", "eth0")  # a host on the link with no lease
    before = udp_pair.nodes[0].counters()
    listener = spawn_py(udp_pair.containers[0], LISTEN, udp_pair.container_ips[0])
    try:
        sent = py(h2, INJECT, udp_pair.container_ips[0],
                  "10.99.0.9,10.10.2.2,nolease",  # from a host that holds no lease
                  "10.99.0.2,10.10.9.9,spoofed",  # the lease holder, with a source outside its subnet
                  "10.99.0.2,10.10.2.2,good")  # the lease holder, from its own subnet: accepted
        assert sent.returncode == 0, sent.stderr
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert out.split() == ["good"]
    counts = udp_pair.nodes[0].counters()
    assert counts["decap_drop_unknown_sender"] - before["decap_drop_unknown_sender"] == 1
    assert counts["decap_drop_spoofed_source"] - before["decap_drop_spoofed_source"] == 1


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_route_changes_do_not_disturb_other_flows(udp_pair: Pair) -> None:
    """Leases for other subnets come and go while c1 pings c2: not one ping is lost."""
    node = udp_pair.nodes[0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            i = 0
            while not stop.is_set():
                lease = (f"10.10.{100 + i % 50}.0/24", f"10.99.0.{100 + i % 7}", None)
                node.apply(added=[lease])
                if i % 3 == 0:
                    node.apply(removed=[lease])
                i += 1
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    try:
        out = ping(udp_pair.containers[0], udp_pair.container_ips[1], count=100, interval="0.01")
    finally:
        stop.set()
        t.join()
    assert not errors
    assert " 100 received" in out.stdout, out.stdout
    node.apply(added=[udp_pair.lease(1)])  # still the route it was
    assert ping(udp_pair.containers[0], udp_pair.container_ips[1], count=1).returncode == 0


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_iperf3_tcp_over_the_udp_backend(udp_pair: Pair) -> None:
    """Throughput is reported, not judged: the pass criterion is that iperf3 moves data both ways."""
    c1, c2 = udp_pair.containers
    server = subprocess.Popen(["ip", "netns", "exec", c2, "iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if nsexec(c2, "ss", "-ltn", "sport = :5201", check=False).stdout.count("LISTEN"):
                break
            time.sleep(0.1)
        out = nsexec(c1, "iperf3", "-c", udp_pair.container_ips[1], "-t", "3", "-J", check=False, timeout=60)
        result = json.loads(out.stdout)
        assert "error" not in result, result.get("error")
        received = result["end"]["sum_received"]
        assert received["bytes"] > 0
        sys.stderr.write(f"iperf3 {udp_pair.datapath} (offloads {udp_pair.nodes[0].ready['offloads']}): "
                         f"{received['bits_per_second'] / 1e9:.2f} Gbit/s\n")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()



UDP_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7778)); s.settimeout(2)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
print("ready", flush=True)
got = []
try:
    while True:
        got.append(s.recv(65536))
except socket.timeout:
    pass
# Each datagram was one 4-byte number repeated: any merge, split or damage shows.
intact = all(len(g) == 1200 and g == g[:4] * 300 for g in got)
print(len(got), len({g[:4] for g in got}), intact, flush=True)
"""

UDP_BURST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(400):  # back to back: the sending data path takes them in batches, the receiving one coalesces
    s.sendto(i.to_bytes(4, "big") * 300, (sys.argv[1], 7778))
"""


def tun_rx_packets(ns: str) -> int:
    link = json.loads(nsexec(ns, "ip", "-s", "-j", "link", "show", "flannel0").stdout)[0]
    return int(link["stats64"]["rx"]["packets"])


@pytest.mark.parametrize("udp_pair", MODES, indirect=True)
def test_bursts_of_udp_datagrams_arrive_whole_and_separate(udp_pair: Pair) -> None:
    """With offloads on, equal-size datagrams of one flow reach the TUN as UDP super-packets; the kernel
    must hand the container every datagram as it was sent, boundaries included."""
    c1, c2 = udp_pair.containers
    before, writes = udp_pair.nodes[1].counters(), tun_rx_packets(udp_pair.hosts[1])
    sink = spawn_py(c2, UDP_SINK, udp_pair.container_ips[1])
    try:
        sent = py(c1, UDP_BURST, udp_pair.container_ips[1])
        assert sent.returncode == 0, sent.stderr
        out, _ = sink.communicate(timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    after, writes = udp_pair.nodes[1].counters(), tun_rx_packets(udp_pair.hosts[1]) - writes
    delivered = after["decap_packets"] - before["decap_packets"]
    count, distinct, intact = out.split()
    assert intact == "True" and int(distinct) == int(count), out
    assert int(count) == delivered > 0  # UDP may lose datagrams on the way in, never after the daemon
    assert after["decap_drop_write_error"] == before["decap_drop_write_error"]
    if udp_pair.nodes[1].ready["offloads"] == "tso,gso,gro":
        assert writes < delivered  # coalesced
    else:
        assert writes == delivered


CONGESTED = r"""
import json, socket, sys, time
from ipaddress import IPv4Network
from flannelpy.backend.udp.fake import FakeNode
from fastpath import offload as ol
from tests.unit.test_offload import tcp_packet

net = IPv4Network("10.10.0.0/16")
kind, threads, gso = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "gso"
a = FakeNode(kind, net, 24, IPv4Network("10.10.1.0/24"), "10.99.0.1", 8285, offload=gso, threads=threads)
b = FakeNode(kind, net, 24, IPv4Network("10.10.2.0/24"), "127.0.0.3", 8285, offload=gso, threads=threads)
assert a.offloads.gso == gso
a.route(b)
b.route(a)
# C's subnet lies behind a 16 kbit/s link: A's socket send buffer fills within a second.
a.table.set(int(IPv4Network("10.10.9.0/24").network_address), int.from_bytes(socket.inet_aton("10.99.0.2"), "big"))
a.tun.kernel.settimeout(0.2)
# With GSO, TCP super-packets of 4 segments: each goes out as one message of 4 datagrams.
pkt = tcp_packet(b"y" * (4 * 1400 if gso else 1400), dst="10.10.9.3")
vnet = ol.vnet_header(ol.F_NEEDS_CSUM, ol.GSO_TCPV4, 40, 1400, 20, 16) if gso else b""
end = time.monotonic() + 2.5
while time.monotonic() < end:
    try:
        a.tun.kernel.send(vnet + pkt)
    except TimeoutError:
        pass
before = a.core.counters()["decap_packets"]
for i in range(5):  # B -> A over the loopback, which is not congested
    b.tun.inject(tcp_packet(b"hello", src="10.10.2.3", dst="10.10.1.2", seq=i))
got = [a.tun.receive(3.0) for _ in range(5)]
t0 = time.monotonic()
a.datapath.stop()
for t in a.threads:
    t.join(10)
print(json.dumps({"delivered": sum(p is not None for p in got),
                  "decap": a.core.counters()["decap_packets"] - before,
                  "dropped": a.core.counters()["encap_drop_send_error"],
                  "encap": a.core.counters()["encap_packets"],
                  "stopped_in": round(time.monotonic() - t0, 1), "alive": [t.is_alive() for t in a.threads]}))
b.stop()
"""


@pytest.mark.parametrize(("kind", "threads", "gso"), [("compiled", 1, ""), ("compiled", 2, ""), ("python", 2, ""),
                                                    ("compiled", 1, "gso")])
def test_a_congested_peer_holds_up_neither_other_traffic_nor_stop(kind: str, threads: int, gso: str) -> None:
    """The way to one peer is slower than what is sent to it: the socket's send buffer fills. Sends never
    block, so packets from other peers still arrive and stop() is seen at once; what does not fit is a
    counted send_error drop, as with a full qdisc (with GSO: every datagram of a message that did not go)."""
    ns = new_prefix() + "cg"
    sh("ip", "netns", "add", ns)
    try:
        nsexec(ns, "ip", "link", "set", "lo", "up")
        nsexec(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        nsexec(ns, "ip", "addr", "add", "10.99.0.1/24", "dev", "v0")
        nsexec(ns, "ip", "link", "set", "v0", "up")
        nsexec(ns, "ip", "link", "set", "v1", "up")
        nsexec(ns, "ip", "neigh", "add", "10.99.0.2", "lladdr", "02:00:00:00:00:02", "dev", "v0", "nud", "permanent")
        nsexec(ns, "tc", "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "16kbit", "burst", "1600",
               "limit", "40mb")
        out = nsexec(ns, sys.executable, "-c", CONGESTED, kind, str(threads), gso or "-", check=False,
                     timeout=90)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["delivered"] == result["decap"] == 5, result
        # Stopped within the 10 s join (a loop blocked in a send took 20 s and more).
        assert result["dropped"] > 0 and result["alive"] == [False] * threads, result
        # Nearly all of it was dropped (the link passed ~5 KB, the send buffer holds a few hundred KB);
        # counting a refused GSO message once instead of per datagram would leave most of it "sent".
        assert result["encap"] - result["dropped"] < result["encap"] // 2, result
    finally:
        kill_netns(ns)
