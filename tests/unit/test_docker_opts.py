"""`flannelpy mk-docker-opts`: the output of flannel's dist/mk-docker-opts.sh, byte for byte.

The expected texts are what the script writes for the same input (checked against the script itself
with /bin/sh when this module was written; flannel's own test cases use the same sample file).
"""

from __future__ import annotations

import pytest

from flannelpy.host import docker_opts
from flannelpy.host.docker_opts import main, render_docker_opts

SAMPLE = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
FLANNELPY = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.23.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Run main() on a subnet file with a clean environment; return (exit code, output file text)."""
    for name in list(__import__("os").environ):
        if name.startswith("DOCKER_OPT") or name.startswith("FLANNEL_") or name == "CUSTOM_KEY":
            monkeypatch.delenv(name)
    monkeypatch.setattr(docker_opts, "conflicting_route", lambda subnet: None)
    src = tmp_path / "subnet.env"
    dst = tmp_path / "docker_opts.env"

    def go(content: str, *flags: str) -> tuple[int, str | None]:
        src.write_text(content)
        if dst.exists():
            dst.unlink()
        rc = main(["-f", str(src), "-d", str(dst), *flags])
        return rc, dst.read_text() if dst.exists() else None

    return go


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
             'DOCKER_OPT_MTU="--mtu=1472"\nDOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'),
        (("-i",), 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
                  'DOCKER_OPT_MTU="--mtu=1472"\n'),
        (("-c",), 'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'),
        (("-k", "CUSTOM_KEY"), 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
                               'DOCKER_OPT_MTU="--mtu=1472"\n'
                               'CUSTOM_KEY=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'),
        (("-m",), 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
                  'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
        (("-ic",), 'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
                   'DOCKER_OPT_MTU="--mtu=1472"\nDOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'),
        (("-mc",), 'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n'),
    ],
)
def test_flannels_own_cases(run, flags, expected):
    assert run(SAMPLE, *flags) == (0, expected)


def test_flannel_masquerading_turns_dockers_off(run):
    """The compat notes' example: a flannelpy subnet file with FLANNEL_IPMASQ=true."""
    rc, out = run(FLANNELPY)
    assert rc == 0
    assert out == (
        'DOCKER_OPT_BIP="--bip=10.5.23.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.5.23.1/24 --ip-masq=false --mtu=1472"\n'
    )


def test_environment_options_are_passed_through_in_name_order(run, monkeypatch):
    monkeypatch.setenv("DOCKER_OPTS", "--dns 1.1.1.1")
    monkeypatch.setenv("DOCKER_OPT_DNS", "--dns=8.8.8.8")
    rc, out = run(FLANNELPY)
    assert rc == 0
    assert out == (
        'DOCKER_OPT_BIP="--bip=10.5.23.1/24"\n'
        'DOCKER_OPT_DNS="--dns=8.8.8.8"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS="--dns 1.1.1.1  --bip=10.5.23.1/24 --dns=8.8.8.8 --ip-masq=false --mtu=1472"\n'
    )


def test_missing_ipmasq_line_gives_no_ipmasq_option():
    out = render_docker_opts({"FLANNEL_SUBNET": "10.5.23.1/24", "FLANNEL_MTU": "1472"})
    assert out == ('DOCKER_OPT_BIP="--bip=10.5.23.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
                   'DOCKER_OPTS=" --bip=10.5.23.1/24 --mtu=1472"\n')


def test_invalid_ipmasq_value_is_refused(run, capsys):
    rc, out = run("FLANNEL_SUBNET=10.5.23.1/24\nFLANNEL_IPMASQ=yes\n")
    assert rc == 1 and out is None
    assert "Invalid value of FLANNEL_IPMASQ: yes" in capsys.readouterr().err


def test_missing_subnet_file_is_an_error_naming_the_file(tmp_path, capsys):
    rc = main(["-f", str(tmp_path / "nope.env"), "-d", str(tmp_path / "out.env")])
    assert rc == 1
    assert not (tmp_path / "out.env").exists()
    err = capsys.readouterr().err
    assert str(tmp_path / "nope.env") in err and "-f" in err


def test_unknown_option_prints_usage_and_fails(capsys):
    assert main(["-x"]) == 1
    err = capsys.readouterr().err
    assert "[-f FLANNEL-ENV-FILE]" in err and "-m\tDo not output --ip-masq" in err


def test_help_prints_usage(capsys):
    assert main(["-h"]) == 0
    assert "Defaults to /run/flannel/subnet.env" in capsys.readouterr().out


def test_bad_combined_key_is_refused(run, capsys):
    rc, out = run(FLANNELPY, "-k", "not a name")
    assert rc == 1 and out is None
    assert "-k" in capsys.readouterr().err


def test_route_to_our_subnet_via_a_gateway_is_reported_after_writing(run, monkeypatch, capsys):
    monkeypatch.setattr(docker_opts, "conflicting_route", lambda subnet: "10.5.23.0/24 via 10.0.0.1 dev eth0")
    rc, out = run(FLANNELPY)
    assert rc == 1
    assert out is not None and "--bip=10.5.23.1/24" in out
    assert "Your routing table already contains the subnet: 10.5.23.0/24 via 10.0.0.1 dev eth0" in (
        capsys.readouterr().err)


def test_defaults_match_the_script():
    assert docker_opts.DEFAULT_DOCKER_ENV == "/run/docker_opts.env"
    assert docker_opts.DEFAULT_COMBINED_KEY == "DOCKER_OPTS"
