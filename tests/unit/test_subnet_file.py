"""The subnet file: flanneld's exact bytes, atomic replacement, tolerant reading."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Network

import pytest

from flannelpy.config import parse_config
from flannelpy.host.subnet_file import (
    parse_env,
    previous_subnet,
    read_subnet_file,
    render_subnet_file,
    write_subnet_file,
)
from flannelpy.subnet.lease import Lease

LEASE = Lease.from_kv("10.5.58.0-24", b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')


def test_ipv4_file_is_byte_identical_to_flanneld(tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    assert path.read_bytes() == (
        b"FLANNEL_NETWORK=10.5.0.0/16\n"
        b"FLANNEL_SUBNET=10.5.58.1/24\n"
        b"FLANNEL_MTU=1472\n"
        b"FLANNEL_IPMASQ=true\n"
    )


def test_ipmasq_false_and_other_mtu():
    text = render_subnet_file(parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1450, False)
    assert text.splitlines()[-2:] == ["FLANNEL_MTU=1450", "FLANNEL_IPMASQ=false"]


def test_dual_stack_adds_ipv6_lines_after_ipv4():
    config = parse_config('{"Network":"10.6.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:6::/56"}')
    lease = Lease.from_kv("10.6.85.0-24&fd00:6:0:2f::-64", b'{"PublicIP":"10.99.0.1","PublicIPv6":null}')
    assert render_subnet_file(config, lease, 1472, True) == (
        "FLANNEL_NETWORK=10.6.0.0/16\n"
        "FLANNEL_SUBNET=10.6.85.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:6::/56\n"
        "FLANNEL_IPV6_SUBNET=fd00:6:0:2f::1/64\n"
        "FLANNEL_MTU=1472\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_ipv6_enabled_with_an_ipv4_only_lease_writes_the_ipv4_lines():
    # flannelpy leases IPv4 only: the file says what the host has, no FLANNEL_IPV6_* it does not hold.
    config = parse_config('{"Network":"10.6.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:6::/56"}')
    assert render_subnet_file(config, LEASE, 1472, True) == (
        "FLANNEL_NETWORK=10.6.0.0/16\n"
        "FLANNEL_SUBNET=10.5.58.1/24\n"
        "FLANNEL_MTU=1472\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_parent_directory_is_created_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    assert path.is_file()
    assert sorted(os.listdir(path.parent)) == ["subnet.env"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_rewrite_replaces_the_file_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text("old contents that are longer than the new file will be " * 10)
    path.chmod(0o600)
    old_inode = path.stat().st_ino
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    assert read_subnet_file(path)["FLANNEL_SUBNET"] == "10.5.58.1/24"
    assert path.stat().st_ino != old_inode  # renamed into place, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_file_another_user_planted_lends_no_permissions(tmp_path):
    # In a shared directory another user creates subnet.env with mode 0666 before us: the root-owned file that
    # replaces it must not stay writable for that user (it is sourced by shells as root).
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a file of another user")
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_MTU=1472\n")
    os.chown(path, 65534, 65534)  # nobody
    path.chmod(0o666)
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    st = path.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644


def test_group_and_others_never_get_write_access(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text("x\n")
    path.chmod(0o666)  # ours, but too open
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_symlink_in_place_of_the_file_lends_no_permissions(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x\n")
    target.chmod(0o755)
    path = tmp_path / "subnet.env"
    path.symlink_to(target)
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert target.read_text() == "x\n"  # the link's target untouched


def test_previous_subnet_reads_back_what_was_written(tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_file(path, parse_config('{"Network":"10.5.0.0/16"}'), LEASE, 1472, True)
    assert previous_subnet(path) == IPv4Network("10.5.58.0/24")


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing file
        b"",
        b"FLANNEL_NETWORK=10.5.0.0/16\n",  # no FLANNEL_SUBNET
        b"FLANNEL_SUBNET=banana\n",
        b"FLANNEL_SUBNET=10.5.58.1\n",  # no prefix length
        b"FLANNEL_SUBNET=10.5.58.1/99\n",
        b"\xff\xfe\x00garbage\x00",
    ],
)
def test_previous_subnet_is_none_for_missing_or_garbage_files(tmp_path, content):
    path = tmp_path / "subnet.env"
    if content is not None:
        path.write_bytes(content)
    assert previous_subnet(path) is None


def test_previous_subnet_of_a_directory_is_none(tmp_path):
    assert previous_subnet(tmp_path) is None


def test_reader_accepts_what_a_shell_would_source():
    env = parse_env(
        "# written by hand\n"
        "export FLANNEL_SUBNET='10.5.58.1/24'\n"
        'FLANNEL_MTU="1472"\n'
        "\n"
        "not an assignment\n"
        "1BAD=x\n"
        "FLANNEL_IPMASQ=true\n"
    )
    assert env == {"FLANNEL_SUBNET": "10.5.58.1/24", "FLANNEL_MTU": "1472", "FLANNEL_IPMASQ": "true"}
