"""mail_dnsbl: the MAIL-phase half of the DNSBL check (P-BLOCK).

With ``[dnsbl] decide_at = "mail"`` the verdict on the connecting address is
taken at MAIL FROM instead of at connect. The logic is the one of
``connect_dnsbl`` (see that module); this module only gives it the check's
name and contract.
"""
from __future__ import annotations

from ..core.transaction import Phase
from . import contract
from .connect_dnsbl import MailDnsbl, build_mail as build
from .contract import CheckSpec

__all__ = ["MailDnsbl", "build", "SPEC"]


SPEC = CheckSpec(
    name='mail_dnsbl', phase=Phase.MAIL, build=build,
    summary='P-BLOCK: DNSBL/DNSWL verdict at MAIL ([dnsbl] decide_at = "mail")',
    position=50,
    replies=('DNSBL_LISTED', 'DNSBL_TEMPFAIL'),
    settings=('dnsbl',),
    services=('dnsbl', 'resolver'),
    deadline=contract.DNS)
