"""Model references: the one place that parses and resolves what training, eval, serving and the gateway start from.

A reference is one of

    models:/<name>/<version>    a registered model version
    models:/<name>@<alias>      the version an alias of a registered model points at
    <directory>                 an HF-format export (config.json) or an llm_core checkpoint (meta.json, or a training
                                run directory holding best/ or last/)

`resolve` turns it into a typed `ResolvedModel` (kind, canonical URI, registered name and version, the version's
artifact URI, tags and aliases, the local directory); `fetch` downloads a registered version's HF export once into
$TULPAR_HOME/cache/models/<name>/<version>; `hf_model` does both and insists on an HF-format model (what training
starts from). `champion_version(name, alias)` is "which version does the alias point at", returning None only when
the alias is not set yet. The registry is the tracking server's (`MLFLOW_TRACKING_URI`, the platform contract); MLflow
retries unreachable servers as `MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `MLFLOW_HTTP_REQUEST_TIMEOUT` say.

Errors. Every failure is one of these types, each with a message naming the reference and the fix:

    MalformedReference     `models:...` that is neither form above, or an empty reference
    NotAModelDirectory     a path that does not exist, or a directory with neither config.json nor a checkpoint
                           (and, where an HF model is required, an llm_core checkpoint)
    NoSuchVersion          the registry answered: no registered model of that name, or no such version
    AliasNotSet            the registry answered: the model exists but the alias is not set (yet)
    RegistryUnreachable    the registry could not answer: connection refused, timeout, HTTP 5xx, authentication
                           or permission refused, a database error, or any other registry failure

All five are user errors: ValueError subclasses (through `ModelReferenceError`), so a job prints the message and
exits 2 without a traceback. Each is fixed by the user — the reference, the training run that registers the
version, the promotion that sets the alias, or the server / MLFLOW_TRACKING_URI / credentials — and an unreachable
server is already a user error when `tracking.check_server` finds it at a job's start; this is the same error found
later. Failing closed is about the types, not the base class: `RegistryUnreachable` and `AliasNotSet` are siblings,
and the registry's "not found" is confirmed by reading the registered model before it becomes `AliasNotSet`, so an
outage can never read as "alias not set". Code that tolerates an unset alias catches `AliasNotSet` alone (or calls
`champion_version`); nothing may catch `ModelReferenceError` or `ValueError` to mean "no model". Exceptions that
are not registry failures (a bug) propagate unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from jobs.platform.runtime import Settings

FORMS = "models:/<name>/<version>, models:/<name>@<alias>, an HF-format directory or an llm_core checkpoint directory"

_REGISTERED = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_.-]+)|/(?P<version>[0-9]+))$")
# MLflow's error codes for "the registry looked and it is not there": a missing model or version is
# RESOURCE_DOES_NOT_EXIST; a missing alias is INVALID_PARAMETER_VALUE in MLflow's SQL store. Both are confirmed
# by reading the registered model before they become NoSuchVersion / AliasNotSet.
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


# ---------------------------------------------------------------------------------------- errors


class ModelReferenceError(ValueError):
    """A model reference could not be resolved; the message names the reference and the fix."""

    def __init__(self, reference: str, message: str) -> None:
        super().__init__(message)
        self.reference = reference


class MalformedReference(ModelReferenceError):
    """`models:...` that is neither models:/<name>/<version> nor models:/<name>@<alias> (or an empty reference)."""


class NotAModelDirectory(ModelReferenceError):
    """A path that does not exist or is not a model directory of the kind needed."""


class NoSuchVersion(ModelReferenceError):
    """The registry has no registered model of that name, or no such version of it."""


class AliasNotSet(ModelReferenceError):
    """The registered model exists but the alias is not set (yet)."""


class RegistryUnreachable(ModelReferenceError):
    """The registry could not answer (connection, timeout, 5xx, authentication, database): never 'not found'."""


# ---------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class RegisteredReference:
    """models:/<name>/<version> (version set) or models:/<name>@<alias> (alias set)."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class LocalReference:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


def is_registered(reference: str) -> bool:
    """Whether `reference` is meant as a registered model (`models:...`), well-formed or not."""
    return reference.startswith("models:")


def parse(reference: str) -> RegisteredReference | LocalReference:
    """The reference's form (no I/O). MalformedReference for an empty reference or a bad `models:` URI."""
    if not reference or not reference.strip():
        raise MalformedReference(reference, f"empty model reference: pass {FORMS}")
    if not is_registered(reference):
        return LocalReference(Path(reference).expanduser())
    m = _REGISTERED.match(reference)
    if not m:
        raise MalformedReference(
            reference,
            f"model URI {reference!r} is not models:/<name>/<version> (a version number) or models:/<name>@<alias> "
            "(letters, digits, '_', '.', '-'): fix the URI, e.g. models:/kk-350m/3 or models:/kk-350m@champion",
        )
    return RegisteredReference(m.group("name"), version=m.group("version"), alias=m.group("alias"))


