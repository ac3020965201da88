"""Pure message-content logic (issue 5): wire hygiene, RFC 5322 headers, trace and subject rules.

Nothing here does I/O or knows about SMTP sessions; the check modules in
``gateway/checks/data_*.py`` feed it ``tx.message`` and turn findings into
ledger outcomes.
"""
from .findings import DEFAULT_ACTIONS, RULES, Finding, Rule
from .parse import (HeaderSyntaxError, Mailbox, ParsedHeaders, check_mime, decode_words, parse_address_list,
                    parse_content_type, parse_date, parse_headers, parse_received, valid_message_id)
from .rules import check_structure, check_subject, check_trace
from .settings import HeaderSettings
from .wire import check_wire

__all__ = [
    "DEFAULT_ACTIONS", "RULES", "Finding", "Rule", "HeaderSettings", "HeaderSyntaxError", "Mailbox",
    "ParsedHeaders", "check_mime", "check_structure", "check_subject", "check_trace", "check_wire",
    "decode_words", "parse_address_list", "parse_content_type", "parse_date", "parse_headers",
    "parse_received", "valid_message_id",
]
