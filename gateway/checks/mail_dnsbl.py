"""mail_dnsbl: the MAIL-phase half of the DNSBL check (P-BLOCK).

With ``[dnsbl] decide_at = "mail"`` the verdict on the connecting address is
taken at MAIL FROM instead of at connect. The logic is the one of
``connect_dnsbl`` (see that module); this module only gives it the check's
name, so the loader finds every check as ``<name>.build``.
"""
from __future__ import annotations

from .connect_dnsbl import MailDnsbl, build_mail as build

__all__ = ["MailDnsbl", "build"]
