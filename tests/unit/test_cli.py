"""flanneld's flags, FLANNELD_* variables and their precedence."""

from __future__ import annotations

import pytest

from flannelpy.cli import FLAGS, main, parse_daemon_args


def test_defaults_are_flanneld_defaults() -> None:
    ns = parse_daemon_args([], environ={})
    assert ns.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert ns.etcd_prefix == "/coreos.com/network"
    assert ns.subnet_file == "/run/flannel/subnet.env"
    assert ns.subnet_lease_renew_margin == 60
    assert ns.ip_masq is False
    assert ns.iptables_resync == 5
    assert ns.iptables_forward_rules is True
    assert ns.healthz_ip == "0.0.0.0"
    assert ns.healthz_port == 0
    assert ns.iface == [] and ns.iface_regex == []
    assert ns.v == 0


def test_go_style_single_dash_and_bool_forms() -> None:
    ns = parse_daemon_args(["-etcd-prefix=/flannel_use/network", "--ip-masq", "-iptables-forward-rules=false",
                            "--iface", "eth0", "--iface=10.0.0.1", "-v", "2"], environ={})
    assert ns.etcd_prefix == "/flannel_use/network"
    assert ns.ip_masq is True
    assert ns.iptables_forward_rules is False
    assert ns.iface == ["eth0", "10.0.0.1"]
    assert ns.v == 2


def test_environment_fills_in_and_command_line_wins() -> None:
    env = {"FLANNELD_ETCD_PREFIX": "/env/network", "FLANNELD_IP_MASQ": "true", "FLANNELD_IFACE": "eth1,eth2",
           "FLANNELD_HEALTHZ_PORT": "8471", "FLANNELD_SUBNET_FILE": "/tmp/env.env"}
    ns = parse_daemon_args(["--subnet-file=/tmp/cli.env"], environ=env)
    assert ns.etcd_prefix == "/env/network"
    assert ns.ip_masq is True
    assert ns.iface == ["eth1", "eth2"]
    assert ns.healthz_port == 8471
    assert ns.subnet_file == "/tmp/cli.env"


def test_every_flag_has_an_environment_variable() -> None:
    for flag in FLAGS:
        assert flag.env == "FLANNELD_" + flag.name.upper().replace("-", "_")


@pytest.mark.parametrize("value", ["0", "1440", "-5"])
def test_renew_margin_out_of_range_is_a_clear_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_daemon_args([f"--subnet-lease-renew-margin={value}"], environ={})
    assert exc.value.code == 2
    assert "between 1 and 1439" in capsys.readouterr().err


def test_bad_boolean_in_environment_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_daemon_args([], environ={"FLANNELD_IP_MASQ": "maybe"})
    assert "FLANNELD_IP_MASQ" in capsys.readouterr().err


def test_version_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and out.err == ""
