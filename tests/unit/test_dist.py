"""The systemd units in dist/ name commands and variables that exist."""

from __future__ import annotations

import configparser
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
    assert unit["Service"]["EnvironmentFile"] == "/run/docker_opts.env"
    assert "$DOCKER_OPTS" in unit["Service"]["ExecStart"]
