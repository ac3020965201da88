"""Prometheus metrics, written from the transaction ledger (never from
scattered call sites), served at /metrics. A subscriber of the event bus
(core/events.py) for transactions and refused connections."""
from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .core import replies
from .core.events import Authenticated, DuplicateRisk, EventBus, Refusal, SessionEnded, TransactionEnded
from .core.transaction import Phase

# gateway_auth_total{outcome}: a refused AUTH by the reply it got; success
# from the Authenticated event.
_AUTH_OUTCOMES = {replies.AUTH_INVALID: "failure", replies.AUTH_SUSPENDED: "suspended",
                  replies.AUTH_TOO_MANY_FAILURES: "blocked"}
# gateway_sessions_closed_total{reason}: sessions the gateway closed for
# connection-level abuse, from SessionEnded's session.ended (smtp/server.py).
_CLOSED_REASONS = {"preauth timeout": "preauth_timeout", "evicted": "evicted"}

DUPLICATE_RISK_CAUSES = ("client_gone", "upstream_timeout_after_data", "upstream_lost_after_data",
                         "local_kept_relay_deferred")


class _StatsCollector:
    """Exposes the counters components keep themselves (resolver, DNSBL,
    relay pool) at scrape time, so their hot paths only bump integers."""

    def __init__(self, source: Callable[[], Any]):
        self.source = source

    def collect(self):
        gw = self.source()
        if gw is None:
            return
        resolver = getattr(gw, "resolver", None)
        if resolver is not None:
            st = resolver.stats
            fam = CounterMetricFamily("gateway_dns_lookups", "Resolver lookups by how they were answered",
                                      labels=["source"])
            for key in ("cache_hits", "negative_hits", "shared_hits", "coalesced", "static", "queries"):
                fam.add_metric([key], getattr(st, key))
            yield fam
            fam = CounterMetricFamily("gateway_dns_errors", "Resolver failures", labels=["kind"])
            for key in ("failures", "timeouts", "shared_errors"):
                fam.add_metric([key], getattr(st, key))
            yield fam
            yield HistogramMetricFamily("gateway_dns_query_seconds", "DNS query latency (cache misses)",
                                        buckets=list(st.as_dict()["latency_buckets"].items()),
                                        sum_value=st.latency_sum)
        dnsbl = getattr(gw, "dnsbl", None)
        if dnsbl is not None:
            fam = CounterMetricFamily("gateway_dnsbl_checks", "DNSBL checks by result", labels=["result"])
            for key in ("checks", "listed", "tempfail", "zone_errors"):
                fam.add_metric([key], getattr(dnsbl.stats, key))
            yield fam
            g = GaugeMetricFamily("gateway_dnsbl_zone_disabled", "1 when a zone failed its health probe",
                                  labels=["zone"])
            for zone in dnsbl.settings.zones:
                g.add_metric([zone.display], 1 if zone.display in dnsbl.disabled_zones else 0)
            yield g
        relay = getattr(gw, "relay", None)
        if relay is not None:
            fam = CounterMetricFamily("gateway_upstream_connections", "Upstream connections", labels=["event"])
            for key, value in relay.stats.items():
                fam.add_metric([key], value)
            yield fam
            g = GaugeMetricFamily("gateway_upstream_connections_open", "Upstream connections open (in use, idle, "
                                  "being opened or quit), over all upstreams; at most relay.max_connections")
            g.add_metric([], relay.open)
            yield g
            g = GaugeMetricFamily("gateway_upstream_connections_max", "relay.max_connections")
            g.add_metric([], relay.max_connections)
            yield g
            g = GaugeMetricFamily("gateway_upstream_connection_waiters",
                                  "Transactions waiting for an upstream connection slot now")
            g.add_metric([], relay.waiting)
            yield g
            yield from _breaker_metrics(relay)
        counters = getattr(gw, "counters", None)
        if counters is not None and hasattr(counters, "health"):
            yield from _counter_metrics(counters)
        registry = getattr(gw, "registry", None)
        if registry is not None:
            yield from _registry_metrics(registry)
        gauge = GaugeMetricFamily("gateway_smtp_connections", "Open SMTP connections")
        gauge.add_metric([], gw.connections.total)
        yield gauge


