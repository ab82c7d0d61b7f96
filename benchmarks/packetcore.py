"""packetcore benchmark: written once its modules land (see issue 5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console


@dataclass
class Params:
    quick: bool = False
    reps: int = 3


def run(params: Params, out_dir: Path, console: Console) -> dict[str, object]:
    console.print("[yellow]packetcore: not available yet[/yellow]")
    return {}
