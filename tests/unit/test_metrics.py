"""/metrics: data-path counters become labelled Prometheus series."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace
from typing import Any

from flannelpy.observe.metrics import render_metrics
from flannelpy.routes import RouteTable
from flannelpy.subnet.lease import Lease, LeaseAttrs


class _Node(SimpleNamespace):
    def counters(self) -> dict[str, int]:
        return dict(self.values)


def _scrape(values: dict[str, int]) -> str:
    node: Any = _Node(values=values, routes=RouteTable(), lease=None, config=None, last_event_at=None)
    body, ctype = render_metrics(node, SimpleNamespace(reconnects=2))
    assert ctype.startswith("text/plain")
    return body


def test_packets_bytes_and_drops_are_labelled_by_direction_and_reason() -> None:
    body = _scrape({"encap_packets": 10, "decap_packets": 7, "encap_bytes": 1000, "decap_bytes": 700,
                    "decap_drop_unknown_sender": 3, "encap_drop_ttl_expired": 1, "icmp_unreachable_sent": 2})
    assert 'flannel_packets_total{direction="encap"} 10.0' in body
    assert 'flannel_packets_total{direction="decap"} 7.0' in body
    assert 'flannel_bytes_total{direction="decap"} 700.0' in body
    assert 'flannel_drops_total{direction="decap",reason="unknown_sender"} 3.0' in body
    assert 'flannel_drops_total{direction="encap",reason="ttl_expired"} 1.0' in body
    assert 'flannel_backend_events_total{name="icmp_unreachable_sent"} 2.0' in body
    assert "flannel_etcd_reconnects_total 2.0" in body
    assert "flannel_routes 0.0" in body


def test_every_metric_name_is_prefixed_flannel() -> None:
    body = _scrape({"reconciles": 4})
    names = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("flannel_") for n in names)


def test_iptables_errors_are_counted_by_operation() -> None:
    node: Any = _Node(values={}, routes=RouteTable(), lease=None, config=None, last_event_at=None,
                      iptables_errors={"read": 3, "write": 1})
    body, _ = render_metrics(node, SimpleNamespace(reconnects=0))
    assert 'flannel_iptables_errors_total{op="read"} 3.0' in body
    assert 'flannel_iptables_errors_total{op="write"} 1.0' in body


def test_realtime_loops_are_a_gauge_only_for_a_backend_that_has_them() -> None:
    udp: Any = _Node(values={"realtime_promotions": 5}, routes=RouteTable(), lease=None, config=None,
                     last_event_at=None, backend=SimpleNamespace(realtime_threads=2))
    body, _ = render_metrics(udp, SimpleNamespace(reconnects=0))
    assert "flannel_realtime_threads 2.0" in body
    assert "flannel_realtime_refused 0.0" in body
    assert 'flannel_backend_events_total{name="realtime_promotions"} 5.0' in body
    udp.backend = SimpleNamespace(realtime_threads=0, realtime_refused="Operation not permitted (errno 1), after start")
    body, _ = render_metrics(udp, SimpleNamespace(reconnects=0))
    assert "flannel_realtime_threads 0.0" in body and "flannel_realtime_refused 1.0" in body
    vxlan: Any = _Node(values={}, routes=RouteTable(), lease=None, config=None, last_event_at=None,
                       backend=SimpleNamespace())
    body = render_metrics(vxlan, SimpleNamespace(reconnects=0))[0]
    assert "flannel_realtime_threads" not in body and "flannel_realtime_refused" not in body


def test_unrouted_leases_are_a_gauge_not_a_counter() -> None:
    # The number falls when a lease goes or becomes routable: as a counter, Prometheus would see a reset.
    node: Any = _Node(values={"reconciles": 4}, routes=RouteTable(), lease=None, config=None, last_event_at=None,
                      backend=SimpleNamespace(leases_not_routed=3))
    body, _ = render_metrics(node, SimpleNamespace(reconnects=0))
    assert "# TYPE flannel_leases_not_routed gauge" in body and "flannel_leases_not_routed 3.0" in body
    assert "leases_not_routed" not in body.split("flannel_backend_events_total", 1)[-1].split("# HELP", 1)[0]
    node.backend.leases_not_routed = 1
    assert "flannel_leases_not_routed 1.0" in render_metrics(node, SimpleNamespace(reconnects=0))[0]


def test_routes_are_the_remote_leases_the_backend_routes() -> None:
    # node.routes holds every remote lease; a udp node does not route a vxlan host's lease, for one.
    leases = [Lease(IPv4Network(f"10.5.{i}.0/24"), LeaseAttrs(IPv4Address(f"10.99.0.{i}"))) for i in (2, 3, 4)]
    node: Any = _Node(values={}, routes=RouteTable(leases), lease=None, config=None, last_event_at=None,
                      backend=SimpleNamespace(leases_not_routed=1))
    body, _ = render_metrics(node, SimpleNamespace(reconnects=0))
    assert "flannel_routes 2.0" in body and "flannel_leases_not_routed 1.0" in body
