"""Type stubs for fastpath.io (compiled): the udp backend's batched I/O loops."""

from fastpath.core import PacketCore

DEFAULT_BATCH: int
MAX_BATCH: int

class Datapath:
    core: PacketCore
    tun_fd: int
    udp_fd: int
    port: int
    batch: int
    bufsize: int
    vnet_hdr: bool
    gso: bool
    gro: bool
    gso_error: int
    auto_rtprio: int
    rt_threads: int
    rt_promotions: int
    rt_error: int
    def __init__(self, core: PacketCore, tun_fd: int, udp_fd: int, port: int, batch: int = 64, *,
                 vnet_hdr: bool = False, gso: bool = False, gro: bool = False, auto_rtprio: int = 0) -> None: ...
    def stop(self) -> None: ...
    def run(self) -> None: ...
    def run_encap(self) -> None: ...
    def run_decap(self) -> None: ...

def rt_decisions(windows: list[tuple[int, int, int, bool] | tuple[int, int, int, bool, int]]) -> list[bool]: ...
def rt_sparse_packets(packets: list[tuple[bool, bytes]]) -> list[bool]: ...
