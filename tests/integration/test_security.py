"""etcd with user/password auth (re-authentication after a restart) and with TLS client certificates."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from flannelpy.lab.etcd import EtcdCluster, EtcdTLS
from flannelpy.subnet.manager import SubnetManager
from flannelpy.subnet.registry import EtcdRegistry, RegistryAuthError, RegistryError, RegistryUnavailableError
from tests.integration.conftest import etcdctl
from tests.integration.test_leases import CONFIG_JSON, host


async def test_user_password_and_reauth(tmp_path: Path, prefix: str) -> None:
    # Tokens expire after 2 idle seconds here, so the client must notice and log in again.
    with EtcdCluster.local(tmp_path, extra_args=["--auth-token-ttl", "2"]) as private_etcd:
        await check_user_password_and_reauth(private_etcd, prefix)


async def check_user_password_and_reauth(private_etcd: EtcdCluster, prefix: str) -> None:
    etcdctl(private_etcd, "user", "add", "root:rootpw")
    etcdctl(private_etcd, "user", "grant-role", "root", "root")
    etcdctl(private_etcd, "auth", "enable")
    reg = EtcdRegistry(private_etcd.endpoints, username="root", password="rootpw")
    try:
        m = SubnetManager(reg, prefix)
        await m.set_config(CONFIG_JSON)
        config = await m.get_network_config()
        lease = await m.acquire_lease(config, host(1))
        it = m.watch_leases(config, lease)
        assert await asyncio.wait_for(it.__anext__(), 10) == ([], [])
        with capture_logs() as logs:
            await asyncio.sleep(3)  # the token expires
            assert (await m.get_network_config()).network == config.network
        assert any(str(e["event"]).startswith("etcd auth token rejected") for e in logs)
        private_etcd.kill_member("etcd0")  # the watch breaks and resumes with a fresh login
        private_etcd.start_member("etcd0")
        etcdctl(private_etcd, "--user", "root:rootpw", "put", f"{prefix}/subnets/10.5.99.0-24",
                host(2).to_json().decode())
        added, _ = await asyncio.wait_for(it.__anext__(), 30)
        assert [str(le.subnet) for le in added] == ["10.5.99.0/24"]
        await it.aclose()
    finally:
        await reg.close()

    wrong = EtcdRegistry(private_etcd.endpoints, username="root", password="nope")
    with pytest.raises(RegistryAuthError, match=r"refused user 'root'.*--etcd-password"):
        await wrong.get(f"{prefix}/config")
    await wrong.close()
    anonymous = EtcdRegistry(private_etcd.endpoints)
    with pytest.raises(RegistryError):
        await anonymous.get(f"{prefix}/config")
    await anonymous.close()


def make_certs(d: Path) -> dict[str, Path]:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=fp-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")]:
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=fp-{name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


async def test_tls_client_certificates(tmp_path: Path, prefix: str) -> None:
    certs = make_certs(tmp_path)
    tls = EtcdTLS(certs["ca.crt"], certs["server.crt"], certs["server.key"], certs["client.crt"],
                  certs["client.key"])
    with EtcdCluster(tmp_path / "etcd", EtcdCluster.local(tmp_path).members, tls=tls) as cluster:
        assert cluster.endpoints[0].startswith("https://")
        reg = EtcdRegistry(cluster.endpoints, cafile=str(certs["ca.crt"]), certfile=str(certs["client.crt"]),
                           keyfile=str(certs["client.key"]))
        try:
            m = SubnetManager(reg, prefix)
            await m.set_config(CONFIG_JSON)
            lease = await m.acquire_lease(await m.get_network_config(), host(1))
            assert [le.subnet for le in await m.list_leases()] == [lease.subnet]
        finally:
            await reg.close()
        # Without a client certificate etcd does not let us in.
        no_cert = EtcdRegistry(cluster.endpoints, cafile=str(certs["ca.crt"]), dial_timeout=2, request_timeout=2)
        with pytest.raises(RegistryUnavailableError):
            await no_cert.get(f"{prefix}/config")
        await no_cert.close()


def test_tls_files_are_checked_up_front(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"--etcd-cafile=.*cannot read it"):
        EtcdRegistry(["https://127.0.0.1:2379"], cafile=str(tmp_path / "missing.crt"))
    with pytest.raises(RegistryError, match="--etcd-certfile and --etcd-keyfile"):
        EtcdRegistry(["https://127.0.0.1:2379"], certfile=str(tmp_path / "c.crt"))
    with pytest.raises(RegistryError, match="both --etcd-username and --etcd-password"):
        EtcdRegistry(["http://127.0.0.1:2379"], username="root")
    with pytest.raises(RegistryError, match="etcd endpoint 'ftp://x'"):
        EtcdRegistry(["ftp://x"])
