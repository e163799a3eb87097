"""API keys: generated once, shown once, stored only as hashes.

Hash formats (the string stored in the Secret):
  pbkdf2-sha256:<key_id>:<iterations>:<salt_hex>:<digest_hex>   default; for keys made by `new` below
  sha256:<digest_hex>                                           plain SHA-256, for high-entropy keys made elsewhere

Keys made here look like `tlp-<key_id>-<secret>`: the key id (8 hex chars, not secret) picks the one stored hash
to check, so a wrong key costs one PBKDF2 at most and a correct key costs one per gateway process (verified keys
are remembered in memory by their SHA-256). 600,000 iterations follows OWASP's PBKDF2-HMAC-SHA256 advice.

    python -m services.gateway.keys new --name alice     # prints the key (once) and the line for the Secret
    echo -n "$KEY" | python -m services.gateway.keys hash --name alice   # hash a key you already have

Key sources (YAML, same format in both): the file `auth.keys_file` (a mounted Kubernetes Secret) and the env var
`auth.keys_env` (default TULPAR_GATEWAY_KEYS):

    alice: "pbkdf2-sha256:1a2b3c4d:600000:...:..."
    batch-jobs: {hash: "sha256:...", requests_per_minute: 600, tokens_per_minute: 200000}
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("tulpar.gateway")

DEFAULT_ITERATIONS = 600_000
_KEY_RE = re.compile(r"^tlp-([0-9a-f]{8})-[A-Za-z0-9_-]{20,}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ApiKey:
    """A stored key: its name (used in metrics and logs; never the key) and optional per-key limits."""

    name: str
    scheme: str  # "pbkdf2-sha256" | "sha256"
    key_id: str | None
    iterations: int
    salt: bytes
    digest: bytes
    requests_per_minute: float | None = None
    request_burst: int | None = None
    tokens_per_minute: float | None = None

    def matches(self, key: str) -> bool:
        raw = key.encode()
        if self.scheme == "sha256":
            got = hashlib.sha256(raw).digest()
        else:
            got = hashlib.pbkdf2_hmac("sha256", raw, self.salt, self.iterations)
        return hmac.compare_digest(got, self.digest)


def new_key() -> tuple[str, str]:
    """(key_id, key): a fresh `tlp-<id>-<secret>` key with 256 bits of secret."""
    key_id = secrets.token_hex(4)
    return key_id, f"tlp-{key_id}-{secrets.token_urlsafe(32)}"


def hash_key(key: str, *, iterations: int = DEFAULT_ITERATIONS, scheme: str = "pbkdf2-sha256") -> str:
    """The string to store for `key`. pbkdf2 needs a `tlp-<id>-...` key (the id selects the hash)."""
    if scheme == "sha256":
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    if scheme != "pbkdf2-sha256":
        raise ValueError(f"unknown hash scheme {scheme!r}: use pbkdf2-sha256 or sha256")
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError(
            "pbkdf2-sha256 needs a key made by `python -m services.gateway.keys new` (tlp-<8 hex>-<secret>); "
            "hash other high-entropy keys with --scheme sha256"
        )
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), salt, iterations)
    return f"pbkdf2-sha256:{m.group(1)}:{iterations}:{salt.hex()}:{digest.hex()}"


def parse_hash(name: str, stored: str, **limits: Any) -> ApiKey:
    parts = stored.strip().split(":")
    try:
        if parts[0] == "sha256" and len(parts) == 2:
            digest = bytes.fromhex(parts[1])
            if len(digest) != 32:
                raise ValueError
            return ApiKey(name, "sha256", None, 0, b"", digest, **limits)
        if parts[0] == "pbkdf2-sha256" and len(parts) == 5:
            key_id, iterations, salt, digest = (
                parts[1],
                int(parts[2]),
                bytes.fromhex(parts[3]),
                bytes.fromhex(parts[4]),
            )
            if not re.fullmatch(r"[0-9a-f]{8}", key_id) or iterations < 1 or len(digest) != 32:
                raise ValueError
            return ApiKey(name, "pbkdf2-sha256", key_id, iterations, salt, digest, **limits)
    except ValueError:
        pass
    raise ValueError(
        f"API key {name!r}: stored hash is not 'pbkdf2-sha256:<id>:<iterations>:<salt>:<digest>' or "
        "'sha256:<64 hex>' (make one with `python -m services.gateway.keys new --name NAME`)"
    )


def parse_keys(text: str, where: str) -> list[ApiKey]:
    """Keys from YAML text: {name: hash} or {name: {hash, requests_per_minute, request_burst, tokens_per_minute}}."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f"API keys in {where} are not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if isinstance(data, list):  # [{name: .., hash: ..}, ...]
        try:
            data = {item["name"]: {k: v for k, v in item.items() if k != "name"} for item in data}
        except (TypeError, KeyError):
            raise ValueError(f"API keys in {where}: list entries need `name` and `hash`") from None
    if not isinstance(data, dict):
        raise ValueError(f"API keys in {where} must be a mapping name -> hash")
    keys = []
    for name, spec in data.items():
        name = str(name)
        if not _NAME_RE.match(name):
            raise ValueError(f"API key name {name!r} in {where}: use letters, digits, '.', '_' or '-'")
        if isinstance(spec, str):
            keys.append(parse_hash(name, spec))
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("hash"), str):
            raise ValueError(f"API key {name!r} in {where}: give a hash string or a mapping with `hash`")
        extra = set(spec) - {"hash", "requests_per_minute", "request_burst", "tokens_per_minute"}
        if extra:
            raise ValueError(f"API key {name!r} in {where}: unknown fields {sorted(extra)}")
        limits = {
            k: spec[k] for k in ("requests_per_minute", "request_burst", "tokens_per_minute") if k in spec
        }
        for k, v in limits.items():
            if v is not None and (not isinstance(v, int | float) or v <= 0):
                raise ValueError(f"API key {name!r} in {where}: {k} must be a positive number")
        keys.append(parse_hash(name, spec["hash"], **limits))
    return keys