def parse_registered(reference: str) -> RegisteredReference:
    """Like `parse`, for places that take registered models only."""
    ref = parse(reference)
    if not isinstance(ref, RegisteredReference):
        raise MalformedReference(
            reference,
            f"{reference!r} is not a registered model: pass models:/<name>/<version> or models:/<name>@<alias>",
        )
    return ref


# ---------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class ResolvedModel:
    """Where a reference leads. `uri` is canonical: models:/<name>/<version> (an alias resolved to its version) or
    the absolute directory. `path` is the local directory: set for local references, and for registered ones once
    `fetch`ed (None before). `source` is a registered version's artifact URI (what MLflow downloads)."""

    reference: str
    kind: Literal["registered", "hf", "checkpoint"]
    uri: str
    path: Path | None = None
    name: str | None = None
    version: str | None = None
    source: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------- local directories


def checkpoint_dir(path: Path) -> Path | None:
    """The llm_core checkpoint at `path`: the directory itself (meta.json) or a run directory's best/ or last/."""
    if (path / "meta.json").is_file():
        return path
    for sub in ("best", "last"):
        if (path / sub / "meta.json").is_file():
            return path / sub
    return None


def resolve_local(reference: str) -> ResolvedModel:
    """An HF-format directory (config.json) or an llm_core checkpoint; NotAModelDirectory otherwise."""
    ref = parse(reference)
    if isinstance(ref, RegisteredReference):
        raise MalformedReference(
            reference, f"{reference!r} is a registered model, not a directory: resolve it"
        )
    path = ref.path
    if not path.exists():
        raise NotAModelDirectory(
            reference, f"model {reference!r} not found (no such file or directory): pass {FORMS}"
        )
    if (path / "config.json").is_file():
        return ResolvedModel(reference, "hf", str(path.resolve()), path=path.resolve())
    ckpt = checkpoint_dir(path)
    if ckpt is not None:
        return ResolvedModel(reference, "checkpoint", str(ckpt.resolve()), path=ckpt.resolve())
    raise NotAModelDirectory(
        reference,
        f"model {reference!r}: {path} is not an HF-format model directory (no config.json) nor an llm_core "
        f"checkpoint (no meta.json, no best/ or last/): pass {FORMS}",
    )


# ---------------------------------------------------------------------------------------- the registry


