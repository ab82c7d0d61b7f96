"""The network config stored at <prefix>/config: parse, apply flanneld's defaults, validate (pure).

Keys match case-insensitively, as Go's encoding/json does for flanneld. Every rejection is one
ConfigError whose message names the key, the value and the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, TypeVar

from flannelpy.errors import ConfigError

BACKEND_TYPES = ("udp", "vxlan", "host-gw", "alloc")
DEFAULT_UDP_PORT = 8285
DEFAULT_VXLAN_VNI = 1

# The keys each backend understands (lower case); anything else is kept but reported.
_BACKEND_KEYS: dict[str, tuple[str, ...]] = {
    "udp": ("type", "port", "mtu"),
    "vxlan": ("type", "vni", "port", "gbp", "learning", "directrouting", "mtu"),
    "host-gw": ("type", "mtu"),
    "alloc": ("type", "mtu"),
}


@dataclass(frozen=True)
class BackendConfig:
    type: str = "udp"
    options: dict[str, Any] = field(default_factory=dict)  # lower-cased keys, as written

    def _get(self, key: str, default: Any) -> Any:
        return self.options.get(key.lower(), default)

    @property
    def port(self) -> int:
        return int(self._get("port", DEFAULT_UDP_PORT if self.type == "udp" else 0))

    @property
    def vni(self) -> int:
        return int(self._get("vni", DEFAULT_VXLAN_VNI))

    @property
    def mtu(self) -> int | None:
        value = self._get("mtu", 0)
        return int(value) if value else None

    @property
    def gbp(self) -> bool:
        return bool(self._get("gbp", False))

    @property
    def learning(self) -> bool:
        return bool(self._get("learning", False))

    @property
    def direct_routing(self) -> bool:
        return bool(self._get("directrouting", False))

    def to_json_obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Type": self.type}
        names = {"port": "Port", "vni": "VNI", "mtu": "MTU", "gbp": "GBP", "learning": "Learning",
                 "directrouting": "DirectRouting"}
        for k, v in self.options.items():
            if k != "type":
                out[names.get(k, k)] = v
        return out


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    backend: BackendConfig = field(default_factory=BackendConfig)
    unknown_keys: tuple[str, ...] = ()

    @property
    def backend_type(self) -> str:
        return self.backend.type

    def subnet_count(self) -> int:
        """How many subnets lie between SubnetMin and SubnetMax, both included."""
        if self.subnet_min is None or self.subnet_max is None:
            return 0
        return ((int(self.subnet_max) - int(self.subnet_min)) >> (32 - self.subnet_len)) + 1

    def iter_subnets(self) -> list[IPv4Network]:
        """Every leasable IPv4 subnet, SubnetMin to SubnetMax (at most 2**(30-prefix) of them)."""
        assert self.subnet_min is not None
        step = 1 << (32 - self.subnet_len)
        start = int(self.subnet_min)
        return [IPv4Network((start + i * step, self.subnet_len)) for i in range(self.subnet_count())]

    def contains_subnet(self, subnet: IPv4Network) -> bool:
        """A lease fits if it has our SubnetLen and lies between SubnetMin and SubnetMax."""
        if self.network is None or self.subnet_min is None or self.subnet_max is None:
            return False
        return (
            subnet.prefixlen == self.subnet_len
            and int(self.subnet_min) <= int(subnet.network_address) <= int(self.subnet_max)
        )

    def to_json(self) -> str:
        obj: dict[str, Any] = {}
        if self.network is not None:
            obj["Network"] = str(self.network)
            obj["SubnetLen"] = self.subnet_len
            obj["SubnetMin"] = str(self.subnet_min)
            obj["SubnetMax"] = str(self.subnet_max)
        if not self.enable_ipv4:
            obj["EnableIPv4"] = False
        if self.enable_ipv6:
            obj["EnableIPv6"] = True
            obj["IPv6Network"] = str(self.ipv6_network)
            obj["IPv6SubnetLen"] = self.ipv6_subnet_len
            obj["IPv6SubnetMin"] = str(self.ipv6_subnet_min)
            obj["IPv6SubnetMax"] = str(self.ipv6_subnet_max)
        obj["Backend"] = self.backend.to_json_obj()
        return json.dumps(obj)


_KNOWN_KEYS = {
    "network", "subnetlen", "subnetmin", "subnetmax", "enableipv4", "enableipv6", "ipv6network",
    "ipv6subnetlen", "ipv6subnetmin", "ipv6subnetmax", "backend",
}


def _lower_keys(obj: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        lk = k.lower()
        if lk in out:
            raise ConfigError(f"config key {where}{k!r} is given twice (keys match case-insensitively)")
        out[lk] = v
    return out


def _int(raw: dict[str, Any], key: str, name: str) -> int:
    value = raw.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key {name}={value!r}: must be a whole number")
    return value


def _bool(raw: dict[str, Any], key: str, name: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config key {name}={value!r}: must be true or false")
    return value


def _str(raw: dict[str, Any], key: str, name: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"config key {name}={value!r}: must be a string")
    return value


def _parse_backend(raw: Any) -> BackendConfig:
    if raw is None:
        return BackendConfig("udp", {"type": "udp"})
    if not isinstance(raw, dict):
        raise ConfigError(f'config key Backend={raw!r}: must be an object such as {{"Type": "vxlan"}}')
    opts = _lower_keys(raw, "Backend.")
    btype = opts.get("type")
    if isinstance(btype, str):
        btype = opts["type"] = btype.lower()  # as flanneld's backend manager: "VXLAN" and "Host-GW" work
    if not isinstance(btype, str) or btype not in BACKEND_TYPES:
        raise ConfigError(
            f"config key Backend.Type={btype!r}: unknown backend type; use one of {', '.join(BACKEND_TYPES)}"
        )
    for key in ("port", "vni", "mtu"):
        if key in opts:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"config key Backend.{key}={v!r}: must be a whole number >= 0")
    if "port" in opts and opts["port"] > 65535:
        raise ConfigError(f"config key Backend.Port={opts['port']!r}: must be at most 65535")
    if btype == "udp" and opts.get("port") == 0:
        # vxlan's 0 means the kernel's default port; a udp socket on port 0 would get a random one, while
        # peers send to the port of the config.
        raise ConfigError("config key Backend.Port=0: the udp backend needs a port between 1 and 65535 "
                          f"(leave it out for {DEFAULT_UDP_PORT})")
    if "vni" in opts and opts["vni"] > 0xFFFFFF:
        raise ConfigError(f"config key Backend.VNI={opts['vni']!r}: must be at most 16777215")
    if "mtu" in opts and opts["mtu"] and not 68 <= opts["mtu"] <= 65535:
        raise ConfigError(f"config key Backend.MTU={opts['mtu']!r}: must be between 68 and 65535 (0 = computed)")
    for key in ("gbp", "learning", "directrouting"):
        if key in opts and not isinstance(opts[key], bool):
            raise ConfigError(f"config key Backend.{key}={opts[key]!r}: must be true or false")
    return BackendConfig(btype, opts)


def _ipv4_part(raw: dict[str, Any]) -> tuple[IPv4Network, int, IPv4Address, IPv4Address]:
    text = _str(raw, "network", "Network")
    if text is None:
        raise ConfigError('config key Network is missing: give the overlay range, e.g. "Network": "10.5.0.0/16"')
    try:
        network = IPv4Network(text, strict=False)  # flanneld masks host bits off
    except ValueError:
        raise ConfigError(f"config key Network={text!r}: not an IPv4 CIDR such as 10.5.0.0/16") from None
    plen = network.prefixlen
    subnet_len = _int(raw, "subnetlen", "SubnetLen")
    if subnet_len < 0:
        raise ConfigError(f"config key SubnetLen={subnet_len}: must not be negative")
    if subnet_len == 0:
        if plen < 23:
            subnet_len = 24
        elif plen <= 28:
            subnet_len = plen + 2
        else:
            raise ConfigError(
                f"config key Network={text!r}: network is too small. Minimum useful network prefix is /28"
            )
    else:
        if subnet_len > 30:
            raise ConfigError(
                f"config key SubnetLen={subnet_len}: must be 30 or less (subnets of /31, /32 hold no hosts)"
            )
        if subnet_len < plen + 2:
            raise ConfigError(
                f"config key SubnetLen={subnet_len}: network must be able to accommodate at least four subnets "
                f"(with Network {network} SubnetLen must be at least {plen + 2})"
            )
    size = 1 << (32 - subnet_len)
    first = int(network.network_address)
    last_subnet = first + (1 << (32 - plen)) - size

    smin = _bound(raw, "SubnetMin", IPv4Address(first + size), network, subnet_len, "Network", "SubnetLen")
    smax = _bound(raw, "SubnetMax", IPv4Address(last_subnet), network, subnet_len, "Network", "SubnetLen")
    if smin > smax:
        raise ConfigError(f"config key SubnetMin={smin}: must not be above SubnetMax={smax}")
    return network, subnet_len, smin, smax


_Address = TypeVar("_Address", IPv4Address, IPv6Address)


def _bound(raw: dict[str, Any], name: str, default: _Address, network: IPv4Network | IPv6Network,
           subnet_len: int, network_key: str, len_key: str) -> _Address:
    """SubnetMin/SubnetMax (or the IPv6 pair): default when absent, else an address of the network on a
    subnet boundary."""
    s = _str(raw, name.lower(), name)
    if s is None:
        return default
    try:
        addr = type(default)(s)
    except ValueError:
        raise ConfigError(f"config key {name}={s!r}: not an IPv{default.version} address") from None
    if int(addr) == 0:
        return default  # flanneld reads the zero address as "not set" (CheckNetworkConfig)
    if addr not in network:
        raise ConfigError(f"config key {name}={s!r}: must lie in {network_key} {network}")
    if (int(addr) - int(network.network_address)) % (1 << (network.max_prefixlen - subnet_len)):
        raise ConfigError(f"config key {name}={s!r}: must be on a /{subnet_len} boundary ({len_key})")
    return addr


def _ipv6_part(raw: dict[str, Any]) -> tuple[IPv6Network, int, IPv6Address, IPv6Address]:
    text = _str(raw, "ipv6network", "IPv6Network")
    if text is None:
        raise ConfigError(
            'config key IPv6Network is missing while EnableIPv6 is true, e.g. "IPv6Network": "fd00:6::/56"'
        )
    try:
        network = IPv6Network(text, strict=False)
    except ValueError:
        raise ConfigError(f"config key IPv6Network={text!r}: not an IPv6 CIDR such as fd00:6::/56") from None
    plen = network.prefixlen
    slen = _int(raw, "ipv6subnetlen", "IPv6SubnetLen")
    if slen == 0:
        if plen <= 62:
            slen = 64
        elif plen <= 124:
            slen = plen + 2
        else:
            raise ConfigError(
                f"config key IPv6Network={text!r}: network is too small. Minimum useful network prefix is /124"
            )
    else:
        if slen > 126:
            raise ConfigError(f"config key IPv6SubnetLen={slen}: must be 126 or less")
        if slen < plen + 2:
            raise ConfigError(
                f"config key IPv6SubnetLen={slen}: network must be able to accommodate at least four subnets "
                f"(with IPv6Network {network} it must be at least {plen + 2})"
            )
    size = 1 << (128 - slen)
    first = int(network.network_address)
    last = first + (1 << (128 - plen)) - size

    smin = _bound(raw, "IPv6SubnetMin", IPv6Address(first + size), network, slen, "IPv6Network", "IPv6SubnetLen")
    smax = _bound(raw, "IPv6SubnetMax", IPv6Address(last), network, slen, "IPv6Network", "IPv6SubnetLen")
    if smin > smax:
        raise ConfigError(f"config key IPv6SubnetMin={smin}: must not be above IPv6SubnetMax={smax}")
    return network, slen, smin, smax


def parse_config(data: str | bytes) -> NetworkConfig:
    """Parse the JSON stored at <prefix>/config. Raises ConfigError naming key, value and rule."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(f"network config is not valid JSON ({why}); write an object such as "
                          '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}') from None
    if not isinstance(obj, dict):
        raise ConfigError(f"network config must be a JSON object, got {type(obj).__name__}")
    raw = _lower_keys(obj, "")
    enable4 = _bool(raw, "enableipv4", "EnableIPv4", True)
    enable6 = _bool(raw, "enableipv6", "EnableIPv6", False)
    if not enable4 and not enable6:
        raise ConfigError("config keys EnableIPv4=false and EnableIPv6=false: at least one must be true")
    backend = _parse_backend(raw.get("backend"))
    net4: IPv4Network | None = None
    slen4 = 0
    min4 = max4 = None
    if enable4:
        net4, slen4, min4, max4 = _ipv4_part(raw)
    net6 = None
    slen6 = 0
    min6 = max6 = None
    if enable6:
        net6, slen6, min6, max6 = _ipv6_part(raw)
    unknown = [k for k in obj if k.lower() not in _KNOWN_KEYS]
    unknown += [f"Backend.{k}" for k in backend.options if k not in _BACKEND_KEYS[backend.type]]
    return NetworkConfig(
        network=net4, subnet_len=slen4, subnet_min=min4, subnet_max=max4,
        enable_ipv4=enable4, enable_ipv6=enable6, ipv6_network=net6, ipv6_subnet_len=slen6,
        ipv6_subnet_min=min6, ipv6_subnet_max=max6, backend=backend, unknown_keys=tuple(sorted(unknown)),
    )
