"""RL fine-tuning (GRPO or PPO): `python -m jobs.rl --config configs/rl/<name>.yaml [key=value ...]`.

Starts from a registered model (`models:/<name>@sft-latest` or `@dpo-latest`) or an HF directory. Prompts come
from a generated kk/ru/en arithmetic set, GSM8K-style jsonl, or instruction jsonl; completions are sampled by the
rollout engine (llm_core's generator on the policy, or vLLM engines as Ray actors whose weights are pushed after
every update), scored by weighted rewards (`jobs.rlhf.rewards`), and the policy is updated on Ray Train
(`jobs.rlhf.loop`). The held-out reward is measured before the first step and every `train.eval_every` steps; the
checkpoint with the best held-out reward becomes a registered child version (`tulpar.parent_model_uri`) with
alias `@rl-latest`. MLflow gets reward mean/std per reward and per language, KL, entropy, clip fraction, value
loss (PPO), response length, rollout tokens/s, the rollout/update/push time split, and a PNG of the curves.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jobs.platform.results import ModelVersionOutputs, StageResult, model_reference, take_inputs
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.rlhf.grpo import GRPOConfig
from jobs.rlhf.loop import (
    GRPOSettings,
    PPOSettings,
    RLEvalConfig,
    RLTask,
    RLTrainConfig,
    RolloutConfig,
    UpdateConfig,
    load_rl_checkpoint,
    rl_worker_loop,
)
from jobs.rlhf.rewards import RewardSpec
from jobs.rlhf.tasks import LANGUAGES, Problem
from jobs.training.distributed import RayTrainConfig
from jobs.training.posttrain import ChatSampleSpec
from llm_core.config import StrictModel
from llm_core.trainer import TrainConfig

CURVES = (
    "reward",
    "val_reward",
    "kl",
    "entropy",
    "clip_fraction",
    "value_loss",
    "response_length",
    "rollout_tokens_per_s",
)


class PromptSetSpec(StrictModel):
    """Where the prompts come from; a held-out part measures the reward of the policy."""

    source: Literal["arithmetic", "gsm8k", "instructions"] = Field(
        description="arithmetic: generated kk/ru/en word problems with answers; gsm8k: GSM8K-style jsonl "
        "(question, answer ending '#### <n>'); instructions: SFT-style jsonl (lang, instruction, input)"
    )
    files: list[str] = Field(
        default_factory=list, description="gsm8k/instructions files; relative: TULPAR_DATA"
    )
    lang: str | None = Field(None, description="gsm8k: the files' language (kk, ru, en)")
    count: int = Field(300, gt=0, description="arithmetic: problems generated; others: most prompts per file")
    languages: list[str] = Field(default_factory=lambda: list(LANGUAGES), description="languages kept")
    val_prompts: int = Field(24, gt=0, description="prompts held out to measure the reward")
    seed: int = 0
    max_prompt_tokens: int | None = Field(
        None,
        gt=0,
        description="longest prompt (chat template included); null: context - rollout.max_new_tokens",
    )
    drop_longer: bool = Field(
        False,
        description="drop prompts longer than max_prompt_tokens or than the context leaves (default: an error)",
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in LANGUAGES]
        if bad or not v:
            raise ValueError(f"prompts.languages {v}: use a non-empty subset of {list(LANGUAGES)}")
        return v

    @model_validator(mode="after")
    def _files_fit_source(self) -> PromptSetSpec:
        if self.source == "arithmetic" and self.files:
            raise ValueError("prompts.files: the arithmetic source generates its problems; drop files")
        if self.source != "arithmetic" and not self.files:
            raise ValueError(f"prompts.files: the {self.source} source needs at least one jsonl file")
        if self.source == "gsm8k" and self.lang not in LANGUAGES:
            raise ValueError(
                f"prompts.lang {self.lang!r}: gsm8k files need their language, one of {LANGUAGES}"
            )
        return self


class RLConfig(StrictModel):
    name: str = Field(description="registered model name of the result")
    init: str = Field(
        description="the policy to start from (models:/<name>@sft-latest or @dpo-latest, or a dir)"
    )
    reference: str | None = Field(None, description="the KL reference; default: the starting model")
    algorithm: Literal["grpo", "ppo"] = "grpo"
    prompts: PromptSetSpec
    rewards: list[RewardSpec] = Field(description="weighted rewards (jobs.rlhf.rewards.REWARDS)")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    evaluation: RLEvalConfig = Field(default_factory=RLEvalConfig)
    train: RLTrainConfig = Field(default_factory=RLTrainConfig)
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    sample: ChatSampleSpec = Field(default_factory=ChatSampleSpec)
    register_model: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        if self.algorithm == "grpo":  # the library config checks group size and loss aggregation
            GRPOConfig(
                group_size=self.grpo.group_size,
                loss_aggregation=self.grpo.loss_aggregation,
                max_new_tokens=self.rollout.max_new_tokens,
            )
        if self.ray.parallelism == "fsdp":
            raise ValueError(
                "ray.parallelism=fsdp is not supported by jobs.rl: its workers are replicas whose gradients are "
                "all-reduced (DDP-style). Use ray.parallelism: ddp"
            )
        if self.rollout.prompts_per_step % self.ray.num_workers:
            raise ValueError(
                f"rollout.prompts_per_step {self.rollout.prompts_per_step} is not a multiple of ray.num_workers "
                f"{self.ray.num_workers}: each worker rolls out the same number of prompts"
            )
        if self.rollout.engine == "vllm" and self.ray.use_gpu and self.rollout.engine_gpus == 0:
            raise ValueError(
                "rollout.engine=vllm with ray.use_gpu: give the engines GPUs (rollout.engine_gpus: 1)"
            )
        return self

    def with_inputs(self, inputs: dict[str, StageResult]) -> RLConfig:
        """`--input init=<an earlier training stage's result>`: start from that registered model version."""
        got = take_inputs("rl", inputs, {"init": (ModelVersionOutputs,)})
        if "init" not in got:
            return self
        return RLConfig.model_validate({**self.model_dump(), "init": model_reference(got["init"], "init")})


# ------------------------------------------------------------------------------------------------ prompts


def load_problems(spec: PromptSetSpec, settings: Settings) -> list[Problem]:
    from jobs.rlhf.tasks import arithmetic_problems, load_gsm8k, load_instructions
    from jobs.sft import data_paths

    if spec.source == "arithmetic":
        return arithmetic_problems(spec.count, seed=spec.seed, languages=tuple(spec.languages))
    out: list[Problem] = []
    for path in data_paths(spec.files, settings):
        if spec.source == "gsm8k":
            out += load_gsm8k(Path(path), spec.lang)[: spec.count]
        else:
            out += [p for p in load_instructions(Path(path), spec.count) if p.lang in spec.languages]
    return out


def prepare_prompts(
    cfg: RLConfig, settings: Settings, tokenizer, max_seq_len: int
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train, held-out, stats): each prompt rendered as one user turn of the chat template, with its ids."""
    problems = load_problems(cfg.prompts, settings)
    if not problems:
        raise ValueError(
            f"prompts: the {cfg.prompts.source} source gave no prompts (files {cfg.prompts.files}, languages "
            f"{cfg.prompts.languages}): an empty prompt set cannot be trained on"
        )
    fits = max_seq_len - cfg.rollout.max_new_tokens
    budget = min(fits, cfg.prompts.max_prompt_tokens or fits)
    rows, dropped = [], 0
    for p in problems:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p.question}], add_generation_prompt=True
        )
        ids = tokenizer.encode(text)
        if len(ids) > budget:
            if cfg.prompts.drop_longer:
                dropped += 1
                continue
            if len(ids) > fits:
                raise ValueError(
                    f"prompt {p.id} has {len(ids)} tokens; with rollout.max_new_tokens "
                    f"{cfg.rollout.max_new_tokens} it does not fit the model's context of {max_seq_len}: lower "
                    "rollout.max_new_tokens, use shorter prompts, or set prompts.drop_longer=true to skip them"
                )
            raise ValueError(
                f"prompt {p.id} has {len(ids)} tokens, more than prompts.max_prompt_tokens "
                f"{cfg.prompts.max_prompt_tokens}: raise it, or set prompts.drop_longer=true to skip such prompts"
            )
        rows.append({"id": p.id, "lang": p.lang, "prompt": p.question, "answer": p.answer, "prompt_ids": ids})
    if len(rows) <= cfg.prompts.val_prompts:
        raise ValueError(
            f"prompts: {len(rows)} usable prompts ({dropped} too long dropped) leave nothing to "
            f"train on after prompts.val_prompts={cfg.prompts.val_prompts} held out: add prompts or lower it"
        )
    order = list(range(len(rows)))
    random.Random(cfg.prompts.seed).shuffle(order)
    val = [rows[i] for i in order[: cfg.prompts.val_prompts]]
    train = [rows[i] for i in order[cfg.prompts.val_prompts :]]
    by_lang: dict[str, int] = {}
    for r in train:
        by_lang[r["lang"]] = by_lang.get(r["lang"], 0) + 1
    stats = {
        "train_prompts": len(train),
        "val_prompts": len(val),
        "dropped_too_long": dropped,
        "train_prompts_by_lang": by_lang,
        "mean_prompt_tokens": sum(len(r["prompt_ids"]) for r in rows) / len(rows),
    }
    return train, val, stats


