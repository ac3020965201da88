"""Mailing-list registry: lists, double opt-in, opt-out with keyed-hash
suppression, and the cached lookups of the RCPT hot path (P-OPTIN, P-OPTOUT).
See docs/registry.md.

Import from the submodules (``gateway.registry.service`` etc.); this package
stays light because ``gateway.config`` imports its settings.
"""

_EXPORTS = {
    "RegistryService": "service", "build_registry": "service",
    "MailingList": "model", "Subscriber": "model", "RecipientStatus": "model", "RegistryError": "model",
    "RegistryUnavailable": "model", "NotFound": "model", "Invalid": "model", "Conflict": "model",
    "RateLimited": "model", "TokenError": "model", "AddResult": "model", "UnsubscribeResult": "model",
    "normalize_address": "model", "RegistrySettings": "settings",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