def _redact(uri: str) -> str:
    """A tracking URI fit for a message: no user:password@."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _error_code(exc: BaseException) -> str | None:
    from mlflow.exceptions import MlflowException

    return exc.error_code if isinstance(exc, MlflowException) else None


def _registry_failure(exc: BaseException) -> bool:
    """Whether `exc` is the registry failing to answer (as opposed to a bug in the caller)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (MlflowException, OSError, TimeoutError)):  # requests' errors are OSErrors
        return True
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        return False
    return isinstance(exc, SQLAlchemyError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


class Registry:
    """The MLflow model registry at one tracking URI (the client is created on first use and reused)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def _unreachable(self, reference: str, exc: BaseException) -> RegistryUnreachable:
        return RegistryUnreachable(
            reference,
            f"cannot resolve {reference}: the model registry at {_redact(self.tracking_uri)} did not answer "
            f"({_redact(_first_line(exc))}): start the tracking server or fix MLFLOW_TRACKING_URI or its credentials, "
            "then retry",
        )

    def _call(self, reference: str, fn, *args):
        """fn(*args) with registry failures other than 'not found' as RegistryUnreachable; 'not found' re-raised."""
        try:
            return fn(*args)
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND_CODES or not _registry_failure(exc):
                raise
            raise self._unreachable(reference, exc) from exc

    def _model_or_raise(self, reference: str, name: str):
        """The registered model `name`; NoSuchVersion when the registry says it does not exist."""
        try:
            return self._call(reference, self.client.get_registered_model, name)
        except RegistryUnreachable:
            raise
        except Exception as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                raise NoSuchVersion(
                    reference,
                    f"registered model {reference!r} not found in {_redact(self.tracking_uri)}: there is no "
                    f"registered model named {name!r}; train it first (make pretrain) or check the name",
                ) from None
            if _registry_failure(exc):
                raise self._unreachable(reference, exc) from exc
            raise

    def resolve(self, reference: str) -> ResolvedModel:
        """A registered reference through the registry (no download), or a local directory."""
        ref = parse(reference)
        if isinstance(ref, LocalReference):
            return resolve_local(reference)
        if ref.alias is not None:
            mv = self._by_alias(reference, ref.name, ref.alias)
        else:
            mv = self._by_version(reference, ref.name, str(ref.version))
        return self._resolved(reference, mv)

    def _resolved(self, reference: str, mv) -> ResolvedModel:
        return ResolvedModel(
            reference,
            "registered",
            f"models:/{mv.name}/{mv.version}",
            name=mv.name,
            version=str(mv.version),
            source=mv.source,
            tags=dict(mv.tags or {}),
            aliases=tuple(mv.aliases or ()),
        )

    def _by_version(self, reference: str, name: str, version: str):
        try:
            return self._call(reference, self.client.get_model_version, name, version)
        except RegistryUnreachable:
            raise
        except Exception as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES:
                raise
            model = self._model_or_raise(reference, name)  # NoSuchVersion if the model itself is missing
            latest = max((int(v.version) for v in (model.latest_versions or [])), default=None)
            raise NoSuchVersion(
                reference,
                f"registered model {reference!r} not found in {_redact(self.tracking_uri)}: {name!r} has no "
                f"version {version}"
                + (f" (latest: {latest})" if latest is not None else "")
                + ": check the version number, or use an alias (models:/<name>@<alias>)",
            ) from None

    def _by_alias(self, reference: str, name: str, alias: str):
        try:
            return self._call(reference, self.client.get_model_version_by_alias, name, alias)
        except RegistryUnreachable:
            raise
        except Exception as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES:
                raise
            not_found = exc
        model = self._model_or_raise(reference, name)
        aliases = dict(model.aliases or {})
        if alias in aliases:  # the registry lists the alias it just said it could not find: do not guess
            raise self._unreachable(reference, not_found) from not_found
        listed = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
        raise AliasNotSet(
            reference,
            f"registered model {reference!r}: alias @{alias} is not set on {name!r} in "
            f"{_redact(self.tracking_uri)} (its aliases: {listed}): run the stage that sets it (a training job "
            f"sets @<stage>-latest, `jobs.eval --promote` sets @champion) or pass models:/{name}/<version>",
        )

    def champion_version(self, name: str, alias: str) -> ResolvedModel | None:
        """The version `alias` points at; None only when the alias is not set. Every other failure raises."""
        try:
            return self.resolve(f"models:/{name}@{alias}")
        except AliasNotSet:
            return None

    def fetch(self, resolved: ResolvedModel, cache_root: Path) -> ResolvedModel:
        """A registered version with its files local: downloaded once into cache_root/<name>/<version>."""
        if resolved.kind != "registered":
            return resolved
        import mlflow

        from llm_core.io import atomic_dir

        dst = cache_root / str(resolved.name) / str(resolved.version)
        if not (dst / "config.json").is_file():
            with atomic_dir(dst) as tmp:
                # the artifact location from this registry's client: mlflow's models:/ download would ask the
                # process-wide registry URI instead, which need not be this one
                location = self._call(
                    resolved.uri,
                    self.client.get_model_version_download_uri,
                    str(resolved.name),
                    str(resolved.version),
                )
                mlflow.artifacts.download_artifacts(
                    location, dst_path=str(tmp), tracking_uri=self.tracking_uri
                )
                nested = [p for p in tmp.iterdir() if p.is_dir()]  # some stores add the artifact dir's name
                if not (tmp / "config.json").is_file() and len(nested) == 1:
                    for item in nested[0].iterdir():
                        item.rename(tmp / item.name)
                    nested[0].rmdir()
        return dataclasses.replace(resolved, path=dst)


# ---------------------------------------------------------------------------------------- with Settings


def registry_for(settings: Settings) -> Registry:
    return Registry(settings.mlflow_tracking_uri)


def resolve(reference: str, settings: Settings) -> ResolvedModel:
    """`Registry.resolve` against settings' tracking URI (local references need no registry)."""
    if not is_registered(reference):
        return resolve_local(reference)
    return registry_for(settings).resolve(reference)


def model_cache(settings: Settings) -> Path:
    return settings.home / "cache" / "models"


def resolve_fetched(reference: str, settings: Settings) -> ResolvedModel:
    """Resolve and, for a registered version, download: `path` is always set."""
    reg = registry_for(settings)
    return (
        reg.fetch(reg.resolve(reference), model_cache(settings))
        if is_registered(reference)
        else resolve_local(reference)
    )


def hf_model(reference: str, settings: Settings) -> ResolvedModel:
    """A registered version or an HF-format directory, with its files local (what training starts from);
    NotAModelDirectory for a checkpoint, naming its HF export as the fix."""
    resolved = resolve_fetched(reference, settings)
    if resolved.kind == "checkpoint":
        raise NotAModelDirectory(
            reference,
            f"{reference!r} is a training checkpoint, not an HF-format model: start from its HF export "
            "($TULPAR_HOME/models/<name>/<version>) or its registered model URI (models:/<name>@pretrain-latest)",
        )
    assert resolved.path is not None
    if not (resolved.path / "config.json").is_file():
        raise NotAModelDirectory(
            reference,
            f"model {reference!r} ({resolved.uri}): its files in {resolved.path} have no config.json, so it is not "
            "an HF-format model: register the HF export (tracking.register_hf_model), not a checkpoint",
        )
    return resolved


def champion_version(name: str, alias: str, settings: Settings | None = None) -> ResolvedModel | None:
    """The version models:/<name>@<alias> points at, or None when that alias is not set yet. Raises
    RegistryUnreachable / NoSuchVersion (and never returns None) for anything else."""
    if settings is None:
        from jobs.platform.runtime import Settings

        settings = Settings.from_env()
    return registry_for(settings).champion_version(name, alias)