def _breaker_metrics(relay):
    from .relay.breaker import STATE_VALUES
    state = GaugeMetricFamily("gateway_upstream_state", "Circuit breaker per upstream: 0 closed, "
                              "1 half-open (probe running), 2 open (skipped)", labels=["upstream"])
    failures = GaugeMetricFamily("gateway_upstream_consecutive_failures",
                                 "Consecutive failures to open a connection and start a transaction",
                                 labels=["upstream"])
    opens = CounterMetricFamily("gateway_upstream_breaker_opens", "Times the breaker opened (failed probes "
                                "included)", labels=["upstream"])
    skipped = CounterMetricFamily("gateway_upstream_skipped", "Transactions that skipped the upstream "
                                  "without trying it (breaker open)", labels=["upstream"])
    for up in relay.upstreams:
        b = up.breaker
        state.add_metric([up.name], STATE_VALUES[b.state])
        failures.add_metric([up.name], b.consecutive_failures)
        opens.add_metric([up.name], b.opens)
        skipped.add_metric([up.name], b.skipped)
    yield from (state, failures, opens, skipped)


def _counter_metrics(counters):
    h = counters.health()
    g = GaugeMetricFamily("gateway_counters_fallback", "1 while the shared counters (Redis) are unreachable "
                          "and limits are counted locally, scaled down")
    g.add_metric([], 1 if h["state"] == "fallback" else 0)
    yield g
    yield CounterMetricFamily("gateway_counters_fallbacks", "Times the counters fell back to local counting",
                              value=h["fallbacks"])
    yield CounterMetricFamily("gateway_counters_redis_errors", "Redis calls of the counters that failed or "
                              "overran their deadline", value=h["redis_errors"])


def _registry_metrics(registry):
    st = registry.stats
    fam = CounterMetricFamily("gateway_registry_confirmations",
                              "Confirmation (double opt-in) mails: sent, failed, or deferred by the account's "
                              "budget (a single add queued, a resend refused, an outbox claim refused)",
                              labels=["outcome"])
    for key in ("sent", "failed", "deferred"):
        fam.add_metric([key], st.get(f"confirmations_{key}", 0))
    yield fam
    yield CounterMetricFamily("gateway_registry_confirmation_budget_exhausted",
                              "Times an account used up its budget of confirmation mails "
                              "(once per account and window per gateway)",
                              value=st.get("confirmation_budget_exhausted", 0))
    fam = CounterMetricFamily("gateway_registry_optouts",
                              "Opt-outs by the way they came (one-click: RFC 8058 POST, page: the unsubscribe "
                              "page's button, mailto, api: removed by the list owner) and result (removed: a "
                              "subscriber record was deleted; already: none was left)", labels=["via", "result"])
    for (via, result), value in registry.optouts.items():
        fam.add_metric([via, result], value)
    yield fam
    checkpointer = registry.store.checkpointer
    if checkpointer is not None:
        fam = CounterMetricFamily("gateway_registry_wal_checkpoints",
                                  "SQLite WAL checkpoints after deletions of personal data, by result (busy: a "
                                  "reader held an older snapshot; retried)", labels=["result"])
        for key, value in checkpointer.stats.items():
            fam.add_metric([key], value)
        yield fam
    cache = registry.cache
    snaps = cache.snapshots
    fam = CounterMetricFamily("gateway_registry_lookups", "RCPT subscription lookups by what answered them",
                              labels=["answered_by"])
    fam.add_metric(["list_snapshot"], snaps.stats["hits"] if snaps is not None else 0)
    fam.add_metric(["entry_cache"], cache.stats["hits"])
    fam.add_metric(["database"], cache.stats["misses"])
    yield fam
    g = GaugeMetricFamily("gateway_registry_channel_healthy",
                          "1 while the invalidation channel is up (else every lookup reads the database)")
    g.add_metric([], 1 if cache.healthy else 0)
    yield g
    if snaps is not None:
        g = GaugeMetricFamily("gateway_registry_snapshot_lists", "Mailing lists held in memory")
        g.add_metric([], len(snaps))
        yield g
        g = GaugeMetricFamily("gateway_registry_snapshot_entries", "Subscription entries held in memory")
        g.add_metric([], snaps.entries)
        yield g
        fam = CounterMetricFamily("gateway_registry_snapshot_loads", "List snapshot loads by result",
                                  labels=["result"])
        for key, label in (("loads", "loaded"), ("too_big", "too_big"), ("load_failures", "failed"),
                           ("discarded", "discarded"), ("evictions", "evicted")):
            fam.add_metric([label], snaps.stats[key])
        yield fam
        yield CounterMetricFamily("gateway_registry_snapshot_load_seconds",
                                  "Time spent loading list snapshots (completed loads)",
                                  value=snaps.stats["load_seconds"])


