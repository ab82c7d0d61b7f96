"""The udp backend's TUN device (flannel0): opened with TUNSETIFF, configured through pyroute2.

As flanneld: IFF_TUN | IFF_NO_PI, address `<subnet>.0/32`, the backend MTU, up, and one route for the
whole Network through the device. The device is not persistent: closing the fd removes it, together
with its address and route.

With offloads (see offload.py) the device is also opened with IFF_VNET_HDR (every read and write
carries a virtio_net_hdr) and TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4), so that the kernel hands over
64 KB TCP super-packets. TSO6 is not asked for: the flannel network is IPv4 and IPv6 packets are
dropped, one by one as without offloads. A kernel that refuses either keeps working without it.

Unlike flanneld's, the device gets no queueing discipline (noqueue), like the kernel's own tunnels (vxlan,
ipip): the TUN driver never stops its queue (a full ring drops), so a qdisc only adds a lock and an
enqueue/dequeue per packet. Measured: one TCP stream +10%, four +6% (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannelpy.errors import FlannelError

log = structlog.get_logger()

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
IFNAMSIZ = 16


class TunError(FlannelError):
    """The TUN device could not be created or configured."""


def open_tun(name: str, vnet_hdr: bool = False) -> tuple[int, str]:
    """Open a TUN device (non-blocking fd) named `name`, with IFF_VNET_HDR if asked; returns (fd, the
    kernel's name)."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
        raise TunError(f"TUN device name {name!r} is invalid: 1..15 characters, no '/' or spaces")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
    except PermissionError:
        raise TunError("cannot open /dev/net/tun: run as root or with CAP_NET_ADMIN") from None
    except OSError as e:  # ENODEV: a device node without the tun driver behind it
        raise TunError(f"cannot open /dev/net/tun: {e.strerror}; is the tun module loaded (modprobe tun)?") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0))
        out = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            raise TunError(
                f"TUN device {name} is in use: is another flanneld/flannelpy running on this host?"
            ) from None
        if e.errno == errno.EPERM:
            raise TunError(f"cannot create TUN device {name}: run as root or with CAP_NET_ADMIN") from None
        if e.errno == errno.EINVAL:
            raise TunError(
                f"cannot create TUN device {name}: a device of another kind has that name; remove it "
                f"(ip link del {name}) or choose another name"
            ) from None
        raise TunError(f"cannot create TUN device {name}: {e.strerror}") from None
    kernel_name = out[:IFNAMSIZ].rstrip(b"\0").decode()
    return fd, kernel_name


def _no_ipv6(name: str) -> None:
    """IPv6 off on flannel0 before it comes up: the udp backend carries IPv4 only, and the kernel's own
    router solicitations and MLD reports from a link-local address would be the first packets the data path
    reads (counted as not_ipv4 drops on an idle node). Kernels without IPv6 have nothing to turn off."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")


def _no_qdisc(ipr: IPRoute, index: int, name: str) -> str:
    """Replace the root qdisc the kernel attached on up with noqueue; returns the qdisc left on the device.
    A kernel that refuses keeps its default (logged): the device works either way."""
    try:
        ipr.tc("replace", "noqueue", index, 0)
        return "noqueue"
    except NetlinkError as e:
        try:
            kinds = [m.get_attr("TCA_KIND") for m in ipr.get_qdiscs(index=index) if m["parent"] == 0xFFFFFFFF]
        except NetlinkError:
            kinds = []
        kept = kinds[0] if kinds else "unknown"
        log.warning("TUN device keeps its default qdisc", device=name, qdisc=kept, error=os.strerror(e.code))
        return kept


class TunDevice:
    """flannel0: the fd the data path reads and writes, and its netlink configuration."""

    def __init__(self, fd: int, name: str, index: int, vnet_hdr: bool = False, tso: bool = False) -> None:
        self.fd = fd
        self.name = name
        self.index = index
        self.vnet_hdr = vnet_hdr  # reads and writes carry a virtio_net_hdr
        self.tso = tso  # the kernel may hand over TCP super-packets (TUN_F_TSO4)

    @classmethod
    def create(cls, name: str, address: IPv4Address, mtu: int, network: IPv4Network, *,
               vnet_hdr: bool = False, tso: bool = False) -> TunDevice:
        """vnet_hdr: open with IFF_VNET_HDR; tso: also TUNSETOFFLOAD(CSUM | TSO4). What the kernel refuses
        is left off and logged (the returned device says what it got)."""
        try:
            fd, kname = open_tun(name, vnet_hdr)
        except TunError:
            if not vnet_hdr:
                raise
            fd, kname = open_tun(name)
            log.warning("TUN offloads unavailable, running without", device=name, refused="IFF_VNET_HDR")
            vnet_hdr = tso = False
        if tso:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
            except OSError as e:
                log.warning("TUN offloads unavailable, running without", device=kname, refused="TUNSETOFFLOAD",
                            error=e.strerror)
                tso = False
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=kname)
                if not found:
                    raise TunError(f"TUN device {kname} vanished right after it was created")
                index = found[0]
                ipr.link("set", index=index, mtu=mtu)
                # A device left over by a crash (persistent TUN) may still hold an old address.
                for msg in ipr.get_addr(index=index, family=2):
                    old = msg.get_attr("IFA_ADDRESS")
                    if old != str(address):
                        ipr.addr("del", index=index, address=old, prefixlen=msg["prefixlen"])
                try:
                    ipr.addr("add", index=index, address=str(address), prefixlen=32)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                _no_ipv6(kname)
                ipr.link("set", index=index, state="up")
                qdisc = _no_qdisc(ipr, index, kname)
                ipr.route("replace", dst=str(network.network_address), dst_len=network.prefixlen, oif=index)
        except NetlinkError as e:
            os.close(fd)
            raise TunError(f"cannot configure TUN device {kname}: {os.strerror(e.code)} (netlink)") from None
        except BaseException:
            os.close(fd)
            raise
        log.info("TUN device ready", device=kname, address=f"{address}/32", mtu=mtu, route=str(network),
                 vnet_hdr=vnet_hdr, tso=tso, qdisc=qdisc)
        return cls(fd, kname, index, vnet_hdr, tso)

    def close(self) -> None:
        """Close the fd; the kernel removes the (non-persistent) device, its address and route."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        try:
            with IPRoute() as ipr:
                if ipr.link_lookup(ifname=self.name):
                    ipr.link("del", ifname=self.name)  # a persistent device left by someone else
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                log.warning("TUN device removal failed", device=self.name, error=os.strerror(e.code))
