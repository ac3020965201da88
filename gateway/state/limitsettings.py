"""``[limits]``: the recipient and message rate limits per account and per
identity inside it (P-LOAD, issue 12; the check is gateway/checks/rcpt_rate.py).

Accounts have no class column, so the class is a config mapping::

    [limits]
    default_class = "standard"          # the class of an account not listed below

    [limits.classes.bulk]               # a class sets the keys it changes; the
    recipients_per_hour = 20000         # others keep the built-in defaults
    recipients_per_day = 100000

    [limits.accounts]                   # account name -> class
    bigshop = "bulk"

    [limits.overrides.bigshop]          # one account's own values, on top of its class
    recipients_per_day = 250000

The class ``standard`` always exists (the built-in defaults, below); a class
of that name in the file changes it. ``0`` means no limit for that key.
Resolution for an account: built-in defaults < its class < its override.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

# The built-in production defaults (class "standard"): what a hosting
# provider gives a customer without asking. Generous for legitimate mail (a
# shop's order confirmations and a weekly newsletter to a few thousand
# subscribers fit an hour), small enough that a compromised site cannot
# send more than a few thousand recipients before it is stopped for the
# hour. The per-minute burst catches a script at full speed within the
# first minute; a day is about four busy hours. An identity (one site of
# the account) gets a fifth of its account, so one compromised site is
# stopped while the others keep most of the account's room.
BUILTIN: dict[str, int] = {
    "recipients_per_minute": 500,
    "recipients_per_hour": 5000,
    "recipients_per_day": 20000,
    "identity_recipients_per_minute": 200,
    "identity_recipients_per_hour": 1000,
    "identity_recipients_per_day": 4000,
    "messages_per_hour": 2500,
    "messages_per_day": 10000,
    "identity_messages_per_hour": 500,
    "identity_messages_per_day": 2000,
}

WINDOWS = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(frozen=True)
class LimitValues:
    """One class or one account's override: a key left out keeps the value below it."""

    recipients_per_minute: int | None = None
    recipients_per_hour: int | None = None
    recipients_per_day: int | None = None
    identity_recipients_per_minute: int | None = None
    identity_recipients_per_hour: int | None = None
    identity_recipients_per_day: int | None = None
    messages_per_hour: int | None = None
    messages_per_day: int | None = None
    identity_messages_per_hour: int | None = None
    identity_messages_per_day: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise ValueError(f"{f.name}: must be 0 (no limit) or a positive integer, got {value}")

    def set_keys(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class LimitSettings:
    default_class: str = "standard"
    classes: dict[str, LimitValues] = field(default_factory=dict)
    accounts: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, LimitValues] = field(default_factory=dict)
    # Retry storms (docs/checks.md, rcpt_rate): a sender (account, or
    # account + identity) refused by these limits more than storm_refusals
    # times within storm_window seconds is tarpitted (a delay before each
    # 451, from tarpit_min growing to tarpit_max); past 3 x storm_refusals
    # it is refused with 550 5.7.1 and one Violation(kind="rate_storm") is
    # published per window. 0 = no storm handling.
    storm_refusals: int = 500
    storm_window: float = 900.0
    tarpit_min: float = 1.0
    tarpit_max: float = 5.0

    def __post_init__(self) -> None:
        known = {"standard", *self.classes}
        if self.default_class not in known:
            raise ValueError(f"default_class: no class {self.default_class!r} "
                             f"(known: {', '.join(sorted(known))})")
        for account, cls in self.accounts.items():
            if cls not in known:
                raise ValueError(f"accounts: {account}: no class {cls!r} (known: {', '.join(sorted(known))})")
        if self.storm_refusals < 0:
            raise ValueError(f"storm_refusals: must be 0 (off) or a positive integer, got {self.storm_refusals}")
        if not self.storm_window > 0:
            raise ValueError(f"storm_window: must be greater than 0, got {self.storm_window}")
        if not 0 <= self.tarpit_min <= self.tarpit_max:
            raise ValueError(f"tarpit_min: must be between 0 and tarpit_max ({self.tarpit_max:g}), "
                             f"got {self.tarpit_min:g}")
        if self.tarpit_max > 10:
            raise ValueError(f"tarpit_max: at most 10 s (the check's deadline is 15 s), got {self.tarpit_max:g}")

    def class_of(self, account: str) -> str:
        return self.accounts.get(account, self.default_class)

    def for_account(self, account: str) -> dict[str, int]:
        """The effective limits of an account: built-in < class < override."""
        values = dict(BUILTIN)
        cls = self.classes.get(self.class_of(account))
        if cls is not None:
            values.update(cls.set_keys())
        override = self.overrides.get(account)
        if override is not None:
            values.update(override.set_keys())
        return values
