"""Reward model: `python -m jobs.reward_model --config configs/reward_model/<name>.yaml [key=value ...]`.

A Bradley-Terry reward model: the trunk of a registered model (usually `models:/<name>@sft-latest`) with a scalar
head (`llm_core.value_model.ScalarHeadModel`: the score of a chat is the head's output at its last token), trained
on Ray Train on preference pairs in the DPO format ({"prompt", "chosen", "rejected"} jsonl) with the loss
-log sigmoid(score(chosen) - score(rejected)). A share of the pairs is held out: it is the evaluation set, so the
checkpoint kept is the one with the lowest held-out loss. On the driver, that checkpoint's pairwise accuracy on the
held-out pairs (with its Wilson 95% interval) and its mean margin are logged to MLflow and returned, next to the
same figures on the training pairs and for the untrained model. The result is exported as an HF
`LlamaForSequenceClassification` (one label; transformers' scores equal ours) with the tokenizer beside it, and
registered as a version of `name` with alias `@rm-latest` and the lineage tags (`tulpar.parent_model_uri`,
`tulpar.tokenizer_sha256`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from pydantic import Field, model_validator

from jobs.dpo import PreferenceDataSpec
from jobs.platform import registry, tracking
from jobs.platform.cache import StageCache, files_sha256, model_version_still_registered
from jobs.platform.results import (
    ModelVersionOutputs,
    RewardModelOutputs,
    StageResult,
    model_reference,
    take_inputs,
)
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.rlhf.reward_model import PairwiseEval, evaluate, preference_pair_rows, rows_to_pairs
from jobs.sft import data_paths, limited
from jobs.training.distributed import (
    RayTrainConfig,
    best_val_metrics,
    checkpoint_storage_path,
    final_checkpoints,
    launch,
    run_dir_for,
)
from jobs.training.posttrain import loss_curve_png, rows_sha256, task_identity
from jobs.training.storage import put_object
from jobs.training.tasks import RewardModelTask
from llm_core.chat_data import Stats, read_jsonl, split_holdout
from llm_core.checkpoint import load_checkpoint, read_meta
from llm_core.config import StrictModel, config_sha256, config_to_dict
from llm_core.data import DataError
from llm_core.export_hf import load_hf
from llm_core.io import atomic_write_json
from llm_core.tokenizer import Tokenizer
from llm_core.trainer import TrainConfig
from llm_core.value_model import ScalarHeadModel, export_hf_reward_model

STAGE = "reward_model"
ALIAS = "rm-latest"


class RewardDataSpec(PreferenceDataSpec):
    """Preference pairs: DPO-format jsonl files, and/or pairs generated from SFT instruction files."""

    files: list[str] = Field(
        default_factory=list,
        description="jsonl with prompt/chosen/rejected; relative paths are under TULPAR_DATA",
    )
    language_pairs_from: list[str] = Field(
        default_factory=list,
        description="SFT jsonl (lang, instruction, input, output) to generate pairs from: chosen = the record's "
        "answer, rejected = an answer in another language (jobs.rlhf.tasks.language_preference_pairs); "
        "max_records_per_file applies per file",
    )

    @model_validator(mode="after")
    def _some_data(self) -> RewardDataSpec:
        if not self.files and not self.language_pairs_from:
            raise ValueError(
                "data: give preference files (data.files) or SFT files (data.language_pairs_from)"
            )
        return self


class RewardModelConfig(StrictModel):
    name: str = Field(description="registered model name of the reward model (e.g. tulpar-tiny-rm)")
    init: str = Field(
        description="the model whose trunk starts the reward model: models:/<name>@<alias>, models:/<name>/<version> "
        "or an HF directory (usually models:/<name>@sft-latest)"
    )
    data: RewardDataSpec
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=10, seq_len=512))
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    register_model: bool = True

    @model_validator(mode="after")
    def _fits(self) -> RewardModelConfig:
        if self.data.val_fraction <= 0:
            raise ValueError(
                "data.val_fraction must be > 0: the reward model is selected and reported on held-out pairs"
            )
        if self.ray.parallelism != "ddp":
            raise ValueError(f"ray.parallelism={self.ray.parallelism}: the reward model trains with ddp only")
        return self

    def with_inputs(self, inputs: dict[str, StageResult]) -> RewardModelConfig:
        """`--input init=<an earlier training stage's result>`: start from that registered model version."""
        got = take_inputs(STAGE, inputs, {"init": (ModelVersionOutputs,)})
        if "init" not in got:
            return self
        return RewardModelConfig.model_validate(
            {**self.model_dump(), "init": model_reference(got["init"], "init")}
        )


def prepare_pairs(
    cfg: RewardModelConfig, settings: Settings, tokenizer: Tokenizer
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], dict]:
    """(training rows, held-out rows, data stats): the pairs of `preference_pair_rows`, split by train.seed."""
    stats = Stats()
    records = list(limited(read_jsonl(data_paths(cfg.data.files, settings)), cfg.data.max_records_per_file))
    if cfg.data.language_pairs_from:
        from jobs.rlhf.tasks import language_preference_pairs

        generated = language_preference_pairs(
            [Path(p) for p in data_paths(cfg.data.language_pairs_from, settings)],
            cfg.data.max_records_per_file,
            seed=cfg.train.seed,
        )
        records += [(f"language_pairs:{i}", rec) for i, rec in enumerate(generated, 1)]
    rows = preference_pair_rows(records, tokenizer, cfg.train.seq_len, stats)
    train, val = split_holdout(rows, cfg.data.val_fraction, cfg.train.seed)
    if not train or not val:
        raise DataError(
            f"no preference pairs left for {'training' if not train else 'held-out evaluation'} ({len(rows)} pairs "
            f"from {', '.join(cfg.data.files + cfg.data.language_pairs_from)}; {json.dumps(stats.to_dict())}): "
            "check data.files, "
            "data.max_records_per_file and train.seq_len"
        )
    return train, val, {**stats.to_dict(), "train_pairs": len(train), "val_pairs": len(val)}


def scalar_head_model(init_dir: Path, seed: int) -> ScalarHeadModel:
    """The reward model before training, as every training worker builds it (the head drawn after seeding)."""
    torch.manual_seed(seed)
    return ScalarHeadModel(load_hf(init_dir))


def pairwise_metrics(prefix: str, ev: PairwiseEval) -> dict[str, float]:
    return {
        f"{prefix}accuracy": ev.accuracy,
        f"{prefix}accuracy_ci95_low": ev.ci_low,
        f"{prefix}accuracy_ci95_high": ev.ci_high,
        f"{prefix}margin": ev.margin,
        f"{prefix}pairs": float(ev.pairs),
    }


def main(cfg: RewardModelConfig, settings: Settings) -> JobResult:
    start = registry.hf_model(cfg.init, settings)
    assert start.path is not None  # hf_model returns the files local
    init_dir, parent_uri = start.path, start.uri
    tokenizer = Tokenizer.from_dir(init_dir)
    trunk_cfg = load_hf(init_dir).cfg
    if cfg.train.seq_len > trunk_cfg.max_seq_len:
        raise ValueError(
            f"train.seq_len {cfg.train.seq_len} > max_seq_len {trunk_cfg.max_seq_len} of the init model "
            f"{cfg.init}: lower train.seq_len to at most {trunk_cfg.max_seq_len}"
        )
    if trunk_cfg.is_moe:
        raise ValueError(
            f"init {cfg.init} is a mixture-of-experts model: the reward model's HF export "
            "(LlamaForSequenceClassification) takes dense trunks only; start from a dense model"
        )
    train_rows, val_rows, stats = prepare_pairs(cfg, settings, tokenizer)
    print(f"{STAGE}: {json.dumps(stats, ensure_ascii=False)}", flush=True)
    tracking.check_server(settings)
    identity = {
        "config": config_to_dict(cfg),
        "parent_model_uri": parent_uri,
        "data_sha256": rows_sha256(train_rows) + rows_sha256(val_rows),
        "task": task_identity(RewardModelTask),
    }
    if not parent_uri.startswith("models:/"):  # a directory: its files are the input
        identity["init_sha256"] = files_sha256([p for p in Path(init_dir).rglob("*") if p.is_file()])
    cache = StageCache(settings, STAGE, identity)
    if (stored := cache.lookup(model_version_still_registered(settings))) is not None:
        return stored

    run_key = f"{cfg.name}-{STAGE}-{config_sha256(cfg)[:8]}"
    run_dir = run_dir_for(settings, run_key)
    prepared_uri = f"{checkpoint_storage_path(settings)}/{run_key}/prepared.pt"
    put_object(prepared_uri, {"train": train_rows, "val": val_rows})
    lineage = {"tulpar.parent_model_uri": parent_uri, "tulpar.tokenizer_sha256": tokenizer.sha256}
    run_tags = {**lineage, "tulpar.model_name": cfg.name}
    with tracking.start_run(
        settings, STAGE, cfg, run_name=run_key, tags=run_tags, system_metrics=True
    ) as run:
        tracking.log_dict(stats, "data/stats.json")
        spec = RewardModelTask(init=str(init_dir), prepared=prepared_uri, train=cfg.train)
        result = launch(
            settings=settings,
            run_name=run_key,
            ray_cfg=cfg.ray,
            task=spec,
            run_config=config_to_dict(cfg),
            mlflow_run_id=run.info.run_id,
            fault_marker=str(run_dir / ".fault-injected"),
        )
        best_ckpt, last_ckpt = final_checkpoints(result, settings, run_key, run_dir)
        model = scalar_head_model(init_dir, cfg.train.seed)
        with best_ckpt.as_directory() as best_dir:
            best_meta = read_meta(best_dir)
            state = load_checkpoint(best_dir, restore_rng=False)
        initial = scalar_head_model(init_dir, cfg.train.seed)
        model.load_state_dict(state["model_state"])
        model.eval()

        train_pairs, val_pairs = rows_to_pairs(train_rows), rows_to_pairs(val_rows)
        batch = cfg.train.batch_size
        heldout = evaluate(model, val_pairs, tokenizer.pad_id, batch)
        metrics = {
            **pairwise_metrics("heldout_", heldout),
            **pairwise_metrics("train_", evaluate(model, train_pairs, tokenizer.pad_id, batch)),
            **pairwise_metrics("initial_heldout_", evaluate(initial, val_pairs, tokenizer.pad_id, batch)),
            **pairwise_metrics("initial_train_", evaluate(initial, train_pairs, tokenizer.pad_id, batch)),
            **best_val_metrics(best_meta),
            "steps": float(best_meta["step"]),
            "params": float(model.num_params()),
        }
        tracking.log_metrics(metrics)
        print(
            f"{STAGE}: held-out pairwise accuracy {heldout.accuracy:.3f} (95% CI {heldout.ci_low:.3f}-"
            f"{heldout.ci_high:.3f}) on {heldout.pairs} pairs, mean margin {heldout.margin:.3f}; training pairs "
            f"{metrics['initial_train_accuracy']:.3f} -> {metrics['train_accuracy']:.3f} (step {best_meta['step']})",
            flush=True,
        )
        plot = loss_curve_png(run.info.run_id, run_dir / "loss_curve.png", f"{cfg.name} reward model")
        version_tags = {
            **lineage,
            "tulpar.model_kind": "reward-model",
            "tulpar.best_val_loss": f"{best_meta['metrics'].get('val_loss', float('nan')):.6f}",
            "tulpar.heldout_accuracy": f"{heldout.accuracy:.4f}",
            "tulpar.checkpoint": best_ckpt.path,
        }
        model_uri, hf_dir = tracking.publish_hf_model(
            model,
            tokenizer,
            settings,
            cfg.name,
            register=cfg.register_model,
            stage=STAGE,
            alias=ALIAS,
            tags=version_tags,
            export=functools.partial(export_hf_reward_model, pad_token_id=tokenizer.pad_id),
        )

    outputs = RewardModelOutputs(
        model_uri=model_uri,
        hf_dir=str(hf_dir),
        checkpoint_dir=str(run_dir),
        best_checkpoint=best_ckpt.path,
        last_checkpoint=last_ckpt.path,
        parent_model_uri=parent_uri,
        tokenizer_sha256=tokenizer.sha256,
        loss_curve=str(plot),
        heldout_accuracy=heldout.accuracy,
        heldout_accuracy_ci95=(heldout.ci_low, heldout.ci_high),
        heldout_margin=heldout.margin,
        heldout_pairs=heldout.pairs,
        data=stats,
    )
    result_obj = JobResult(
        STAGE, outputs=outputs, metrics=metrics, mlflow_run_id=run.info.run_id, output_dir=run_dir
    )
    atomic_write_json(run_dir / "checkpoints.json", {"best": best_ckpt.path, "last": last_ckpt.path})
    return cache.store(result_obj)


if __name__ == "__main__":
    main_entry(STAGE, RewardModelConfig, main)
