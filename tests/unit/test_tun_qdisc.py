"""flannel0's queueing discipline: noqueue when the kernel takes it, its default kept (and said once) when not.
The netns test (test_udp_backend.py) checks the real device; this one the refusal, which a kernel here won't do."""

from __future__ import annotations

import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from structlog.testing import capture_logs

from flannelpy.backend.udp.device import _no_qdisc


class _Qdisc(dict[str, Any]):
    def __init__(self, kind: str, parent: int) -> None:
        super().__init__(parent=parent)
        self.kind = kind

    def get_attr(self, name: str) -> str | None:
        return self.kind if name == "TCA_KIND" else None


class _IPRoute:
    def __init__(self, refuse: int | None, dump_fails: bool = False) -> None:
        self.refuse = refuse
        self.dump_fails = dump_fails
        self.calls: list[tuple[Any, ...]] = []

    def tc(self, *args: Any) -> None:
        self.calls.append(args)
        if self.refuse is not None:
            raise NetlinkError(self.refuse)

    def get_qdiscs(self, index: int) -> list[_Qdisc]:
        if self.dump_fails:
            raise NetlinkError(errno.EBUSY)
        return [_Qdisc("pfifo_fast", 0xFFFFFFFF), _Qdisc("ingress", 0xFFFFFFF1)]


def test_noqueue_replaces_the_root_qdisc() -> None:
    ipr = _IPRoute(refuse=None)
    with capture_logs() as logs:
        assert _no_qdisc(ipr, 7, "flannel0") == "noqueue"
    assert ipr.calls == [("replace", "noqueue", 7, 0)]
    assert logs == []


def test_a_refusing_kernel_keeps_the_default_and_says_so() -> None:
    ipr = _IPRoute(refuse=errno.EOPNOTSUPP)
    with capture_logs() as logs:
        assert _no_qdisc(ipr, 7, "flannel0") == "pfifo_fast"
    assert [(e["event"], e["qdisc"], e["log_level"]) for e in logs] == [
        ("TUN device keeps its default qdisc", "pfifo_fast", "warning")]
    assert "not supported" in logs[0]["error"]


def test_a_failing_qdisc_dump_after_a_refusal_still_leaves_a_working_device() -> None:
    ipr = _IPRoute(refuse=errno.EOPNOTSUPP, dump_fails=True)
    with capture_logs() as logs:
        assert _no_qdisc(ipr, 7, "flannel0") == "unknown"
    assert [(e["event"], e["qdisc"]) for e in logs] == [("TUN device keeps its default qdisc", "unknown")]
