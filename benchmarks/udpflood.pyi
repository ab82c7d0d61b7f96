"""Types of benchmarks/udpflood.pyx (compiled at run time by benchmarks/pyxcache.py)."""

def send_loop(fd: int, size: int, seconds: float, batch: int) -> tuple[int, float, dict[int, int], int]:
    """(datagrams accepted, seconds sent, {errno: failed calls}, fatal errno or 0)."""

def sink_loop(fd: int, size: int, window: float, idle: float, wait_first: float,
              batch: int) -> tuple[int, int, float, float, int]:
    """(datagrams, bytes, seconds first to last, seconds first to end of window, fatal errno or 0)."""
