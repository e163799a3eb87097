"""What SFT, DPO and distillation share: the starting model (resolved by jobs.platform.registry), shipping prepared data to the Ray
Train workers, and turning the best checkpoint into a registered model version (with a PEFT adapter for LoRA).

Each stage module (jobs.sft / jobs.dpo / jobs.distill) prepares its rows on the driver, names its training task
(`jobs.training.tasks`: SFTTask, DPOTask, WhiteboxDistillTask) and calls `run_posttrain`. The training loop itself
is llm_core's Trainer via jobs.training.distributed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from jobs.platform import registry, tracking
from jobs.platform.cache import StageCache, files_sha256, model_version_still_registered
from jobs.platform.results import ModelVersionOutputs
from jobs.platform.runtime import JobResult, Settings
from jobs.training.distributed import (
    RayTrainConfig,
    best_val_metrics,
    checkpoint_storage_path,
    final_checkpoints,
    launch,
    run_dir_for,
)
from jobs.training.sampling import end_of_training_samples
from jobs.training.storage import put_object
from jobs.training.tasks import ChatRowsTask, SFTTask, build_model
from llm_core.checkpoint import load_checkpoint, read_meta
from llm_core.config import StrictModel, config_sha256, config_to_dict
from llm_core.export_hf import load_hf
from llm_core.io import atomic_write_json
from llm_core.lora import LoRAConfig, save_peft_adapter, strip_lora
from llm_core.tokenizer import Tokenizer

log = logging.getLogger("tulpar.posttrain")


class ChatSampleSpec(StrictModel):
    """Prompts answered by the trained model at the end, one chat turn per language."""

    prompts: dict[str, str] = Field(
        default_factory=lambda: {
            "kk": "Қазақстанның астанасы қай қала?",
            "ru": "Какая столица у Казахстана?",
            "en": "What is the capital of Kazakhstan?",
        }
    )
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.0, ge=0)


# ---------------------------------------------------------------------------------------- the starting model


# ---------------------------------------------------------------------------------------- the driver


@dataclass
class Prepared:
    """Rows for training and evaluation, prepared once on the driver."""

    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    stats: dict[str, Any]


def run_posttrain(
    *,
    stage: str,
    cfg: BaseModel,
    settings: Settings,
    init: str,
    prepare: Callable[[Tokenizer, Path], Prepared],
    task: Callable[..., ChatRowsTask] = SFTTask,
    lora: LoRAConfig | None = None,
    tags: dict[str, str] | None = None,
) -> JobResult:
    """Resolve the starting model, prepare rows, train on Ray Train, export + register the best checkpoint.

    `task` makes the stage's training task from init, lora, prepared and train: a registered ChatRowsTask class,
    or a functools.partial of one carrying the stage's own fields (DPO's beta, the distillation teacher)."""
    name: str = cfg.name  # type: ignore[attr-defined]
    train_cfg = cfg.train  # type: ignore[attr-defined]
    ray_cfg: RayTrainConfig = cfg.ray  # type: ignore[attr-defined]
    start = registry.hf_model(init, settings)
    assert start.path is not None  # hf_model returns the files local
    init_dir, parent_uri = start.path, start.uri
    tokenizer = Tokenizer.from_dir(init_dir)
    model_cfg = load_hf(init_dir).cfg
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(
            f"train.seq_len {train_cfg.seq_len} > the model's max_seq_len {model_cfg.max_seq_len}: lower train.seq_len"
        )
    prepared = prepare(tokenizer, init_dir)
    print(f"{stage}: {json.dumps(prepared.stats, ensure_ascii=False)}", flush=True)
    tracking.check_server(settings)
    identity = {
        "config": config_to_dict(cfg),
        "parent_model_uri": parent_uri,
        "data_sha256": rows_sha256(prepared.train) + rows_sha256(prepared.val),
        "task": task_identity(task),
        "tags": tags or {},  # e.g. the resolved teacher version of a distillation
    }
    if not parent_uri.startswith("models:/"):  # a directory: its files are the input
        identity["init_sha256"] = files_sha256([p for p in Path(init_dir).rglob("*") if p.is_file()])
    cache = StageCache(settings, stage, identity)
    if (stored := cache.lookup(model_version_still_registered(settings))) is not None:
        return stored

    run_key = f"{name}-{stage}-{config_sha256(cfg)[:8]}"
    run_dir = run_dir_for(settings, run_key)
    prepared_uri = f"{checkpoint_storage_path(settings)}/{run_key}/prepared.pt"
    put_object(prepared_uri, {"train": prepared.train, "val": prepared.val})
    all_tags = {
        "tulpar.parent_model_uri": parent_uri,
        "tulpar.tokenizer_sha256": tokenizer.sha256,
        "tulpar.model_name": name,
        **(tags or {}),
    }
    with tracking.start_run(
        settings, stage, cfg, run_name=run_key, tags=all_tags, system_metrics=True
    ) as run:
        tracking.log_dict(prepared.stats, "data/stats.json")
        spec = task(init=str(init_dir), lora=lora, prepared=prepared_uri, train=train_cfg)
        result = launch(
            settings=settings,
            run_name=run_key,
            ray_cfg=ray_cfg,
            task=spec,
            run_config=config_to_dict(cfg),
            mlflow_run_id=run.info.run_id,
            fault_marker=str(run_dir / ".fault-injected"),
        )
        best_ckpt, last_ckpt = final_checkpoints(result, settings, run_key, run_dir)
        model = build_model(init_dir, lora)
        with best_ckpt.as_directory() as best_dir:
            best_meta = read_meta(best_dir)
            state = load_checkpoint(best_dir, restore_rng=False)
        model.load_state_dict(state["model_state"])
        model.eval()
        sample_spec: ChatSampleSpec = cfg.sample  # type: ignore[attr-defined]
        samples = end_of_training_samples(
            model,
            tokenizer,
            sample_spec.prompts,
            chat=True,
            max_new_tokens=sample_spec.max_new_tokens,
            temperature=sample_spec.temperature,
        )
        for lang, text in samples.items():
            print(f"sample [{lang}] {text!r}", flush=True)
        tracking.log_text("\n".join(f"[{k}] {v}" for k, v in samples.items()), "samples.txt")
        plot = loss_curve_png(run.info.run_id, run_dir / "loss_curve.png", f"{name} {stage}")

        adapter_dir = None
        if lora is not None:
            adapter_dir = settings.path("adapters", name, run.info.run_id[:8])
            save_peft_adapter(model, adapter_dir, base_model_name_or_path=parent_uri)
            tracking.log_artifacts(adapter_dir, "adapter")
            model = strip_lora(model)
        version_tags = {
            "tulpar.parent_model_uri": parent_uri,
            "tulpar.best_val_loss": f"{best_meta['metrics'].get('val_loss', float('nan')):.6f}",
            "tulpar.checkpoint": best_ckpt.path,
        }
        if adapter_dir is not None:
            version_tags["tulpar.adapter_uri"] = f"runs:/{run.info.run_id}/adapter"
        model_uri, hf_dir = tracking.publish_hf_model(
            model,
            tokenizer,
            settings,
            name,
            register=cfg.register_model,  # type: ignore[attr-defined]
            stage=stage,
            alias=f"{stage}-latest",
            tags=version_tags,
        )

    metrics = best_val_metrics(best_meta)
    metrics["steps"] = float(best_meta["step"])
    outputs = ModelVersionOutputs(
        checkpoint_dir=str(run_dir),
        best_checkpoint=best_ckpt.path,
        last_checkpoint=last_ckpt.path,
        parent_model_uri=parent_uri,
        hf_dir=str(hf_dir),
        model_uri=model_uri,
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        loss_curve=str(plot),
        samples=samples,
        data=prepared.stats,
    )
    result_obj = JobResult(
        stage, outputs=outputs, metrics=metrics, mlflow_run_id=run.info.run_id, output_dir=run_dir
    )
    atomic_write_json(run_dir / "checkpoints.json", {"best": best_ckpt.path, "last": last_ckpt.path})
    return cache.store(result_obj)


def loss_curve_png(run_id: str, path: Path, title: str) -> Path:
    """The run's train loss and every validation loss it logged (`val_loss/<set>`), as a PNG logged to MLflow."""
    from mlflow import MlflowClient

    from jobs.reporting.plots import plot_loss_curve

    logged = MlflowClient().get_run(run_id).data.metrics
    keys = ["train_loss"] + sorted(k for k in logged if k.startswith("val_loss/"))
    plot = plot_loss_curve(tracking.metric_history(run_id, keys), path, title)
    tracking.log_figure_file(plot)
    return plot


def task_identity(task: Callable[..., ChatRowsTask]) -> dict[str, Any]:
    """The training task's kind and its settings (a teacher's local path left out: the tags carry its version)."""
    func = getattr(task, "func", task)
    keywords = {k: v for k, v in getattr(task, "keywords", {}).items() if k != "teacher"}
    return {"task": getattr(func, "__name__", repr(func)), "settings": keywords}


def rows_sha256(rows: list[dict[str, torch.Tensor]]) -> str:
    """A content hash of prepared rows (keys, dtypes, shapes and values), for the stage's cache key."""
    h = hashlib.sha256()
    for row in rows:
        for key in sorted(row):
            t = row[key].detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()