# ------------------------------------------------------------------------------------------------ driver


def engine_cpus_left(cfg: RLConfig, settings: Settings) -> RayTrainConfig:
    """With vLLM engines on CPU, the workers get the cluster's CPUs minus the engines' (at least 1 each)."""
    if cfg.rollout.engine != "vllm" or cfg.ray.use_gpu or cfg.ray.cpus_per_worker is not None:
        return cfg.ray
    import ray

    from jobs.platform.raycluster import init_ray

    init_ray(settings)
    total = float(ray.cluster_resources().get("CPU", 1))
    free = total - cfg.rollout.num_engines * cfg.rollout.engine_cpus
    per_worker = max(1.0, float(int(free // cfg.ray.num_workers)))
    return cfg.ray.model_copy(update={"cpus_per_worker": per_worker})


def check_rewards(cfg: RLConfig, settings: Settings, tokenizer) -> None:
    """Build the rewards once on the driver, so a bad reward setting (an unknown name, a reward model whose
    tokenizer is not the policy's, a judge without its key) fails before any worker starts."""
    from jobs.rlhf.rewards import RewardContext, build_rewards

    build_rewards(cfg.rewards, RewardContext(tokenizer, settings, "cpu", policy=cfg.init))


def main(cfg: RLConfig, settings: Settings) -> JobResult:
    from jobs.platform import registry, tracking
    from jobs.platform.cache import StageCache, files_sha256, model_version_still_registered
    from jobs.reporting.plots import plot_metric_panels
    from jobs.training.distributed import checkpoint_storage_path, final_checkpoints, launch, run_dir_for
    from jobs.training.sampling import end_of_training_samples
    from jobs.training.storage import put_object
    from llm_core.config import config_sha256, config_to_dict
    from llm_core.export_hf import load_hf, model_config_from_hf
    from llm_core.io import atomic_write_json
    from llm_core.tokenizer import Tokenizer

    start = registry.hf_model(cfg.init, settings)
    assert start.path is not None
    init_dir, parent_uri = Path(start.path), start.uri
    reference_dir = str(registry.hf_model(cfg.reference, settings).path) if cfg.reference else None
    tokenizer = Tokenizer.from_dir(init_dir)
    model_cfg = model_config_from_hf(json.loads((init_dir / "config.json").read_text(encoding="utf-8")))
    if cfg.rollout.max_new_tokens >= model_cfg.max_seq_len:
        raise ValueError(
            f"rollout.max_new_tokens {cfg.rollout.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {model_cfg.max_seq_len}: lower rollout.max_new_tokens"
        )
    train, val, stats = prepare_prompts(cfg, settings, tokenizer, model_cfg.max_seq_len)
    print(f"rl: {json.dumps(stats, ensure_ascii=False)}", flush=True)
    check_rewards(cfg, settings, tokenizer)
    tracking.check_server(settings)
    identity = {
        "config": config_to_dict(cfg),
        "parent_model_uri": parent_uri,
        "prompts": [[r["id"], r["prompt_ids"], r["answer"]] for r in train + val],
    }
    if not parent_uri.startswith("models:/"):
        identity["init_sha256"] = files_sha256([p for p in init_dir.rglob("*") if p.is_file()])
    cache = StageCache(settings, "rl", identity)
    if (stored := cache.lookup(model_version_still_registered(settings))) is not None:
        return stored

    run_key = f"{cfg.name}-rl-{config_sha256(cfg)[:8]}"
    run_dir = run_dir_for(settings, run_key)
    prompts_uri = f"{checkpoint_storage_path(settings)}/{run_key}/prompts.pt"
    put_object(prompts_uri, {"train": train, "val": val})
    tags = {
        "tulpar.parent_model_uri": parent_uri,
        "tulpar.tokenizer_sha256": tokenizer.sha256,
        "tulpar.model_name": cfg.name,
        "tulpar.rl_algorithm": cfg.algorithm,
        "tulpar.rollout_engine": cfg.rollout.engine,
    }
    engines = None
    with tracking.start_run(settings, "rl", cfg, run_name=run_key, tags=tags, system_metrics=True) as run:
        tracking.log_dict(stats, "data/stats.json")
        task = RLTask(
            train=TrainConfig(steps=cfg.train.steps, lr=cfg.train.lr, seed=cfg.train.seed),
            algorithm=cfg.algorithm,
            init=str(init_dir),
            reference=reference_dir,
            prompts=prompts_uri,
            rewards=cfg.rewards,
            rollout=cfg.rollout,
            update=cfg.update,
            grpo=cfg.grpo,
            ppo=cfg.ppo,
            evaluation=cfg.evaluation,
            rl_train=cfg.train,
            engine_name=f"tulpar-rollout-{run_key}" if cfg.rollout.engine == "vllm" else None,
        )
        ray_cfg = engine_cpus_left(cfg, settings)
        try:
            if cfg.rollout.engine == "vllm":
                from jobs.platform.raycluster import init_ray
                from jobs.rlhf.rollout import VLLMEngines

                init_ray(settings)

                engines = VLLMEngines.start(
                    str(init_dir),
                    num_engines=cfg.rollout.num_engines,
                    name=task.engine_name,
                    dtype=cfg.rollout.dtype,
                    num_cpus=cfg.rollout.engine_cpus,
                    num_gpus=cfg.rollout.engine_gpus,
                    max_model_len=model_cfg.max_seq_len,
                    seed=cfg.train.seed,
                    extra=cfg.rollout.engine_args,
                )
            result = launch(
                settings=settings,
                run_name=run_key,
                ray_cfg=ray_cfg,
                task=task,
                run_config=config_to_dict(cfg),
                mlflow_run_id=run.info.run_id,
                fault_marker=str(run_dir / ".fault-injected"),
                train_loop=rl_worker_loop,
                checkpoint_score=("val_reward", "max"),
            )
        finally:
            if engines is not None:
                engines.shutdown()
        best_ckpt, last_ckpt = final_checkpoints(result, settings, run_key, run_dir, ("val_reward", "max"))
        with best_ckpt.as_directory() as best_dir:
            state, best_meta = load_rl_checkpoint(Path(best_dir))
        model = load_hf(init_dir)
        model.load_state_dict(state["policy"])
        model.eval()
        samples = end_of_training_samples(
            model,
            tokenizer,
            cfg.sample.prompts,
            chat=True,
            max_new_tokens=cfg.sample.max_new_tokens,
            temperature=cfg.sample.temperature,
        )
        for lang, text in samples.items():
            print(f"sample [{lang}] {text!r}", flush=True)
        tracking.log_text("\n".join(f"[{k}] {v}" for k, v in samples.items()), "samples.txt")
        history = tracking.metric_history(run.info.run_id, list(CURVES))
        plot = plot_metric_panels(
            history, list(CURVES), run_dir / "rl_curves.png", f"{cfg.name} rl ({cfg.algorithm})"
        )
        tracking.log_figure_file(plot)
        baseline = next((h["val_reward"] for h in history if h["step"] == 0 and "val_reward" in h), None)
        best_reward = best_meta["metrics"].get("val_reward")
        metrics = {
            "best_val_reward": float(best_reward),
            "best_step": float(best_meta["step"]),
            "steps": float(cfg.train.steps),
        }
        if baseline is not None:
            metrics["baseline_val_reward"] = float(baseline)
            metrics["val_reward_gain"] = float(best_reward - baseline)
        tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        version_tags = {
            "tulpar.parent_model_uri": parent_uri,
            "tulpar.best_val_reward": f"{best_reward:.6f}",
            "tulpar.rl_algorithm": cfg.algorithm,
            "tulpar.checkpoint": best_ckpt.path,
        }
        model_uri, hf_dir = tracking.publish_hf_model(
            model,
            tokenizer,
            settings,
            cfg.name,
            register=cfg.register_model,
            stage="rl",
            alias="rl-latest",
            tags=version_tags,
        )

    outputs = ModelVersionOutputs(
        checkpoint_dir=str(run_dir),
        best_checkpoint=best_ckpt.path,
        last_checkpoint=last_ckpt.path,
        parent_model_uri=parent_uri,
        hf_dir=str(hf_dir),
        model_uri=model_uri,
        tokenizer_sha256=tokenizer.sha256,
        loss_curve=str(plot),
        samples=samples,
        data=stats,
    )
    result_obj = JobResult(
        "rl", outputs=outputs, metrics=metrics, mlflow_run_id=run.info.run_id, output_dir=run_dir
    )
    atomic_write_json(run_dir / "checkpoints.json", {"best": best_ckpt.path, "last": last_ckpt.path})
    return cache.store(result_obj)


if __name__ == "__main__":
    main_entry("rl", RLConfig, main)
