"""Prometheus metrics of the gateway, served at GET /metrics on the admin listener only (config `admin`; they
name API keys, so never on the public port).

| metric | type | labels |
|---|---|---|
| tulpar_gateway_requests_total | counter | route, model (public name; "-" when unknown), key, status |
| tulpar_gateway_request_duration_seconds | histogram | route, model: until the last byte was sent |
| tulpar_gateway_time_to_first_byte_seconds | histogram | route, model: until the upstream's first body chunk |
| tulpar_gateway_upstream_requests_total | counter | model, served_model, status: canary traffic per version |
| tulpar_gateway_in_flight_requests | gauge | |
| tulpar_gateway_auth_failures_total | counter | reason: missing / invalid |
| tulpar_gateway_rate_limited_total | counter | key, limit: requests / tokens |
| tulpar_gateway_upstream_errors_total | counter | kind: connect / timeout / protocol |
| tulpar_gateway_alias_refresh_total | counter | result: ok / error |
| tulpar_gateway_alias_target | gauge | alias, target, served_model: the target's weight (share of traffic) |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """One registry per app, so several gateways (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tulpar_gateway_requests", "Requests answered", ["route", "model", "key", "status"], registry=r
        )
        self.duration = Histogram(
            "tulpar_gateway_request_duration_seconds",
            "Time to the last byte of the response",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "tulpar_gateway_time_to_first_byte_seconds",
            "Time to the upstream's first response chunk (TTFT for streams)",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream = Counter(
            "tulpar_gateway_upstream_requests",
            "Requests sent upstream, by served model id (canary split)",
            ["model", "served_model", "status"],
            registry=r,
        )
        self.in_flight = Gauge("tulpar_gateway_in_flight_requests", "Requests being answered", registry=r)
        self.auth_failures = Counter(
            "tulpar_gateway_auth_failures", "Requests refused with 401", ["reason"], registry=r
        )
        self.rate_limited = Counter(
            "tulpar_gateway_rate_limited", "Requests refused with 429", ["key", "limit"], registry=r
        )
        self.upstream_errors = Counter(
            "tulpar_gateway_upstream_errors", "Upstream transport failures", ["kind"], registry=r
        )
        self.alias_refresh = Counter(
            "tulpar_gateway_alias_refresh", "Alias resolutions against the registry", ["result"], registry=r
        )
        self.alias_target = Gauge(
            "tulpar_gateway_alias_target",
            "Weight of each alias target and the served id it resolves to",
            ["alias", "target", "served_model"],
            registry=r,
        )

    def set_alias_table(self, table: dict[str, list[dict]]) -> None:
        self.alias_target.clear()
        for alias, targets in table.items():
            total = sum(t["weight"] for t in targets) or 1.0
            for t in targets:
                self.alias_target.labels(alias, t["target"], t["served"] or "").set(t["weight"] / total)
