"""`flannelpy demo`, the README's main job: traffic across hosts is shown, and Ctrl-C removes everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from flannelpy.lab.topology import list_namespaces

ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_demo_pings_every_pair_shows_iperf3_and_ctrl_c_removes_everything() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flannelpy", "demo", "--hosts", "2", "--iperf-seconds", "1", "--keep"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        # A runner that started us in the background may have SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: give the demo the terminal's default, as a user's Ctrl-C would find it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Namespaces:"):  # printed just before it waits for Enter
            break
    output = "".join(lines)
    match = re.search(r"grep (\S+); logs in (\S+)", output)
    assert match, output
    prefix, workdir = match.groups()
    assert len(list_namespaces(prefix)) == 1 + 2 + 2 * 2  # switch, hosts, containers
    assert output.count("3/3") == 2, output  # h1 -> h2 and h2 -> h1, no echo lost
    assert re.search(r"iperf3 TCP .* \d+ Mbit/s", output), output

    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert list_namespaces(prefix) == []
    assert not Path(workdir).exists()
    assert _processes_mentioning(workdir) == []  # etcd members and daemons all stopped
