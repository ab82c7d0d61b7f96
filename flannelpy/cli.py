"""The `flannelpy` command: flanneld's flags and FLANNELD_* variables, plus operator verbs.

    flannelpy [flags]                  run the daemon (flanneld's flags; the command line wins over env)
    flannelpy config get|set FILE|JSON read or write <prefix>/config with the etcd v3 API
    flannelpy leases                   list leases: subnet, PublicIP, backend, TTL left
    flannelpy mk-docker-opts [-f -d -i -c -k -m]   Docker options from the subnet file
    flannelpy demo                     a three-host cluster in network namespaces on this machine
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flannelpy import __version__

ENV_PREFIX = "FLANNELD_"


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "t", "true", "yes", "on"):
        return True
    if low in ("0", "f", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use true or false)")


def _renew_margin(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1439:
        raise argparse.ArgumentTypeError(
            f"--subnet-lease-renew-margin={value}: must be between 1 and 1439 minutes (less than 24 h)"
        )
    return value


def _int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An int flag checked at parse time (flanneld's Go flags only parse; a bad value failed later, or never)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ({what})") from None
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range {bound} ({what})")
        return value

    return parse


def _ip(version: int | None, what: str) -> Callable[[str], str]:
    """An address flag: empty (unset) or a literal address; a host name would be looked up, slowly, later."""

    def parse(text: str) -> str:
        if not text:
            return text
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an IP address ({what})") from None
        if version is not None and addr.version != version:
            raise argparse.ArgumentTypeError(f"{text!r} is not an IPv{version} address ({what})")
        return str(addr)

    return parse


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {e}") from None
    return text


@dataclass(frozen=True)
class Flag:
    """One daemon flag; `env` is derived so docs and code cannot disagree."""

    name: str
    default: Any
    help: str
    kind: Callable[[str], Any] = str
    repeat: bool = False
    boolean: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("etcd-endpoints", "http://127.0.0.1:4001,http://127.0.0.1:2379", "comma-separated list of etcd endpoints"),
    Flag("etcd-prefix", "/coreos.com/network", "etcd prefix"),
    Flag("etcd-keyfile", "", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", "", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication"),
    Flag("etcd-username", "", "username for BasicAuth to etcd"),
    Flag("etcd-password", "", "password for BasicAuth to etcd"),
    Flag("iface", [], "interface to use (IP or name) for inter-host communication; repeatable", repeat=True),
    Flag("iface-regex", [], "regex of interface name or IP to use for inter-host communication; repeatable",
         _regex, repeat=True),
    Flag("iface-can-reach", "", "detect the interface to use by the route to this IP", _ip(None, "--iface-can-reach")),
    Flag("public-ip", "", "IP accessible by other nodes for inter-host communication", _ip(4, "--public-ip")),
    Flag("subnet-file", "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) will be written"),
    Flag("subnet-lease-renew-margin", 60, "subnet lease renewal margin, in minutes (1..1439)", _renew_margin),
    Flag("ip-masq", False, "setup IP masquerade rule for traffic destined outside of overlay network",
         _bool, boolean=True),
    Flag("iptables-resync", 5, "resync period for iptables rules, in seconds",
         _int_in(1, None, "--iptables-resync, seconds")),
    Flag("iptables-forward-rules", True, "add default accept rules to FORWARD chain in iptables", _bool, boolean=True),
    Flag("healthz-ip", "0.0.0.0", "the IP address for healthz server to listen", _ip(None, "--healthz-ip")),
    Flag("healthz-port", 0, "the port for healthz server to listen (0 to disable)",
         _int_in(0, 65535, "--healthz-port, 0 = off")),
    Flag("log-format", "text", "log lines as key=value text or one JSON object per line (text|json)"),
    Flag("subnet-lease-ttl", 86400,
         "TEST ONLY: etcd lease TTL in seconds (flanneld: fixed 24 h); see docs/operations.md",
         _int_in(1, None, "--subnet-lease-ttl, seconds")),
)
FLAG_BY_DEST = {f.dest: f for f in FLAGS}


def _normalise(argv: Sequence[str]) -> list[str]:
    """Go's flag package accepts -name and --name alike; argparse wants --name."""
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg.split("=", 1)[0]) > 2:
            arg = "-" + arg
        out.append(arg)
    return out


