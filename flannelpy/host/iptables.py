"""flanneld's ip-masq and forward rules: generated here (pure), installed, kept and removed by IptablesManager.

nat (`--ip-masq`), chain FLANNEL-POSTRTG jumped to from the top of POSTROUTING:

    -m mark --mark 0x4000/0x4000            RETURN      kube-proxy marked it; do not NAT twice
    -s <Network> -d <Network>               RETURN      overlay to overlay keeps its source
    -s <Network> ! -d 224.0.0.0/4           MASQUERADE  containers leaving the overlay (not multicast)
    ! -s <Network> -d <own subnet>          RETURN      traffic arriving for our own containers
    ! -s <Network> -d <Network>             MASQUERADE  the host talking into the overlay

filter (`--iptables-forward-rules`, default on), chain FLANNEL-FWD jumped to from the top of FORWARD:
ACCEPT -s <Network>, ACCEPT -d <Network>. Every rule carries the comment "flanneld masq" /
"flanneld forward". MASQUERADE takes --random-fully when iptables supports it (1.6.2 and newer).

The chains are ours: each install declares them (which, with iptables-restore --noflush, flushes them)
and writes the whole chain in one transaction, so rules left by an earlier run with another lease are
replaced, and nothing foreign ends up between our rules. Unlike flanneld, remove() deletes everything on
a clean shutdown. Where iptables is missing and nft is present, the same rules go into an nftables table
`ip flannel-ipv4` (the name flanneld's nftables mode uses).

Every iptables call waits for the xtables lock as flanneld's (go-iptables) do: `--wait` where the installed
iptables has it (1.4.20), with a limit of `lock_wait` seconds where it takes one (1.6.0; iptables-restore
1.6.2), so a lock held for long delays one resync instead of hanging the loop. A read that fails (lock still
busy, tool broken) says nothing about the rules: the resync counts it, logs it (at most once a minute while
it lasts) and asks again next time; it never rewrites the rules on a failed read.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network

import structlog

from flannelpy.config import NetworkConfig
from flannelpy.errors import FlannelError
from flannelpy.subnet.lease import Lease

log = structlog.get_logger()

MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = "224.0.0.0/4"
NFT_TABLE = "flannel-ipv4"
DEFAULT_RESYNC = 5.0
DEFAULT_LOCK_WAIT = 5  # seconds; go-iptables waits without limit, which would stall the resync loop
READ_ERROR_LOG_INTERVAL = 60.0  # seconds between log lines while reads keep failing
EXIT_RESOURCE_PROBLEM = 4  # iptables' exit status when the xtables lock stays busy
# What iptables says when a rule, chain or jump target is not there (go-iptables' IsNotExist patterns).
_ABSENT = ("Bad rule (does a matching rule exist", "No chain/target/match by that name",
           "No such file or directory", "does not exist")


class FirewallError(FlannelError):
    """The ip-masq or forward rules could not be installed."""


class RulesUnreadable(FirewallError):
    """iptables or nft could not say what is installed (xtables lock busy, tool failing): the state is unknown."""


@dataclass(frozen=True)
class Rule:
    """One iptables rule: table, chain and the match/target words after the chain name."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def words(self, action: str = "-A", position: int | None = None) -> list[str]:
        where = [str(position)] if position is not None else []
        return [action, self.chain, *where, *self.spec]

    def restore_line(self, action: str = "-A", position: int | None = None) -> str:
        """The rule as iptables-restore (and iptables-save) writes it: words with spaces quoted."""
        return " ".join(f'"{w}"' if (" " in w or not w) else w for w in self.words(action, position))


@dataclass(frozen=True)
class Chain:
    """A chain of ours: its rules and the jump to it from a built-in chain."""

    table: str
    name: str
    hook: str  # the built-in chain that jumps here: POSTROUTING or FORWARD
    comment: str
    rules: tuple[Rule, ...]

    @property
    def jump(self) -> Rule:
        return Rule(self.table, self.hook, ("-m", "comment", "--comment", self.comment, "-j", self.name))


def masq_chain(network: IPv4Network, subnet: IPv4Network, random_fully: bool) -> Chain:
    n, sn = str(network), str(subnet)
    c = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")
    rules = (
        ("-m", "mark", "--mark", KUBE_PROXY_MARK, *c, "-j", "RETURN"),
        ("-s", n, "-d", n, *c, "-j", "RETURN"),
        ("-s", n, "!", "-d", MULTICAST, *c, *masq),
        ("!", "-s", n, "-d", sn, *c, "-j", "RETURN"),
        ("!", "-s", n, "-d", n, *c, *masq),
    )
    return Chain("nat", MASQ_CHAIN, "POSTROUTING", MASQ_COMMENT, tuple(Rule("nat", MASQ_CHAIN, r) for r in rules))


