"""Joining Ray: one place where every job and service connects to `RAY_ADDRESS` or starts a local Ray."""

from __future__ import annotations

import logging
import os

from jobs.platform.runtime import Settings

FORWARDED_ENV_PREFIXES = ("TULPAR_", "MLFLOW_", "AWS_")


def worker_env(settings: Settings) -> dict[str, str]:
    """The driver's TULPAR_*/MLFLOW_*/AWS_* environment, with TULPAR_HOME and TULPAR_DATA always set, so that Ray
    workers resolve the same settings as the driver."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.setdefault("TULPAR_HOME", str(settings.home))
    env.setdefault("TULPAR_DATA", str(settings.data))
    # Ray Train's print patch sends each worker line to the driver twice: see jobs.training.distributed's
    # WORKER_PRINT_PATCH
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def init_ray(
    settings: Settings,
    *,
    forward_settings: bool = True,
    log_to_driver: bool = True,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Connect to RAY_ADDRESS, or start a local Ray (no dashboard); a no-op when this process is already in Ray.

    forward_settings: workers get the driver's settings environment (`worker_env`): training and serving workers
    read MLflow and storage from it. log_to_driver: worker output is printed by the driver. num_cpus and
    object_store_memory limit a local Ray (preprocessing's execution options); they do not apply to a cluster."""
    import ray

    if ray.is_initialized():
        return
    options = {
        "log_to_driver": log_to_driver,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }
    if forward_settings:
        options["runtime_env"] = {"env_vars": worker_env(settings)}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **options)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, **options)
