"""The reply catalogue: every SMTP reply the gateway can send is defined here.

A reply carries its RFC 5321 code, its RFC 3463 enhanced status code, a text
and the POLICY.md rule id it enforces (if any), so a customer who receives it
can look the reason up. No other module writes SMTP code literals; they name a
catalogue entry and may add a short detail.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Characters that must never reach the wire inside a reply text.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_LINE = 510


def _fit(line: str) -> str:
    """``line`` cut to MAX_LINE octets of UTF-8 (a client's detail, e.g. a
    600-character parameter name, may be longer), with "..." where it was cut."""
    if len(line) <= MAX_LINE // 4:
        return line
    data = line.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_LINE:
        return line
    return data[:MAX_LINE - 3].decode("utf-8", "ignore") + "..."


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str
    rule: str | None = None

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def render(self, detail: str | None = None) -> str:
        """The reply line, e.g. ``550 5.7.1 P-FORGE sender not authorized: x``."""
        parts = [str(self.code), self.enhanced]
        if self.rule:
            parts.append(self.rule)
        text = self.text
        if detail:
            text = f"{text}: {detail}"
        parts.append(_UNSAFE.sub(" ", text))
        return _fit(" ".join(parts))

    def with_suffix(self, suffix: str) -> "Rendered":
        """This reply with ``suffix`` appended to its text as is (e.g. ", trace id X")."""
        text = f"{self.rule} {self.text}{suffix}" if self.rule else f"{self.text}{suffix}"
        return Rendered(self.code, self.enhanced, text)

    def with_detail(self, detail: str) -> "Rendered":
        """This reply with a run-time detail appended to its text (rule id kept)."""
        return self.with_suffix(f": {detail}")


@dataclass(frozen=True, slots=True)
class Rendered:
    """A reply decided at run time (e.g. passed back from the upstream)."""

    code: int
    enhanced: str
    text: str

    def render(self, detail: str | None = None) -> str:
        return _fit(f"{self.code} {self.enhanced} {_UNSAFE.sub(' ', self.text)}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500


R = Reply

# --- positive -----------------------------------------------------------------
SENDER_OK = R(250, "2.1.0", "Sender OK")
RECIPIENT_OK = R(250, "2.1.5", "Recipient OK")
RELAYED = R(250, "2.0.0", "OK: relayed")        # completed with the trace id and the upstream's answer
HANDLED_LOCALLY = R(250, "2.0.0", "OK: done")   # service mailboxes / unsubscribe only; with the trace id
HELP = R(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321 and the provider's policy")
RESET = R(250, "2.0.0", "Reset")
NOOP = R(250, "2.0.0", "OK")
BYE = R(221, "2.0.0", "Bye")
AUTH_OK = R(235, "2.7.0", "Authentication successful")
VRFY_NOTHING = R(252, "2.5.0", "Cannot VRFY user; send mail and delivery will be attempted", "P-HARVEST")
START_TLS = R(220, "2.0.0", "Ready to start TLS")
START_DATA = R(354, "", "End data with <CR><LF>.<CR><LF>")

# --- session / protocol (P-STD) ---------------------------------------------------
SYNTAX_ERROR = R(500, "5.5.2", "Syntax error, command unrecognized", "P-STD")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long", "P-STD")
COMMAND_BARE_CR = R(500, "5.5.2", "Bare CR in command line", "P-STD")
ARG_SYNTAX = R(501, "5.5.4", "Syntax error in parameters or arguments", "P-STD")
EXPN_DISABLED = R(502, "5.5.1", "EXPN gives nothing", "P-HARVEST")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands", "P-STD")
PARAM_UNKNOWN = R(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented", "P-STD")
NEED_HELO = R(503, "5.5.1", "Send EHLO/HELO first", "P-STD")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command", "P-STD")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command", "P-STD")
NESTED_MAIL = R(503, "5.5.1", "Nested MAIL command", "P-STD")
SMTPUTF8_REQUIRED = R(553, "5.6.7", "Non-ASCII address needs SMTPUTF8", "P-STD")
TLS_NOT_AVAILABLE = R(454, "4.7.0", "TLS not available")
TLS_REQUIRED = R(530, "5.7.0", "Must issue a STARTTLS command first", "P-RELAY")
TLS_ALREADY = R(503, "5.5.1", "TLS already active", "P-STD")
TOO_MANY_BOGUS = R(421, "4.7.0", "Too many unrecognized commands, closing", "P-LOAD")
TOO_MANY_COMMANDS = R(421, "4.7.0", "Too many commands in this session, closing", "P-LOAD")
IDLE_TIMEOUT = R(421, "4.4.2", "Idle timeout, closing", "P-LOAD")
PREAUTH_TIMEOUT = R(421, "4.4.2", "Timeout before authentication, closing", "P-LOAD")
DATA_TIMEOUT = R(421, "4.4.2", "DATA timeout: the message did not end in time, closing", "P-LOAD")
TOO_MANY_TRANSACTIONS = R(421, "4.7.0", "Too many transactions in this session, closing", "P-LOAD")
SHUTTING_DOWN = R(421, "4.3.2", "Service shutting down, try again later")
INTERNAL_ERROR = R(451, "4.3.0", "Temporary internal error, try again later")

# --- limits (P-LOAD) ------------------------------------------------------------------
TOO_MANY_CONNECTIONS = R(421, "4.7.0", "Too many connections, try again later", "P-LOAD")
TOO_MANY_CONNECTIONS_IP = R(421, "4.7.0", "Too many connections from your address, try again later", "P-LOAD")
# Near the connection cap an idle session that never authenticated gives its slot to a newcomer.
EVICTED_UNAUTHENTICATED = R(421, "4.7.0", "Too many connections: closing an idle unauthenticated session, "
                            "try again later", "P-LOAD")
MESSAGE_TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed maximum message size", "P-LOAD")
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Too many recipients", "P-LOAD")
# rcpt_rate (issue 12): the text names the limit, e.g. "451 4.7.1 P-LOAD recipients_per_hour exceeded, try
# again later" (checks/rcpt_rate.py); a sender that keeps retrying against it gets RATE_STORM.
RATE_LIMITED = R(451, "4.7.1", "Rate limit exceeded, try again later", "P-LOAD")
RATE_STORM = R(550, "5.7.1", "Rate limit exceeded repeatedly, sending stopped; contact your provider", "P-LOAD")

# --- authentication (P-RELAY, P-LOAD, P-STRIKE) ----------------------------------------
AUTH_REQUIRED = R(530, "5.7.0", "Authentication required", "P-RELAY")
AUTH_INVALID = R(535, "5.7.8", "Authentication credentials invalid", "P-RELAY")
AUTH_SUSPENDED = R(535, "5.7.8", "Account suspended, contact your provider", "P-STRIKE")
# A sub-login "account/user" whose user part is empty, too long or holds
# characters outside the identity charset (accounts/identity.py).
AUTH_BAD_IDENTITY = R(535, "5.7.8", "Authentication credentials invalid: the identity after the account name "
                                    "is empty, too long, or not letters, digits and . _ @ + ~ / -", "P-RELAY")
AUTH_TOO_MANY_FAILURES = R(454, "4.7.0", "Too many authentication failures, try again later", "P-LOAD")
AUTH_NEEDS_TLS = R(538, "5.7.11", "Encryption required for requested authentication mechanism", "P-RELAY")
AUTH_ALREADY = R(503, "5.5.1", "Already authenticated", "P-STD")
AUTH_MECHANISM = R(504, "5.5.4", "Unrecognized authentication type", "P-STD")
AUTH_ABORTED = R(501, "5.7.0", "Authentication aborted", "P-STD")
AUTH_BAD_BASE64 = R(501, "5.5.2", "Cannot decode base64", "P-STD")
AUTH_LINE_TOO_LONG = R(500, "5.5.6", "Authentication exchange line is too long", "P-STD")
AUTH_TEMP_FAILURE = R(454, "4.7.0", "Temporary authentication failure", None)

# --- relay (P-RELAY) ----------------------------------------------------------------
RELAY_DENIED = R(554, "5.7.1", "Relay access denied", "P-RELAY")
RELAY_TRICK = R(554, "5.7.1", "Address form not accepted (relay trick)", "P-RELAY")
ACCOUNT_SUSPENDED = R(550, "5.7.1", "Account suspended, contact your provider", "P-STRIKE")

# --- envelope syntax (P-STD) ------------------------------------------------------------
BAD_SENDER_SYNTAX = R(553, "5.1.7", "Bad sender address syntax", "P-STD")
BAD_RECIPIENT_SYNTAX = R(553, "5.1.3", "Bad recipient address syntax", "P-STD")

# --- upstream (relay) ------------------------------------------------------------------------
UPSTREAM_UNAVAILABLE = R(451, "4.4.1", "Upstream relay unavailable, try again later")
UPSTREAM_TEMP_FAILURE = R(451, "4.4.1", "Upstream relay failed temporarily, try again later")
UPSTREAM_NO_SMTPUTF8 = R(451, "4.6.7", "No upstream relay supports SMTPUTF8, try again later")
# [relay] max_connections reached and no connection freed within connection_wait
# (RFC 3463 X.4.5: mail system congestion)
UPSTREAM_BUSY = R(451, "4.4.5", "Upstream connections busy, try again later", "P-LOAD")
SERVICE_MAILBOX_FAILED = R(451, "4.3.0", "Could not store message, try again later")

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def from_upstream(code: int, message: str, fallback_enhanced: str | None = None) -> Rendered:
    """Wrap an upstream reply so it can be passed to the client unchanged in meaning.

    The upstream's own enhanced code is kept when it sent one; otherwise a
    generic one of the right class is supplied (ENHANCEDSTATUSCODES is
    advertised, so every reply must carry one).
    """
    text = " ".join(message.split())
    first, _, rest = text.partition(" ")
    if _ENHANCED.match(first) and first[0] == str(code)[0]:
        return Rendered(code, first, f"upstream: {rest}".rstrip())
    enhanced = fallback_enhanced or f"{str(code)[0]}.0.0"
    return Rendered(code, enhanced, f"upstream: {text}".rstrip())

# --- headers (issue 5) ---
WIRE_BARE_LF = R(550, "5.6.0", "Bare LF in message data (SMTP smuggling)", "P-HDR")
WIRE_BARE_CR = R(550, "5.6.0", "Bare CR in message data (SMTP smuggling)", "P-HDR")
WIRE_NUL = R(550, "5.6.0", "NUL byte in message data", "P-HDR")
WIRE_LINE_TOO_LONG = R(550, "5.6.0", "Line longer than 998 octets", "P-HDR")
WIRE_8BIT = R(550, "5.6.7", "8-bit data without BODY=8BITMIME or SMTPUTF8", "P-STD")
WIRE_8BIT_HEADER = R(550, "5.6.7", "Non-ASCII header without SMTPUTF8", "P-STD")
HDR_INVALID = R(550, "5.6.0", "Invalid header", "P-HDR")
HDR_DATE_WINDOW = R(550, "5.6.0", "Date header outside the allowed window", "P-HDR")
HDR_DATE_MISSING = R(550, "5.6.0", "Date header required", "P-HDR")
HDR_MESSAGE_ID_MISSING = R(550, "5.6.0", "Message-ID header required", "P-HDR")
HDR_MIME = R(550, "5.6.3", "Invalid MIME structure", "P-STD")
TRACE_FORGED = R(550, "5.7.1", "Forged trace header", "P-PATH")
SUBJ_FAKE_REPLY = R(550, "5.7.1", "Misleading subject: reply marker without a thread", "P-SUBJ")
SUBJ_DISPLAY_NAME = R(550, "5.7.1", "Misleading From display name", "P-FORGE")
SUBJ_REPLY_TO = R(550, "5.7.1", "Reply-To in another domain than From", "P-SUBJ")
SUBJ_OBFUSCATED = R(550, "5.7.1", "Obfuscated subject", "P-SUBJ")

# --- DNS (issue 3) ---
# DNSBL on the connecting address (P-BLOCK); the detail names the zones' display
# names (never a zone's query name, which may carry an access key).
DNSBL_LISTED = R(554, "5.7.1", "Client address is listed on a block list", "P-BLOCK")
DNSBL_TEMPFAIL = R(451, "4.7.1", "Block list lookup failed, try again later", "P-BLOCK")
# Sender domain existence (P-DOM): MAIL FROM domain ...
DOMAIN_NOT_FOUND = R(550, "5.1.8", "Sender domain does not exist", "P-DOM")
DOMAIN_NO_MAIL = R(550, "5.1.8", "Sender domain has no usable mail exchanger (MX, A or AAAA)", "P-DOM")
NULL_MX = R(550, "5.7.27", "Sender domain does not accept mail (null MX)", "P-DOM")  # RFC 7505 s.4.2
# ... and header From domain
HEADER_FROM_DOMAIN_NOT_FOUND = R(550, "5.7.1", "Header From domain does not exist", "P-DOM")
HEADER_FROM_DOMAIN_NO_MAIL = R(550, "5.7.1", "Header From domain has no usable mail exchanger (MX, A or AAAA)", "P-DOM")
HEADER_FROM_NULL_MX = R(550, "5.7.27", "Header From domain does not accept mail (null MX)", "P-DOM")
DNS_TEMPFAIL = R(451, "4.4.3", "Cannot verify the domain now (DNS failure), try again later", "P-DOM")

# --- block lists (issue 3) ---
# Operator block lists (P-BLOCK). The detail names the matched entry; the
# operator's reason stays in the transaction log.
BLOCKED_CLIENT = R(554, "5.7.1", "Client address is blocked by the operator", "P-BLOCK")
BLOCKED_CLIENT_HOST = R(554, "5.7.1", "Client host name (reverse DNS) is blocked by the operator", "P-BLOCK")
BLOCKED_HELO = R(554, "5.7.1", "HELO/EHLO host name is blocked by the operator", "P-BLOCK")
BLOCKED_SENDER = R(554, "5.7.1", "Sender domain is blocked by the operator", "P-BLOCK")

# --- sender authorization (issue 5) ---
# The envelope sender and the From/Sender headers must be in the account's
# authorized domains: verified by a DNS TXT proof, or approved by an operator
# (P-FORGE). The detail says which domain and why (pending proof, subdomain).
SENDER_NOT_AUTHORIZED = R(550, "5.7.1", "Sender domain not authorized for this account", "P-FORGE")
HEADER_FROM_NOT_AUTHORIZED = R(550, "5.7.1", "Header From domain not authorized for this account", "P-FORGE")
HEADER_SENDER_NOT_AUTHORIZED = R(550, "5.7.1", "Header Sender domain not authorized for this account", "P-FORGE")
DISPLAY_NAME_NOT_AUTHORIZED = R(550, "5.7.1", "From display name shows an address not authorized for this account",
                                "P-FORGE")
NULL_SENDER_NOT_REPORT = R(550, "5.7.1", "Null sender only for delivery status or disposition notifications",
                           "P-FORGE")

# --- mailing lists (issue 4) ---
REGISTRY_UNAVAILABLE = R(451, "4.3.0", "Mailing-list registry unavailable, try again later", "P-OPTIN")
OPTIN_NOT_SUBSCRIBED = R(550, "5.7.1", "Recipient is not a confirmed subscriber of this list", "P-OPTIN")
OPTIN_UNSUBSCRIBED = R(550, "5.7.1", "Recipient has unsubscribed from this list", "P-OPTOUT")
OPTIN_UNREGISTERED_LIST = R(550, "5.7.1", "Mailing-list mail from a list that is not registered", "P-OPTIN")
# List mail is one recipient per client transaction: each copy is its own
# upstream transaction, and one client reply cannot say "taken for bob,
# refused for carol" (docs/lists.md, "One recipient per transaction").
LIST_ONE_RECIPIENT = R(452, "4.5.3", "List mail takes one recipient per transaction; send the others again",
                       "P-OPTIN")
UNSUBSCRIBE_BAD_TOKEN = R(550, "5.1.1", "Unknown or damaged unsubscribe address", "P-OPTOUT")

# --- forwarded mail and SRS bounces (docs/forwarding.md) ---
# A forwarding candidate without evidence is refused with SENDER_NOT_AUTHORIZED
# (P-FORGE) and a detail naming the evidence it lacks. At the SRS domain only a
# valid, unexpired SRS address is relayed (to the original sender); nothing else
# there is.
SRS_NOT_SRS = R(550, "5.1.1", "No such address: not an SRS address of this gateway", "P-RELAY")
SRS_BAD_HASH = R(550, "5.7.1", "SRS address does not verify (bad hash)", "P-RELAY")
SRS_EXPIRED = R(550, "5.1.1", "SRS address has expired", "P-RELAY")
SRS_BOUNCES_ONLY = R(550, "5.7.1", "SRS addresses take bounces only (null reverse-path)", "P-RELAY")
SRS_SEPARATE = R(452, "4.5.3", "SRS bounces need a transaction of their own; send the other recipients again",
                 "P-RELAY")


# --- harvest guard and connection limits (P-HARVEST, P-LOAD; issue 12, checks/rcpt_harvest.py,
# checks/connect_rate.py, checks/mail_account_connections.py) --------------------------------
HARVEST_SESSION = R(421, "4.7.0", "Too many refused recipients in this session, closing", "P-HARVEST")
HARVEST_DEFERRED = R(451, "4.7.1", "Too many refused recipients recently, try again later", "P-HARVEST")
CONNECTION_RATE = R(421, "4.7.0", "Too many connections from your address per minute (connection rate), "
                    "try again later", "P-LOAD")
TOO_MANY_CONNECTIONS_ACCOUNT = R(421, "4.7.0", "Too many concurrent connections for this account, "
                                 "try again later", "P-LOAD")


# --- bulk and repeat detectors (issue 12, checks/data_bulk.py, docs/bulk.md) ---
# Over [bulk] recipients_threshold distinct recipients of one fingerprint in
# the window: deferred first; past refuse_factor times it, refused. The same
# fingerprint to one recipient again (another Message-ID): refused.
BULK_DEFERRED = R(451, "4.7.1", "Too many similar messages to different recipients; try again later", "P-UCE")
BULK_REFUSED = R(550, "5.7.1", "Bulk mail: too many similar messages to recipients who did not ask", "P-UCE")
REPEAT_REFUSED = R(550, "5.7.1", "The same message again to the same recipient", "P-UCE")


def catalogue() -> dict[str, Reply]:
    """Every catalogue entry by its name (``DNSBL_LISTED``), in definition order.
    Check SPECs name their replies by these names (``CheckSpec.replies``)."""
    return {name: value for name, value in globals().items()
            if isinstance(value, Reply) and name.isupper()}

