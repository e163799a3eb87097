"""Direct Preference Optimization: `python -m jobs.dpo --config configs/dpo/<name>.yaml [key=value ...]`.

Starts from an SFT model (`models:/<name>@sft-latest`) and trains on {"prompt", "chosen", "rejected"} jsonl with
the sigmoid DPO loss against a frozen reference: the starting model, whose sequence log-probs are precomputed once
on the workers (no second model in memory during training). Logs reward accuracy, chosen/rejected rewards and
margins; registers the result with alias `@dpo-latest`.
"""

from __future__ import annotations

import functools

from pydantic import Field

from jobs.platform.results import ModelVersionOutputs, StageResult, model_reference, take_inputs
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.sft import data_paths, limited
from jobs.training.distributed import RayTrainConfig
from jobs.training.posttrain import ChatSampleSpec, Prepared, run_posttrain
from jobs.training.tasks import DPOTask
from llm_core.chat_data import Stats, preference_rows, read_jsonl, split_holdout
from llm_core.config import StrictModel
from llm_core.lora import LoRAConfig
from llm_core.trainer import TrainConfig


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

    def with_inputs(self, inputs: dict[str, StageResult]) -> DPOConfig:
        """`--input init=<an earlier training stage's result>`: start from that registered model version."""
        got = take_inputs("dpo", inputs, {"init": (ModelVersionOutputs,)})
        if "init" not in got:
            return self
        return DPOConfig.model_validate({**self.model_dump(), "init": model_reference(got["init"], "init")})


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


def main(cfg: DPOConfig, settings: Settings) -> JobResult:
    from jobs.platform.registry import hf_model

    reference = str(hf_model(cfg.reference, settings).path) if cfg.reference else None
    return run_posttrain(
        stage="dpo",
        cfg=cfg,
        settings=settings,
        init=cfg.init,
        prepare=lambda tokenizer, _init_dir: prepare_dpo(cfg, settings, tokenizer),
        task=functools.partial(
            DPOTask, beta=cfg.beta, label_smoothing=cfg.label_smoothing, reference=reference
        ),
        lora=cfg.lora,
    )


if __name__ == "__main__":
    main_entry("dpo", DPOConfig, main)
