"""The subnet file (`--subnet-file`, default /run/flannel/subnet.env), byte for byte as flanneld writes it.

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.58.1/24
    FLANNEL_MTU=1472
    FLANNEL_IPMASQ=true

plus FLANNEL_IPV6_NETWORK / FLANNEL_IPV6_SUBNET after the IPv4 lines when IPv6 is enabled and the lease
has an IPv6 subnet (flannelpy leases IPv4 only; a dual-stack lease of flanneld's it reuses has one). Docker
(through mk-docker-opts) and CNI read it; the subnet manager reads FLANNEL_SUBNET back on restart.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from ipaddress import IPv4Network
from pathlib import Path

import structlog

from flannelpy.config import NetworkConfig
from flannelpy.subnet.lease import Lease

log = structlog.get_logger()

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def render_subnet_file(config: NetworkConfig, lease: Lease, mtu: int, ipmasq: bool) -> str:
    """The file's text; FLANNEL_SUBNET is the lease's first address with the lease's prefix length."""
    lines: list[str] = []
    if config.enable_ipv4:
        if config.network is None:
            raise ValueError("IPv4 is enabled but the network config has no Network")
        lines.append(f"FLANNEL_NETWORK={config.network}")
        lines.append(f"FLANNEL_SUBNET={lease.subnet.network_address + 1}/{lease.subnet.prefixlen}")
    # flannelpy leases IPv4 only (said at start): IPv6 lines only for a dual-stack lease it reused.
    if config.enable_ipv6 and config.ipv6_network is not None and lease.ipv6_subnet is not None:
        v6 = lease.ipv6_subnet
        lines.append(f"FLANNEL_IPV6_NETWORK={config.ipv6_network}")
        lines.append(f"FLANNEL_IPV6_SUBNET={v6.network_address + 1}/{v6.prefixlen}")
    lines.append(f"FLANNEL_MTU={mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}")
    return "\n".join(lines) + "\n"


def write_text_atomically(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path`, fsync the directory.

    Readers see either the old file or the whole new one, never a partial write. An existing file's
    permissions are kept (flanneld does the same).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        # Only a regular file of ours lends its permissions (not a symlink's target, not a file another user
        # made in a shared directory), and never write access for others: the file is sourced by shells.
        st = target.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            mode = stat.S_IMODE(st.st_mode)
    mode &= ~0o022
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(dir_fd)


def write_subnet_file(
    path: str | os.PathLike[str], config: NetworkConfig, lease: Lease, mtu: int, ipmasq: bool
) -> None:
    write_text_atomically(path, render_subnet_file(config, lease, mtu, ipmasq))
    log.info(f"Wrote subnet file to {path}", path=str(path), subnet=str(lease.subnet), mtu=mtu)


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as a shell would source them: comments, blank lines and `export ` allowed,
    one level of matching quotes stripped. Lines that are not assignments are ignored."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not _NAME.fullmatch(key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def read_subnet_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's variables; empty when the file is missing, unreadable or not text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return parse_env(text)


def previous_subnet(path: str | os.PathLike[str]) -> IPv4Network | None:
    """The subnet recorded by an earlier run (FLANNEL_SUBNET with host bits masked), or None."""
    value = read_subnet_file(path).get("FLANNEL_SUBNET")
    if not value:
        return None
    try:
        if "/" not in value:
            raise ValueError("no prefix length")
        return IPv4Network(value, strict=False)
    except ValueError:
        log.warning("subnet file has an unreadable FLANNEL_SUBNET; ignoring it", path=str(path), value=value)
        return None
