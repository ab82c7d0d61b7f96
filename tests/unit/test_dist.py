"""The systemd units in dist/ name commands and variables that exist."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess
import sys
from pathlib import Path

from flannelpy.cli import FLAGS

DIST = Path(__file__).resolve().parents[2] / "dist"


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DIST / name)
    return parser


def test_service_is_type_notify_and_runs_the_daemon() -> None:
    unit = _unit("flannelpy.service")
    assert unit["Service"]["Type"] == "notify"
    assert unit["Service"]["ExecStart"].endswith("flannelpy")
    assert "docker.service" in unit["Unit"]["Before"]


def test_documented_variables_are_real_flags() -> None:
    envs = {f.env for f in FLAGS}
    for line in (DIST / "flannelpy.service").read_text().splitlines():
        if line.startswith("#   FLANNELD_"):
            assert line[4:].split("=")[0] in envs, line


def test_docker_dropin_feeds_dockerd_from_mk_docker_opts() -> None:
    unit = _unit("docker-flannelpy.conf")
    assert unit["Service"]["ExecStartPre"].endswith("flannelpy mk-docker-opts -c -d /run/docker_opts.env")
    # systemd loads it for ExecStartPre as well, before that has written it: a missing one must not fail.
    assert unit["Service"]["EnvironmentFile"] == "-/run/docker_opts.env"
    assert "$DOCKER_OPTS" in unit["Service"]["ExecStart"]


def test_docker_restarts_do_not_pile_up_options(tmp_path: Path) -> None:
    """As systemd runs the drop-in's ExecStartPre at each start: with the previous file's variables loaded."""
    subnet = tmp_path / "subnet.env"
    subnet.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.23.1/24\nFLANNEL_MTU=1472\n"
                      "FLANNEL_IPMASQ=true\n")
    out = tmp_path / "docker_opts.env"
    argv = shlex.split(_unit("docker-flannelpy.conf")["Service"]["ExecStartPre"])
    assert argv[0] == "/usr/bin/env"
    argv = [a.replace("/usr/local/bin/flannelpy", f"{sys.executable} -m flannelpy") for a in argv]
    argv = [x for a in argv for x in shlex.split(a)]
    argv[argv.index("/run/docker_opts.env")] = str(out)
    argv += ["-f", str(subnet)]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(DIST.parent)}
    for _ in range(3):
        loaded = dict(line.split("=", 1) for line in out.read_text().splitlines()) if out.exists() else {}
        loaded = {k: v.strip('"') for k, v in loaded.items()}
        subprocess.run(argv, env={**env, **loaded}, check=True, timeout=60)
    assert out.read_text() == 'DOCKER_OPTS=" --bip=10.5.23.1/24 --ip-masq=false --mtu=1472"\n'

