"""Per-key token buckets: requests per minute and, optionally, requested tokens (max_tokens) per minute.

A bucket holds up to `capacity` units and refills at `rate` units per second. A request takes 1 request unit and
`max_tokens` token units, from both buckets or from neither; when one is short, the answer is 429 with
Retry-After = the seconds until both can pay. State is per gateway process: with N replicas behind a Service, each
key gets N times the limit (set limits per replica accordingly).

With a `BucketStore` (config `state_dir`), every bucket's level is written to SQLite after each request it admits
(one transaction, WAL), with the wall-clock time, and read back when the bucket is first used: a restarted
gateway keeps what each key has spent (plus the refill of the time it was down) instead of refilling everyone.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tulpar.gateway")


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


class BucketStore:
    """Bucket levels in SQLite (`<state_dir>/ratelimit.sqlite`): (key, kind) -> level at a wall-clock time."""

    def __init__(self, state_dir: Path) -> None:
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.path = state_dir / "ratelimit.sqlite"
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # each commit survives a killed process
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS buckets (key TEXT NOT NULL, kind TEXT NOT NULL, level REAL NOT NULL, "
                "wall REAL NOT NULL, PRIMARY KEY (key, kind))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise ValueError(
                f"state_dir {str(state_dir)!r} is not usable for the rate-limit state ({exc}): give a writable "
                "directory (a volume) or state_dir=null to keep limits in memory"
            ) from None

    def load(self, key: str, kind: str) -> tuple[float, float] | None:
        row = self._db.execute(
            "SELECT level, wall FROM buckets WHERE key = ? AND kind = ?", (key, kind)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def save(self, key: str, levels: dict[str, float], wall: float) -> None:
        with self._db:  # one transaction for both buckets of the key
            self._db.executemany(
                "INSERT INTO buckets (key, kind, level, wall) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key, kind) DO UPDATE SET level = excluded.level, wall = excluded.wall",
                [(key, kind, level, wall) for kind, level in levels.items()],
            )

    def close(self) -> None:
        self._db.close()


class RateLimiter:
    """Buckets per key name, created on first use with that key's limits (and its stored level, if any)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        store: BucketStore | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.store = store
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[Limits, TokenBucket | None, TokenBucket | None]] = {}

    def _bucket(
        self, key: str, kind: str, per_minute: float | None, capacity: float | None
    ) -> TokenBucket | None:
        if not per_minute:
            return None
        bucket = TokenBucket(per_minute, capacity, self.clock)
        saved = self.store.load(key, kind) if self.store else None
        if saved is not None:
            level, wall = saved
            down_s = max(0.0, self.wall_clock() - wall)
            bucket.level = max(0.0, min(bucket.capacity, level + down_s * bucket.rate))
        return bucket

    def _get(self, key: str, limits: Limits) -> tuple[TokenBucket | None, TokenBucket | None]:
        entry = self._buckets.get(key)
        if entry is None or entry[0] != limits:  # new key, or its limits changed (Secret reloaded)
            req = self._bucket(key, "requests", limits.requests_per_minute, limits.request_burst)
            tok = self._bucket(key, "tokens", limits.tokens_per_minute, None)
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
            if self.store is not None:
                levels = {kind: b.level for kind, b in (("requests", req), ("tokens", tok)) if b is not None}
                if levels:
                    try:
                        self.store.save(key, levels, self.wall_clock())
                    except (
                        sqlite3.Error
                    ) as exc:  # the limit still holds in memory; only a restart would forget
                        log.error("could not persist rate-limit state to %s: %s", self.store.path, exc)
            return Decision(True)
