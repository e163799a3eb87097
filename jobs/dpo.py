"""Direct Preference Optimization: `python -m jobs.dpo --config configs/dpo/<name>.yaml [key=value ...]`.

Starts from an SFT model (`models:/<name>@sft-latest`) and trains on {"prompt", "chosen", "rejected"} jsonl with
the sigmoid DPO loss against a frozen reference: the starting model, whose sequence log-probs are precomputed once
on the workers (no second model in memory during training). Logs reward accuracy, chosen/rejected rewards and
margins; registers the result with alias `@dpo-latest`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.sft import data_paths, limited
from jobs.training.distributed import RayTrainConfig, TaskSetup
from jobs.training.posttrain import ChatSampleSpec, Prepared, build_model, get_object, run_posttrain
from llm_core.chat_data import (
    RowSampler,
    Stats,
    batches_of,
    collate,
    preference_rows,
    read_jsonl,
    split_holdout,
)
from llm_core.config import StrictModel
from llm_core.export_hf import load_hf
from llm_core.lora import LoRAConfig
from llm_core.losses import dpo_loss, sequence_logprobs
from llm_core.trainer import EvalBatches, TrainConfig


class PreferenceDataSpec(StrictModel):
    files: list[str] = Field(
        description="jsonl with prompt/chosen/rejected; relative paths are under TULPAR_DATA"
    )
    max_records_per_file: int | None = Field(None, gt=0)
    val_fraction: float = Field(0.05, ge=0, lt=1)


class DPOConfig(StrictModel):
    name: str = Field(description="registered model name of the result")
    init: str = Field(description="the policy to start from (usually models:/<name>@sft-latest)")
    reference: str | None = Field(None, description="reference model; default: the starting model")
    data: PreferenceDataSpec
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed label noise")
    lora: LoRAConfig | None = None
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-6, warmup_steps=10, seq_len=512))
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    sample: ChatSampleSpec = Field(default_factory=ChatSampleSpec)
    register_model: bool = True


def make_dpo_loss(beta: float, label_smoothing: float):
    def loss_fn(model, batch):
        """batch: input_ids/targets (2B, T) with chosen rows first; ref_logps (B, 2)."""
        logits = model(batch["input_ids"]).logits
        logps = sequence_logprobs(logits, batch["targets"])  # (2B,)
        pairs = logps.size(0) // 2
        ref = batch["ref_logps"]
        return dpo_loss(
            logps[:pairs], logps[pairs:], ref[:, 0], ref[:, 1], beta=beta, label_smoothing=label_smoothing
        )

    return loss_fn


@torch.no_grad()
def add_reference_logps(rows: list[dict], model, rank: int, world_size: int, batch_size: int = 8) -> None:
    """rows[i]["ref_logps"] = (chosen, rejected) sequence log-probs under `model`; rows are split across ranks and
    the results gathered, so each rank computes 1/world_size of them."""
    model.eval()
    mine = list(range(rank, len(rows), world_size))
    values: dict[int, torch.Tensor] = {}
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        batch = collate([rows[j] for j in idx])
        device = next(model.parameters()).device
        logps = sequence_logprobs(
            model(batch["input_ids"].to(device)).logits, batch["targets"].to(device)
        ).cpu()
        pairs = len(idx)
        for k, j in enumerate(idx):
            values[j] = torch.stack([logps[k], logps[pairs + k]])
    if world_size > 1:
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, values)
        values = {j: v for part in gathered for j, v in part.items()}
    for j, row in enumerate(rows):
        row["ref_logps"] = values[j]
    model.train()


def prepare_dpo(cfg: DPOConfig, settings: Settings, tokenizer) -> Prepared:
    stats = Stats()
    files = data_paths(cfg.data.files, settings)
    rows = preference_rows(
        limited(read_jsonl(files), cfg.data.max_records_per_file), tokenizer, cfg.train.seq_len, stats
    )
    train, val = split_holdout(rows, cfg.data.val_fraction, cfg.train.seed)
    if not train:
        raise ValueError(
            f"no preference pairs left for training ({stats.to_dict()}): check the data and seq_len"
        )
    return Prepared(train, val, {**stats.to_dict(), "train_pairs": len(train), "val_pairs": len(val)})


def build_task(config: dict, *, rank: int, world_size: int, device) -> TaskSetup:
    train_cfg = TrainConfig.model_validate(config["train"])
    lora = LoRAConfig.model_validate(config["lora"]) if config.get("lora") else None
    data = get_object(config["prepared"])
    policy = build_model(Path(config["init"]), lora)
    reference = load_hf(config["reference"]) if config.get("reference") else policy
    for rows in (data["train"], data["val"]):
        add_reference_logps(
            rows, reference.to(device) if reference is not policy else reference, rank, world_size
        )
    sampler = RowSampler(
        data["train"], train_cfg.batch_size, seed=train_cfg.seed, rank=rank, world_size=world_size
    )
    val = batches_of(data["val"], train_cfg.batch_size)
    return TaskSetup(
        policy,
        sampler,
        [EvalBatches("pairs", val)] if val else [],
        make_dpo_loss(config["beta"], config["label_smoothing"]),
    )


def main(cfg: DPOConfig, settings: Settings) -> JobResult:
    from jobs.platform.registry import hf_model

    reference = str(hf_model(cfg.reference, settings).path) if cfg.reference else None
    return run_posttrain(
        stage="dpo",
        cfg=cfg,
        settings=settings,
        init=cfg.init,
        prepare=lambda tokenizer, _init_dir: prepare_dpo(cfg, settings, tokenizer),
        task_builder="jobs.dpo:build_task",
        worker_extra={"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "reference": reference},
        lora=cfg.lora,
    )


if __name__ == "__main__":
    main_entry("dpo", DPOConfig, main)
