"""Operator block lists (P-BLOCK): client IPs/CIDRs, sender domains and
host names (HELO/EHLO and reverse DNS), kept in the storage backend and
changed at run time without restart. See docs/blocklists.md.

- ``model``: entry kinds, normalization and validation (pure)
- ``matcher``: the immutable snapshot the SMTP checks read (pure, no I/O)
- ``store``: the database side (SQLAlchemy Core; SQLite or PostgreSQL)
- ``service``: :class:`BlockList`, the snapshot plus its refresher
"""
from .model import KINDS, BlockEntry, BlockError, Conflict, Invalid, NotFound, normalize
from .matcher import Snapshot
from .service import BlockList
from .store import BlockStore

__all__ = ["KINDS", "BlockEntry", "BlockError", "Conflict", "Invalid", "NotFound", "normalize",
           "Snapshot", "BlockList", "BlockStore"]
