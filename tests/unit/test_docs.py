"""docs/configuration.md must name every flag, variable and config key the code knows."""

from __future__ import annotations

import re
from pathlib import Path

from flannelpy import config
from flannelpy.cli import FLAGS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


def test_every_flag_and_env_variable_is_documented_with_its_default() -> None:
    for flag in FLAGS:
        row = next((line for line in DOC.splitlines() if line.startswith(f"| `--{flag.name}` |")), None)
        assert row is not None, f"--{flag.name} missing from docs/configuration.md"
        assert f"`{flag.env}`" in row
        default = "(none)" if flag.default in ("", []) else str(flag.default).lower() if isinstance(
            flag.default, bool) else str(flag.default)
        assert f"`{default}`" in row, f"--{flag.name}: documented default differs from the code's {default!r}"


def test_no_documented_flag_is_unknown_to_the_code() -> None:
    names = {f.name for f in FLAGS} | {"version"}
    for documented in re.findall(r"^\| `--([a-z0-9-]+)` \|", DOC, re.M):
        assert documented in names, f"docs/configuration.md documents --{documented}, which the daemon lacks"


def test_every_config_key_is_documented() -> None:
    documented = {k.lower() for k in re.findall(r"^\| `([A-Za-z0-9]+)` \|", DOC, re.M)}
    assert documented >= config._KNOWN_KEYS
    for keys in config._BACKEND_KEYS.values():
        for key in keys:
            assert key in {k.lower() for k in re.findall(r"\| `([A-Za-z]+)` \|", DOC)}, key