class KeyStore:
    """Checks presented keys against the stored hashes; re-reads the Secret file when it changes."""

    def __init__(
        self, keys_file: Path | None = None, keys_env: str | None = None, *, reload_s: float = 30.0
    ) -> None:
        self.keys_file = keys_file
        self.keys_env = keys_env
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._keys: list[ApiKey] = []
        self._by_id: dict[str, ApiKey] = {}
        self._by_sha: dict[bytes, ApiKey] = {}
        self._verified: OrderedDict[bytes, ApiKey] = OrderedDict()  # sha256(key) -> key, bounded LRU
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        self.load()

    @property
    def names(self) -> list[str]:
        return [k.name for k in self._keys]

    def __len__(self) -> int:
        return len(self._keys)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = self.keys_file.stat() if self.keys_file else None
        except OSError:
            return None
        return (st.st_mtime, st.st_size) if st else None

    def load(self) -> None:
        """(Re)read every source; raises ValueError on a bad source (the old keys stay in force)."""
        keys: list[ApiKey] = []
        if self.keys_file is not None:
            path = Path(self.keys_file)
            if not path.is_file():
                raise ValueError(
                    f"auth.keys_file {str(path)!r} not found: mount the Secret there or set auth.keys_file"
                )
            stamp = self._stamp()
            keys += parse_keys(path.read_text(encoding="utf-8"), str(path))
            self._file_stamp = stamp
        if self.keys_env and os.environ.get(self.keys_env, "").strip():
            keys += parse_keys(os.environ[self.keys_env], f"${self.keys_env}")
        names = [k.name for k in keys]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"API key names must be unique; repeated: {dup}")
        with self._lock:
            self._keys = keys
            self._by_id = {k.key_id: k for k in keys if k.key_id}
            self._by_sha = {k.digest: k for k in keys if k.scheme == "sha256"}
            self._verified.clear()
        self._checked_at = time.monotonic()

    def maybe_reload(self) -> None:
        """Re-read the Secret file if it changed (Kubernetes swaps the mounted file on rotation)."""
        if self.keys_file is None or time.monotonic() - self._checked_at < self.reload_s:
            return
        self._checked_at = time.monotonic()
        if self._stamp() != self._file_stamp:
            try:
                self.load()
                log.info("reloaded %d API keys from %s", len(self._keys), self.keys_file)
            except ValueError as exc:
                log.error("keeping the previous API keys: %s", exc)

    def is_cheap(self, key: str) -> bool:
        """True when verify(key) needs no PBKDF2 (cached, plain sha256, or no candidate to check)."""
        sha = hashlib.sha256(key.encode()).digest()
        m = _KEY_RE.match(key)
        with self._lock:
            return sha in self._verified or sha in self._by_sha or not (m and m.group(1) in self._by_id)

    def verify(self, key: str) -> ApiKey | None:
        """The stored key that `key` matches, or None. At most one PBKDF2 per call."""
        if not key or len(key) > 512:
            return None
        sha = hashlib.sha256(key.encode()).digest()
        with self._lock:
            hit = self._verified.get(sha)
            if hit is not None:
                self._verified.move_to_end(sha)
                return hit
            found = self._by_sha.get(sha)
            m = _KEY_RE.match(key)
            candidate = self._by_id.get(m.group(1)) if (found is None and m) else None
        if found is None and candidate is not None and candidate.matches(key):
            found = candidate
        if found is not None:
            with self._lock:
                self._verified[sha] = found
                while len(self._verified) > 4096:
                    self._verified.popitem(last=False)
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.keys", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_new = sub.add_parser("new", help="make a key; print it once, and the line to put in the Secret")
    p_hash = sub.add_parser("hash", help="hash a key read from stdin")
    for p in (p_new, p_hash):
        p.add_argument("--name", required=True, help="who the key is for (shown in metrics and logs)")
        p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    p_hash.add_argument("--scheme", choices=["pbkdf2-sha256", "sha256"], default="pbkdf2-sha256")
    args = parser.parse_args(argv)
    if not _NAME_RE.match(args.name):
        print(f"error: --name {args.name!r}: use letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 2
    try:
        if args.cmd == "new":
            _, key = new_key()
            stored = hash_key(key, iterations=args.iterations)
            print(f"key (shown once; give it to {args.name}): {key}", file=sys.stderr)
            print(f"{args.name}: {stored}")
        else:
            key = sys.stdin.read().strip()
            print(f"{args.name}: {hash_key(key, iterations=args.iterations, scheme=args.scheme)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
