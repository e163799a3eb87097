"""Per-key token buckets: requests per minute and, optionally, requested tokens (max_tokens) per minute.

A bucket holds up to `capacity` units and refills at `rate` units per second. A request takes 1 request unit and
`max_tokens` token units, from both buckets or from neither; when one is short, the answer is 429 with
Retry-After = the seconds until both can pay. State is per gateway process: with N replicas behind a Service, each
key gets N times the limit (set limits per replica accordingly).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucket:
    def __init__(
        self, per_minute: float, capacity: float | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.rate = per_minute / 60.0
        self.capacity = float(capacity if capacity is not None else per_minute)
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if now; inf if it never fits)."""
        self._refill()
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0
    limit: str | None = None  # "requests" | "tokens" when refused
    message: str = ""


@dataclass(frozen=True)
class Limits:
    requests_per_minute: float | None
    request_burst: int | None
    tokens_per_minute: float | None


class RateLimiter:
    """Buckets per key name, created on first use with that key's limits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[Limits, TokenBucket | None, TokenBucket | None]] = {}

    def _get(self, key: str, limits: Limits) -> tuple[TokenBucket | None, TokenBucket | None]:
        entry = self._buckets.get(key)
        if entry is None or entry[0] != limits:  # new key, or its limits changed (Secret reloaded)
            req = (
                TokenBucket(limits.requests_per_minute, limits.request_burst, self.clock)
                if limits.requests_per_minute
                else None
            )
            tok = (
                TokenBucket(limits.tokens_per_minute, None, self.clock) if limits.tokens_per_minute else None
            )
            entry = self._buckets[key] = (limits, req, tok)
        return entry[1], entry[2]

    def acquire(self, key: str, limits: Limits, tokens: int) -> Decision:
        with self._lock:
            req, tok = self._get(key, limits)
            wait_req = req.wait_for(1) if req else 0.0
            wait_tok = tok.wait_for(tokens) if tok else 0.0
            if math.isinf(wait_tok):
                return Decision(
                    False,
                    math.inf,
                    "tokens",
                    f"max_tokens={tokens} is more than this key's tokens_per_minute "
                    f"({limits.tokens_per_minute:g}): ask for fewer tokens",
                )
            if wait_req > 0 or wait_tok > 0:
                which = "requests" if wait_req >= wait_tok else "tokens"
                per_min = limits.requests_per_minute if which == "requests" else limits.tokens_per_minute
                return Decision(
                    False,
                    max(wait_req, wait_tok),
                    which,
                    f"Rate limit reached for {which} ({per_min:g} per minute for this key). "
                    f"Try again in {max(wait_req, wait_tok):.1f}s.",
                )
            if req:
                req.take(1)
            if tok:
                tok.take(tokens)
            return Decision(True)
