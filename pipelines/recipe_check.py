"""`python -m pipelines.recipes --check [NAME ...]` (`make recipe-check`): validate recipes without training.

For each recipe, and each stage in order, it loads the stage's config through the stage's own pydantic config
class (the recipe's overrides, plus the inputs the pipeline passes from earlier stages, as placeholders), then
again with the rehearsal overrides on top, and checks what would otherwise fail hours into a GPU run:

- vocabulary: the tokenizer stage produces `tokenizer.vocab_size` tokens (Tulpar's special tokens included:
  HF's BpeTrainer counts them inside vocab_size, and the superword stage stops at it), and the model's embedding
  is that rounded up to a multiple of 64. A model preset (or override) stating any other vocab_size conflicts.
- head_dim servable by vLLM where the serve config runs it: CPU (`VLLM_CPU_HEAD_DIMS`) or GPU
  (`VLLM_GPU_HEAD_DIMS`, FlashAttention's rule: vLLM's first choice on NVIDIA GPUs).
- train.seq_len <= model.max_seq_len for every training stage; eval window and serve max_model_len too.
- pretraining tokens per optimizer step = batch_size x seq_len x accumulation x num_workers (accumulation from
  `TrainConfig.accum_steps`, which rounds tokens_per_step) equals hardware.tokens_per_step.
- an estimate of GPU memory per worker (`estimate_gpu_memory`) fits hardware.gpu_memory_gb.
- every input path exists (under TULPAR_DATA, or shipped in the repository for eval fixtures), and no string in
  any resolved config points into tests/ (the images do not ship tests/).
- rehearsal: the rehearsal overrides keep the shapes (vocabulary, dims, layers, heads, experts, seq_len) and run
  on CPU.

Every failure names the recipe, the stage, the key and the fix; the command then exits 2.
"""

from __future__ import annotations

import copy
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from jobs.platform.configfile import (
    VLLM_CPU_HEAD_DIMS,
    apply_overrides,
    load_preset,
    resolve_presets,
    validate_config,
)
from jobs.platform.runtime import REPO_ROOT, Settings
from llm_core.config import ConfigError, ModelConfig
from pipelines.recipes import (
    STAGES,
    RecipeConfig,
    ServeSpec,
    list_recipes,
    load_recipe,
    split_serve_overrides,
    stage_config_path,
)

# Head sizes vLLM 0.32 serves on NVIDIA GPUs with its default attention backend. vllm/platforms/cuda.py
# (_get_backend_priorities) tries FLASH_ATTN first on Ampere/Hopper (FLASHINFER first on Blackwell, whose
# get_supported_head_sizes is [64, 128, 256, 512] in vllm/v1/attention/backends/flashinfer.py);
# vllm/v1/attention/backends/flash_attn.py FlashAttentionBackend.supports_head_size accepts head_size % 8 == 0 and
# head_size <= 256 (<= 512 only with FlashAttention 4). Multiples of 8 up to 256 are therefore servable on the
# default path; other sizes would fall back to slower backends (Triton) or fail.
VLLM_GPU_HEAD_DIMS = tuple(range(8, 257, 8))

VOCAB_MULTIPLE = 64
GiB = 1024**3
# CUDA context, cuBLAS/NCCL workspaces, and the caching allocator's fragmentation (see estimate_gpu_memory)
FIXED_OVERHEAD_GB = 1.5
FRAGMENTATION = 1.1
SHAPE_KEYS = (
    "vocab_size",
    "dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_dim",
    "max_seq_len",
    "num_experts",
    "num_experts_per_token",
    "num_shared_experts",
    "moe_ffn_hidden_dim",
    "tie_embeddings",
)
TRAINING_STAGES = ("pretrain", "extend", "sft", "dpo", "distill")


def stage_classes() -> dict[str, type[BaseModel]]:
    """Each stage's own config class, imported from the stage's module (importing runs nothing)."""
    from jobs.distill import DistillConfig
    from jobs.dpo import DPOConfig
    from jobs.eval import EvalConfig
    from jobs.preprocess import PreprocessConfig
    from jobs.pretrain import PretrainConfig
    from jobs.rl import RLConfig
    from jobs.sft import SFTConfig
    from jobs.tokenizer import TokenizerJobConfig
    from services.llm_serve.config import ServeConfig

    return {
        "tokenizer": TokenizerJobConfig,
        "preprocess": PreprocessConfig,
        "pretrain": PretrainConfig,
        "extend": PretrainConfig,
        "sft": SFTConfig,
        "dpo": DPOConfig,
        "rl": RLConfig,
        "distill": DistillConfig,
        "eval": EvalConfig,
        "serve": ServeConfig,
    }


