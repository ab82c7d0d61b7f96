"""The key-value store behind the subnet manager: a small Registry protocol and its etcd v3 implementation.

This is the only module that imports aetcd. aetcd 1.0 dials one host over an insecure channel; we use its
generated gRPC stubs (aetcd.rpc) over our own grpc.aio channels to add what flannel needs from an etcd
client: several endpoints with failover, TLS client certificates, user/password auth that re-authenticates
when the token is rejected (expired, or etcd restarted), keepalive pings plus per-call deadlines so a frozen
member is left within seconds, and a watch that resumes from the last seen revision + 1 after a broken
stream and reports compaction so the caller re-lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
import structlog
from aetcd import rpc

from flannelpy.errors import FlannelError

log = structlog.get_logger()

T = TypeVar("T")


class RegistryError(FlannelError):
    """A registry operation failed."""


class RegistryUnavailableError(RegistryError):
    """No endpoint answered: etcd is down, unreachable or frozen."""


class RegistryAuthError(RegistryError):
    """etcd refused our user name/password, or the user lacks permission."""


class LeaseNotFoundError(RegistryError):
    """The etcd lease a key was to be attached to no longer exists."""


class CompactedError(RegistryError):
    """A watch asked for history that etcd has compacted away; list again and diff."""

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        super().__init__(message or f"etcd history was compacted up to revision {compact_revision}")
        self.compact_revision = compact_revision


class HistoryRewoundError(CompactedError):
    """etcd's revision is behind the one a watch resumes from: the cluster was restored from a snapshot or
    rebuilt, and the revisions in between are not the events we missed. List again and diff, as after a
    compaction (a watch from the old revision would stay silent until etcd counted up to it)."""

    def __init__(self, revision: int, resume: int) -> None:
        super().__init__(revision, f"etcd is at revision {revision}, behind the watch's {resume}: restored "
                                   "from a snapshot or rebuilt")
        self.resume = resume


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int = 0  # etcd lease id; 0 = no lease (a reservation, for subnet keys)
    mod_revision: int = 0
    create_revision: int = 0
    version: int = 0


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    key: str
    value: bytes  # empty for DELETE
    lease: int
    revision: int  # the mod_revision of the change
    create_revision: int = 0  # of the key (PUT only)


@dataclass(frozen=True)
class Claim:
    """A key created with a fresh etcd lease by create_with_lease."""

    lease_id: int
    ttl: float  # seconds granted
    revision: int


class Registry(Protocol):
    async def get(self, key: str) -> KeyValue | None: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write key (attached to etcd lease `lease` unless 0); returns the new revision."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under prefix and the store revision they were read at."""
        ...

    async def create_with_lease(self, key: str, value: bytes, ttl: float) -> Claim | None:
        """Atomically create key attached to a new etcd lease; None (lease revoked) if the key exists."""
        ...

    async def refresh_lease(self, lease_id: int) -> float | None:
        """Renew an etcd lease to its full TTL; returns the TTL, or None if the lease no longer exists."""
        ...

    async def lease_ttl(self, lease_id: int) -> float | None:
        """Seconds left on an etcd lease; None if it no longer exists."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of changes under prefix from start_revision on; raises CompactedError."""
        ...

    async def close(self) -> None: ...


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix"."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _decode_key(key: bytes) -> str:
    return key.decode("utf-8", errors="replace")


def _kv(kv: Any) -> KeyValue:
    return KeyValue(_decode_key(kv.key), bytes(kv.value), int(kv.lease), int(kv.mod_revision),
                    int(kv.create_revision), int(kv.version))


@dataclass(frozen=True)
class Endpoint:
    url: str
    target: str  # host:port for gRPC
    secure: bool


def parse_endpoints(endpoints: list[str], tls: bool) -> list[Endpoint]:
    """`http://h:2379` (plain), `https://h:2379` (TLS), `h:2379` (TLS when certificates are given)."""
    out: list[Endpoint] = []
    for raw in endpoints:
        text = raw.strip()
        if not text:
            continue
        if "://" in text:
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise RegistryError(f"etcd endpoint {raw!r}: use http://HOST:PORT or https://HOST:PORT")
            try:
                port = parts.port or 2379
            except ValueError:
                raise RegistryError(f"etcd endpoint {raw!r}: the port is not a number") from None
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            out.append(Endpoint(text, f"{host}:{port}", parts.scheme == "https"))
        else:
            target = text if ":" in text else f"{text}:2379"
            out.append(Endpoint(text, target, tls))
    if not out:
        raise RegistryError("no etcd endpoints given; use --etcd-endpoints http://127.0.0.1:2379")
    return out


_FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
PROGRESS_EVERY = 20.0  # seconds between progress requests on a quiet watch (readiness counts etcd stale at 60)


def _is_token_error(e: grpc.aio.AioRpcError) -> bool:
    details = (e.details() or "").lower()
    return e.code() == grpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in details \
        or "auth store is old" in details or "user name is empty" in details


class _DialError(Exception):
    pass


class _Conn:
    """One gRPC channel to one endpoint, with the stubs and the auth token it uses."""

    def __init__(self, endpoint: Endpoint, channel: grpc.aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.auth = rpc.AuthStub(channel)
        self.token: str | None = None
        self.dropped = False  # closed by a failover: calls still on it were cancelled by grpc, not by us

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("token", self.token),) if self.token else ()


class EtcdRegistry:
    """Registry over etcd's v3 gRPC API with failover between endpoints."""

    def __init__(self, endpoints: list[str], *, cafile: str | None = None, certfile: str | None = None,
                 keyfile: str | None = None, username: str | None = None, password: str | None = None,
                 dial_timeout: float = 5.0, request_timeout: float = 5.0,
                 keepalive_time: float = 5.0, keepalive_timeout: float = 3.0,
                 max_backoff: float = 5.0) -> None:
        self._credentials = self._load_tls(cafile, certfile, keyfile)
        self.endpoints = parse_endpoints(endpoints, tls=self._credentials is not None)
        if any(e.secure for e in self.endpoints) and self._credentials is None:
            self._credentials = grpc.ssl_channel_credentials()  # https:// with the system's CAs
        if (username is None) != (password is None) or username == "":
            raise RegistryError("etcd auth needs both --etcd-username and --etcd-password")
        self._username = username
        self._password = password
        plain = [e.url for e in self.endpoints if not e.secure]
        if plain and (cafile or certfile or keyfile or username):
            # The files (and a password) would go unused, or in the clear: an http:// endpoint is plaintext.
            log.warning("etcd endpoints without TLS although TLS files or a user are set: not encrypted; "
                        "write them as https://", endpoints=",".join(plain))
        # How to reach this etcd from a shell, for the hints in messages (no password: it would be logged).
        raw = ",".join(e.url for e in self.endpoints)
        tls = [(name, path) for name, path in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile))
               if path]
        self.hint_flags = " ".join([f"--etcd-endpoints={raw}", *(f"--etcd-{n}={v}" for n, v in tls)])
        etcdctl = {"cafile": "cacert", "certfile": "cert", "keyfile": "key"}
        self.etcdctl_flags = " ".join([f"--endpoints={raw}", *(f"--{etcdctl[n]}={v}" for n, v in tls)])
        self.dial_timeout = dial_timeout
        self.request_timeout = request_timeout
        self.max_backoff = max_backoff
        self._options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
            # grpc core enforces the ping timeout, not keepalive_timeout (grpc/grpc#39239).
            ("grpc.http2.ping_timeout_ms", int(keepalive_timeout * 1000)),
            # etcd's server rejects pings on a connection without streams (PermitWithoutStream=false:
            # GOAWAY too_many_pings after ~15 s idle). The watch channel always carries its stream, so it
            # is pinged; an idle request channel relies on the per-call deadline instead.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            # As etcd's Go client (MaxCallRecvMsgSize = MaxInt32): one listing of subnets/ with a few dozen
            # large garbage values passed 64 MiB and stopped every daemon at start.
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
        ]
        self._index = 0  # the endpoint unary calls use; moves on after a failure
        self._conn: _Conn | None = None
        self._conn_lock = asyncio.Lock()
        self._unary_opened = False
        self._closed = False
        self._watch_conns: set[_Conn] = set()
        # Read by health checks and metrics.
        self.reconnects = 0
        self.last_success: float | None = None

    @staticmethod
    def _load_tls(cafile: str | None, certfile: str | None,
                  keyfile: str | None) -> grpc.ChannelCredentials | None:
        if not (cafile or certfile or keyfile):
            return None
        if bool(certfile) != bool(keyfile):
            raise RegistryError("TLS client auth needs both --etcd-certfile and --etcd-keyfile")

        def read(path: str | None, flag: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise RegistryError(f"{flag}={path}: cannot read it: {e.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(cafile, "--etcd-cafile"),
            private_key=read(keyfile, "--etcd-keyfile"),
            certificate_chain=read(certfile, "--etcd-certfile"),
        )

    @property
    def endpoint(self) -> str:
        """The endpoint unary calls currently use."""
        return self.endpoints[self._index].url

    # -- connections ---------------------------------------------------------------------------

    async def _open(self, index: int, *, reconnect: bool) -> _Conn:
        endpoint = self.endpoints[index]
        if endpoint.secure:
            assert self._credentials is not None
            channel = grpc.aio.secure_channel(endpoint.target, self._credentials, options=self._options)
        else:
            channel = grpc.aio.insecure_channel(endpoint.target, options=self._options)
        conn = _Conn(endpoint, channel)
        try:
            await self._dial(channel)
            if self._username is not None:
                await self._authenticate(conn)
        except BaseException:
            await channel.close()
            raise
        if reconnect:
            self.reconnects += 1
        log.debug("etcd connected", endpoint=endpoint.url)
        return conn

    async def _dial(self, channel: grpc.aio.Channel) -> None:
        # Fail fast on a refused connection; a frozen member costs at most dial_timeout.
        deadline = time.monotonic() + self.dial_timeout
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
                raise _DialError("cannot connect (is etcd running there? a firewall in the way?)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _DialError(f"no answer within {self.dial_timeout:g}s")
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except TimeoutError:
                raise _DialError(f"no answer within {self.dial_timeout:g}s") from None
            state = channel.get_state(try_to_connect=True)

    async def _authenticate(self, conn: _Conn) -> None:
        try:
            resp = await conn.auth.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password),
                timeout=self.request_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() in _FAILOVER_CODES:
                raise
            raise RegistryAuthError(
                f"etcd at {conn.endpoint.url} refused user {self._username!r}: {e.details()}; "
                "check --etcd-username/--etcd-password") from None
        conn.token = resp.token

    async def _current(self) -> _Conn:
        async with self._conn_lock:
            if self._conn is None:
                self._conn = await self._open(self._index, reconnect=self._unary_opened)
                self._unary_opened = True
            return self._conn

    async def _drop(self, conn: _Conn, why: str) -> None:
        async with self._conn_lock:
            if self._conn is conn:
                conn.dropped = True
                self._conn = None
                self._index = (self._index + 1) % len(self.endpoints)
                log.warning("etcd endpoint failed; trying the next one", endpoint=conn.endpoint.url,
                            error=why, next=self.endpoints[self._index].url)
                await conn.channel.close(grace=0.5)

    async def _call(self, fn: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run fn on the current connection, failing over through every endpoint once."""
        if self._closed:
            raise RegistryError("etcd registry is closed")
        errors: list[str] = []
        reauthed = False
        attempt = 0
        while attempt < len(self.endpoints):
            try:
                conn = await self._current()
            except (_DialError, grpc.aio.AioRpcError) as e:
                why = str(e) if isinstance(e, _DialError) else f"{e.code().name}: {e.details()}"
                errors.append(f"{self.endpoint}: {why}")
                async with self._conn_lock:
                    failed, self._index = self.endpoint, (self._index + 1) % len(self.endpoints)
                if len(self.endpoints) > 1:  # a black-holed member costs dial_timeout: say where it went
                    log.warning("etcd endpoint unreachable; trying the next one", endpoint=failed, error=why,
                                next=self.endpoint)
                attempt += 1
                continue
            try:
                result = await fn(conn)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not conn.dropped or (task is not None and task.cancelling()):
                    raise
                # Another call failed over and closed this channel under us: go on to the next endpoint.
                errors.append(f"{conn.endpoint.url}: channel closed by a failover")
                attempt += 1
                continue
            except grpc.aio.AioRpcError as e:
                if e.code() in _FAILOVER_CODES:
                    errors.append(f"{conn.endpoint.url}: {e.code().name}: {e.details()}")
                    await self._drop(conn, f"{e.code().name}: {e.details()}")
                    attempt += 1
                    continue
                if self._username is not None and _is_token_error(e) and not reauthed:
                    log.info("etcd auth token rejected; authenticating again", endpoint=conn.endpoint.url,
                             error=e.details())
                    reauthed = True
                    try:
                        await self._authenticate(conn)
                    except grpc.aio.AioRpcError as e2:
                        await self._drop(conn, f"{e2.code().name}: {e2.details()}")
                        attempt += 1
                    continue
                if "requested lease not found" in (e.details() or ""):
                    raise LeaseNotFoundError(f"etcd: {e.details()}") from None
                if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise RegistryAuthError(f"etcd denied the request: {e.details()}") from None
                raise RegistryError(f"etcd request failed: {e.code().name}: {e.details()}") from None
            self.last_success = time.time()
            return result
        raise RegistryUnavailableError("no etcd endpoint answered (" + "; ".join(errors) + ")")

    # -- key-value -----------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        req = rpc.RangeRequest(key=key.encode())
        resp = await self._call(lambda c: c.kv.Range(req, timeout=self.request_timeout, metadata=c.metadata))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        req = rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = await self._call(lambda c: c.kv.Put(req, timeout=self.request_timeout, metadata=c.metadata))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        req = rpc.DeleteRangeRequest(key=key.encode())
        resp = await self._call(
            lambda c: c.kv.DeleteRange(req, timeout=self.request_timeout, metadata=c.metadata))
        return bool(resp.deleted)

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        p = prefix.encode()
        req = rpc.RangeRequest(key=p, range_end=prefix_range_end(p))
        resp = await self._call(lambda c: c.kv.Range(req, timeout=self.request_timeout, metadata=c.metadata))
        return [_kv(kv) for kv in resp.kvs], int(resp.header.revision)

    async def create_with_lease(self, key: str, value: bytes, ttl: float) -> Claim | None:
        grant = await self._call(lambda c: c.lease.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=int(ttl)), timeout=self.request_timeout, metadata=c.metadata))
        lease_id = int(grant.ID)
        k = key.encode()
        txn = rpc.TxnRequest(
            compare=[rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=k, version=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        )
        try:
            resp = await self._call(lambda c: c.kv.Txn(txn, timeout=self.request_timeout, metadata=c.metadata))
        except RegistryError:
            await self._revoke_quietly(lease_id)
            raise
        if resp.succeeded:
            return Claim(lease_id, float(grant.TTL), int(resp.header.revision))
        # A retried txn may find the key its first, lost-looking attempt created.
        current = resp.responses[0].response_range.kvs if resp.responses else []
        if current and int(current[0].lease) == lease_id:
            return Claim(lease_id, float(grant.TTL), int(current[0].mod_revision))
        await self._revoke_quietly(lease_id)
        return None

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self.revoke_lease(lease_id)
        except RegistryError as e:
            log.warning("could not revoke an unused etcd lease; it expires by itself", lease=lease_id,
                        error=str(e))

    async def revoke_lease(self, lease_id: int) -> None:
        req = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(lambda c: c.lease.LeaseRevoke(req, timeout=self.request_timeout,
                                                           metadata=c.metadata))
        except LeaseNotFoundError:
            pass

    async def refresh_lease(self, lease_id: int) -> float | None:
        async def keepalive(c: _Conn) -> Any:
            call = c.lease.LeaseKeepAlive(timeout=self.request_timeout, metadata=c.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                await call.done_writing()
                return await call.read()
            finally:
                call.cancel()

        resp = await self._call(keepalive)
        if resp is grpc.aio.EOF or int(resp.TTL) <= 0:
            return None
        return float(resp.TTL)

    async def lease_ttl(self, lease_id: int) -> float | None:
        req = rpc.LeaseTimeToLiveRequest(ID=lease_id)
        resp = await self._call(
            lambda c: c.lease.LeaseTimeToLive(req, timeout=self.request_timeout, metadata=c.metadata))
        return float(resp.TTL) if int(resp.TTL) >= 0 else None

    async def compact(self, revision: int) -> None:
        req = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call(lambda c: c.kv.Compact(req, timeout=self.request_timeout, metadata=c.metadata))

    # -- watch ---------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Yield event batches; survives broken streams and endpoint failures by resuming after the
        last revision seen. Raises CompactedError when that revision is no longer in etcd's history."""
        p = prefix.encode()
        next_rev = start_revision
        index = self._index
        backoff = 0.2
        failures = 0
        reauthed = False
        opened_before = False
        said = False  # "etcd watch resumed" logged for the current outage
        conn: _Conn | None = None
        try:
            while not self._closed:
                try:
                    if conn is None:
                        conn = await self._open(index, reconnect=opened_before)
                        opened_before = True
                        self._watch_conns.add(conn)
                    async for events, rev in self._watch_stream(conn, p, next_rev):
                        if failures and not said:
                            log.info("etcd watch resumed", endpoint=conn.endpoint.url, revision=next_rev)
                            said = True
                        if events is None:  # accepted; the back-off resets only once etcd answers on it
                            self.last_success = time.time()
                            continue
                        backoff, failures, reauthed, said = 0.2, 0, False, False
                        next_rev = rev + 1
                        self.last_success = time.time()
                        if events:
                            yield events
                    why = "watch stream ended"
                except (_DialError, grpc.aio.AioRpcError, _WatchRetry) as e:
                    why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
                    if (isinstance(e, grpc.aio.AioRpcError) and conn is not None and not reauthed and
                            self._username is not None and _is_token_error(e)):
                        reauthed = True
                        try:
                            await self._authenticate(conn)
                            continue
                        except (grpc.aio.AioRpcError, RegistryAuthError) as e2:
                            why = str(e2)
                failures += 1
                if conn is not None:
                    self._watch_conns.discard(conn)
                    await conn.channel.close(grace=0)
                    conn = None
                index = (index + 1) % len(self.endpoints)
                # Wait only once every endpoint has failed in a row; a single dead member is skipped at once.
                delay = 0.0 if failures < len(self.endpoints) else backoff * (0.5 + random.random())
                if failures >= len(self.endpoints):
                    backoff = min(backoff * 2, self.max_backoff)
                # One warning per outage; the retries while etcd stays down are debug noise.
                (log.warning if failures == 1 else log.debug)(
                    "etcd watch broken; resuming", error=why, resume_revision=next_rev,
                    next_endpoint=self.endpoints[index].url, retry_in=round(delay, 2))
                if delay:
                    await asyncio.sleep(delay)
        finally:
            if conn is not None:
                self._watch_conns.discard(conn)
                await conn.channel.close(grace=0)

    async def _watch_stream(self, conn: _Conn, prefix: bytes,
                            start_revision: int) -> AsyncIterator[tuple[list[WatchEvent] | None, int]]:
        # "hasleader" makes a member that lost its quorum cancel the watch instead of going silent.
        call = conn.watch.Watch(metadata=(*conn.metadata, ("hasleader", "true")))
        ticker: asyncio.Future[None] | None = None
        try:
            # From one revision earlier than needed, that one's events dropped below: a compaction at
            # start_revision itself removes a delete's tombstone there without refusing a watch from it,
            # and the delete would be lost; from start_revision - 1 etcd reports the compaction instead.
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_range_end(prefix), start_revision=max(1, start_revision - 1),
                progress_notify=True)))
            # etcd's own progress notifications come after 10 quiet minutes; ask every PROGRESS_EVERY s so
            # an idle but healthy cluster keeps last_success (and /readyz) fresh.
            ticker = asyncio.ensure_future(self._ask_progress(call))
            last = start_revision - 1
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                if resp.compact_revision:
                    raise CompactedError(int(resp.compact_revision))
                if resp.canceled:
                    reason = resp.cancel_reason or "canceled by etcd"
                    if "permission denied" in reason:
                        raise RegistryAuthError(f"etcd refused to watch {prefix.decode()!r}: {reason}")
                    raise _WatchRetry(f"watch canceled: {reason}")
                if resp.created:
                    if int(resp.header.revision) < start_revision - 1:
                        raise HistoryRewoundError(int(resp.header.revision), start_revision)
                    yield None, last  # accepted: "resumed" is said now, not at the next event or progress report
                    continue
                events = [
                    WatchEvent(EventType.PUT if ev.type == rpc.Event.PUT else EventType.DELETE,
                               _decode_key(ev.kv.key), bytes(ev.kv.value), int(ev.kv.lease),
                               int(ev.kv.mod_revision), int(ev.kv.create_revision))
                    for ev in resp.events if ev.kv.mod_revision >= start_revision
                ]
                if events:
                    last = max(last, events[-1].revision)
                elif not resp.fragment:
                    # A progress notification: nothing under the prefix changed up to this revision.
                    last = max(last, int(resp.header.revision))
                yield events, last
        finally:
            if ticker is not None:
                ticker.cancel()
            call.cancel()

    @staticmethod
    async def _ask_progress(call: Any) -> None:
        with contextlib.suppress(Exception):  # the stream broke: the reader sees it and resumes
            while True:
                await asyncio.sleep(PROGRESS_EVERY)
                await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    async def close(self) -> None:
        self._closed = True
        async with self._conn_lock:
            if self._conn is not None:
                await self._conn.channel.close(grace=0)
                self._conn = None
        for conn in list(self._watch_conns):
            await conn.channel.close(grace=0)
        self._watch_conns.clear()


class _WatchRetry(Exception):
    pass
