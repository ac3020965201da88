"""How one client reply is derived from several answers.

A message can have several copies (one per list recipient, each with its
own upstream transaction) besides what the gateway keeps itself. The client
gets one reply after DATA:

- 250 only when every copy was taken: the first copy's answer (the client's
  250 then carries the trace id and that answer);
- otherwise the first transient (4xx) failure, so the client keeps the
  message and retries: a retry may duplicate copies that did go out, which
  is never a loss;
- otherwise (all failures permanent) the first failure.
"""
from __future__ import annotations

from typing import Sequence

from ..core.replies import Rendered, Reply


def combine(answers: Sequence[Reply | Rendered]) -> Reply | Rendered:
    failed = [a for a in answers if not a.is_positive]
    if not failed:
        return answers[0]
    transient = [a for a in failed if a.is_transient]
    return transient[0] if transient else failed[0]
