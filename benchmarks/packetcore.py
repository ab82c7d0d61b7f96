"""Packet-core micro-benchmark: ns per packet, compiled (fastpath.core) vs pure Python (flannelpy.packet).

Both implement the same API: PacketCore(RouteTable, mtu).encap(packet, reply) and .decap(packet, sender).
Each call is timed on a valid UDP-in-IPv4 packet of 64, 512, 1400 and 1472 bytes that takes the forwarding
path (encap -> FORWARD, decap -> DELIVER). Both calls decrement the TTL in place, so the loop puts the TTL
back before each call; a loop doing only that is timed too and subtracted, leaving the call itself.

Three ways are timed:
  compiled, C call     encap_c/decap_c from a C loop (benchmarks/coreloop.pyx): what fastpath/io.pyx pays
  compiled, Python call  PacketCore.encap/decap of fastpath.core called from Python
  pure Python          flannelpy.packet, what FLANNELPY_DATAPATH=python pays per packet
"""

from __future__ import annotations

import statistics
import struct
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console

from benchmarks import pyxcache, report

SIZES = (64, 512, 1400, 1472)
MTU = 1472
NETWORK, PREFIX_LEN, SUBNET_LEN = "10.5.0.0", 16, 24
LOCAL_SUBNET, PEER_SUBNET, PEER_IP = "10.5.1.0", "10.5.2.0", "10.99.0.2"
SRC, DST = "10.5.1.2", "10.5.2.2"


@dataclass
class Params:
    quick: bool = False
    reps: int = 3
    target_seconds: float = 0.25  # per timed loop

    def __post_init__(self) -> None:
        if self.quick:
            self.reps, self.target_seconds = 1, 0.05


