"""The model every layer shares: phases, outcomes and the ledger, session,
transaction and recipients, verdicts (``transaction``), envelope addresses
(``address``) and the reply catalogue (``replies``).

It imports nothing of the gateway outside itself, so config, message
analysis, checks, delivery, the SMTP server and the web app can all depend
on it without a cycle.
"""
