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


def test_an_empty_environment_variable_is_as_if_unset() -> None:
    # As flanneld: an empty FLANNELD_SUBNET_FILE must not mean "write no subnet file", nor an empty
    # FLANNELD_IPTABLES_FORWARD_RULES "no forward rules" (a unit file's Environment=X= with nothing after it).
    env = {f.env: "" for f in FLAGS} | {"FLANNELD_V": ""}
    assert vars(parse_daemon_args([], environ=env)) == vars(parse_daemon_args([], environ={}))


def test_go_style_v_flag_and_no_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_daemon_args(["--v=2"], environ={}).v == 2
    assert parse_daemon_args(["-v=3"], environ={}).v == 3
    with pytest.raises(SystemExit):
        parse_daemon_args(["--etcd-pre=/x"], environ={})  # Go's flag package knows no prefixes
    assert "unrecognized arguments: --etcd-pre=/x" in capsys.readouterr().err


def test_bad_verbosity_in_environment_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_daemon_args([], environ={"FLANNELD_V": "x"})
    assert exc.value.code == 2 and "FLANNELD_V='x': not a number" in capsys.readouterr().err


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


def test_the_etcd_client_verbs_take_empty_variables_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from flannelpy.cli import _client_parser

    monkeypatch.setenv("FLANNELD_ETCD_PREFIX", "")
    monkeypatch.setenv("FLANNELD_ETCD_ENDPOINTS", "")
    ns = _client_parser("leases").parse_args([])
    assert ns.etcd_prefix == "/coreos.com/network"
    assert ns.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"


@pytest.mark.parametrize(("args", "says"), [
    (["--iptables-resync=0"], "--iptables-resync: 0 is out of range 1 or more"),
    (["--healthz-port=70000"], "--healthz-port: 70000 is out of range 0..65535"),  # not 70000 mod 65536
    (["--healthz-port=-1"], "--healthz-port: -1 is out of range"),
    (["--healthz-ip=not-an-ip"], "'not-an-ip' is not an IP address"),  # was a 10 s name lookup, then exit 1
    (["--public-ip=bad"], "'bad' is not an IP address"),
    (["--public-ip=fd00::1"], "is not an IPv4 address"),
    (["--iface-can-reach=bad"], "'bad' is not an IP address"),
    (["--iface-regex=("], "'(' is not a regular expression"),
    (["--subnet-lease-ttl=0"], "--subnet-lease-ttl: 0 is out of range"),
])
def test_bad_flag_values_exit_2_at_once_naming_the_flag(args: list[str], says: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Before, these took a lease and created devices first, then exited 1 (or, for the port, listened elsewhere).
    with pytest.raises(SystemExit) as exc:
        parse_daemon_args(args, environ={})
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_bad_values_in_the_environment_are_checked_alike(capsys: pytest.CaptureFixture[str]) -> None:
    for env, says in (({"FLANNELD_IFACE_REGEX": "("}, "FLANNELD_IFACE_REGEX='('"),
                      ({"FLANNELD_HEALTHZ_PORT": "x"}, "'x' is not a whole number")):
        with pytest.raises(SystemExit) as exc:
            parse_daemon_args([], environ=env)
        assert exc.value.code == 2 and says in capsys.readouterr().err
    ns = parse_daemon_args(["--iface-regex=^eth", "--healthz-port=8471", "--public-ip=10.99.0.1"], environ={})
    assert (ns.iface_regex, ns.healthz_port, ns.public_ip) == (["^eth"], 8471, "10.99.0.1")
