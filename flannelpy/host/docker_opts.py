"""`flannelpy mk-docker-opts`: flannel's dist/mk-docker-opts.sh, same options and same output bytes.

Reads the subnet file and writes Docker daemon options into an environment file that a docker.service
drop-in loads, e.g. for FLANNEL_SUBNET=10.1.74.1/24, FLANNEL_MTU=1472, FLANNEL_IPMASQ=true:

    DOCKER_OPT_BIP="--bip=10.1.74.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=false"
    DOCKER_OPT_MTU="--mtu=1472"
    DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472"

Like the script, DOCKER_OPT_* variables already in the environment are passed through (sorted by name
with the generated ones) and an existing value of the combined key is kept in front. Unlike the script,
a missing subnet file is an error instead of an empty DOCKER_OPTS that would start Docker on the wrong
bridge address, and the output file is replaced atomically.
"""

from __future__ import annotations

import getopt
import os
import re
import sys
from collections.abc import Mapping
from ipaddress import IPv4Network

from flannelpy.host.subnet_file import DEFAULT_SUBNET_FILE, parse_env, write_text_atomically

DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_COMBINED_KEY = "DOCKER_OPTS"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

USAGE = f"""flannelpy mk-docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to {DEFAULT_SUBNET_FILE}
\t-d\tPath to Docker env file to write to. Defaults to {DEFAULT_DOCKER_ENV}
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)
"""


class DockerOptsError(ValueError):
    """Input that the script would also reject (or silently mangle)."""


def render_docker_opts(
    variables: Mapping[str, str],
    *,
    individual: bool = True,
    combined: bool = True,
    key: str = DEFAULT_COMBINED_KEY,
    ipmasq: bool = True,
) -> str:
    """The docker env file for `variables` (the environment overlaid with the subnet file's lines)."""
    if not _NAME.fullmatch(key):
        raise DockerOptsError(f"-k {key!r}: the combined key must be a shell variable name such as DOCKER_OPTS")
    opts = {name: value for name, value in variables.items() if name.startswith("DOCKER_OPT_")}
    if variables.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={variables['FLANNEL_SUBNET']}"
    if variables.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={variables['FLANNEL_MTU']}"
    masq = variables.get("FLANNEL_IPMASQ", "")
    if masq and ipmasq:
        if masq == "true":  # flannel masquerades, so docker must not
            opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=false"
        elif masq == "false":
            opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=true"
        else:
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq}")
    docker_opts = variables.get(key, "")
    if docker_opts:
        docker_opts += " "
    out: list[str] = []
    for name in sorted(opts):  # the shell lists variables in byte order
        if individual:
            out.append(f'{name}="{opts[name]}"\n')
        docker_opts += f" {opts[name]}"
    if combined:
        out.append(f'{key}="{docker_opts}"\n')
    return "".join(out)


def conflicting_route(subnet: str) -> str | None:
    """The script refuses a subnet that the routing table already sends via a gateway."""
    try:
        network = IPv4Network(subnet, strict=False)
    except ValueError:
        return None
    from pyroute2 import IPRoute  # only this check needs netlink

    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2, table=254):
            if route.get("dst") == str(network.network_address) and route["dst_len"] == network.prefixlen:
                gateway = route.get("gateway")
                if gateway:
                    dev = ipr.get_links(route.get("oif"))[0].get("ifname") if route.get("oif") else "?"
                    return f"{network} via {gateway} dev {dev}"
    return None


def main(argv: list[str]) -> int:
    try:
        opts, _ = getopt.getopt(argv, "f:d:icmk:h")
    except getopt.GetoptError as e:
        sys.stderr.write(f"mk-docker-opts: {e}\n{USAGE}")
        return 1
    flannel_env, docker_env, key = DEFAULT_SUBNET_FILE, DEFAULT_DOCKER_ENV, DEFAULT_COMBINED_KEY
    individual = combined = False
    ipmasq = True
    for flag, value in opts:
        if flag == "-f":
            flannel_env = value
        elif flag == "-d":
            docker_env = value
        elif flag == "-i":
            individual = True
        elif flag == "-c":
            combined = True
        elif flag == "-m":
            ipmasq = False
        elif flag == "-k":
            key = value
        elif flag == "-h":
            sys.stdout.write(USAGE)
            return 0
    if not individual and not combined:
        individual = combined = True
    try:
        with open(flannel_env, encoding="utf-8") as f:
            file_vars = parse_env(f.read())
    except (OSError, UnicodeDecodeError) as e:
        sys.stderr.write(
            f"mk-docker-opts: cannot read the flannel env file {flannel_env}: {getattr(e, 'strerror', None) or e}. "
            "Is flannelpy running? It writes the file once its network is up (see --subnet-file); "
            "give another path with -f.\n"
        )
        return 1
    variables = {**os.environ, **file_vars}
    try:
        text = render_docker_opts(variables, individual=individual, combined=combined, key=key, ipmasq=ipmasq)
    except DockerOptsError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    try:
        write_text_atomically(docker_env, text)
    except OSError as e:
        sys.stderr.write(f"mk-docker-opts: cannot write the Docker env file {docker_env}: {e.strerror or e}\n")
        return 1
    subnet = variables.get("FLANNEL_SUBNET")
    if subnet:
        route = conflicting_route(subnet)
        if route:
            sys.stderr.write(f"Your routing table already contains the subnet: {route}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
