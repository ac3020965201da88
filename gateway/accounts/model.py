"""Customer accounts as the SMTP side sees them."""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field


class AccountStatus(str, enum.Enum):
    ACTIVE = "active"
    WARNED = "warned"
    SUSPENDED = "suspended"


@dataclass(frozen=True, slots=True)
class SenderDomain:
    domain: str              # lower-case A-label
    status: str              # pending | verified | approved
    token: str = ""
    verified_at: float | None = None
    note: str = ""

    @property
    def authorized(self) -> bool:
        return self.status in ("verified", "approved")


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    status: AccountStatus
    contact: str = ""
    allow_subdomains: bool = False
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    domains: tuple[SenderDomain, ...] = field(default=())
    forwarding: bool = False                  # may forward mail from any mailbox of its domains
    forward_identities: tuple[str, ...] = ()  # or only from these mailboxes (lower-case local@A-label)

    @property
    def may_forward(self) -> bool:
        return self.forwarding or bool(self.forward_identities)

    @property
    def suspended(self) -> bool:
        return self.status is AccountStatus.SUSPENDED
