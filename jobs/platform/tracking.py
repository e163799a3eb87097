"""MLflow helpers: one experiment per stage family, standard lineage tags, params, plots.

Names follow ../shared/design/platform.md: experiments tulpar-data / -tokenizer / -train / -eval / -serve; tags
tulpar.stage, tulpar.config_sha256, tulpar.git_commit (+ dataset/tokenizer/parent-model lineage where they apply).
A pipeline sets TULPAR_PARENT_RUN_ID so each stage's run is nested under the pipeline's parent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jobs.platform.runtime import REPO_ROOT, Settings
from llm_core.config import config_sha256, config_to_dict

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
    """An MLflow run for one stage with standard tags, flattened params and the resolved config artifact."""
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
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=all_tags, log_system_metrics=system_metrics
    ) as run:
        params = {k: str(v)[:6000] for k, v in flatten(config_to_dict(cfg)).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_dict(config_to_dict(cfg), "config/resolved.yaml")
        yield run


def check_server(settings: Settings) -> None:
    """Fail early, with the fix, when the tracking server cannot be reached."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if (
        settings.mlflow_tracking_uri.startswith(("sqlite:", "file:"))
        or "://" not in settings.mlflow_tracking_uri
    ):
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as exc:
        from jobs.platform.registry import RegistryUnreachable

        raise RegistryUnreachable(
            settings.mlflow_tracking_uri,
            f"MLflow tracking server {settings.mlflow_tracking_uri} is unreachable ({type(exc).__name__}): start it, "
            "fix MLFLOW_TRACKING_URI, or unset it to use the local SQLite store",
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step)


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
) -> tuple[str | None, Path]:
    """Export `model` (with `tokenizer`) in HF format and, with `register`, register it as a new version of `name`
    (`register_hf_model`), moving the export to $TULPAR_HOME/models/<name>/<version>. Returns (models:/ URI or None,
    the export directory: the version's, or the staging directory when not registered). `export(model, out_dir,
    tokenizer)` writes the HF directory; default `llm_core.export_hf.export_hf` (a causal LM)."""
    import shutil

    import mlflow

    from llm_core.export_hf import export_hf

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("publish_hf_model needs an active MLflow run")
    staging = settings.path("models", name, f".staging-{run.info.run_id[:8]}")
    (export or export_hf)(model, staging, tokenizer=tokenizer)
    if not register:
        return None, staging
    model_uri, version = register_hf_model(staging, name, stage=stage, alias=alias, tags=tags)
    hf_dir = settings.path("models", name, version)
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    staging.rename(hf_dir)
    return model_uri, hf_dir


def register_hf_model(
    hf_dir: Path, name: str, *, stage: str, alias: str, tags: dict[str, str] | None = None
) -> tuple[str, str]:
    """Log an HF-format directory as the active run's `model/` artifact, register it as a new version of
    `name`, tag the version with its stage and point `alias` at it. Returns (models:/name/version, version)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_hf_model needs an active MLflow run")
    mlflow.log_artifacts(str(hf_dir), "model")
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # only "already registered" (earlier or by a concurrent job) is expected
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {"tulpar.stage": stage, "tulpar.format": "hf", **(tags or {})}
    mv = client.create_model_version(
        name, source=mlflow.get_artifact_uri("model"), run_id=run.info.run_id, tags=version_tags
    )
    client.set_registered_model_alias(name, alias, mv.version)
    mlflow.set_tag("tulpar.registered_model", f"models:/{name}/{mv.version}")
    return f"models:/{name}/{mv.version}", str(mv.version)


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
