"""Settings of the account side (``[accounts]`` in the config file)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccountSettings:
    # How often every DNS-verified sender domain is proven again (seconds).
    # A domain whose _gateway-proof TXT record is gone goes back to pending;
    # operator-approved domains are never re-checked. 0 = no periodic re-check.
    proof_recheck_interval: float = 3600.0
    # Deadline of one proof lookup (the resolver's own deadline also applies).
    proof_lookup_timeout: float = 5.0
    # Proof lookups in flight at once during a re-check pass.
    proof_concurrency: int = 8

    def __post_init__(self) -> None:
        if self.proof_recheck_interval < 0:
            raise ValueError("proof_recheck_interval: must be >= 0 (0 disables the re-check)")
        if self.proof_lookup_timeout <= 0:
            raise ValueError("proof_lookup_timeout: must be greater than 0")
        if not 1 <= self.proof_concurrency <= 256:
            raise ValueError("proof_concurrency: must be within 1..256")
