"""What the udp backend puts on the host network (root): each datagram is UDP 8285 -> 8285 carrying
exactly one inner IPv4 packet, as flanneld sends and expects. Captured with an AF_PACKET socket on
the host's link inside its namespace, with offloads off and on.

With offloads on, the sender hands the kernel up to 64 datagrams at once (UDP GSO); a veth would carry
them to the other namespace unsegmented, as one buffer, and the capture would see that buffer. A real
NIC segments them; here the kernel is made to (tx-udp-segmentation off on both hosts' eth0), so the
capture sees the datagrams that a wire would carry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.netns.conftest import Pair
from tests.netns.test_udp_datapath import CLIENT, SERVER, ping, py, spawn_py

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

CAPTURE = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL: both directions
s.bind(("eth0", 0)); s.settimeout(0.2)
print("ready", flush=True)
frames = []
while True:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        if sys.stdin in __import__("select").select([sys.stdin], [], [], 0)[0]:
            break
        continue
    ip = frame[14:]
    if frame[12:14] != b"\x08\x00" or len(ip) < 28 or ip[9] != 17:
        continue
    ihl = (ip[0] & 15) * 4
    sport, dport, ulen = struct.unpack("!HHH", ip[ihl:ihl + 6])
    payload = ip[ihl + 8: ihl + ulen]
    frames.append({"src": socket.inet_ntoa(ip[12:16]), "dst": socket.inet_ntoa(ip[16:20]), "sport": sport,
                   "dport": dport, "payload_len": len(payload), "udp_len": ulen,
                   "inner_version": payload[0] >> 4 if payload else None,
                   "inner_total": int.from_bytes(payload[2:4], "big") if len(payload) >= 4 else None,
                   "inner_src": socket.inet_ntoa(payload[12:16]) if len(payload) >= 20 else None})
print(json.dumps(frames), flush=True)
"""


NO_UDP_SEGMENTATION = r"""
from pyroute2.ethtool import Ethtool
e = Ethtool()
features = e.get_features("eth0")
features.features["tx-udp-segmentation"].enable = False
e.set_features("eth0", features)
assert not e.get_features("eth0").features["tx-udp-segmentation"].enable
"""


@pytest.mark.parametrize("udp_pair", ["compiled-0", "compiled-1"], indirect=True)
def test_each_datagram_carries_exactly_one_inner_packet_port_8285(udp_pair: Pair) -> None:
    c1, c2 = udp_pair.containers
    offloads = {n.ready["offloads"] for n in udp_pair.nodes}
    if udp_pair.nodes[0].spec["offload"] == "1":
        if offloads != {"tso,gso,gro"}:
            pytest.skip(f"this kernel refuses some udp offloads: {offloads}")
        for host in udp_pair.hosts:
            out = py(host, NO_UDP_SEGMENTATION)
            assert out.returncode == 0, out.stderr
    else:
        assert offloads == {"off"}
    cap = subprocess.Popen(["ip", "netns", "exec", udp_pair.hosts[0], sys.executable, "-c", CAPTURE],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
        for size in (0, 56, 1000, 1444):
            assert ping(c1, udp_pair.container_ips[1], count=2, size=size).returncode == 0
        server = spawn_py(c2, SERVER, udp_pair.container_ips[1])
        assert py(c1, CLIENT, udp_pair.container_ips[1], str(2 << 20)).returncode == 0
        server.communicate(timeout=30)
        out, err = cap.communicate("stop\n", timeout=30)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    frames = json.loads(out.strip().splitlines()[-1])
    tunnel = [f for f in frames if {f["src"], f["dst"]} == set(udp_pair.public_ips)]
    assert len(tunnel) > 100, f"too little captured: {len(tunnel)} datagrams ({err})"
    for f in tunnel:
        assert (f["sport"], f["dport"]) == (8285, 8285), f
        assert f["inner_version"] == 4, f
        assert f["payload_len"] == f["udp_len"] - 8 == f["inner_total"], f
    assert {f["inner_src"] for f in tunnel} == set(udp_pair.container_ips)
    biggest = max(f["inner_total"] for f in tunnel)
    assert biggest == udp_pair.nodes[0].ready["mtu"] == 1472  # full-size packets fill the TUN MTU, no more
