"""MLflow helpers: one experiment per stage family, standard lineage tags, params, plots.

Names follow ../shared/design/platform.md: experiments tulpar-data / -tokenizer / -train / -eval / -serve; tags
tulpar.stage, tulpar.config_sha256, tulpar.git_commit (+ dataset/tokenizer/parent-model lineage where they apply).
A pipeline sets TULPAR_PARENT_RUN_ID so each stage's run is nested under the pipeline's parent run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobs.platform.runtime import REPO_ROOT, Settings
from llm_core.config import config_sha256, config_to_dict
from llm_core.io import atomic_write_json

log = logging.getLogger("tulpar.tracking")

EXPERIMENT = {
    "preprocess": "tulpar-data",
    "tokenizer": "tulpar-tokenizer",
    "tokenizer_report": "tulpar-tokenizer",
    "pretrain": "tulpar-train",
    "sft": "tulpar-train",
    "dpo": "tulpar-train",
    "distill": "tulpar-train",
    "rl": "tulpar-train",
    "reward_model": "tulpar-train",
    "eval": "tulpar-eval",
    "serve": "tulpar-serve",
}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def setup(settings: Settings, experiment: str) -> str:
    """Point MLflow at the tracking server and return the experiment id (created with our artifact root)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if settings.mlflow_tracking_uri.startswith("sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if settings.mlflow_tracking_uri.startswith("sqlite:") or "TULPAR_MLFLOW_ARTIFACTS" in os.environ:
        location = f"{settings.mlflow_artifact_root.rstrip('/')}/{experiment}"
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # created concurrently by another job
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(
    settings: Settings,
    stage: str,
    cfg: BaseModel,
    *,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """An MLflow run for one stage with standard tags, flattened params and the resolved config artifact.

    Metrics logged with `log_metrics` inside go through the run's MetricBuffer (journal: `driver_journal`);
    on exit the buffer is delivered (waiting up to $TULPAR_TRACKING_FLUSH_S for a server that is down) and the
    run ended FINISHED, or FAILED when the body raised; an outage at that point is logged, never raised over
    the body's own exception."""
    import mlflow

    experiment_id = setup(settings, EXPERIMENT.get(stage, f"tulpar-{stage}"))
    all_tags = {
        "tulpar.stage": stage,
        "tulpar.config_sha256": config_sha256(cfg),
        "tulpar.git_commit": git_commit(),
        **(tags or {}),
    }
    parent = os.environ.get("TULPAR_PARENT_RUN_ID")
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=all_tags, log_system_metrics=system_metrics
    )
    run_id = run.info.run_id
    _BUFFERS[run_id] = MetricBuffer(settings.mlflow_tracking_uri, driver_journal(settings, run_id))
    finished = False
    try:
        params = {k: str(v)[:6000] for k, v in flatten(config_to_dict(cfg)).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_dict(config_to_dict(cfg), "config/resolved.yaml")
        yield run
        finished = True
    finally:
        _finish_run(run_id, finished)


def _finish_run(run_id: str, finished: bool) -> None:
    """Deliver the run's buffered metrics and end it (FINISHED or FAILED). When the body raised, nothing here
    may replace its exception: tracking failures are logged."""
    import mlflow
    from mlflow import MlflowClient

    status = "FINISHED" if finished else "FAILED"
    buffer = _BUFFERS.pop(run_id, None)
    try:
        if buffer is not None:
            buffer.close()
        ended = False
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            try:
                with one_http_attempt(10):
                    mlflow.end_run(
                        status
                    )  # pops the run before its server call: a failed one is retried below
                ended = True
            except Exception as exc:
                if not transient_failure(exc):
                    raise
        if not ended:
            with_retries(
                f"ending MLflow run {run_id}",
                lambda: MlflowClient().set_terminated(run_id, status),
                env_seconds(FLUSH_ENV, 120.0),
            )
    except Exception as exc:  # noqa: BLE001 - see below
        if finished:
            raise
        # the job itself already failed and its own exception is propagating: an unrecorded run status must not
        # replace it (the run stays RUNNING in MLflow; the log line says so)
        log.error("could not record MLflow run %s as %s: %s", run_id, status, exc)


def check_server(settings: Settings) -> None:
    """Fail early, with the fix, when the tracking server cannot be reached."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if (
        settings.mlflow_tracking_uri.startswith(("sqlite:", "file:"))
        or "://" not in settings.mlflow_tracking_uri
    ):
        return
    try:
        with one_http_attempt(10):
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as exc:
        from jobs.platform.registry import RegistryUnreachable

        raise RegistryUnreachable(
            settings.mlflow_tracking_uri,
            f"MLflow tracking server {settings.mlflow_tracking_uri} is unreachable ({type(exc).__name__}): start it, "
            "fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store",
        ) from None


# ------------------------------------------------------------------------------ outages: attempts and retries

# MLflow error codes of a server that could not answer now (connection refused and timeouts arrive as
# INTERNAL_ERROR from mlflow.utils.rest_utils; HTTP 5xx/429 as these codes). Anything else is an answer.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)


def env_seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment variable `name` (default when unset)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{name}={raw!r} is not a number of seconds >= 0: set it to e.g. {default:g}")
    return value


@contextlib.contextmanager
def one_http_attempt(timeout_s: float) -> Iterator[None]:
    """MLflow HTTP calls inside make one attempt of at most `timeout_s` seconds (MLflow's own retries, by
    default 7 with exponential backoff, would block a training step for minutes): the caller retries."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({keys[0]: "0", keys[1]: str(max(1, round(timeout_s)))})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def transient_failure(exc: BaseException) -> bool:
    """Whether `exc` means "the tracking server did not answer now" (worth retrying), not an answer."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, (OSError, TimeoutError)):  # requests' and boto's connection errors are OSErrors
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        return False
    return isinstance(exc, OperationalError)  # a database that is locked or gone


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within the retry budget."""


def with_retries(
    what: str,
    fn: Callable[[], Any],
    budget_s: float,
    *,
    attempt_timeout_s: float = 10.0,
    first_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """fn() retried with exponential backoff (first_delay_s, doubling, at most max_delay_s) while it fails
    transiently (`transient_failure`) and the next attempt still starts within `budget_s` seconds; each attempt
    is one HTTP try of at most attempt_timeout_s. Other failures propagate at once; running out of time raises
    TrackingUnavailable naming `what` and the last failure."""
    deadline = time.monotonic() + budget_s
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            with one_http_attempt(attempt_timeout_s):
                return fn()
        except Exception as exc:
            if not transient_failure(exc):
                raise
            if time.monotonic() + delay > deadline:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise TrackingUnavailable(
                    f"{what}: the tracking server did not answer in {attempt} attempt(s) over {budget_s:g}s "
                    f"({type(exc).__name__}: {first})"
                ) from exc
            log.warning(
                "%s: tracking server unavailable (%s); retrying in %.1fs", what, type(exc).__name__, delay
            )
            sleep(delay)
            delay = min(delay * 2, max_delay_s)


# ------------------------------------------------------------------------------ buffered metrics

FLUSH_ENV = "TULPAR_TRACKING_FLUSH_S"  # how long the end of a run waits for the tracking server (default 120)
_LOG_BATCH_MAX = 1000  # MLflow's limit of metrics per log_batch request


class MetricBuffer:
    """Metrics for MLflow runs that survive a tracking-server outage and a crash of the logging process.

    `log` never raises because the server is down: each metric is appended (flushed and fsynced) to the
    journal, a JSON-lines file, then queued in memory; the queue is delivered in logging order with MlflowClient
    .log_batch, keeping every metric's own step and timestamp. A failed delivery is retried on a later `log`
    after a backoff (min_backoff_s, doubling, at most max_backoff_s), and `close` keeps retrying until
    everything is delivered or its time is up. After each delivered batch the journal records
    {"delivered": <seq>}; a new MetricBuffer on the same journal (the restarted worker, or the driver after the
    workers are done) re-queues what was logged but not delivered. A journal whose metrics are all delivered is
    deleted. Delivering a metric twice (a crash between the server's answer and the journal line) stores it once:
    MLflow's SQL store drops a metric equal to a stored one (key, value, step, timestamp).

    A failure that is an answer (an unknown run, an invalid metric: not `transient_failure`) propagates."""

    def __init__(
        self,
        tracking_uri: str,
        journal: Path | None = None,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        attempt_timeout_s: float = 5.0,
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.journal = journal
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.attempt_timeout_s = attempt_timeout_s
        self.pending: list[dict[str, Any]] = []  # {"seq", "run_id", "key", "value", "timestamp", "step"}
        self.seq = 0
        self.backoff_s = min_backoff_s
        self.next_attempt = 0.0  # time.monotonic() before which no delivery is tried
        self.lock = threading.Lock()
        if journal is not None:
            self._reload()

    def _reload(self) -> None:
        assert self.journal is not None
        if not self.journal.is_file():
            return
        records, delivered = [], 0
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: it was never acknowledged
                continue
            if "delivered" in rec:
                delivered = max(delivered, int(rec["delivered"]))
            elif "seq" in rec:
                records.append(rec)
        self.seq = max([delivered, *(r["seq"] for r in records)])
        self.pending = sorted((r for r in records if r["seq"] > delivered), key=lambda r: r["seq"])
        if self.pending:
            log.info(
                "%d metric(s) in %s were not delivered yet: queued again", len(self.pending), self.journal
            )

    def _append(self, records: list[dict[str, Any]]) -> None:
        if self.journal is None or not records:
            return
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def log(
        self, run_id: str, metrics: dict[str, float], step: int | None = None, timestamp_ms: int | None = None
    ):
        """Queue `metrics` of `run_id` at `step` (default 0) and try to deliver the queue (unless backing off)."""
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        with self.lock:
            records = []
            for key, value in metrics.items():
                if value is None:
                    continue
                self.seq += 1
                records.append(
                    {"seq": self.seq, "run_id": run_id, "key": key.replace("@", "_"), "value": float(value),
                     "timestamp": now, "step": int(step or 0)}
                )  # fmt: skip
            self._append(records)
            self.pending.extend(records)
            if time.monotonic() >= self.next_attempt:
                self._deliver()

    def _deliver(self) -> bool:
        """One delivery attempt of the whole queue, in order; False (and a later next_attempt) on an outage."""
        from mlflow.entities import Metric

        while self.pending:
            run_id = self.pending[0]["run_id"]
            batch = []
            for rec in self.pending[:_LOG_BATCH_MAX]:
                if rec["run_id"] != run_id:
                    break
                batch.append(rec)
            metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in batch]
            try:
                with one_http_attempt(self.attempt_timeout_s):
                    self.client.log_batch(run_id, metrics=metrics, synchronous=True)
            except Exception as exc:
                if not transient_failure(exc):
                    raise
                if self.backoff_s == self.min_backoff_s:  # the first failure of an outage
                    log.warning(
                        "tracking server unavailable (%s): buffering metrics%s and retrying",
                        type(exc).__name__,
                        f" (journal {self.journal})" if self.journal else "",
                    )
                self.next_attempt = time.monotonic() + self.backoff_s
                self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
                return False
            del self.pending[: len(batch)]
            self._append([{"delivered": batch[-1]["seq"]}])
            self.backoff_s, self.next_attempt = self.min_backoff_s, 0.0
        return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Deliver everything still queued, retrying with the backoff for at most `timeout_s` seconds (default
        $TULPAR_TRACKING_FLUSH_S or 120). True when all is delivered (the journal is then deleted); False leaves
        the journal for a later MetricBuffer (or `deliver_journal`) and logs where it is."""
        budget = env_seconds(FLUSH_ENV, 120.0) if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        with self.lock:
            while True:
                self.next_attempt = min(self.next_attempt, deadline)
                wait = self.next_attempt - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # the backoff: waiting for the server to come back
                if self._deliver():
                    if self.journal is not None:
                        self.journal.unlink(missing_ok=True)
                    return True
                if time.monotonic() >= deadline:
                    log.error(
                        "%d metric(s) not delivered to %s after %gs%s",
                        len(self.pending),
                        self.tracking_uri,
                        budget,
                        f": they stay in {self.journal}; deliver them with "
                        f"`python -m jobs.platform.tracking deliver {self.journal}`"
                        if self.journal
                        else " (no journal: they are lost)",
                    )
                    return False


def deliver_journal(journal: Path, tracking_uri: str, timeout_s: float | None = None) -> bool:
    """Deliver what a journal holds undelivered (see MetricBuffer); True when nothing is left (or no journal)."""
    if not journal.is_file():
        return True
    return MetricBuffer(tracking_uri, journal).close(timeout_s)


_BUFFERS: dict[str, MetricBuffer] = {}  # the driver's buffer per active MLflow run id


def driver_journal(settings: Settings, run_id: str) -> Path:
    """Where a job's own process journals the metrics of run `run_id` (workers use their run directory)."""
    return settings.home / "tracking-buffer" / f"{run_id}.jsonl"


def get_run_or_none(client, run_id: str):
    """The MLflow run `run_id`, or None when the tracking store says it does not exist (deleted, or another store).
    Any other failure (server down, authentication) propagates: it must not read as "no such run"."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def metric_history(run_id: str, keys: list[str]) -> list[dict[str, float]]:
    """Logged values of `keys` merged per step: [{"step": s, key: value, ...}, ...] sorted by step."""
    from mlflow import MlflowClient

    client = MlflowClient()
    by_step: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"step": m.step})[key] = m.value
    return [by_step[s] for s in sorted(by_step)]


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log `metrics` to the active run through its MetricBuffer (in-memory only for a run not started by
    `start_run`): a tracking-server outage delays them, it does not raise."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_metrics needs an active MLflow run")
    buffer = _BUFFERS.get(run.info.run_id)
    if buffer is None:
        buffer = _BUFFERS[run.info.run_id] = MetricBuffer(mlflow.get_tracking_uri())
    buffer.log(run.info.run_id, metrics, step)


def log_figure_file(path: Path, artifact_path: str = "plots") -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def log_dict(obj: dict, artifact_file: str) -> None:
    import mlflow

    mlflow.log_dict(obj, artifact_file)


def log_artifacts(local_dir: Path, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


REGISTER_RETRY_ENV = "TULPAR_REGISTER_RETRY_S"  # how long registration retries an unavailable server (300)


class RegistrationDeferred(Exception):
    """Training and the HF export are done, but the model registry did not answer within the retry budget.
    Not a user error (exit 2) nor a bug (exit 1): jobs exit EXIT_NOT_REGISTERED with this message, which names
    the checkpoint, the export and the one command that registers it later (`python -m jobs.register`)."""

    def __init__(self, message: str, pending: Path) -> None:
        super().__init__(message)
        self.pending = pending


def register_command(pending: Path) -> str:
    return f"python -m jobs.register {shlex.quote(str(pending))}"


def publish_hf_model(
    model: Any,
    tokenizer: Any,
    settings: Settings,
    name: str,
    *,
    register: bool,
    stage: str,
    alias: str,
    tags: dict[str, str] | None = None,
    export: Any = None,
    retry_s: float | None = None,
) -> tuple[str | None, Path]:
    """Export `model` (with `tokenizer`) in HF format and, with `register`, register it as a new version of `name`
    (`register_hf_model`), moving the export to $TULPAR_HOME/models/<name>/<version>. Returns (models:/ URI or None,
    the export directory: the version's, or the staging directory when not registered). `export(model, out_dir,
    tokenizer)` writes the HF directory; default `llm_core.export_hf.export_hf` (a causal LM).

    When the registry stays unavailable for `retry_s` seconds (default $TULPAR_REGISTER_RETRY_S or 300), the
    export stays in its staging directory, <staging>.pending.json records the registration, and
    RegistrationDeferred names the checkpoint (the tag tulpar.checkpoint), the export and `python -m
    jobs.register <pending.json>`."""
    import mlflow

    from llm_core.export_hf import export_hf

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("publish_hf_model needs an active MLflow run")
    staging = settings.path("models", name, f".staging-{run.info.run_id[:8]}")
    (export or export_hf)(model, staging, tokenizer=tokenizer)
    if not register:
        return None, staging
    pending = staging.with_name(staging.name + ".pending.json")
    atomic_write_json(
        pending,
        {"hf_dir": str(staging), "name": name, "stage": stage, "alias": alias, "tags": tags or {},
         "run_id": run.info.run_id, "tracking_uri": settings.mlflow_tracking_uri},
    )  # fmt: skip
    try:
        model_uri, version = register_hf_model(
            staging, name, stage=stage, alias=alias, tags=tags, retry_s=retry_s
        )
    except TrackingUnavailable as exc:  # the record stays: jobs.register finishes it
        from jobs.platform.registry import _redact

        checkpoint = (tags or {}).get("tulpar.checkpoint", "(none recorded)")
        raise RegistrationDeferred(
            f"trained and exported, but not registered as a version of {name!r}: {exc}. "
            f"Checkpoint: {checkpoint}. HF export: {staging}. "
            f"Register it once the server is back (MLFLOW_TRACKING_URI={_redact(settings.mlflow_tracking_uri)}): "
            f"{register_command(pending)}",
            pending,
        ) from None
    except BaseException:  # an answer (permission, invalid name) or a bug: nothing to finish later
        pending.unlink(missing_ok=True)
        raise
    pending.unlink(missing_ok=True)
    return model_uri, place_version(settings, name, version, staging)


def place_version(settings: Settings, name: str, version: str, staging: Path) -> Path:
    """Move a registered export to $TULPAR_HOME/models/<name>/<version> (the version is the registry's own,
    never computed here, so two jobs cannot both hold one) and return that directory."""
    import shutil

    hf_dir = settings.path("models", name, version)
    if hf_dir.exists():  # left by an earlier registry at this home (a reset store): its number was reused
        shutil.rmtree(hf_dir)
    staging.rename(hf_dir)
    return hf_dir


def alias_insert_race(exc: BaseException) -> bool:
    """The registry refused an alias because a concurrent job inserted the same (model, alias) row a moment
    earlier: MLflow's SQL store checks for the alias, then inserts it, and the database's unique key stops the
    second insert (SQLite: IntegrityError UNIQUE constraint failed; PostgreSQL: UniqueViolation, duplicate key)."""
    text = str(exc)
    return "registered_model_aliases" in text and any(
        marker in text for marker in ("UNIQUE constraint failed", "UniqueViolation", "duplicate key")
    )


def set_alias_once_more_on_a_race(client, name: str, alias: str, version: str) -> None:
    """Point `alias` of `name` at `version`. When two jobs create the alias at the same moment, the loser's insert
    fails on the unique key (alias_insert_race): the alias exists now, so setting it again updates it (the last
    job to register wins, as when they register one after the other). Any other failure propagates."""
    from mlflow.exceptions import (
        MlflowException,
    )  # the SQL store's and a tracking server's errors (RestException)

    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        if not alias_insert_race(exc):
            raise
        log.warning(
            "setting alias %s of %s: a concurrent job created it first; setting it again", alias, name
        )
        client.set_registered_model_alias(name, alias, version)


def register_hf_model(
    hf_dir: Path,
    name: str,
    *,
    stage: str,
    alias: str,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    retry_s: float | None = None,
) -> tuple[str, str]:
    """Log an HF-format directory as run `run_id`'s (default: the active run's) `model/` artifact, register it
    as a new version of `name`, tag the version with its stage and point `alias` at it. Returns
    (models:/name/version, version).

    Each step is retried with backoff while the server is unavailable, for `retry_s` seconds in all (default
    $TULPAR_REGISTER_RETRY_S or 300), then TrackingUnavailable. A retried step cannot register twice: the version
    is looked up by this run and artifact before one is created."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if run_id is None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("register_hf_model needs an active MLflow run")
        run_id = run.info.run_id
    budget = env_seconds(REGISTER_RETRY_ENV, 300.0) if retry_s is None else retry_s
    deadline = time.monotonic() + budget
    client = MlflowClient()

    def retried(what: str, fn: Callable[[], Any]) -> Any:
        return with_retries(
            f"registering {hf_dir} as {name}: {what}", fn, max(0.0, deadline - time.monotonic())
        )

    retried("uploading the model artifact", lambda: client.log_artifacts(run_id, str(hf_dir), "model"))
    source = (
        retried("reading the run", lambda: client.get_run(run_id)).info.artifact_uri.rstrip("/") + "/model"
    )

    def create_model() -> None:
        try:
            client.create_registered_model(name)
        except (
            MlflowException
        ) as exc:  # only "already registered" (earlier or by a concurrent job) is expected
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    retried("creating the registered model", create_model)
    version_tags = {"tulpar.stage": stage, "tulpar.format": "hf", **(tags or {})}

    def create_version():
        for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if mv.source == source:  # created by an attempt whose answer was lost
                return mv
        return client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)

    mv = retried("creating the model version", create_version)
    retried("setting the alias", lambda: set_alias_once_more_on_a_race(client, name, alias, mv.version))
    retried(
        "tagging the run",
        lambda: client.set_tag(run_id, "tulpar.registered_model", f"models:/{name}/{mv.version}"),
    )
    return f"models:/{name}/{mv.version}", str(mv.version)


def register_pending(pending: Path, settings: Settings) -> tuple[str, Path]:
    """Register what a RegistrationDeferred left (`<staging>.pending.json`) in the registry of `settings`, move
    the export to its version directory and delete the record. Returns (models:/name/version, that directory)."""
    try:
        rec = json.loads(pending.read_text(encoding="utf-8"))
        hf_dir = Path(rec["hf_dir"])
        name, stage, alias, run_id = rec["name"], rec["stage"], rec["alias"], rec["run_id"]
    except FileNotFoundError:
        raise ValueError(
            f"{pending}: no such pending registration (already registered?): pass the .pending.json file a job "
            "named when it exited with status 3"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{pending} is not a pending registration written by a training job ({exc})"
        ) from None
    if not (hf_dir / "config.json").is_file():
        raise ValueError(
            f"{pending}: the HF export {hf_dir} it names is gone (no config.json): re-run the training job"
        )
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if get_run_or_none(mlflow.MlflowClient(), run_id) is None:
        raise ValueError(
            f"{pending}: MLflow run {run_id} does not exist at {settings.mlflow_tracking_uri}: set MLFLOW_TRACKING_URI "
            f"to the server the job used ({rec.get('tracking_uri')})"
        )
    model_uri, version = register_hf_model(
        hf_dir, name, stage=stage, alias=alias, tags=rec.get("tags"), run_id=run_id
    )
    out = place_version(settings, name, version, hf_dir)
    pending.unlink(missing_ok=True)
    return model_uri, out


def mark_run_preempted(run_id: str, step: int | None, checkpoint: str | None) -> None:
    """Record a training run stopped by a preemption notice: status KILLED (MLflow's status for a run stopped from
    outside; the run's context has just ended it FAILED) and the tags tulpar.preempted=true,
    tulpar.preempted_step and tulpar.preemption_checkpoint (the checkpoint the same command resumes from). The
    run's metrics are kept; the resumed attempt is a new run. A tracking failure here is logged, not raised: the
    job still exits as preempted."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        client.set_tag(run_id, "tulpar.preempted", "true")
        client.set_tag(run_id, "tulpar.preempted_step", "" if step is None else str(step))
        client.set_tag(run_id, "tulpar.preemption_checkpoint", checkpoint or "")
        client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - the checkpoint is safe; only the run's status is wrong
        logging.getLogger("tulpar.tracking").warning(
            "could not mark MLflow run %s as preempted (KILLED): %s", run_id, exc
        )


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from jobs.platform.runtime import run_cli

    p = argparse.ArgumentParser(prog="python -m jobs.platform.tracking")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deliver", help="deliver the metrics a journal holds undelivered (MetricBuffer)")
    d.add_argument("journal", type=Path)
    args = p.parse_args(argv)

    def body() -> None:
        if not args.journal.is_file():
            raise ValueError(f"{args.journal}: no such metrics journal (delivered already, or another path)")
        if not deliver_journal(args.journal, Settings.from_env().mlflow_tracking_uri):
            raise ValueError(
                f"{args.journal}: the tracking server did not take the metrics: start it and retry"
            )
        print(f"delivered {args.journal}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(_main())
