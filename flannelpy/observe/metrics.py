"""Prometheus metrics, prefixed flannel_, collected from the node at scrape time."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flannelpy import __version__
from flannelpy.observe.log import lines_lost

# Data-path counter names: encap_packets, decap_bytes, encap_drop_no_route, decap_drop_unknown_sender, ...
_COUNTER = re.compile(r"(?P<direction>encap|decap)_(?:(?P<what>packets|bytes)|drop_(?P<reason>\w+))")


class NodeCollector:
    def __init__(self, node: Any, registry: Any) -> None:
        self.node = node
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        node = self.node
        counters: dict[str, int] = node.counters()
        # Counted when a packet passes the checks, before the system call: a send or write the kernel then
        # refuses is also a send_error/write_error drop. Counting after it would need a decrement, and a
        # Prometheus counter must never go down.
        packets = CounterMetricFamily("flannel_packets", "Packets the data path passed on (encap: to peers, "
                                      "decap: from peers), send_error/write_error drops included",
                                      labels=["direction"])
        nbytes = CounterMetricFamily("flannel_bytes", "Bytes of the packets in flannel_packets_total",
                                     labels=["direction"])
        drops = CounterMetricFamily("flannel_drops", "Packets dropped by the data path, by reason",
                                    labels=["direction", "reason"])
        other = CounterMetricFamily("flannel_backend_events", "Other backend counters (ICMP sent, "
                                    "reconciliations, routes programmed, ...)", labels=["name"])
        for key, value in sorted(counters.items()):
            m = _COUNTER.fullmatch(key)
            if m is None:
                other.add_metric([key], value)
            elif m["reason"]:
                drops.add_metric([m["direction"], m["reason"]], value)
            elif m["what"] == "packets":
                packets.add_metric([m["direction"]], value)
            else:
                nbytes.add_metric([m["direction"]], value)
        yield packets
        yield nbytes
        yield drops
        yield other
        backend = getattr(node, "backend", None)
        unrouted = getattr(backend, "leases_not_routed", None) if backend else None
        # node.routes holds every remote lease; the backend may leave some out (another backend type, ...).
        yield GaugeMetricFamily("flannel_routes", "Remote leases routed",
                                value=len(node.routes) - (unrouted or 0))
        ttl = GaugeMetricFamily("flannel_lease_ttl_seconds", "Seconds until our lease expires (-1: reservation)")
        if node.lease is not None:
            exp = node.lease.expiration
            ttl.add_metric([], -1 if exp is None else max(0.0, exp - time.time()))
        yield ttl
        yield CounterMetricFamily("flannel_etcd_reconnects", "Reconnections to etcd",
                                  value=getattr(self.registry, "reconnects", 0))
        ipt = CounterMetricFamily("flannel_iptables_errors", "iptables/nft commands that failed (read: the rules "
                                  "could not be listed, checked again at the next resync; write: not installed)",
                                  labels=["op"])
        for op, n in sorted((getattr(node, "iptables_errors", None) or {}).items()):
            ipt.add_metric([op], n)
        yield ipt
        # The one place a broken log stream shows: its own lines are what is lost.
        yield CounterMetricFamily("flannel_log_lines_lost", "Log lines that could not be written (stderr closed "
                                  "or full); the daemon goes on without them", value=lines_lost())
        lag = GaugeMetricFamily("flannel_watch_lag_seconds", "Seconds since the last lease batch was applied")
        if node.last_event_at is not None:
            lag.add_metric([], time.time() - node.last_event_at)
        yield lag
        if unrouted is not None:
            yield GaugeMetricFamily("flannel_leases_not_routed", "Remote leases the backend does not route now "
                                    "(the log says why, once per lease)", value=unrouted)
        realtime = getattr(backend, "realtime_threads", None) if backend else None
        if realtime is not None:
            yield GaugeMetricFamily("flannel_realtime_threads", "udp data-path loops running under SCHED_RR now "
                                    "(FLANNELPY_UDP_RTPRIO)", value=realtime)
            # Without this a refusal after start shows only as 0 threads, which is also what an idle path shows.
            yield GaugeMetricFamily("flannel_realtime_refused", "1 if the kernel refused SCHED_RR to the udp data "
                                    "path (it runs under normal scheduling; the log says why)",
                                    value=1 if getattr(backend, "realtime_refused", None) else 0)
        info = InfoMetricFamily("flannel_backend", "Backend in use")
        if node.config is not None:
            info.add_metric([], {"type": node.config.backend.type, "version": __version__,
                                 "subnet": str(node.lease.subnet) if node.lease else ""})
        yield info


def render_metrics(node: Any, registry: Any) -> tuple[str, str]:
    reg = CollectorRegistry()
    reg.register(NodeCollector(node, registry))
    return generate_latest(reg).decode(), CONTENT_TYPE_LATEST