def daemon_parser() -> argparse.ArgumentParser:
    # No prefix abbreviations: Go's flag package has none (--v would otherwise be taken for --version).
    p = argparse.ArgumentParser(
        prog="flannelpy", allow_abbrev=False,
        description="flannel overlay network daemon (flanneld-compatible flags; FLANNELD_<FLAG> env vars). "
        "Verbs: config get|set, leases, mk-docker-opts, demo.",
    )
    for f in FLAGS:
        if f.repeat:
            p.add_argument(f"--{f.name}", dest=f.dest, action="append", default=None, type=f.kind, help=f.help)
        elif f.boolean:
            p.add_argument(f"--{f.name}", dest=f.dest, nargs="?", const=True, default=None, type=f.kind,
                           help=f"{f.help} (default {str(f.default).lower()})")
        else:
            p.add_argument(f"--{f.name}", dest=f.dest, default=None, type=f.kind,
                           help=f"{f.help} (default {f.default!r})")
    p.add_argument("-v", "--v", dest="v", type=int, nargs="?", const=1, default=None,
                   help="log verbosity (0 = info; 2 and more = debug); env FLANNELD_V")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def parse_daemon_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    """Flags from argv, else FLANNELD_* from the environment, else flanneld's defaults."""
    env = os.environ if environ is None else environ
    p = daemon_parser()
    ns = p.parse_args(_normalise(argv))
    for f in FLAGS:
        if getattr(ns, f.dest) is not None:
            continue
        raw = env.get(f.env)
        if not raw:  # unset or empty: flanneld (flagutil.SetFlagsFromEnv) skips empty values too
            setattr(ns, f.dest, list(f.default) if f.repeat else f.default)
            continue
        try:
            if f.repeat:
                value: Any = [f.kind(x) for x in (raw.split(",") if f.name == "iface" else [raw]) if x]
            else:
                value = f.kind(raw)
        except (argparse.ArgumentTypeError, ValueError) as e:
            p.error(f"environment variable {f.env}={raw!r}: {e}")
        setattr(ns, f.dest, value)
    if ns.v is None:
        try:
            ns.v = int(env.get("FLANNELD_V", "0") or 0)
        except ValueError:
            p.error(f"environment variable FLANNELD_V={env['FLANNELD_V']!r}: not a number (log verbosity, 0 = info)")
    if ns.log_format not in ("text", "json"):
        p.error(f"--log-format={ns.log_format!r}: use text or json")
    return ns


def _registry_from(ns: argparse.Namespace) -> Any:
    from flannelpy.subnet.registry import EtcdRegistry

    return EtcdRegistry(
        [e.strip() for e in ns.etcd_endpoints.split(",") if e.strip()],
        cafile=ns.etcd_cafile or None, certfile=ns.etcd_certfile or None, keyfile=ns.etcd_keyfile or None,
        username=ns.etcd_username or None, password=ns.etcd_password or None,
    )


def _client_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"flannelpy {prog}", allow_abbrev=False)
    for name in ("etcd-endpoints", "etcd-prefix", "etcd-cafile", "etcd-certfile", "etcd-keyfile",
                 "etcd-username", "etcd-password"):
        f = next(x for x in FLAGS if x.name == name)
        p.add_argument(f"--{name}", dest=f.dest, default=os.environ.get(f.env) or f.default, help=f.help)
    return p


def _config_text(value: str) -> str:
    """A JSON object given inline, a file name, or - for standard input."""
    from flannelpy.errors import ConfigError

    if value == "-":
        return sys.stdin.read()
    if value.lstrip().startswith("{"):
        return value
    try:
        with open(value) as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{value!r} is neither a JSON object nor a file; give the config inline "
                          """('{"Network": "10.5.0.0/16"}'), as a file name, or - to read standard input""") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the config file {value}: {e}") from None


