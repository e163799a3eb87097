"""Public model names -> served model ids.

A public name is either an alias from the config, whose targets are `models:/<name>@<alias>` (resolved through the
MLflow registry to the version the alias points at, re-resolved every `alias_refresh_s`), `models:/<name>/<version>`
or a served id; or, with `allow_served_ids`, an id the upstream lists in its own /v1/models. A served id is what
services.llm_serve calls a registered version: `<name>-v<version>` by default (`served_name_template`). `models:`
URIs are parsed and resolved by jobs.platform.registry, whose typed errors name the URI; when a refresh fails
(registry unreachable included) a target keeps its last good answer.

With two or more targets, each request goes to one of them in proportion to the weights. `split: request_id`
hashes the request's X-Request-ID (sha256, so the same id always lands on the same target and ids spread
uniformly); `split: random` draws from an RNG (seeded with `seed` for reproducible runs).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.platform import registry
from jobs.platform.registry import ModelReferenceError, Registry, RegistryUnreachable
from services.gateway.config import AliasConfig

log = logging.getLogger("tulpar.gateway")


@dataclass
class ResolvedAlias:
    name: str
    config: AliasConfig
    served: list[str | None]  # per target; None while unresolved
    cumulative: list[float] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    error: str | None = None

    def __post_init__(self) -> None:
        total = sum(t.weight for t in self.config.targets)
        acc, self.cumulative = 0.0, []
        for t in self.config.targets:
            acc += t.weight / total
            self.cumulative.append(acc)
        self.cumulative[-1] = 1.0
        self.rng = random.Random(self.config.seed)

    def pick_index(self, request_id: str) -> int:
        """Which target serves this request (weights as probabilities)."""
        if len(self.cumulative) == 1:
            return 0
        if self.config.split == "random":
            u = self.rng.random()
        else:
            h = hashlib.sha256(f"{self.name}\x00{request_id}".encode()).digest()
            u = int.from_bytes(h[:8], "big") / 2**64
        return min(bisect.bisect_right(self.cumulative, u), len(self.cumulative) - 1)


class Router:
    """Holds the alias table and the upstream's model list; thread-safe swaps on refresh."""

    def __init__(
        self,
        aliases: dict[str, AliasConfig],
        *,
        tracking_uri: str | None = None,
        served_name_template: str = "{name}-v{version}",
        allow_served_ids: bool = True,
        resolver: Callable[[str], tuple[str, str]] | None = None,
    ) -> None:
        self.alias_configs = aliases
        self.template = served_name_template
        self.allow_served_ids = allow_served_ids
        self._resolver = resolver
        self._registry = Registry(tracking_uri) if tracking_uri else None
        self._lock = threading.Lock()
        self._aliases: dict[str, ResolvedAlias] = {
            name: ResolvedAlias(name, cfg, [None] * len(cfg.targets)) for name, cfg in aliases.items()
        }
        self.upstream_models: list[str] = []

    @property
    def needs_registry(self) -> bool:
        return any(
            registry.is_registered(t.model) for cfg in self.alias_configs.values() for t in cfg.targets
        )

    def _version(self, uri: str) -> tuple[str, str]:
        """(registered name, version) of a models:/ URI; a jobs.platform.registry error naming the URI."""
        if self._resolver is not None:
            return self._resolver(uri)
        if self._registry is None:
            raise RegistryUnreachable(
                uri, f"cannot resolve {uri}: no MLflow tracking URI configured: set mlflow_tracking_uri"
            )
        found = self._registry.resolve(uri)
        return str(found.name), str(found.version)

    def served_id(self, target: str) -> str:
        """The upstream's id for a target: a served id as is, models:/ URIs through the registry."""
        if not registry.is_registered(target):
            return target
        ref = registry.parse_registered(target)
        if ref.version is not None:  # explicit version: no lookup needed
            return self.template.format(name=ref.name, version=ref.version)
        name, version = self._version(target)
        return self.template.format(name=name, version=version)

    def refresh(self) -> list[str]:
        """Re-resolve every alias target (blocking: MLflow calls). Returns the errors; a target that fails keeps
        its previous served id, so a registry outage does not take a working alias down."""
        errors = []
        for name, cfg in self.alias_configs.items():
            with self._lock:
                old = self._aliases[name].served
            served: list[str | None] = []
            alias_errors = []
            for i, t in enumerate(cfg.targets):
                try:
                    served.append(self.served_id(t.model))
                except ModelReferenceError as exc:  # unreachable included: keep the last good answer
                    served.append(old[i])
                    alias_errors.append(str(exc))
            errors += alias_errors
            with self._lock:
                ra = self._aliases[name]
                if served != ra.served:
                    log.info("alias %s -> %s", name, served)
                ra.served = served
                ra.error = "; ".join(alias_errors) or None
        return errors

    def set_upstream_models(self, ids: list[str]) -> None:
        with self._lock:
            self.upstream_models = list(ids)

    def public_models(self) -> list[str]:
        with self._lock:
            names = list(self._aliases)
            if self.allow_served_ids:
                names += [m for m in self.upstream_models if m not in self._aliases]
        return names

    def table(self) -> dict[str, list[dict]]:
        """alias -> [{target, weight, served}] (for /health and metrics)."""
        with self._lock:
            return {
                name: [
                    {"target": t.model, "weight": t.weight, "served": s}
                    for t, s in zip(ra.config.targets, ra.served)
                ]
                for name, ra in self._aliases.items()
            }

    def _known_unlocked(self, model: str) -> bool:
        return model in self._aliases or (self.allow_served_ids and model in self.upstream_models)

    def _split_adapter(self, model: str) -> tuple[str, str | None]:
        """`<name>:<adapter>` -> (name, adapter) when `name` is known and the whole id is not (Ray Serve's
        multi-LoRA ids are `<base model id>:<adapter>`, and its /v1/models may list only the base)."""
        if self._known_unlocked(model):
            return model, None
        base, sep, adapter = model.partition(":")
        if sep and adapter and self._known_unlocked(base):
            return base, adapter
        return model, None

    def is_known(self, model: str) -> bool:
        with self._lock:
            return self._known_unlocked(self._split_adapter(model)[0])

    def route(self, model: str, request_id: str) -> tuple[str | None, str | None]:
        """(served id, None), or (None, why) for a known alias that is not resolved yet; KeyError if unknown.
        `<alias>:<adapter>` goes to `<served id>:<adapter>` (a LoRA adapter on the alias's version)."""
        with self._lock:
            name, adapter = self._split_adapter(model)
            suffix = f":{adapter}" if adapter else ""
            ra = self._aliases.get(name)
            if ra is None:
                if self.allow_served_ids and name in self.upstream_models:
                    return name + suffix, None
                raise KeyError(model)
            idx = ra.pick_index(request_id)
            served = ra.served[idx]
            if served is None:  # fall back to a resolved target of the same alias
                served = next((s for s in ra.served if s is not None), None)
            if served is None:
                return None, ra.error or f"alias {name!r} is not resolved yet"
            return served + suffix, None