def forward_chain(network: IPv4Network) -> Chain:
    n = str(network)
    c = ("-m", "comment", "--comment", FORWARD_COMMENT)
    rules = (("-s", n, *c, "-j", "ACCEPT"), ("-d", n, *c, "-j", "ACCEPT"))
    return Chain("filter", FORWARD_CHAIN, "FORWARD", FORWARD_COMMENT,
                 tuple(Rule("filter", FORWARD_CHAIN, r) for r in rules))


def wanted_chains(network: IPv4Network, subnet: IPv4Network, masq: bool, forward: bool,
                  random_fully: bool) -> list[Chain]:
    chains = []
    if masq:
        chains.append(masq_chain(network, subnet, random_fully))
    if forward:
        chains.append(forward_chain(network))
    return chains


def restore_payload(chains: Sequence[Chain], jumps_present: Sequence[bool]) -> str:
    """iptables-restore --noflush input that (re)writes our chains and adds the missing jumps.

    Declaring a user chain with --noflush creates it or flushes it, so the chain ends up exactly as
    given. A jump that is already there is left alone (inserting it again would duplicate it).
    """
    out: list[str] = []
    for table in dict.fromkeys(ch.table for ch in chains):
        out.append(f"*{table}")
        mine = [(ch, present) for ch, present in zip(chains, jumps_present, strict=True) if ch.table == table]
        out.extend(f":{ch.name} - [0:0]" for ch, _ in mine)
        for ch, present in mine:
            out.extend(rule.restore_line() for rule in ch.rules)
            if not present:
                out.append(ch.jump.restore_line("-I", 1))  # first, as flanneld: before anyone else's rules
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def nft_ruleset(network: IPv4Network, subnet: IPv4Network, masq: bool, forward: bool) -> str:
    """The same rules as an nftables table (for hosts without iptables)."""
    n, sn = str(network), str(subnet)
    lines = [f"table ip {NFT_TABLE} {{"]
    if masq:
        c = f'comment "{MASQ_COMMENT}"'
        lines += [
            "\tchain postrtg {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\tmeta mark & 0x4000 == 0x4000 return {c}",
            f"\t\tip saddr {n} ip daddr {n} return {c}",
            f"\t\tip saddr {n} ip daddr != {MULTICAST} masquerade fully-random {c}",
            f"\t\tip saddr != {n} ip daddr {sn} return {c}",
            f"\t\tip saddr != {n} ip daddr {n} masquerade fully-random {c}",
            "\t}",
        ]
    if forward:
        c = f'comment "{FORWARD_COMMENT}"'
        lines += [
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy accept;",
            f"\t\tip saddr {n} accept {c}",
            f"\t\tip daddr {n} accept {c}",
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def iptables_version(version_output: str) -> tuple[int, int, int] | None:
    """`iptables --version` ("iptables v1.8.9 (nf_tables)") → (1, 8, 9); None when unrecognised."""
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", version_output)
    return None if m is None else (int(m[1]), int(m[2]), int(m[3]))


def supports_random_fully(version_output: str) -> bool:
    """`iptables --version` → whether MASQUERADE takes --random-fully (iptables 1.6.2 and newer)."""
    v = iptables_version(version_output)
    return v is not None and v >= (1, 6, 2)


def wait_args(version_output: str, seconds: int) -> list[str]:
    """The xtables-lock option for `iptables`, as go-iptables picks it: `--wait <seconds>` from 1.6.0, a bare
    `--wait` (no limit) from 1.4.20, nothing before (or when the version is unknown: never an unknown option)."""
    v = iptables_version(version_output)
    if v is None or v < (1, 4, 20):
        return []
    return ["--wait", str(seconds)] if v >= (1, 6, 0) else ["--wait"]


def restore_wait_args(version_output: str, seconds: int) -> list[str]:
    """The same for `iptables-restore`, which takes the lock from 1.6.2 on."""
    v = iptables_version(version_output)
    return ["--wait", str(seconds)] if v is not None and v >= (1, 6, 2) else []


def is_absent(returncode: int, stderr: str) -> bool:
    """Whether a failed `iptables -C` / `-S <chain>` means "not there" (an answer), not "could not look"."""
    return returncode in (1, 2) and any(p in stderr for p in _ABSENT)


async def _run(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace").strip()


class IptablesManager:
    """Installs flanneld's rules for our lease, restores them when someone deletes them, removes them.

    The daemon calls install() once the lease is known, runs run() as a task (it re-checks every
    `resync` seconds: `--iptables-resync`), and calls remove() on a clean shutdown. `errors` counts failed
    reads ("read": the check was skipped until the next resync) and failed writes ("write").
    """

    def __init__(self, config: NetworkConfig, lease: Lease, masq: bool, forward: bool,
                 resync: float = DEFAULT_RESYNC, *, tool: str | None = None,
                 lock_wait: int = DEFAULT_LOCK_WAIT) -> None:
        if config.network is None:
            raise FirewallError("ip-masq and forward rules need an IPv4 Network in the network config")
        if resync <= 0:
            raise FirewallError(f"--iptables-resync={resync}: must be a positive number of seconds")
        if lock_wait < 1:
            raise FirewallError(f"lock_wait={lock_wait}: must be at least 1 second")
        self.network = config.network
        self.subnet = lease.subnet
        self.masq = masq
        self.forward = forward
        self.resync = resync
        self._tool = tool  # "iptables" or "nft"; None = iptables if installed, else nft
        self.lock_wait = lock_wait
        self.errors = {"read": 0, "write": 0}
        self._version: str | None = None  # `iptables --version`; "" in nft mode
        self._random_fully: bool | None = None
        self._unread_since_log = 0  # failed reads not yet logged
        self._read_logged_at: float | None = None  # when the last failed read was logged; None: reads work
        self._snapshot: dict[str, str] = {}  # what the installed state looked like, per chain/table
        self._installed = False
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.masq or self.forward

    def _pick_tool(self) -> str:
        if self._tool is None:
            if shutil.which("iptables") and shutil.which("iptables-restore"):
                self._tool = "iptables"
            elif shutil.which("nft"):
                self._tool = "nft"
            else:
                raise FirewallError(
                    "--ip-masq / forward rules need iptables (iptables and iptables-restore) or nft on PATH; "
                    "install the iptables package, or run with --ip-masq=false --iptables-forward-rules=false"
                )
        return self._tool

    async def _iptables_version(self) -> str:
        if self._version is None:
            try:
                rc, out, _ = await _run(["iptables", "--version"])
                self._version = out if rc == 0 else ""
            except FileNotFoundError:
                self._version = ""  # nft mode: its rules say fully-random themselves
        return self._version

    async def chains(self) -> list[Chain]:
        if self._random_fully is None:
            self._random_fully = supports_random_fully(await self._iptables_version())
        return wanted_chains(self.network, self.subnet, self.masq, self.forward, self._random_fully)

    async def _read(self, argv: list[str]) -> str | None:
        """Run a read-only command: its output, None when it answers "not there", RulesUnreadable when it
        could not answer (the xtables lock still busy after the wait, the tool failing)."""
        try:
            rc, out, err = await _run(argv)
        except OSError as e:
            raise RulesUnreadable(f"could not run {argv[0]}: {e}") from e
        if rc == 0:
            return out
        if is_absent(rc, err):
            return None
        why = err or "no message"
        if rc == EXIT_RESOURCE_PROBLEM:
            why += f" (another program held the xtables lock for more than {self.lock_wait}s)"
        raise RulesUnreadable(f"`{' '.join(argv)}` exited with status {rc}: {why}")

    # -- iptables ---------------------------------------------------------------------------------

    async def _iptables(self) -> list[str]:
        return ["iptables", *wait_args(await self._iptables_version(), self.lock_wait)]

    async def _jump_present(self, ch: Chain) -> bool:
        return await self._read([*await self._iptables(), "-t", ch.table, "-C", *ch.jump.words()[1:]]) is not None

    async def _chain_listing(self, ch: Chain) -> str | None:
        return await self._read([*await self._iptables(), "-t", ch.table, "-S", ch.name])

    async def _iptables_install(self) -> None:
        chains = await self.chains()
        present = [await self._jump_present(ch) for ch in chains]
        payload = restore_payload(chains, present)
        wait = restore_wait_args(await self._iptables_version(), self.lock_wait)
        rc, _, err = await _run(["iptables-restore", *wait, "--noflush"], payload)
        if rc != 0:
            self.errors["write"] += 1
            raise FirewallError(f"iptables-restore refused flanneld's rules: {err or f'exit {rc}'}")
        for ch in chains:
            listing = await self._chain_listing(ch)
            if listing is None:
                raise FirewallError(f"chain {ch.name} in table {ch.table} is missing right after installing it")
            self._snapshot[ch.name] = listing

    async def _iptables_missing(self) -> list[str]:
        """Names of our chains whose rules or jump are not as installed."""
        bad = []
        for ch in await self.chains():
            if await self._chain_listing(ch) != self._snapshot.get(ch.name) or not await self._jump_present(ch):
                bad.append(ch.name)
        return bad

    async def _iptables_remove(self) -> None:
        for ch in await self.chains():
            deleted = 0
            while deleted < 100 and await self._jump_present(ch):  # a jump may have been duplicated by hand
                rc, _, err = await _run([*await self._iptables(), "-t", ch.table, *ch.jump.words("-D")])
                if rc != 0:
                    log.warning("could not delete jump rule", table=ch.table, chain=ch.hook, error=err)
                    break
                deleted += 1
            if await self._chain_listing(ch) is None:
                continue
            await _run([*await self._iptables(), "-t", ch.table, "-F", ch.name])
            rc, _, err = await _run([*await self._iptables(), "-t", ch.table, "-X", ch.name])
            if rc != 0:
                log.warning("could not delete chain (another rule still jumps to it?)", table=ch.table,
                            chain=ch.name, error=err)

    # -- nft ----------------------------------------------------------------------------------------

    async def _nft_listing(self) -> str | None:
        return await self._read(["nft", "list", "table", "ip", NFT_TABLE])

    async def _nft_install(self) -> None:
        # add + delete + define in one transaction: atomic replacement of whatever was there
        script = (f"add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
                  + nft_ruleset(self.network, self.subnet, self.masq, self.forward))
        rc, _, err = await _run(["nft", "-f", "-"], script)
        if rc != 0:
            self.errors["write"] += 1
            raise FirewallError(f"nft refused flanneld's rules: {err or f'exit {rc}'}")
        listing = await self._nft_listing()
        if listing is None:
            raise FirewallError(f"nftables table ip {NFT_TABLE} is missing right after installing it")
        self._snapshot[NFT_TABLE] = listing

    async def _nft_remove(self) -> None:
        if await self._nft_listing() is not None:
            rc, _, err = await _run(["nft", "delete", "table", "ip", NFT_TABLE])
            if rc != 0:
                log.warning("could not delete nftables table", table=NFT_TABLE, error=err)

    # -- public API ---------------------------------------------------------------------------------

    async def install(self) -> None:
        """Write our chains and jumps; raises FirewallError when the kernel or the tools refuse (RulesUnreadable
        when iptables could not even be asked what is there)."""
        if not self.enabled:
            return
        async with self._lock:
            await self._install_locked()

    async def _install_locked(self) -> None:
        tool = self._pick_tool()
        if tool == "nft":
            await self._nft_install()
        else:
            await self._iptables_install()
        self._installed = True
        log.info("Installed ip-masq and forward rules", tool=tool, network=str(self.network),
                 subnet=str(self.subnet), masq=self.masq, forward=self.forward)

    async def ensure(self) -> bool:
        """Re-check once; rewrite what was deleted or changed. True if anything had to be restored.

        A read that fails leaves the rules alone (unknown is not "changed"): counted, logged at most once a
        minute, and asked again at the next call."""
        if not self.enabled:
            return False
        async with self._lock:
            try:
                if self._installed:
                    if self._pick_tool() == "nft":
                        bad = [] if await self._nft_listing() == self._snapshot.get(NFT_TABLE) else [NFT_TABLE]
                    else:
                        bad = await self._iptables_missing()
                    self._read_worked()
                    if not bad:
                        return False
                    log.warning("ip-masq/forward rules were changed from outside; restoring them",
                                chains=",".join(bad))
                await self._install_locked()
            except RulesUnreadable as e:
                self._read_failed(e)
                return False
            self._read_worked()
            return True

    def _read_failed(self, e: RulesUnreadable) -> None:
        self.errors["read"] += 1
        self._unread_since_log += 1
        now = time.monotonic()
        if self._read_logged_at is None or now - self._read_logged_at >= READ_ERROR_LOG_INTERVAL:
            log.warning("Could not read ip-masq/forward rules; checking again at the next resync",
                        error=str(e), failed_reads=self._unread_since_log, retry_in=self.resync)
            self._read_logged_at = now
            self._unread_since_log = 0

    def _read_worked(self) -> None:
        if self._read_logged_at is not None:
            log.info("ip-masq/forward rules readable again", failed_reads_unlogged=self._unread_since_log)
            self._read_logged_at = None
            self._unread_since_log = 0

    async def run(self) -> None:
        """Re-check every `resync` seconds until cancelled (flanneld: --iptables-resync, default 5)."""
        if not self.enabled:
            return
        while True:
            try:
                await self.ensure()
            except (FirewallError, OSError) as e:
                log.error("Failed to ensure iptables rules", error=str(e))
            except Exception as e:  # a resync must never take the daemon down
                # e.g. uvloop's RuntimeError when iptables-restore exited (xtables lock busy) before reading
                log.error("Failed to ensure iptables rules", error=repr(e))
            await asyncio.sleep(self.resync)

    async def remove(self) -> None:
        """Delete our jumps and chains (clean shutdown). flanneld leaves them behind."""
        if not self.enabled:
            return
        async with self._lock:
            tool = self._pick_tool()
            try:
                if tool == "nft":
                    await self._nft_remove()
                else:
                    await self._iptables_remove()
            except RulesUnreadable as e:
                self.errors["read"] += 1
                log.warning("Could not remove ip-masq/forward rules", error=str(e))
                return
            self._installed = False
            self._snapshot.clear()
        log.info("Removed ip-masq and forward rules", tool=tool)