def _run_verb(ns: argparse.Namespace, go: Callable[[], Any]) -> int:
    """A verb's coroutine, with its errors as one line on stderr: 2 bad input, 1 etcd unreachable or refused."""
    from flannelpy.errors import ConfigError, FlannelError

    try:
        return int(asyncio.run(go()))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FlannelError as e:
        print(f"error: etcd at {ns.etcd_endpoints}: {e}", file=sys.stderr)
        return 1


def config_main(argv: Sequence[str]) -> int:
    p = _client_parser("config")
    p.add_argument("action", choices=("get", "set"))
    p.add_argument("value", nargs="?", help="for set: a JSON object, a file name, or - for standard input")
    ns = p.parse_intermixed_args(_normalise(argv))  # flags may come after "set", as in the docs
    if ns.action == "set" and ns.value is None:
        p.error("config set needs a JSON object, a file name or -")

    async def go() -> int:
        from flannelpy.subnet.manager import SubnetManager

        text = _config_text(ns.value) if ns.action == "set" else ""
        manager = SubnetManager(_registry_from(ns), ns.etcd_prefix)  # checks the prefix first
        try:
            if ns.action == "get":
                got = await manager.get_config_text()
                if got is None:
                    print(f"no network config at {manager.config_key}", file=sys.stderr)
                    return 1
                print(got)
                return 0
            config = await manager.set_config(text)
        finally:
            await manager.registry.close()
        for key in config.unknown_keys:
            print(f"warning: unknown key {key} ignored (flanneld ignores it too)", file=sys.stderr)
        print(f"wrote {manager.config_key}")
        return 0

    return _run_verb(ns, go)


def leases_main(argv: Sequence[str]) -> int:
    p = _client_parser("leases")
    p.add_argument("--json", action="store_true", help="one JSON object per lease")
    ns = p.parse_args(_normalise(argv))

    async def go() -> int:
        import json
        import time

        from flannelpy.subnet.manager import SubnetManager

        manager = SubnetManager(_registry_from(ns), ns.etcd_prefix)
        try:
            leases = await manager.list_leases()
        finally:
            await manager.registry.close()
        now = time.time()
        rows = []
        for lease in sorted(leases, key=lambda x: int(x.subnet.network_address)):
            ttl = "reserved" if lease.expiration is None else f"{max(0, int(lease.expiration - now))}s"
            rows.append({"subnet": str(lease.subnet), "public_ip": str(lease.attrs.public_ip),
                         "backend": lease.attrs.effective_backend, "ttl": ttl})
        if ns.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print(f"{'SUBNET':<20} {'PUBLIC IP':<16} {'BACKEND':<8} TTL")
            for r in rows:
                print(f"{r['subnet']:<20} {r['public_ip']:<16} {r['backend']:<8} {r['ttl']}")
        return 0

    return _run_verb(ns, go)


def _verb(run: Callable[[], int]) -> int:
    """An operator verb whose reader may stop early (`flannelpy leases | head -2`): no traceback then."""
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's own advice: point stdout at /dev/null so that the flush at exit does not fail again.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 0
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("config", "leases", "mk-docker-opts"):
        from flannelpy.observe.log import configure_logging

        configure_logging(-1)
    if args and args[0] == "config":
        return _verb(lambda: config_main(args[1:]))
    if args and args[0] == "leases":
        return _verb(lambda: leases_main(args[1:]))
    if args and args[0] == "mk-docker-opts":
        from flannelpy.host.docker_opts import main as docker_opts_main

        return _verb(lambda: docker_opts_main(args[1:]))
    if args and args[0] == "demo":
        from flannelpy.lab.demo import main as demo_main

        return demo_main(args[1:])
    ns = parse_daemon_args(args)
    if ns.version:
        print(__version__)
        return 0
    from flannelpy.daemon import run_daemon

    return run_daemon(ns)


if __name__ == "__main__":
    sys.exit(main())