class Metrics:
    def __init__(self, source: Callable[[], Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._children: dict = {}
        if source is not None:
            self.registry.register(_StatsCollector(source))
        r = self.registry
        self.transactions = Counter("gateway_transactions_total", "Transactions by decision",
                                    ["decision"], registry=r)
        self.checks = Counter("gateway_check_outcomes_total", "Check outcomes", ["check", "result"], registry=r)
        self.recipients = Counter("gateway_recipients_total", "Recipients by outcome", ["outcome"], registry=r)
        self.auth = Counter("gateway_auth_total", "AUTH attempts by outcome", ["outcome"], registry=r)
        self.sessions_refused = Counter("gateway_sessions_refused_total", "Connections refused at connect",
                                        ["check"], registry=r)
        self.sessions_closed = Counter("gateway_sessions_closed_total", "Sessions closed before they "
                                       "authenticated: idle past smtp.preauth_timeout, or evicted near the "
                                       "connection cap", ["reason"], registry=r)
        for reason in _CLOSED_REASONS.values():
            self._child(self.sessions_closed, reason)   # both series exist from the start, at 0
        self.dnsbl_alerts = Counter("gateway_dnsbl_zone_alerts_total", "DNSBL zones disabled by health probes",
                                    ["zone"], registry=r)
        # Windows where a copy may be out while the client sends the message
        # again (docs/architecture.md, "Duplicates by design"); every cause
        # shown from the start, so a rate() needs no first occurrence.
        self.duplicate_risk = Counter("gateway_duplicate_risk_total", "Transactions whose message may reach "
                                      "the upstream twice, by cause", ["cause"], registry=r)
        for cause in DUPLICATE_RISK_CAUSES:
            self._child(self.duplicate_risk, cause)
        self.bytes_relayed = Counter("gateway_bytes_relayed_total", "Message bytes relayed", registry=r)
        self.latency = Histogram("gateway_transaction_seconds", "MAIL to final reply",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=r)

    def _child(self, metric, *labels):
        # labels() resolves and locks on every call; the hot path keeps the children.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def subscribe(self, events: EventBus) -> None:
        events.subscribe(TransactionEnded, self._on_transaction_ended)
        events.subscribe(Refusal, self._on_refusal)
        events.subscribe(Authenticated, self._on_authenticated)
        events.subscribe(SessionEnded, self._on_session_ended)
        events.subscribe(DuplicateRisk, self._on_duplicate_risk)

    def _on_transaction_ended(self, event: TransactionEnded) -> None:
        self.observe_transaction(event.tx)

    def _on_refusal(self, event: Refusal) -> None:
        if event.tx is None:
            phase = event.outcome.phase
            if phase is Phase.CONNECT:
                self._child(self.sessions_refused, event.outcome.check).inc()
            elif phase is Phase.AUTH:
                reply = event.outcome.reply
                outcome = _AUTH_OUTCOMES.get(reply) if isinstance(reply, replies.Reply) else None
                if outcome is not None:
                    self._child(self.auth, outcome).inc()

    def _on_duplicate_risk(self, event: DuplicateRisk) -> None:
        self._child(self.duplicate_risk, event.cause).inc()

    def _on_authenticated(self, event: Authenticated) -> None:
        self._child(self.auth, "success").inc()

    def _on_session_ended(self, event: SessionEnded) -> None:
        reason = _CLOSED_REASONS.get(event.session.ended)
        if reason is not None:
            self._child(self.sessions_closed, reason).inc()

    def observe_transaction(self, tx) -> None:
        child = self._child
        child(self.transactions, tx.decision).inc()
        for outcome in tx.ledger:
            child(self.checks, outcome.check, outcome.result.value).inc()
        child(self.recipients, "accepted").inc(len(tx.recipients))
        if tx.refused_recipients:
            child(self.recipients, "refused").inc(tx.refused_recipients)
        if tx.decision == "relayed" and tx.data_octets:
            # the octets received (the message is freed before the bookkeeping runs)
            self.bytes_relayed.inc(tx.data_octets)
        done = tx.timings.get("done")
        if done is not None:
            self.latency.observe(done / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
