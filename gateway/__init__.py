"""Outbound SMTP relay gateway that enforces a hosting provider's anti-spam policy."""

__version__ = "0.1.0"   # the one place of the version (pyproject.toml reads it)