def udp_packet(size: int) -> bytearray:
    """A well-formed IPv4/UDP packet of `size` bytes (header checksum valid) from SRC to DST."""
    if size < 28:
        raise ValueError(f"an IPv4/UDP packet has at least 28 bytes, not {size}")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0x1234, 0x4000, 64, 17, 0,
                                   IPv4Address(SRC).packed, IPv4Address(DST).packed))
    s = sum(struct.unpack("!10H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    header[10:12] = struct.pack("!H", ~s & 0xFFFF)
    payload = bytes(range(256)) * (size // 256 + 1)
    udp = struct.pack("!HHHH", 40000, 5201, size - 20, 0)
    return header + udp + payload[: size - 28]


KINDS = ("c", "compiled", "python")
KIND_TITLES = {"c": "compiled, C call", "compiled": "compiled, Python call", "python": "pure Python"}


def _coreloop() -> ModuleType:
    """benchmarks/coreloop.pyx, compiled on first use (needs Cython and a C compiler, as setup.py does)."""
    import fastpath

    # pyximport does not notice a changed fastpath/core.pxd; a stale build would call the wrong C methods.
    return pyxcache.load("coreloop", [Path(fastpath.__file__).with_name("core.pxd")])


def _load(kind: str) -> ModuleType:
    if kind in ("compiled", "c"):
        import fastpath.core as compiled

        return compiled
    import flannelpy.packet as reference

    return reference


def _core(mod: ModuleType) -> Any:
    table = mod.RouteTable(int(IPv4Address(NETWORK)), PREFIX_LEN, SUBNET_LEN)
    table.set(int(IPv4Address(PEER_SUBNET)), int(IPv4Address(PEER_IP)))
    table.set(int(IPv4Address(LOCAL_SUBNET)), int(IPv4Address("10.99.0.1")))  # decap checks the sender's lease
    return mod.PacketCore(table, MTU)


def _loop_ns(mod: ModuleType, op: str, size: int, n: int) -> tuple[float, float]:
    """(ns per iteration with the call, ns per iteration of the same loop without it)."""
    core = _core(mod)
    packet = udp_packet(size)
    reply = bytearray(mod.ICMP_REPLY_MAX)
    sender = int(IPv4Address("10.99.0.1"))
    if op == "encap":
        verdict = core.encap(packet, reply)
        if verdict[0] != mod.FORWARD:
            raise RuntimeError(f"{mod.__name__}.encap gave {verdict}, expected FORWARD: the benchmark packet is wrong")
        call = core.encap
        t = time.perf_counter_ns()
        for _ in range(n):
            packet[8] = 64
            call(packet, reply)
        with_call = time.perf_counter_ns() - t
    else:
        verdict = core.decap(packet, sender)
        if verdict[0] != mod.DELIVER:
            raise RuntimeError(f"{mod.__name__}.decap gave {verdict}, expected DELIVER: the benchmark packet is wrong")
        call = core.decap
        t = time.perf_counter_ns()
        for _ in range(n):
            packet[8] = 64
            call(packet, sender)
        with_call = time.perf_counter_ns() - t
    t = time.perf_counter_ns()
    for _ in range(n):
        packet[8] = 64
    bare = time.perf_counter_ns() - t
    return with_call / n, bare / n


def _c_loop_ns(loop: ModuleType, op: str, size: int, n: int) -> float:
    import fastpath.core as compiled

    core = _core(compiled)
    packet = udp_packet(size)
    sender = int(IPv4Address("10.99.0.1"))
    if op == "encap":
        reply = bytearray(compiled.ICMP_REPLY_MAX)
        t = time.perf_counter_ns()
        verdict = loop.encap_loop(core, packet, reply, n)
        elapsed = time.perf_counter_ns() - t
        expected = compiled.FORWARD
    else:
        t = time.perf_counter_ns()
        verdict = loop.decap_loop(core, packet, sender, n)
        elapsed = time.perf_counter_ns() - t
        expected = compiled.DELIVER
    if verdict[0] != expected:
        raise RuntimeError(f"encap_c/decap_c gave {verdict}, expected verdict {expected}")
    return elapsed / n


def measure_c(loop: ModuleType, op: str, size: int, params: Params) -> dict[str, Any]:
    per_call = _c_loop_ns(loop, op, size, 100_000)
    n = max(100_000, int(params.target_seconds * 1e9 / max(per_call, 0.5)))
    samples = [_c_loop_ns(loop, op, size, n) for _ in range(max(1, params.reps))]
    return {"ns_per_packet": min(samples), "median_ns": statistics.median(samples), "samples": samples,
            "iterations": n}


def measure(kind: str, op: str, size: int, params: Params) -> dict[str, Any]:
    mod = _load(kind)
    per_call, _ = _loop_ns(mod, op, size, 2000)  # warm-up and a first estimate
    n = max(1000, int(params.target_seconds * 1e9 / max(per_call, 1.0)))
    with_call, bare = [], []
    for _ in range(max(1, params.reps)):
        w, b = _loop_ns(mod, op, size, n)
        with_call.append(w)
        bare.append(b)
    # The least disturbed run of each loop (as timeit): other processes only ever add time.
    return {"ns_per_packet": max(min(with_call) - min(bare), 0.0),
            "median_ns": max(statistics.median(with_call) - statistics.median(bare), 0.0),
            "loop_ns": min(bare), "samples": with_call, "iterations": n}


def run(params: Params, out_dir: Path, console: Console) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": "packetcore", "started": datetime.now(UTC).isoformat(timespec="seconds"),
                            "machine": report.machine(), "params": asdict(params), "results": [], "errors": {}}
    kinds = []
    loop: ModuleType | None = None
    for kind in ("compiled", "python"):
        try:
            _load(kind)
            kinds.append(kind)
        except ImportError as e:
            data["errors"][kind] = (f"cannot import: {e} (build it: python setup.py build_ext --inplace)"
                                    if kind == "compiled" else f"cannot import: {e}")
            console.print(f"[red]packet core {kind}: {data['errors'][kind]}[/red]")
    if "compiled" in kinds:
        try:
            with console.status("packet core: compiling benchmarks/coreloop.pyx"):
                loop = _coreloop()
            kinds.insert(0, "c")
        except Exception as e:  # no compiler, no headers: the other two columns still stand
            data["errors"]["c"] = f"cannot compile benchmarks/coreloop.pyx: {type(e).__name__}: {e}"
            console.print(f"[red]packet core C loop: {data['errors']['c']}[/red]")
    with console.status("packet core: timing encap and decap") as status:
        for op in ("encap", "decap"):
            for size in SIZES:
                row: dict[str, Any] = {"op": op, "size": size}
                for kind in kinds:
                    status.update(f"packet core: {kind} {op} {size} B")
                    try:
                        row[kind] = (measure_c(loop, op, size, params) if kind == "c" and loop is not None
                                     else measure(kind, op, size, params))
                    except Exception as e:  # a wrong verdict or a crash is a result, not a stop
                        row[kind] = {"error": f"{type(e).__name__}: {e}"}
                data["results"].append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "packetcore.json", data)
    table = markdown(data)
    (out_dir / "packetcore.md").write_text(table)
    print(table, flush=True)
    console.print(f"wrote {out_dir / 'packetcore.json'}, {out_dir / 'packetcore.md'}")
    return data


def _ns(entry: dict[str, Any] | None) -> float | None:
    if not entry or "error" in entry:
        return None
    return float(entry["ns_per_packet"])


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in data["results"]:
        c, cp, p = _ns(r.get("c")), _ns(r.get("compiled")), _ns(r.get("python"))
        cells = ["failed" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}") for v in (c, cp, p)]
        mpps = f"{1e3 / c:.0f}" if c else "—"
        speedup = f"{p / c:.0f}x" if c and p else "—"
        rows.append([r["op"], r["size"], cells[0], mpps, cells[1], cells[2], speedup])
    text = (f"Packet core, ns per packet, best of {data['params']['reps']} run(s); {data['started']}. "
            "C call: encap_c/decap_c in a C loop, as fastpath/io.pyx calls them. Python call: the same compiled "
            "core through its Python API (loop overhead subtracted). Pure Python: flannelpy.packet (loop "
            f"overhead subtracted).\n\nMachine: {report.machine_line(data['machine'])}.\n\n")
    text += report.simple_table(["op", "bytes", "compiled, C call (ns)", "C call (Mpps, one core)",
                                 "compiled, Python call (ns)", "pure Python (ns)", "C call vs pure Python"], rows)
    for kind, error in data["errors"].items():
        text += f"\n{KIND_TITLES[kind]}: {error}\n"
    for r in data["results"]:
        for kind in KINDS:
            if isinstance(r.get(kind), dict) and "error" in r[kind]:
                text += f"\n{KIND_TITLES[kind]} {r['op']} {r['size']} B failed: {r[kind]['error']}\n"
    return text
