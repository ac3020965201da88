"""Prometheus metrics, written from the transaction ledger (never from
scattered call sites), served at /metrics."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.transactions = Counter("gateway_transactions_total", "Transactions by decision",
                                    ["decision"], registry=r)
        self.checks = Counter("gateway_check_outcomes_total", "Check outcomes", ["check", "result"], registry=r)
        self.recipients = Counter("gateway_recipients_total", "Recipients by outcome", ["outcome"], registry=r)
        self.auth = Counter("gateway_auth_total", "AUTH attempts by outcome", ["outcome"], registry=r)
        self.sessions_refused = Counter("gateway_sessions_refused_total", "Connections refused at connect",
                                        ["check"], registry=r)
        self.dnsbl_alerts = Counter("gateway_dnsbl_zone_alerts_total", "DNSBL zones disabled by health probes",
                                    ["zone"], registry=r)
        self.connections = Gauge("gateway_connections", "Open SMTP connections", registry=r)
        self.bytes_relayed = Counter("gateway_bytes_relayed_total", "Message bytes relayed", registry=r)
        self.latency = Histogram("gateway_transaction_seconds", "MAIL to final reply",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=r)

    def observe_transaction(self, tx) -> None:
        self.transactions.labels(tx.decision).inc()
        for outcome in tx.ledger:
            self.checks.labels(outcome.check, outcome.result.value).inc()
        self.recipients.labels("accepted").inc(len(tx.recipients))
        if tx.refused_recipients:
            self.recipients.labels("refused").inc(tx.refused_recipients)
        if tx.decision == "relayed" and tx.message is not None:
            self.bytes_relayed.inc(len(tx.message))
        done = tx.timings.get("done")
        if done is not None:
            self.latency.observe(done / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
