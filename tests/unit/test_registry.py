"""Pure parts of the etcd registry: endpoint parsing and prefix ranges."""

from __future__ import annotations

import pytest

from flannelpy.subnet.registry import RegistryError, parse_endpoints, prefix_range_end


def test_endpoint_forms() -> None:
    eps = parse_endpoints(["http://10.0.0.1:2379", "https://etcd.example:2380", "10.0.0.3:2379", "10.0.0.4"],
                          tls=False)
    assert [(e.target, e.secure) for e in eps] == [
        ("10.0.0.1:2379", False), ("etcd.example:2380", True), ("10.0.0.3:2379", False), ("10.0.0.4:2379", False)]
    assert parse_endpoints(["10.0.0.3:2379"], tls=True)[0].secure  # certificates given: TLS
    assert parse_endpoints(["http://[fd00::1]:2379"], tls=False)[0].target == "[fd00::1]:2379"
    assert parse_endpoints(["http://10.0.0.1"], tls=False)[0].target == "10.0.0.1:2379"


@pytest.mark.parametrize(("endpoints", "match"), [
    ([], "no etcd endpoints"),
    (["  "], "no etcd endpoints"),
    (["ftp://10.0.0.1:2379"], "use http://HOST:PORT"),
    (["http://10.0.0.1:port"], "port is not a number"),
])
def test_bad_endpoints(endpoints: list[str], match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        parse_endpoints(endpoints, tls=False)


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/coreos.com/network/subnets/") == b"/coreos.com/network/subnets0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_a_password_or_tls_files_with_an_http_endpoint_are_warned_about() -> None:
    # http:// is plaintext whatever else is given: the password would cross the network in the clear.
    from structlog.testing import capture_logs

    from flannelpy.subnet.registry import EtcdRegistry

    with capture_logs() as logs:
        EtcdRegistry(["http://127.0.0.1:2379", "https://127.0.0.2:2379"], username="flannel", password="secret")
        EtcdRegistry(["http://127.0.0.1:2379"])
        EtcdRegistry(["127.0.0.1:2379"], username="flannel", password="secret")  # no scheme, no TLS files
    warned = [e for e in logs if e["event"].startswith("etcd endpoints without TLS")]
    assert [e["endpoints"] for e in warned] == ["http://127.0.0.1:2379", "127.0.0.1:2379"]
