"""Account storage (SQLAlchemy Core; SQLite or PostgreSQL) and the in-memory
views the SMTP hot path reads (client networks, account status).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import time
from typing import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from ..core.address import AddressError, parse_domain
from ..state.background import BackgroundTask
from ..storage.schema import account_domains, account_forwarders, account_networks, accounts
from .authorize import authorize
from .model import Account, AccountStatus, SenderDomain
from .passwords import DEFAULT_N, P, R, dummy_hash, hash_params, hash_password, verify_password_async

log = logging.getLogger("gateway.accounts")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\Z")


class AccountError(Exception):
    """A request about accounts that cannot be done (names the reason)."""


def normalize_domain(domain: str) -> str:
    try:
        return parse_domain(domain.strip(), utf8=True)
    except AddressError as exc:
        raise AccountError(f"invalid domain {domain!r}: {exc.detail}") from None


def parse_network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise AccountError(f"invalid network {cidr!r}") from None


class AccountStore:
    def __init__(self, engine: AsyncEngine, scrypt_n: int = DEFAULT_N,
                 clock: Callable[[], float] = time.time, refresh_interval: float = 1.0,
                 max_concurrent_verifications: int = 2, db_timeout: float = 5.0):
        self.engine = engine
        self.scrypt_n = scrypt_n
        # What an unknown account's AUTH is checked against: the configured
        # parameters, so it costs what a known account's does (P-HARVEST).
        self.dummy_hash = dummy_hash(scrypt_n)
        # Each verification needs 128 * r * n bytes: at most this many at once.
        self._verify_slots = asyncio.Semaphore(max_concurrent_verifications)
        self.clock = clock
        self.refresh_interval = refresh_interval
        self._by_name: dict[str, Account] = {}
        # name -> stored password hash, from the same snapshot: AUTH of a known
        # account needs no database (a password changed elsewhere arrives with
        # the next refresh, within refresh_interval).
        self._hashes: dict[str, str] = {}
        # Each database wait of the AUTH path (an account newer than the
        # snapshot) has this deadline; the background refresh has its own.
        self.db_timeout = db_timeout
        self._rehashes: set[asyncio.Task] = set()
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        self._loaded_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._task = BackgroundTask("account-refresher")

    # --- snapshot used by the hot path ---------------------------------------------
    async def refresh(self) -> None:
        """Reload the account snapshot (status, networks, domains) from the database."""
        async with self._refresh_lock:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(sa.select(accounts.c.id, accounts.c.name, accounts.c.status,
                                                     accounts.c.contact, accounts.c.allow_subdomains,
                                                     accounts.c.allow_forwarding, accounts.c.password_hash))).all()
                fwds = (await conn.execute(sa.select(account_forwarders.c.account_id,
                                                     account_forwarders.c.address))).all()
                nets = (await conn.execute(sa.select(account_networks.c.account_id,
                                                     account_networks.c.cidr))).all()
                doms = (await conn.execute(sa.select(account_domains))).mappings().all()
            net_by: dict[int, list] = {}
            for acc_id, cidr in nets:
                net_by.setdefault(acc_id, []).append(ipaddress.ip_network(cidr, strict=False))
            dom_by: dict[int, list[SenderDomain]] = {}
            for d in doms:
                dom_by.setdefault(d["account_id"], []).append(
                    SenderDomain(d["domain"], d["status"], d["token"], d["verified_at"], d["note"]))
            fwd_by: dict[int, list[str]] = {}
            for acc_id, address in fwds:
                fwd_by.setdefault(acc_id, []).append(address)
            by_name: dict[str, Account] = {}
            hashes: dict[str, str] = {}
            networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
            for acc_id, name, status, contact, allow_sub, allow_fwd, pw_hash in rows:
                hashes[name] = pw_hash
                acc = Account(acc_id, name, AccountStatus(status), contact, bool(allow_sub),
                              tuple(net_by.get(acc_id, ())), tuple(dom_by.get(acc_id, ())),
                              bool(allow_fwd), tuple(sorted(fwd_by.get(acc_id, ()))))
                by_name[name] = acc
                networks.extend((net, name) for net in acc.networks)
            # Most specific network first, so nested client networks map to the right account.
            networks.sort(key=lambda item: -item[0].prefixlen)
            self._by_name = by_name
            self._hashes = hashes
            self._networks = networks
            self._loaded_at = self.clock()

    async def _refresher(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving the last snapshot; the database may come back
                if not failing:       # once per outage, no traceback: an outage is expected, not a bug
                    log.warning("account snapshot refresh failed, serving the last snapshot until the database "
                                "answers: %s", str(exc) or type(exc).__name__)
                failing = True
            else:
                if failing:
                    log.warning("account snapshot refresh works again")
                failing = False

    async def start(self) -> None:
        await self.refresh()
        self._task.start(self._refresher)

    async def stop(self) -> None:
        await self._task.stop()
        for task in list(self._rehashes):
            task.cancel()

    def cached(self, name: str) -> Account | None:
        return self._by_name.get(name)

    def account_for_ip(self, ip: str) -> Account | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for net, name in self._networks:
            if addr.version == net.version and addr in net:
                return self._by_name.get(name)
        return None

    # --- authentication ---------------------------------------------------------------
    async def authenticate(self, name: str, password: bytes) -> Account | None:
        """The account if the credentials are right (suspended accounts included:
        the caller decides what to answer), else None."""
        stored = self._hashes.get(name)
        if stored is None:
            # Not in the snapshot: unknown, or created since the last refresh.
            # Only this case asks the database, within its own deadline (a
            # TimeoutError or database error reaches the caller: 454 4.7.0).
            async with asyncio.timeout(self.db_timeout):
                async with self.engine.connect() as conn:
                    row = (await conn.execute(sa.select(accounts.c.name, accounts.c.password_hash)
                                              .where(accounts.c.name == name))).first()
            stored = row.password_hash if row else None
        async with self._verify_slots:
            ok = await verify_password_async(password, stored if stored is not None else self.dummy_hash)
        if not ok or stored is None:
            return None
        if hash_params(stored) != (self.scrypt_n, R, P) and len(self._rehashes) < 16:
            # in the background: the AUTH reply never waits for a database write
            task = asyncio.get_running_loop().create_task(self._rehash(name, password, stored))
            self._rehashes.add(task)
            task.add_done_callback(self._rehashes.discard)
        acc = self._by_name.get(name)
        if acc is None:  # created since the last snapshot
            async with asyncio.timeout(self.db_timeout):
                await self.refresh()
            acc = self._by_name.get(name)
        return acc

    async def _rehash(self, name: str, password: bytes, stored: str) -> None:
        """The password hash again at the configured cost, after a successful AUTH
        against one made at another (an older default): from then on this
        account's AUTH costs what an unknown account's does. A failure is logged
        and changes nothing (the AUTH succeeded)."""
        try:
            async with self._verify_slots:
                new_hash = await asyncio.get_running_loop().run_in_executor(
                    None, hash_password, password, self.scrypt_n)
            async with asyncio.timeout(self.db_timeout):
                async with self.engine.begin() as conn:
                    await conn.execute(accounts.update().where(accounts.c.name == name)
                                       .where(accounts.c.password_hash == stored)
                                       .values(password_hash=new_hash))
            if self._hashes.get(name) == stored:
                self._hashes[name] = new_hash
            log.info("account %s: password hash renewed at scrypt n=%d", name, self.scrypt_n)
        except Exception:
            log.warning("account %s: renewing the password hash failed", name, exc_info=True)

    # --- administration (CLI, HTTP admin) ----------------------------------------------
    async def add(self, name: str, password: str, contact: str = "", allow_subdomains: bool = False) -> None:
        if not _NAME.match(name):
            raise AccountError(f"invalid account name {name!r} (letters, digits, . _ @ + -; at most 128)")
        if not password:
            raise AccountError("password must not be empty")
        now = self.clock()
        pw_hash = await asyncio.get_running_loop().run_in_executor(None, hash_password, password, self.scrypt_n)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(accounts.insert().values(
                    name=name, password_hash=pw_hash, status=AccountStatus.ACTIVE.value, contact=contact,
                    allow_subdomains=allow_subdomains, created_at=now, updated_at=now))
        except IntegrityError:
            raise AccountError(f"account {name!r} exists already") from None
        await self.refresh()

    async def _id(self, conn, name: str) -> int:
        acc_id = (await conn.execute(sa.select(accounts.c.id).where(accounts.c.name == name))).scalar()
        if acc_id is None:
            raise AccountError(f"no account {name!r}")
        return acc_id

    async def set_password(self, name: str, password: str) -> None:
        if not password:
            raise AccountError("password must not be empty")
        pw_hash = await asyncio.get_running_loop().run_in_executor(None, hash_password, password, self.scrypt_n)
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            await conn.execute(accounts.update().where(accounts.c.id == acc_id)
                               .values(password_hash=pw_hash, updated_at=self.clock()))
        if name in self._hashes:
            self._hashes[name] = pw_hash

    async def set_status(self, name: str, status: AccountStatus) -> None:
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            await conn.execute(accounts.update().where(accounts.c.id == acc_id)
                               .values(status=status.value, updated_at=self.clock()))
        await self.refresh()

    async def update(self, name: str, *, contact: str | None = None, allow_subdomains: bool | None = None) -> None:
        values: dict = {"updated_at": self.clock()}
        if contact is not None:
            values["contact"] = contact
        if allow_subdomains is not None:
            values["allow_subdomains"] = allow_subdomains
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            await conn.execute(accounts.update().where(accounts.c.id == acc_id).values(**values))
        await self.refresh()

    async def add_network(self, name: str, cidr: str) -> str:
        net = str(parse_network(cidr))
        try:
            async with self.engine.begin() as conn:
                acc_id = await self._id(conn, name)
                await conn.execute(account_networks.insert().values(account_id=acc_id, cidr=net))
        except IntegrityError:
            raise AccountError(f"network {net} is already on account {name!r}") from None
        await self.refresh()
        return net

    async def remove_network(self, name: str, cidr: str) -> None:
        net = str(parse_network(cidr))
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            res = await conn.execute(account_networks.delete().where(
                (account_networks.c.account_id == acc_id) & (account_networks.c.cidr == net)))
            if res.rowcount == 0:
                raise AccountError(f"network {net} is not on account {name!r}")
        await self.refresh()

    async def add_domain(self, name: str, domain: str, *, approved_by: str | None = None) -> SenderDomain:
        """Add a sender domain: pending with a fresh proof token, or approved by an operator."""
        dom = normalize_domain(domain)
        token = secrets.token_urlsafe(24)
        status = "approved" if approved_by else "pending"
        note = f"approved by {approved_by}" if approved_by else ""
        try:
            async with self.engine.begin() as conn:
                acc_id = await self._id(conn, name)
                await conn.execute(account_domains.insert().values(
                    account_id=acc_id, domain=dom, status=status, token=token, note=note,
                    verified_at=self.clock() if approved_by else None, created_at=self.clock()))
        except IntegrityError:
            raise AccountError(f"domain {dom} is already on account {name!r}") from None
        await self.refresh()
        return SenderDomain(dom, status, token, None, note)

    async def set_domain_status(self, name: str, domain: str, status: str, note: str = "", *,
                                expected_status: str | None = None, expected_token: str | None = None) -> bool:
        """Set the status of a sender domain; True when a row changed.

        ``expected_status`` / ``expected_token``: change the domain only if it
        still has this status / token (checked in the UPDATE itself, so a
        concurrent change by an operator wins); False when it no longer does
        or is gone. Without them a domain not on the account raises AccountError.
        """
        dom = normalize_domain(domain)
        where = (account_domains.c.domain == dom)
        if expected_status is not None:
            where &= account_domains.c.status == expected_status
        if expected_token is not None:
            where &= account_domains.c.token == expected_token
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            res = await conn.execute(account_domains.update().where(
                (account_domains.c.account_id == acc_id) & where).values(
                status=status, note=note, verified_at=self.clock() if status != "pending" else None))
            if res.rowcount == 0:
                if expected_status is not None or expected_token is not None:
                    return False
                raise AccountError(f"domain {dom} is not on account {name!r}")
        await self.refresh()
        return True

    async def remove_domain(self, name: str, domain: str) -> None:
        dom = normalize_domain(domain)
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            res = await conn.execute(account_domains.delete().where(
                (account_domains.c.account_id == acc_id) & (account_domains.c.domain == dom)))
            if res.rowcount == 0:
                raise AccountError(f"domain {dom} is not on account {name!r}")
        await self.refresh()

    # --- forwarding (docs/forwarding.md) --------------------------------------------
    def _identity(self, name: str, identity: str) -> str:
        """The comparison form of a forwarding identity: a mailbox of one of the
        account's authorized sender domains."""
        from ..core.address import parse_mailbox

        try:
            box = parse_mailbox(identity.strip(), utf8=True)
        except AddressError as exc:
            raise AccountError(f"invalid identity {identity!r}: {exc.detail}") from None
        if box.is_literal:
            raise AccountError(f"identity {identity!r}: an address literal is not a sender domain")
        acc = self._by_name.get(name)
        if acc is None:
            raise AccountError(f"no account {name!r}")
        verdict = authorize(acc, box.domain_ascii)
        if not verdict.allowed:
            raise AccountError(f"identity {identity!r}: {verdict.reason}")
        from ..forwarding import unquote_local

        return f"{unquote_local(box.local)}@{box.domain_ascii}".lower()

    async def allow_forwarding(self, name: str, identity: str | None = None) -> str | None:
        """Let the account forward mail: from every mailbox of its domains, or
        (``identity``) from that mailbox only. Returns the stored identity."""
        await self.refresh()
        address = self._identity(name, identity) if identity is not None else None
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            if address is None:
                await conn.execute(accounts.update().where(accounts.c.id == acc_id)
                                   .values(allow_forwarding=True, updated_at=self.clock()))
            else:
                exists = (await conn.execute(sa.select(account_forwarders.c.id).where(
                    (account_forwarders.c.account_id == acc_id)
                    & (account_forwarders.c.address == address)))).first()
                if exists is None:
                    await conn.execute(account_forwarders.insert().values(
                        account_id=acc_id, address=address, created_at=self.clock()))
        await self.refresh()
        return address

    async def deny_forwarding(self, name: str, identity: str | None = None) -> None:
        """End forwarding: all of it (account level and every identity), or one identity."""
        async with self.engine.begin() as conn:
            acc_id = await self._id(conn, name)
            if identity is None:
                await conn.execute(accounts.update().where(accounts.c.id == acc_id)
                                   .values(allow_forwarding=False, updated_at=self.clock()))
                await conn.execute(account_forwarders.delete().where(account_forwarders.c.account_id == acc_id))
            else:
                address = identity.strip().lower()
                try:
                    address = self._identity(name, identity)
                except AccountError:
                    pass  # a domain gone since: the stored form is still the lower-case address
                res = await conn.execute(account_forwarders.delete().where(
                    (account_forwarders.c.account_id == acc_id) & (account_forwarders.c.address == address)))
                if res.rowcount == 0:
                    acc = self._by_name.get(name)
                    if acc is not None and acc.forwarding:
                        raise AccountError(f"identity {identity!r} is not listed: every mailbox of {name!r} may "
                                           f"forward ('gateway account forwarding deny {name}' ends that)")
                    raise AccountError(f"identity {identity!r} may not forward on account {name!r} "
                                       f"(see 'gateway account show {name}')")
        await self.refresh()

    async def get(self, name: str) -> Account:
        await self.refresh()
        acc = self._by_name.get(name)
        if acc is None:
            raise AccountError(f"no account {name!r}")
        return acc

    async def list(self) -> list[Account]:
        await self.refresh()
        return sorted(self._by_name.values(), key=lambda a: a.name)

    def all_cached(self) -> Iterable[Account]:
        return self._by_name.values()
