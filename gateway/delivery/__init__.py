"""Delivery: everything from "the data checks passed" to the client's reply,
and the upstream transactions opened at RCPT for it.

- handover.py: :class:`Delivery` (built once by app.py) and the per-transaction
  :class:`Handover` the SMTP server drives (RCPT, DATA, release);
- finalize.py: the outgoing bytes of each copy, built in one place;
- local.py: the table of recipients the gateway handles itself (service
  mailboxes, the unsubscribe mailto) and the SRS bounce target;
- reply.py: how one client reply is derived from several upstream answers;
- trace.py: the Received: and trace header every copy begins with.
"""
from .finalize import Finalizer
from .handover import Delivery, Handover
from .local import LocalHandler, local_handlers

__all__ = ["Delivery", "Finalizer", "Handover", "LocalHandler", "local_handlers"]
