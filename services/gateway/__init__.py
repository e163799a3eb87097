"""The Tulpar API gateway: an OpenAI-compatible front door for services.llm_serve.

    python -m services.gateway --config configs/gateway/local.yaml [dotted.key=value ...]

API keys (hashed), per-key rate limits, body size limits, model aliases resolved through the MLflow registry,
weighted canaries, OpenAI-schema request validation, OpenAI-format errors, SSE pass-through, a minimal public
/health, and an admin listener with Prometheus /metrics. See docs/serving.md.
Names are imported lazily, so `python -m services.gateway.keys` stays quick (no torch via llm_core).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Gateway": "services.gateway.app",
    "create_app": "services.gateway.app",
    "GatewayConfig": "services.gateway.config",
    "load_gateway_config": "services.gateway.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services.gateway' has no attribute {name!r}")
