"""The state the parts of the registry service share, and the guards they all use.

:class:`~gateway.registry.service.RegistryService` sets the state up once; each
part adds one concern over it as a mixin: ``lookups.py`` (the hot path),
``links.py`` (unsubscribe and confirmation links and tokens, opt-out, confirm),
``outbox.py`` (the confirmation mail, its outbox and budget), ``admin.py``
(accounts' API keys, lists, subscribers, imports).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Callable

from .cache import SubscriptionCache
from .model import Invalid, RegistryError, RegistryUnavailable
from .settings import RegistrySettings
from .store import RegistryStore
from .tokens import Keys

log = logging.getLogger("gateway.registry")


def clean_ip(value: Any, field: str) -> str:
    if value in (None, ""):
        return ""
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise Invalid(field, f"{value!r} is not an IP address") from None


class RegistryBase:
    """What every part reads; set by RegistryService.__init__."""

    settings: RegistrySettings
    clock: Callable[[], float]
    keys: Keys | None                  # None: registry.secret not set; what needs a key raises RegistryUnavailable
    store: RegistryStore
    cache: SubscriptionCache
    stats: dict[str, int]

    def _need_keys(self) -> Keys:
        if self.keys is None:
            raise RegistryUnavailable("registry.secret is not configured")
        return self.keys

    async def _db(self, coro, *, bounded: bool = True):
        """Await a store call; any database failure becomes RegistryUnavailable.
        ``bounded``: within lookup_timeout (not for bulk work: imports, exports)."""
        try:
            # no extra task, unlike wait_for
            async with asyncio.timeout(self.settings.lookup_timeout if bounded else None):
                return await coro
        except asyncio.CancelledError:
            raise
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryUnavailable(f"registry database unavailable: {type(exc).__name__}") from None