def padded_vocab(tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-tokens // multiple) * multiple


# --------------------------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    states_gb: float
    activations_gb: float
    logits_gb: float
    total_gb: float
    how: str


def estimate_gpu_memory(
    model: ModelConfig,
    *,
    rows: int,
    seq_len: int,
    num_workers: int,
    parallelism: str,
    activation_checkpointing: bool,
    lora: bool = False,
    resident_reference: bool = False,
) -> MemoryEstimate:
    """Peak GPU memory of one training worker, in GiB: model states + activations + logits, then overheads.

    P = model.num_params() with the padded embedding (tied: counted once), N = num_workers, h = dim, L = layers,
    h_kv = num_kv_heads x head_dim, V = padded vocabulary, b = rows per micro-batch (DPO: 2 x batch_size, chosen
    and rejected), s = seq_len.

    Model states, fp32 master weights with bf16 autocast compute (llm_core/trainer.py) and AdamW: 4P weights +
    4P gradients + 8P for exp_avg and exp_avg_sq = 16P bytes (ZeRO, Rajbhandari et al. 2020, sec. 3.1: mixed-
    precision Adam holds 16 bytes per parameter). DDP keeps all of it on every worker plus 4P of gradient buckets
    (torch DistributedDataParallel, gradient_as_bucket_view=False). FSDP2 (`fully_shard` per block, no
    MixedPrecisionPolicy, so fp32 all-gathers) keeps 16P / N plus two unsharded blocks in fp32 (the block being
    computed and the prefetched next one; PyTorch FSDP2 docs). LoRA: 4P frozen weights (adapter states are
    negligible). A separate DPO reference model: + 4P.

    Activations, per layer and token, in bytes, derived for this block following Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models", sec. 4: 34sbh + 5as^2b for a GPT block with
    a 4h GeLU MLP, dropout and materialised attention scores). Ours has SwiGLU, no dropout and fused SDPA attention
    (no s x s scores kept), with a residual stream in fp32 and matmul outputs in bf16:
        4h (residual, RMSNorm 1 input) + 2h (norm output) + 2(h + 2 h_kv) (q, k, v) + 2h (attention output)
        + 4h (residual, RMSNorm 2 input) + 2h (norm output) + 8 f (gate, up, silu(gate), product)
        = 16h + 4 h_kv + 8f, with f = ffn_hidden_dim, or (experts_per_token + shared) x expert width for MoE.
    Without activation checkpointing: L x that x b x s. With it (each block recomputed in backward): the fp32
    block inputs, 4h x L x b x s, plus one block's full activations.

    Logits and loss: b x s x V x (2 bf16 logits + 4 fp32 upcast + 4 fp32 log-softmax kept for backward) =
    10 b s V bytes (F.cross_entropy(logits.float()) on GPU, llm_core/model.py).

    Total = (states + activations + logits) x 1.1 (allocator fragmentation) + 1.5 GiB (CUDA context, cuBLAS and
    NCCL workspaces). An estimate for planning, not a measurement: compare with `peak_mem` in the training logs.
    """
    # the padding rows of the embedding/head are not parameters anyone uses, but they are allocated and updated
    p = model.num_params() + (model.padded_vocab_size - model.require_vocab_size()) * model.dim * (
        1 if model.tie_embeddings else 2
    )
    h, hkv = model.dim, model.num_kv_heads * model.head_dim
    if lora:
        states, how = 4 * p, "lora"
    elif parallelism == "fsdp" and num_workers > 1:
        block = (model.num_params(include_embeddings=False) - h) / model.num_layers
        states, how = 16 * p / num_workers + 2 * 4 * block, f"fsdp/{num_workers}"
    else:
        states = 16 * p + (4 * p if num_workers > 1 else 0)
        how = f"ddp x{num_workers}" if num_workers > 1 else "1 worker"
    if resident_reference:
        states += 4 * p
    f = (
        (model.num_experts_per_token + model.num_shared_experts) * model.expert_hidden_dim
        if model.is_moe
        else model.ffn_hidden_dim
    )
    per_layer = (16 * h + 4 * hkv + 8 * f) * rows * seq_len
    if activation_checkpointing:
        acts = 4 * h * model.num_layers * rows * seq_len + per_layer
        how += ", activation checkpointing"
    else:
        acts = model.num_layers * per_layer
    logits = 10 * rows * seq_len * model.padded_vocab_size
    total = (states + acts + logits) * FRAGMENTATION / GiB + FIXED_OVERHEAD_GB
    return MemoryEstimate(states / GiB, acts / GiB, logits / GiB, total, how)


# --------------------------------------------------------------------------------------------- checking


@dataclass
class StageReport:
    stage: str
    summary: str = ""
    errors: list[str] = field(default_factory=list)


class RecipeCheckError(ConfigError):
    """One or more recipes fail their check; the message lists every failure with its fix."""


@dataclass
class Loaded:
    """One stage's validated config (None when it did not load) and its raw dict before validation."""

    config: Any
    raw: dict[str, Any]


class RecipeChecker:
    def __init__(self, recipe: RecipeConfig, source: Path, settings: Settings):
        self.recipe, self.source, self.settings = recipe, source, settings
        self.base = source.parent
        self.reports: dict[str, StageReport] = {}
        self.classes = stage_classes()
        self.serve_specs: dict[bool, ServeSpec] = {}

    # ------------------------------------------------------------------ helpers
    def report(self, stage: str) -> StageReport:
        return self.reports.setdefault(stage, StageReport(stage))

    def fail(self, stage: str, key: str, problem: str, fix: str) -> None:
        self.report(stage).errors.append(
            f"recipe {self.recipe.name} ({self.source.name}), stage {stage}, key {key}: {problem}: {fix}"
        )

    def stages(self) -> list[str]:
        out = []
        for s in STAGES:
            spec = getattr(self.recipe, s)
            if spec is not None and spec.enabled:
                out.append(s)
        return out

    def wiring(self, stage: str, raw: dict[str, Any]) -> list[str]:
        """The inputs the pipeline passes from earlier stages' results, as placeholders of the right form."""
        r, home = self.recipe, self.settings.home
        if stage == "preprocess":
            tok_name = self.tokenizer_name or "tokenizer"
            return [f"tokenizer.path={home / 'tokenizers' / tok_name}"]
        if stage in ("pretrain", "extend"):
            wired = [
                f"data.dataset={home / 'datasets' / (self.dataset_name or 'dataset')}",
                f"name={r.model_name}",
            ]
            # extend: the pipeline passes the version the pretrain stage registered (`--input init=`)
            return wired + ([f"init=models:/{r.model_name}@pretrain-latest"] if stage == "extend" else [])
        if stage in ("sft", "dpo"):
            prev = "pretrain" if stage == "sft" or r.sft is None else "sft"
            return [f"init=models:/{r.model_name}@{prev}-latest", f"name={r.model_name}"]
        if stage == "rl":
            prev = next(
                s for s in ("dpo", "sft", "pretrain") if getattr(r, s) is not None and getattr(r, s).enabled
            )
            return [f"init=models:/{r.model_name}@{prev}-latest", f"name={r.model_name}"]
        if stage == "distill":
            return [
                f"init=models:/{r.model_name}@pretrain-latest",
                f"teacher=models:/{r.model_name}@dpo-latest",
            ]
        if stage == "eval":
            last = next(
                s
                for s in ("rl", "dpo", "sft", "pretrain")
                if getattr(r, s) is not None and getattr(r, s).enabled
            )
            return [f"model.source=models:/{r.model_name}@{last}-latest", "promote=true"]
        if stage == "serve":
            return [f"models.0.source=models:/{r.model_name}@{r.serve.alias}"]
        return []

    def load(self, stage: str, extra: list[str], label: str) -> Loaded:
        """Load a stage's config file with the recipe's overrides, `extra` and the pipeline's wiring."""
        spec = getattr(self.recipe, stage)
        path = stage_config_path(stage, spec.config, self.base)
        if not path.is_file():
            self.fail(
                stage,
                "config",
                f"{path} does not exist",
                f"write it, or name an existing config in configs/{stage}/",
            )
            return Loaded(None, {})
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            raw = resolve_presets(copy.deepcopy(raw))
            data = apply_overrides(copy.deepcopy(raw), [*spec.overrides, *extra])
            if stage == "pretrain":
                data = self.with_vocab(data, label)
            data = apply_overrides(data, self.wiring(stage, data))
            cfg = validate_config(self.classes[stage], data, f"{path}{label}")
            if stage == "pretrain" and cfg.init is not None:
                cfg = self.with_init_model(cfg, label)
            elif stage == "pretrain" and self.tokenizer_vocab is not None:
                cfg = cfg.with_vocabulary(self.tokenizer_vocab)  # as jobs.pretrain does from the dataset
            return Loaded(cfg, data)
        except (ConfigError, ValueError) as exc:
            self.fail(
                stage, "config", f"{path}{label} does not load: {exc}", "fix the config or the overrides"
            )
            return Loaded(None, {})

    # ------------------------------------------------------------------ vocabulary
    tokenizer_name: str | None = None
    dataset_name: str | None = None
    derived_vocab: int | None = None
    tokenizer_vocab: int | None = None

    def with_vocab(self, data: dict[str, Any], label: str) -> dict[str, Any]:
        """Check a stated model.vocab_size against the tokenizer's; fill it in while ModelConfig still has it."""
        model = data.get("model")
        if isinstance(model, str):
            model = data["model"] = load_preset(model)
        if not isinstance(model, dict) or self.derived_vocab is None:
            return data
        stated = model.get("vocab_size")
        rehearsal_sets_vocab = any(
            o.split("=", 1)[0] == "model.vocab_size" for o in self.recipe.rehearsal.pretrain
        )
        if label and rehearsal_sets_vocab and stated != self.derived_vocab:
            self.fail(
                "rehearsal",
                "rehearsal.pretrain: model.vocab_size",
                f"{stated} != the tokenizer's {self.derived_vocab}",
                "a rehearsal keeps the real vocabulary: drop that override",
            )
        if stated is not None and not label:
            where = self.model_source()
            self.fail(
                "pretrain",
                "model.vocab_size",
                f"{where} states vocab_size {stated}, but the vocabulary is the tokenizer's: "
                f"{self.tokenizer_name} produces {self.tokenizer_vocab} tokens (embedding {self.derived_vocab}, "
                f"rounded up to a multiple of {VOCAB_MULTIPLE}); jobs.pretrain refuses a stated vocab_size",
                f"remove vocab_size from {where}, or change the tokenizer's tokenizer.vocab_size",
            )
        model.pop("vocab_size", None)  # jobs.pretrain sets it from the dataset's tokenizer
        return data

    def model_source(self) -> str:
        spec = self.recipe.pretrain
        if any(o.split("=", 1)[0] == "model.vocab_size" for o in spec.overrides):
            return f"the recipe's pretrain override model.vocab_size ({self.source})"
        path = stage_config_path("pretrain", spec.config, self.base)
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(raw.get("model"), str):
            preset_overrides = [o for o in spec.overrides if o.split("=", 1)[0] == "model"]
            name = preset_overrides[-1].split("=", 1)[1] if preset_overrides else raw["model"]
            return f"model preset configs/model/{name}.yaml"
        return f"the model section of {path}"

    # ------------------------------------------------------------------ continued pretraining (init)
    def with_init_model(self, cfg: Any, label: str) -> Any:
        """A pretrain stage with its own `init` (an HF directory): its model is the init's config with the stage's
        model keys applied (jobs.pretrain.merged_model_config, from config.json alone), and its vocabulary must be
        the recipe tokenizer's size (the tokenizer itself is trained by the recipe, so its files cannot be compared
        before it runs; jobs.pretrain compares them before training)."""
        from jobs.pretrain import merged_model_config
        from llm_core.export_hf import model_config_from_hf

        init = str(cfg.init)
        if init.startswith("models:/"):
            raise ConfigError(
                f"init {init!r}: the recipe check reads an init's config without a registry, and a registered "
                "model is known only once it is trained: continue from this recipe's own pretrained model with an "
                "`extend:` stage, or give init as an HF directory"
            )
        config_json = Path(init) / "config.json"
        if not config_json.is_file():
            raise ConfigError(
                f"init {init!r} has no config.json: give an HF model directory (export_hf, or a downloaded one)"
            )
        import json

        init_cfg = model_config_from_hf(json.loads(config_json.read_text(encoding="utf-8")))
        if self.tokenizer_vocab is not None and init_cfg.vocab_size != self.tokenizer_vocab:
            raise ConfigError(
                f"init {init!r} has vocab_size {init_cfg.vocab_size}, but this recipe's tokenizer "
                f"{self.tokenizer_name} produces {self.tokenizer_vocab} tokens: continued pretraining needs the "
                "init's vocabulary; preprocess with the init model's tokenizer, or pick an init trained on this one"
            )
        return cfg.with_model(merged_model_config(init_cfg, cfg.model, init))

    def check_extension(self, ext: Loaded, base: ModelConfig, base_seq_len: int) -> ModelConfig | None:
        """The extend stage continues from the pretrain stage's model: its model is that one with the stage's
        model keys (only max_seq_len and rope_scaling may change; the vocabulary is the same tokenizer's), its
        RoPE scaling starts from the length the model was trained at, and it trains at a longer seq_len."""
        from jobs.pretrain import merged_model_config

        where = "extend"
        try:
            model = merged_model_config(base, ext.config.model, "the pretrain stage's model")
        except ValueError as exc:
            self.fail(
                "extend", "model", f"{where}: {exc}", "change only model.max_seq_len and model.rope_scaling"
            )
            return None
        scaling, train = model.rope_scaling, ext.config.train
        if scaling is not None and scaling.original_max_seq_len != base_seq_len:
            self.fail(
                "extend",
                "model.rope_scaling.original_max_seq_len",
                f"{where}: {scaling.original_max_seq_len}, but the pretrain stage trains at train.seq_len "
                f"{base_seq_len}: the scaling maps the new positions onto the ones the model was trained at",
                f"set model.rope_scaling.original_max_seq_len: {base_seq_len} (and factor: max_seq_len / "
                f"{base_seq_len})",
            )
        if train.seq_len <= base_seq_len:
            self.fail(
                "extend",
                "train.seq_len",
                f"{train.seq_len} is not longer than the pretrain stage's {base_seq_len}: nothing is extended",
                f"train at the new context: train.seq_len up to model.max_seq_len {model.max_seq_len}",
            )
        return model

    # ------------------------------------------------------------------ the checks
    def run(self) -> dict[str, StageReport]:
        stages = self.stages()
        for stage in ("tokenizer", "preprocess", "pretrain"):
            if stage not in stages:
                self.fail(
                    stage, stage, "missing or disabled", f"name its config: {stage}: {{config: <name>}}"
                )
        loaded: dict[str, Loaded] = {}
        for stage in stages:
            loaded[stage] = self.load_stage(stage)
        rehearsal = {stage: self.load_stage(stage, rehearsal=True) for stage in stages}
        self.check_tokenizer(loaded.get("tokenizer"))
        model = base = self.check_model(loaded.get("pretrain"))
        for stage in stages:
            cfg = loaded[stage].config
            if cfg is None:
                continue
            if stage == "extend" and base is not None:  # from here on, the model is the extended one
                model = self.check_extension(loaded[stage], base, loaded["pretrain"].config.train.seq_len)
            self.check_paths(stage, cfg)
            if model is not None:
                self.check_stage(stage, cfg, model)
        self.check_rehearsal(loaded, rehearsal, model)
        self.check_aliases(loaded.get("eval"), rehearsal=False)
        self.check_aliases(rehearsal.get("eval"), rehearsal=True)
        for stage in stages:
            self.report(stage)
        return self.reports

    def load_stage(self, stage: str, rehearsal: bool = False) -> Loaded:
        if stage == "serve":
            return self.load_serve(rehearsal)
        extra = list(getattr(self.recipe.rehearsal, stage)) if rehearsal else []
        out = self.load(stage, extra, " + rehearsal" if rehearsal else "")
        if not rehearsal and out.config is not None:
            if stage == "tokenizer":
                self.tokenizer_name = out.config.name
                self.tokenizer_vocab = out.config.tokenizer.vocab_size
                self.derived_vocab = padded_vocab(self.tokenizer_vocab)
            elif stage == "preprocess":
                self.dataset_name = out.config.name
        return out

    def load_serve(self, rehearsal: bool) -> Loaded:
        spec_items, config_items = split_serve_overrides(
            list(self.recipe.rehearsal.serve) if rehearsal else []
        )
        try:
            data = apply_overrides(self.recipe.serve.model_dump(), spec_items)
            self.serve_specs[rehearsal] = validate_config(ServeSpec, data, "rehearsal.serve")
        except ConfigError as exc:
            self.fail("serve", "rehearsal.serve", str(exc), "fix the override")
        return self.load("serve", config_items, " + rehearsal" if rehearsal else "")

    def check_aliases(self, evals: Loaded | None, rehearsal: bool) -> None:
        """The pipeline serves the alias the gate moves: serve.alias must be the eval gate's alias."""
        spec = self.serve_specs.get(rehearsal)
        if evals is None or evals.config is None or spec is None or not spec.enabled:
            return
        gate = evals.config.gate.alias
        if spec.alias != gate:
            where = "rehearsal.serve: alias" if rehearsal else "serve.alias"
            self.fail(
                "rehearsal" if rehearsal else "serve",
                where,
                f"serves @{spec.alias}, but the eval gate promotes to @{gate}"
                + (" with the rehearsal overrides" if rehearsal else ""),
                f"serve the alias the gate moves: set {where.replace(': ', ' ')}={gate}, or change the eval's "
                "gate.alias",
            )

    def check_tokenizer(self, tok: Loaded | None) -> None:
        if tok is None or tok.config is None:
            return
        self.report("tokenizer").summary = (
            f"{tok.config.name}: {self.tokenizer_vocab} tokens (special tokens included) -> embedding "
            f"{self.derived_vocab}"
        )

    def check_model(self, pre: Loaded | None) -> ModelConfig | None:
        if pre is None or pre.config is None:
            return None
        model: ModelConfig = pre.config.model
        if model.vocab_size is None:  # the tokenizer stage did not load: nothing to size the model with
            return None
        return model

    def head_dims_for(self, serve_cfg: Any) -> tuple[str, tuple[int, ...]]:
        return ("GPU", VLLM_GPU_HEAD_DIMS) if serve_cfg.use_gpu else ("CPU", VLLM_CPU_HEAD_DIMS)

    def check_stage(self, stage: str, cfg: Any, model: ModelConfig) -> None:
        rep = self.report(stage)
        if stage == "preprocess":
            rep.summary = (
                f"dataset {cfg.name}: {len(cfg.sources)} sources, languages {','.join(cfg.languages)}"
            )
        elif stage in TRAINING_STAGES:
            self.check_training(stage, cfg, model)
        elif stage == "eval":
            window = cfg.scoring.window or model.max_seq_len
            if window > model.max_seq_len:
                self.fail(
                    stage,
                    "scoring.window",
                    f"{window} > model.max_seq_len {model.max_seq_len}",
                    f"set scoring.window <= {model.max_seq_len} (or null: the model's max_seq_len)",
                )
            self.check_gate(cfg, model)
            rep.summary = (
                f"suite {cfg.name}: {len(cfg.text)} text sets, {len(cfg.multiple_choice)} multiple-choice suites, "
                f"gate {len(cfg.gate.rules)} rules -> @{cfg.gate.alias}"
            )
        elif stage == "serve":
            target, dims = self.head_dims_for(cfg)
            if model.head_dim not in dims:
                self.fail(
                    stage,
                    "model.dim/model.num_heads",
                    f"head_dim {model.head_dim} (dim {model.dim} / {model.num_heads} heads) is not servable by "
                    f"vLLM on {target} (head sizes {list(dims) if target == 'CPU' else 'multiples of 8 up to 256'})",
                    f"choose dim and num_heads so that dim / num_heads is one of {dims[:8]}..., or serve on "
                    f"{'GPU (use_gpu: true)' if target == 'CPU' else 'CPU'} if that target supports it",
                )
            for i, m in enumerate(cfg.models):
                if m.max_model_len is not None and m.max_model_len > model.max_seq_len:
                    self.fail(
                        stage,
                        f"models.{i}.max_model_len",
                        f"{m.max_model_len} > model.max_seq_len {model.max_seq_len}",
                        f"set it <= {model.max_seq_len}",
                    )
            ok = "servable" if model.head_dim in dims else "NOT servable"
            rep.summary = f"{target}, head_dim {model.head_dim} {ok}, alias @{self.recipe.serve.alias}"

    def check_gate(self, cfg: Any, model: ModelConfig) -> None:
        """The pipeline runs the eval with --promote: the gate needs rules, on metrics the suite produces for this
        model (a passkey length that does not fit the model's max_seq_len is skipped, so its metrics never come)."""
        from jobs.eval import check_config

        if not cfg.gate.rules:
            self.fail(
                "eval",
                "gate.rules",
                "empty, but the pipeline evaluates with --promote, which moves the alias only when rules hold",
                "add gate rules (e.g. {metric: passkey/all/acc, max_abs_regression: 0.1})",
            )
            return
        try:
            check_config(cfg.model_copy(update={"promote": False}))  # promote: needs the registry
        except ValueError as exc:
            self.fail("eval", "gate.rules", str(exc), "gate on metrics the suite produces")
        passkey = cfg.long_context.passkey
        if passkey is None:
            return
        room = max(passkey.answer_tokens, passkey.digits + 1)
        for n in passkey.lengths:
            if n + room <= model.max_seq_len:
                continue
            for rule in cfg.gate.rules:
                if rule.metric.startswith(f"passkey/{n}/"):
                    self.fail(
                        "eval",
                        "gate.rules",
                        f"{rule.metric}: passkey length {n} + {room} answer tokens exceeds the model's max_seq_len "
                        f"{model.max_seq_len}, so the length is skipped and the metric never produced",
                        f"gate on a passkey length up to {model.max_seq_len - room}",
                    )

    def check_training(self, stage: str, cfg: Any, model: ModelConfig) -> None:
        hw, train, ray = self.recipe.hardware, cfg.train, cfg.ray
        rep = self.report(stage)
        if train.seq_len > model.max_seq_len:
            self.fail(
                stage,
                "train.seq_len",
                f"{train.seq_len} > model.max_seq_len {model.max_seq_len}",
                f"set train.seq_len <= {model.max_seq_len} or raise the model's max_seq_len",
            )
        workers = ray.num_workers
        accum = train.accum_steps(workers)
        tokens = train.batch_size * train.seq_len * accum * workers
        parts = [
            f"{model.num_params() / 1e6:.1f}M params" if stage == "pretrain" else "",
            f"seq {train.seq_len}<={model.max_seq_len}",
            f"{train.batch_size}x{train.seq_len}x{accum}x{workers}={tokens} tok/step",
        ]
        if stage == "extend":
            scaling = model.rope_scaling
            parts[0] = f"from the pretrain stage's model, max_seq_len {model.max_seq_len}" + (
                f" ({scaling.type} x{scaling.factor:g} from {scaling.original_max_seq_len})"
                if scaling
                else ""
            )
        if stage in ("pretrain", "extend"):
            if stage == "pretrain":
                parts[0] = (
                    f"{model.num_params() / 1e6:.1f}M params (vocab {model.vocab_size}), head_dim {model.head_dim}"
                )
                if cfg.init is not None:
                    parts[0] += f", from init {cfg.init}"
            if train.tokens_per_step is not None and tokens != train.tokens_per_step:
                self.fail(
                    stage,
                    "train.tokens_per_step",
                    f"{train.tokens_per_step} is not a whole number of micro-batches: batch_size {train.batch_size}"
                    f" x seq_len {train.seq_len} x num_workers {workers} x accumulation {accum} gives {tokens}",
                    f"set train.tokens_per_step to a multiple of {train.batch_size * train.seq_len * workers}",
                )
            if stage == "pretrain" and hw.tokens_per_step is not None and tokens != hw.tokens_per_step:
                self.fail(
                    stage,
                    "hardware.tokens_per_step",
                    f"the recipe states {hw.tokens_per_step} tokens per step, but batch_size {train.batch_size} x "
                    f"seq_len {train.seq_len} x accumulation {accum} x num_workers {workers} = {tokens}",
                    f"set hardware.tokens_per_step: {tokens}, or change train.batch_size / train.tokens_per_step / "
                    "ray.num_workers",
                )
        if ray.use_gpu and hw.accelerator != "gpu":
            self.fail(
                stage,
                "ray.use_gpu",
                f"true, but hardware.accelerator is {hw.accelerator}",
                "set hardware.accelerator: gpu with gpu_type and gpu_memory_gb, or ray.use_gpu=false",
            )
        if ray.use_gpu and hw.accelerator == "gpu":
            if hw.gpu_memory_gb is None:
                self.fail(stage, "hardware.gpu_memory_gb", "missing", "state the memory of one GPU, e.g. 80")
            else:
                est = estimate_gpu_memory(
                    model,
                    rows=train.batch_size * (2 if stage == "dpo" else 1),
                    seq_len=train.seq_len,
                    num_workers=workers,
                    parallelism=ray.parallelism,
                    activation_checkpointing=train.activation_checkpointing,
                    lora=getattr(cfg, "lora", None) is not None,
                    resident_reference=stage == "dpo" and getattr(cfg, "reference", None) is not None,
                )
                parts.append(f"~{est.total_gb:.1f} of {hw.gpu_memory_gb:g} GB/GPU ({est.how})")
                if est.total_gb > hw.gpu_memory_gb:
                    self.fail(
                        stage,
                        "train.batch_size",
                        f"estimated {est.total_gb:.1f} GB per worker ({est.how}: states {est.states_gb:.1f}, "
                        f"activations {est.activations_gb:.1f}, logits {est.logits_gb:.1f}) exceeds "
                        f"{hw.gpu_type or 'the GPU'}'s {hw.gpu_memory_gb:g} GB",
                        "lower train.batch_size (raise train.tokens_per_step accumulation instead), enable "
                        "train.activation_checkpointing, or use ray.parallelism=fsdp over more workers",
                    )
        rep.summary = ", ".join(p for p in parts if p)

    # ------------------------------------------------------------------ paths
    def check_paths(self, stage: str, cfg: Any) -> None:
        for key, value in walk_strings(cfg.model_dump(mode="json")):
            if points_into_tests(value):
                self.fail(
                    stage,
                    key,
                    f"{value!r} points into tests/ (test fixtures are not shipped in the images)",
                    "move the file to TULPAR_DATA or configs/ and point there",
                )
        for key, value, bases in input_paths(stage, cfg, self.settings):
            if "://" in value:
                continue
            p = Path(value)
            candidates = [p] if p.is_absolute() else [b / p for b in bases]
            if not any(glob.glob(str(c)) if glob.has_magic(str(c)) else c.exists() for c in candidates):
                self.fail(
                    stage,
                    key,
                    f"{value!r} not found (looked at {', '.join(str(c) for c in candidates)})",
                    f"fix the path, or set TULPAR_DATA (now {self.settings.data}) to the data directory",
                )

    # ------------------------------------------------------------------ rehearsal
    def check_rehearsal(
        self, real: dict[str, Loaded], reh: dict[str, Loaded], model: ModelConfig | None
    ) -> None:
        rep = self.report("rehearsal")
        if any(x.config is None for x in reh.values()):
            return  # already reported by load()
        tok_r = reh.get("tokenizer")
        if (
            tok_r
            and self.tokenizer_vocab is not None
            and tok_r.config.tokenizer.vocab_size != self.tokenizer_vocab
        ):
            self.fail(
                "rehearsal",
                "rehearsal.tokenizer: tokenizer.vocab_size",
                f"{tok_r.config.tokenizer.vocab_size} != the recipe's {self.tokenizer_vocab}",
                "a rehearsal keeps the real vocabulary: drop that override",
            )
        pre, pre_r = real.get("pretrain"), reh.get("pretrain")
        if pre and pre_r and pre.config is not None:
            a = pre.config.model.model_dump()
            b = pre_r.config.model.model_dump()
            for k in SHAPE_KEYS:
                if a.get(k) != b.get(k):
                    self.fail(
                        "rehearsal",
                        f"rehearsal.pretrain: model.{k}",
                        f"{b.get(k)} != the recipe's {a.get(k)}",
                        "a rehearsal keeps the real shapes: drop that override",
                    )
        for stage in TRAINING_STAGES:
            if stage not in reh or real[stage].config is None:
                continue
            cr = reh[stage].config
            if stage == "extend":
                # the extended model's shapes stay (max_seq_len, rope_scaling); its rehearsal may train at a shorter
                # seq_len: attention over e.g. 32k tokens on CPU takes hours a step
                if cr.model != real[stage].config.model:
                    self.fail(
                        "rehearsal",
                        "rehearsal.extend: model",
                        f"{cr.model} != the recipe's {real[stage].config.model}",
                        "a rehearsal keeps the real shapes: drop that override",
                    )
            elif cr.train.seq_len != real[stage].config.train.seq_len:
                self.fail(
                    "rehearsal",
                    f"rehearsal.{stage}: train.seq_len",
                    f"{cr.train.seq_len} != the recipe's {real[stage].config.train.seq_len}",
                    "a rehearsal keeps the real seq_len: drop that override",
                )
            if cr.ray.use_gpu:
                self.fail(
                    "rehearsal",
                    f"rehearsal.{stage}: ray.use_gpu",
                    "true: a rehearsal runs on this machine's CPUs",
                    f"add ray.use_gpu=false (and ray.num_workers=1) to rehearsal.{stage}",
                )
        if "serve" in reh:
            cfg = reh["serve"].config
            if cfg.use_gpu:
                self.fail(
                    "rehearsal",
                    "rehearsal.serve: use_gpu",
                    "true: a rehearsal serves on this machine's CPU",
                    "add use_gpu=false to rehearsal.serve",
                )
            elif (
                model is not None
                and model.head_dim not in VLLM_CPU_HEAD_DIMS
                and real["serve"].config is not None
                and real["serve"].config.use_gpu  # on CPU already reported by the serve stage
            ):
                self.fail(
                    "rehearsal",
                    "model.dim/model.num_heads",
                    f"head_dim {model.head_dim} is not servable by vLLM on CPU ({list(VLLM_CPU_HEAD_DIMS)})",
                    "the rehearsal cannot serve this model here: choose a CPU-servable head_dim",
                )
        steps = {s: reh[s].config.train.steps for s in TRAINING_STAGES if s in reh}
        rep.summary = "same shapes, CPU, steps " + " ".join(f"{s} {n}" for s, n in steps.items())


def walk_strings(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every string in a config dump."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += walk_strings(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            out += walk_strings(v, f"{prefix}.{i}")
    elif isinstance(node, str):
        out.append((prefix, node))
    return out


def points_into_tests(value: str) -> bool:
    """A relative path with a `tests` component, or an absolute one inside the repository's tests/."""
    if "/" not in value:
        return False
    p = Path(value)
    if p.is_absolute():
        return p.resolve().is_relative_to(REPO_ROOT / "tests")
    return "tests" in p.parts


def input_paths(stage: str, cfg: Any, settings: Settings) -> list[tuple[str, str, list[Path]]]:
    """(key, path, where a relative path is looked up) for each input file or directory a stage reads, the
    same lookups the jobs do. Paths the pipeline fills in from earlier stages (tokenizer dir, dataset, models)
    are outputs, not inputs, and are not listed."""
    data, repo = settings.data, REPO_ROOT
    out: list[tuple[str, str, list[Path]]] = []
    if stage == "tokenizer":
        d = cfg.data
        if d.source == "raw":
            out += [("data.corpus_dir", f"{d.corpus_dir}/{lang}", [data]) for lang in d.budgets]
        out += [(f"data.chat_sources.{i}", f, [data]) for i, f in enumerate(d.chat_sources)]
        for i, e in enumerate(cfg.report.eval_sets):  # the report reads the files of the trained languages
            files = [f for lang, f in e.files.items() if lang in d.budgets]
            out += [(f"report.eval_sets.{i}", f"{e.dir}/{f}", [data]) for f in files]
        for i, ref in enumerate(cfg.report.references):
            if ref.path is not None:
                bases = [Path.cwd(), settings.home / "tokenizers", data / "tokenizers"]
                out.append((f"report.references.{i}", ref.path, bases))
    elif stage == "preprocess":
        out += [(f"sources.{i}.path", s.path, [data]) for i, s in enumerate(cfg.sources)]
    elif stage in ("sft", "dpo", "distill"):
        out += [(f"data.files.{i}", f, [data, Path.cwd()]) for i, f in enumerate(cfg.data.files)]
    elif stage == "rl":
        out += [(f"prompts.files.{i}", f, [data, Path.cwd()]) for i, f in enumerate(cfg.prompts.files)]
    elif stage == "eval":
        bases = [data, Path.cwd(), repo]  # jobs.evaluation.text.resolve_path
        for i, t in enumerate(cfg.text):
            out += [(f"text.{i}.files.{lang}", f, bases) for lang, f in t.files.items()]
        for i, m in enumerate(cfg.multiple_choice):
            out += [
                (f"multiple_choice.{i}.{k}", getattr(m, k), bases)
                for k in ("path", "fewshot_path")
                if getattr(m, k)
            ]
    return out


# --------------------------------------------------------------------------------------------- CLI


def check_recipes(names: list[str] | None, settings: Settings, out=print) -> list[str]:
    """Check the named recipes (default: all); print one line per stage; return every failure message."""
    from pipelines.recipes import recipe_path

    failures: list[str] = []
    for name in names or list_recipes():
        try:
            recipe = load_recipe(name)
        except ConfigError as exc:
            failures.append(f"recipe {name}: {exc}")
            out(f"{name:<14} recipe      FAIL")
            continue
        reports = RecipeChecker(recipe, recipe_path(name), settings).run()
        order = [s for s in (*STAGES, "rehearsal") if s in reports]
        for stage in order:
            rep = reports.get(stage)
            if rep is None:
                continue
            status = "FAIL" if rep.errors else "ok  "
            out(f"{recipe.name:<14} {stage:<11} {status} {rep.summary}".rstrip())
            failures += rep.errors
    return failures


def run_check(names: list[str] | None, settings: Settings | None = None) -> None:
    """Raise RecipeCheckError (a ValueError: exit 2) listing every failure, after printing the stage lines."""
    failures = check_recipes(names, settings or Settings.from_env())
    if failures:
        raise RecipeCheckError(f"{len(failures)} recipe check(s) failed:\n  " + "\n  ".join(failures))
