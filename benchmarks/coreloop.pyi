"""Types of benchmarks/coreloop.pyx (compiled at run time by benchmarks/pyxcache.py)."""

from typing_extensions import Buffer

from fastpath.core import PacketCore

def encap_loop(core: PacketCore, packet: Buffer, reply: Buffer,
               iterations: int) -> tuple[int, int]:
    """encap_c on `packet` `iterations` times (TTL reset to 64 before each): (last verdict, its value)."""

def decap_loop(core: PacketCore, packet: Buffer, sender: int, iterations: int) -> tuple[int, int]:
    """decap_c on `packet` from `sender` `iterations` times (TTL reset to 64 before each): (verdict, value)."""
