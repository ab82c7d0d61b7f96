"""Lease values exactly as flanneld stores them in etcd (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannelpy.ip import parse_subnet_key, subnet_key


class LeaseFormatError(ValueError):
    """A value under <prefix>/subnets/ that is not a flannel lease."""


@dataclass(frozen=True)
class LeaseAttrs:
    """The JSON value of a lease key: `{"PublicIP":"10.99.0.1","PublicIPv6":null}` (+ backend)."""

    public_ip: IPv4Address
    public_ipv6: IPv6Address | None = None
    backend_type: str | None = None  # flanneld's udp backend sets none
    backend_data: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 is not None else None,
        }
        if self.backend_type:
            obj["BackendType"] = self.backend_type
        if self.backend_data is not None:
            obj["BackendData"] = self.backend_data
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> LeaseAttrs:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseFormatError(f"lease value is not JSON: {e}") from None
        except RecursionError:  # garbage nested thousands deep must not take every daemon down
            raise LeaseFormatError("lease value is not JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        low = {k.lower(): v for k, v in obj.items()}
        v4 = low.get("publicip")
        # Strings only: ipaddress would also take a JSON number (or true, as 1) for an address.
        try:
            if not isinstance(v4, str):
                raise ValueError(v4)
            public_ip = IPv4Address(v4)
        except ValueError:
            raise LeaseFormatError(f"lease PublicIP={v4!r} is not an IPv4 address") from None
        v6 = low.get("publicipv6")
        try:
            if v6 is not None and not isinstance(v6, str):
                raise ValueError(v6)
            public_ipv6 = IPv6Address(v6) if v6 else None
        except ValueError:
            raise LeaseFormatError(f"lease PublicIPv6={v6!r} is not an IPv6 address") from None
        btype = low.get("backendtype") or None
        if btype is not None and not isinstance(btype, str):
            raise LeaseFormatError(f"lease BackendType={btype!r} is not a string")
        bdata = low.get("backenddata")
        if bdata is not None and not isinstance(bdata, dict):
            raise LeaseFormatError("lease BackendData is not a JSON object")
        return cls(public_ip, public_ipv6, btype, bdata)

    @property
    def effective_backend(self) -> str:
        """flanneld's udp backend writes no BackendType, so an absent one means udp."""
        return self.backend_type or "udp"


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    # Unix time the etcd lease runs out; None for a reservation (a key with no etcd lease).
    expiration: float | None = None
    etcd_lease_id: int = 0
    revision: int = field(default=0, compare=False)  # etcd mod_revision of the key
    # etcd create_revision of the key: which of several leases sharing a PublicIP is routed (the oldest).
    created: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)

    @property
    def is_reservation(self) -> bool:
        return self.etcd_lease_id == 0

    @classmethod
    def from_kv(cls, key: str, value: bytes, *, etcd_lease_id: int = 0, expiration: float | None = None,
                revision: int = 0, created: int = 0) -> Lease:
        """Build a lease from an etcd key (full path or last element) and value; raises ValueError."""
        subnet, v6 = parse_subnet_key(key)
        return cls(subnet, LeaseAttrs.from_json(value), v6, expiration, etcd_lease_id, revision, created)
