"""Gateway settings: a pydantic model loaded from YAML (jobs.platform.configfile.load_config) plus overrides.

Precedence (last wins): the YAML file (`--config`, else $TULPAR_GATEWAY_CONFIG, else built-in defaults); the
container conventions HOST, PORT and TULPAR_UPSTREAM_URL (what the Helm chart sets); environment variables
`TULPAR_GATEWAY__<SECTION>__<KEY>=value` (double underscores separate levels, e.g.
`TULPAR_GATEWAY__UPSTREAM__BASE_URL=http://ray-head:8000/v1`, `TULPAR_GATEWAY__ALIASES__TULPAR-KK=models:/kk-350m@champion`);
then dotted `key=value` arguments on the command line. Values are parsed as YAML scalars, like job overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.platform.configfile import load_config
from llm_core.config import ConfigError, StrictModel

ENV_PREFIX = "TULPAR_GATEWAY__"


class UpstreamConfig(StrictModel):
    """The OpenAI-compatible server behind the gateway (services.llm_serve: Ray Serve + vLLM)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="ends with /v1")
    api_key_env: str | None = Field(
        "TULPAR_UPSTREAM_API_KEY",
        description="env var holding a bearer token sent upstream (unset or empty: no Authorization header)",
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(600.0, gt=0, description="longest wait between two chunks of a response")
    max_connections: int = Field(512, gt=0)
    models_refresh_s: float = Field(30.0, gt=0, description="how often the upstream's /v1/models is re-read")
    unavailable_retry_after_s: int = Field(
        5, ge=1, description="Retry-After (s) on the 503 answered while the upstream refuses connections"
    )

    @field_validator("base_url")
    @classmethod
    def _strip(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8000/v1")
        return v.rstrip("/")


class AuthConfig(StrictModel):
    """API keys, stored only as hashes (see services/gateway/keys.py and `python -m services.gateway.keys`).

    Keys come from `keys_file` (a mounted Kubernetes Secret) and/or the env var `keys_env`; both hold the same
    YAML: `{name: "<hash>"}` or `{name: {hash: "<hash>", requests_per_minute: .., tokens_per_minute: ..}}`.
    """

    enabled: bool = True
    keys_file: Path | None = Field(None, description="e.g. /etc/tulpar/gateway/keys.yaml (a Secret volume)")
    keys_env: str | None = "TULPAR_GATEWAY_KEYS"
    reload_s: float = Field(30.0, gt=0, description="how often keys_file is re-read (Secret rotation)")


class RateLimitConfig(StrictModel):
    """Per-key token buckets (defaults for every key; a key may override them)."""

    requests_per_minute: float | None = Field(60.0, gt=0, description="None: unlimited")
    request_burst: int | None = Field(
        None, gt=0, description="bucket size; default: requests_per_minute (one minute's worth)"
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="budget of requested max_tokens per minute; None: unlimited"
    )
    default_max_tokens: int = Field(
        256, gt=0, description="tokens charged when a request sets no max_tokens/max_completion_tokens"
    )


class RequestLimitsConfig(StrictModel):
    """Bounds on any request body, checked before the OpenAI schema (services/gateway/schema.py)."""

    max_json_depth: int = Field(32, gt=0, description="deepest nesting of objects/lists")
    max_string_chars: int = Field(524_288, gt=0, description="longest string anywhere in the body")
    max_list_items: int = Field(4096, gt=0, description="longest list anywhere in the body")
    max_messages: int = Field(2048, gt=0, description="most chat messages in one request")


class AdminConfig(StrictModel):
    """The second listener: GET /metrics (Prometheus) and GET /health (detailed). Not for clients: it names the
    upstream, the alias table and the API-key names. port=null: no admin listener."""

    host: str = Field("127.0.0.1", description="bind address; the Helm chart sets 0.0.0.0 for Prometheus")
    port: int | None = Field(9090, ge=0, le=65535)


class Target(StrictModel):
    """One destination of an alias: `models:/<name>@<alias>`, `models:/<name>/<version>` or a served id."""

    model: str
    weight: float = Field(1.0, ge=0)


class AliasConfig(StrictModel):
    """A public model name. With two or more targets, requests are split by weight (a canary)."""

    targets: list[Target] = Field(min_length=1)
    split: Literal["request_id", "random"] = Field(
        "request_id",
        description="request_id: hash of the X-Request-ID header (sticky for a retried request); random: RNG",
    )
    seed: int | None = Field(None, description="seed of the RNG for split=random (tests, reproducible runs)")
    description: str = ""

    @model_validator(mode="after")
    def _weights(self) -> AliasConfig:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("target weights must add up to more than 0")
        return self


class GatewayConfig(StrictModel):
    """services.gateway: an OpenAI-compatible front door (auth, limits, aliases, canaries, errors, metrics)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    upstream: UpstreamConfig = UpstreamConfig()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    admin: AdminConfig = AdminConfig()
    max_body_bytes: int = Field(1_048_576, gt=0, description="request bodies over this get 413")
    request_limits: RequestLimitsConfig = RequestLimitsConfig()
    state_dir: Path | None = Field(
        None,
        description="where rate-limit buckets persist (SQLite) across restarts; None: in memory, a restart "
        "refills every bucket",
    )
    aliases: dict[str, AliasConfig] = Field(default_factory=dict)
    allow_served_ids: bool = Field(
        True, description="also accept the upstream's own model ids (as its /v1/models lists them)"
    )
    served_name_template: str = Field(
        "{name}-v{version}",
        description="registered model version -> served id (services.llm_serve's default)",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="default: MLFLOW_TRACKING_URI / jobs.platform.runtime"
    )
    alias_refresh_s: float = Field(
        60.0, gt=0, description="how often models:/name@alias targets are re-resolved"
    )
    require_resolved_aliases: bool = Field(
        True, description="refuse to start when a models:/ target cannot be resolved (else 503 until it can)"
    )
    limit_concurrency: int | None = Field(None, gt=0, description="uvicorn: 503 above this many connections")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _distinct_ports(self) -> GatewayConfig:
        if self.admin.port and self.admin.port == self.port:
            raise ValueError(
                f"admin.port {self.admin.port} is the public port: metrics must not be served to API clients; "
                "pick another admin.port (e.g. 9090) or admin.port=null to turn the admin listener off"
            )
        return self

    @field_validator("aliases", mode="before")
    @classmethod
    def _shorthand(cls, v: object) -> object:
        """`alias: models:/x@champion` is short for `alias: {targets: [{model: models:/x@champion}]}`."""
        if isinstance(v, dict):
            return {k: ({"targets": [{"model": t}]} if isinstance(t, str) else t) for k, t in v.items()}
        return v


# container conventions (the Helm chart's Deployment sets these), applied before TULPAR_GATEWAY__*
WELL_KNOWN_ENV = {"HOST": "host", "PORT": "port", "TULPAR_UPSTREAM_URL": "upstream.base_url"}


def env_overrides(environ: dict[str, str] | None = None) -> list[str]:
    """HOST, PORT, TULPAR_UPSTREAM_URL, then `TULPAR_GATEWAY__UPSTREAM__BASE_URL=x` -> `upstream.base_url=x`
    (sorted, so the result does not depend on the environment's order)."""
    environ = os.environ if environ is None else environ
    out = [f"{key}={environ[env]}" for env, key in WELL_KNOWN_ENV.items() if environ.get(env)]
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            dotted = ".".join(p.lower() for p in key[len(ENV_PREFIX) :].split("__"))
            out.append(f"{dotted}={value}")
    return out


def load_gateway_config(
    path: str | Path | None, overrides: list[str] | None = None, environ: dict[str, str] | None = None
) -> GatewayConfig:
    """YAML, then env overrides, then explicit overrides; raises ConfigError naming the bad key."""
    try:
        return load_config(GatewayConfig, path, env_overrides(environ) + list(overrides or []))
    except ConfigError:
        raise
    except ValueError as exc:  # pragma: no cover - load_config raises ConfigError for everything it checks
        raise ConfigError(str(exc)) from None
