"""Export llm_core models to Hugging Face format, and import Hugging Face checkpoints back.

A dense model becomes a `LlamaForCausalLM` directory, an MoE model with shared experts a `Qwen2MoeForCausalLM`
directory and an MoE model without them a `MixtralForCausalLM` directory; a dense model with multi-head latent
attention (attention: mla) a `DeepseekV3ForCausalLM` directory (every layer dense: first_k_dense_replace =
num_hidden_layers); all load with
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and serve with vLLM, giving the same logits as llm_core.
`check_exportable` says which configs export at all (run at config validation, before training).
DeepSeek-V3's MoE (sigmoid router, ungated shared experts) exports only as DeepseekV3ForCausalLM, which needs MLA
attention: `check_deepseek_v3_moe`, `deepseek_v3_moe_config` and `deepseek_v3_moe_key_plan` are its MoE part.

Layout written by `export_hf`:

    config.json              HF model config (architecture, RoPE parameters, special token ids, dtype)
    model.safetensors        weights under HF key names; MoE experts in the legacy per-expert layout
                             (`mlp.experts.{e}.gate_proj.weight`), which both transformers and vLLM load
    generation_config.json   special token ids and sampling defaults
    tulpar_config.json       the exact llm_core ModelConfig, so `load_hf` restores it field for field
    tokenizer.json, ...      when a tokenizer is given (written by `tokenizer.save(dir)`)

`load_hf` reads such a directory, or any HF Llama / Qwen2-MoE / Mixtral checkpoint whose architecture llm_core can
represent exactly, and raises ValueError naming the offending value and the fix otherwise.

Key mapping (i = layer, e = expert; Qwen2-MoE names, Mixtral's below):

    model.embed_tokens.weight                          embed_tokens.weight
    model.layers.i.input_layernorm.weight              layers.i.attn_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.weight     layers.i.attn.{q,k,v,o}_proj.weight
    model.layers.i.self_attn.{q,k,v}_proj.bias         (none: all zeros, MoE only; see QWEN2_MOE_ZERO_QKV_BIAS)
    model.layers.i.post_attention_layernorm.weight     layers.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight      layers.i.mlp.{gate,up,down}_proj.weight     (dense)
    model.layers.i.mlp.gate.weight                     layers.i.mlp.router.weight                  (MoE)
    model.layers.i.mlp.experts.e.gate_proj.weight      layers.i.mlp.w_gate[e]                      (MoE)
    model.layers.i.mlp.experts.e.up_proj.weight        layers.i.mlp.w_up[e]                        (MoE)
    model.layers.i.mlp.experts.e.down_proj.weight      layers.i.mlp.w_down[e]                      (MoE)
    model.layers.i.mlp.shared_expert.X.weight          layers.i.mlp.shared.X.weight                (MoE)
    model.layers.i.mlp.shared_expert_gate.weight       layers.i.mlp.shared_gate.weight             (MoE)
    model.norm.weight                                  norm.weight
    lm_head.weight                                     lm_head.weight     (absent when embeddings are tied)

Mixtral (no shared experts, no attention biases) names its MoE tensors as the original Mixtral checkpoints do,
which transformers (converting to its fused layout on load) and vLLM both read:

    model.layers.i.block_sparse_moe.gate.weight        layers.i.mlp.router.weight
    model.layers.i.block_sparse_moe.experts.e.w1.weight  layers.i.mlp.w_gate[e]
    model.layers.i.block_sparse_moe.experts.e.w3.weight  layers.i.mlp.w_up[e]
    model.layers.i.block_sparse_moe.experts.e.w2.weight  layers.i.mlp.w_down[e]

DeepseekV3 (MLA) attention tensors, same names on both sides (q_proj, or q_a_proj/q_a_layernorm/q_b_proj with
q_lora_rank; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj under self_attn / attn). llm_core rotates the
qk_rope_head_dim rotary dims in Llama's rotate-half layout (pairs i, i + r/2); DeepseekV3 in transformers
(rope_interleave: true) and vLLM rotate interleaved pairs (2i, 2i + 1). The export therefore reorders the rotary
output rows of q_proj / q_b_proj (per head) and of kv_a_proj_with_mqa (its last r rows) so that HF row 2i is our
row i and HF row 2i + 1 our row i + r/2; the import undoes it. Query/key dot products, hence logits, are unchanged.

Routing is the same computation on both sides: softmax over all experts (fp32), top-k, and the k weights
renormalised to sum to 1 (Mixtral always renormalises, so norm_topk_prob must be true to export as Mixtral).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from llm_core.artifacts import check_safetensors
from llm_core.checkpoint import unwrap_model
from llm_core.config import ConfigError, ModelConfig, RopeScaling
from llm_core.io import atomic_dir, tensor_bytes
from llm_core.model import Transformer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Qwen2-MoE exports carry explicit all-zero q/k/v biases (config qkv_bias: true). vLLM 0.32's Qwen2MoeAttention
# builds qkv_proj with bias=True whatever config.qkv_bias says, and a checkpoint without bias tensors leaves that
# bias uninitialised (torch.empty: NaN logits); transformers honours qkv_bias either way. Zero biases are exact in
# both. Set False to write the bias-free layout (qkv_bias: false) once vLLM honours the flag.
QWEN2_MOE_ZERO_QKV_BIAS = True

# Sampling defaults `export_hf(generation=...)` may set in generation_config.json.
GENERATION_KEYS = frozenset(
    {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"}
)

# ModelConfig fields that are not architecture: they may differ between tulpar_config.json and config.json.
_NON_ARCH_FIELDS = frozenset({"name", "dropout", "init_std", "aux_loss_coef", "router_bias_update_rate"})


class TokenizerLike(Protocol):
    """What `export_hf` needs from a tokenizer: special token ids and a `save(dir)` writing tokenizer files."""

    bos_id: int
    eos_id: int
    pad_id: int

    def save(self, directory: str | Path) -> Any: ...


# ------------------------------------------------------------------------------------------- config


def _dtype_name(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    return dtype


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """HF `rope_parameters` reproducing llm_core's `rope_inv_freq` exactly (see transformers' modeling_rope_utils)."""
    rs = cfg.rope_scaling
    if rs is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs.type == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_seq_len,
        }
    # YaRN. transformers takes `factor` as given (only a missing factor falls back to max_position_embeddings /
    # original_max_position_embeddings, which ModelConfig guarantees equal anyway), derives attention_factor =
    # 0.1 * ln(factor) + 1 when neither attention_factor nor mscale/mscale_all_dim is set, and floors/ceils the
    # correction range (`truncate` defaults to true): all as llm_core does, so those keys are left out.
    return {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": rs.factor,
        "beta_fast": rs.beta_fast,
        "beta_slow": rs.beta_slow,
        "original_max_position_embeddings": rs.original_max_seq_len,
    }


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF `model_type` `cfg` exports to: "llama" (dense), "qwen2_moe" (MoE with shared experts),
    "mixtral" (MoE without shared experts) or "deepseek_v3" (multi-head latent attention)."""
    if cfg.is_mla:
        return "deepseek_v3"
    if not cfg.is_moe:
        return "llama"
    return "qwen2_moe" if cfg.num_shared_experts else "mixtral"


# The fix for an MoE that only DeepSeek-V3 can represent (sigmoid router, ungated shared experts).
_DEEPSEEK_V3_FIX = "use attention: mla to export as DeepSeek-V3 (DeepseekV3ForCausalLM)"


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError (a ValueError) naming the `model.*` key and the fix if `cfg` has no exact HF export.

    Needs no vocabulary, so training jobs call it when their config is validated, before any training starts.
    An MoE exports as Qwen2-MoE (softmax router, gated shared experts) or Mixtral (softmax router, no shared
    experts); DeepSeek-V3's MoE (sigmoid router, ungated shared experts) needs MLA attention and is checked by
    `check_deepseek_v3_moe`.
    """
    if cfg.is_mla:
        if cfg.is_moe:
            check_deepseek_v3_moe(cfg)
        if cfg.norm_eps != 1e-6:
            raise ConfigError(
                f"model.norm_eps = {cfg.norm_eps:g} with model.attention = mla cannot be exported exactly: "
                "transformers' DeepseekV3 normalises the latents (kv_a_layernorm, q_a_layernorm) with eps 1e-6 "
                "whatever rms_norm_eps says, vLLM with rms_norm_eps; set model.norm_eps: 1.0e-6 so both agree"
            )
        if cfg.rope_scaling is not None and cfg.rope_scaling.type != "yarn":
            raise ConfigError(
                f"model.rope_scaling.type = {cfg.rope_scaling.type} with model.attention = mla cannot be "
                "exported: vLLM's DeepSeek models read any RoPE scaling as DeepSeek YaRN; use type: yarn"
            )
        return
    if cfg.is_moe:  # GQA attention: Qwen2-MoE or Mixtral
        if cfg.router_score == "sigmoid":
            raise ConfigError(
                "model.router_score = 'sigmoid' cannot be exported with GQA attention: Qwen2-MoE and Mixtral route by "
                "softmax, so transformers and vLLM would pick other experts with other weights. Set "
                f"model.router_score: softmax, or {_DEEPSEEK_V3_FIX}"
            )
        if cfg.num_shared_experts and not cfg.shared_expert_gate:
            raise ConfigError(
                "model.shared_expert_gate = false cannot be exported with GQA attention: Qwen2-MoE's shared expert "
                "always sits behind a sigmoid gate. Set model.shared_expert_gate: true, or use a sigmoid router "
                f"(model.router_score: sigmoid) and {_DEEPSEEK_V3_FIX}"
            )
    if hf_architecture(cfg) == "mixtral" and not cfg.norm_topk_prob:
        raise ConfigError(
            f"model.norm_topk_prob = false with model.num_shared_experts = 0 cannot be exported: an MoE without "
            f"shared experts exports as Mixtral, whose router always renormalises the top-{cfg.num_experts_per_token} "
            "softmax weights to sum to 1 (llm_core would weight the experts by the raw softmax probabilities, "
            "giving different logits). Set model.norm_topk_prob: true, or add a shared expert "
            "(model.num_shared_experts: 1, exported as Qwen2-MoE, which honours norm_topk_prob)"
        )


def check_deepseek_v3_moe(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the `model.*` key and the fix if `cfg`'s MoE has no exact DeepseekV3ForCausalLM
    layout (a dense model has none to check: it exports with first_k_dense_replace = num_layers).

    transformers' DeepseekV3 always routes by sigmoid scores + e_score_correction_bias and always adds ungated
    shared experts of width n_shared_experts * moe_intermediate_size; its group-limited top-k (n_group = 1 here)
    takes the top 2 scores of the group, so it needs at least 2 routed experts.
    """
    if not cfg.is_moe:
        return
    problems = []
    if cfg.router_score != "sigmoid":
        problems.append(
            "model.router_score = 'softmax': DeepSeek-V3 routes by sigmoid scores (transformers ignores "
            "scoring_func); set model.router_score: sigmoid"
        )
    if not cfg.num_shared_experts:
        problems.append(
            "model.num_shared_experts = 0: DeepSeek-V3's MoE always has shared experts; set "
            "model.num_shared_experts: 1 (or more)"
        )
    elif cfg.shared_expert_gate:
        problems.append(
            "model.shared_expert_gate = true: DeepSeek-V3's shared experts have no gate; set "
            "model.shared_expert_gate: false"
        )
    if cfg.num_experts < 2:
        problems.append(
            f"model.num_experts = {cfg.num_experts}: DeepSeek-V3's router needs at least 2 routed experts"
        )
    if problems:
        raise ConfigError("this MoE cannot be exported as DeepSeek-V3: " + "; ".join(problems))


def deepseek_v3_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    """The MoE keys of a DeepseekV3ForCausalLM config.json for `cfg` (MoE in every layer), as the installed
    transformers (DeepseekV3Config, DeepseekV3TopkRouter) and vLLM (deepseek_v2.py: `scoring_func` and
    `topk_method: noaux_tc`, which makes it load and apply e_score_correction_bias) read them."""
    check_deepseek_v3_moe(cfg)
    return {
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": cfg.num_shared_experts,
        "moe_intermediate_size": cfg.expert_hidden_dim,
        "num_experts_per_tok": cfg.num_experts_per_token,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
    }


def hf_config(
    cfg: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The HF `config.json` dict for `cfg`: LlamaForCausalLM when dense, Qwen2MoeForCausalLM for an MoE with shared
    experts, MixtralForCausalLM for one without.

    Token ids are always written (None as null) so transformers' class defaults (Llama's bos 1 / eos 2) never apply.
    MoE configs say qkv_bias: true, matching the all-zero bias tensors `to_hf_state_dict` writes (see
    QWEN2_MOE_ZERO_QKV_BIAS). Raises ValueError for a config `check_exportable` refuses.
    """
    dtype = _dtype_name(dtype)
    for field, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(
                f"{field} = {value} is outside the vocabulary [0, {cfg.vocab_size}): check the tokenizer"
            )
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": _rope_parameters(cfg),
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # read by transformers 4 and older tools; transformers 5 prefers `dtype`
    }
    if cfg.is_mla:
        check_exportable(cfg)
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            "num_key_value_heads": cfg.num_heads,  # MLA: every head has its own decompressed key and value
            "kv_lora_rank": cfg.kv_lora_rank,
            "q_lora_rank": cfg.q_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "rope_interleave": True,  # what vLLM always does; the export permutes the rotary rows to match
            "attention_bias": False,
            "pretraining_tp": 1,
            **(
                deepseek_v3_moe_config(cfg)  # MoE in every layer: sigmoid router, ungated shared experts
                if cfg.is_moe
                else {
                    "first_k_dense_replace": cfg.num_layers,  # every layer dense (no MoE layer is built)
                    "moe_intermediate_size": cfg.ffn_hidden_dim,
                    "n_routed_experts": 1,
                    "n_shared_experts": 1,
                    "num_experts_per_tok": 1,
                    "n_group": 1,
                    "topk_group": 1,
                    "norm_topk_prob": True,
                    "routed_scaling_factor": 1.0,
                }
            ),
        }
    if not cfg.is_moe:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "head_dim": cfg.head_dim,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
        }
    check_exportable(cfg)
    if hf_architecture(cfg) == "mixtral":
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **common,
            "intermediate_size": cfg.expert_hidden_dim,  # Mixtral's intermediate_size is the per-expert width
            "head_dim": cfg.head_dim,
            "sliding_window": None,
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_token,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
        }
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **common,
        "qkv_bias": QWEN2_MOE_ZERO_QKV_BIAS,  # with all-zero bias tensors: see QWEN2_MOE_ZERO_QKV_BIAS
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": cfg.expert_hidden_dim,
        "shared_expert_intermediate_size": cfg.num_shared_experts * cfg.expert_hidden_dim,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_token,
        "norm_topk_prob": cfg.norm_topk_prob,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "output_router_logits": False,
    }


# --------------------------------------------------------------------------------------- key mapping


@dataclass(frozen=True)
class _KeyMap:
    """One HF tensor: its llm_core parameter, the expert row of that parameter (None = whole tensor), and for MLA
    which rotary rows are reordered on export ("q": per query head, "kv_a": the shared rotary key; None: none)."""

    hf: str
    ours: str
    expert: int | None = None
    rope_rows: str | None = None


def _mla_attention_keys(cfg: ModelConfig) -> list[tuple[str, str | None]]:
    """DeepseekV3 attention modules (the same names in llm_core) and which of them carry rotary rows."""
    q = (
        [("q_proj", "q")]
        if cfg.q_lora_rank is None
        else [("q_a_proj", None), ("q_a_layernorm", None), ("q_b_proj", "q")]
    )
    return [
        *q,
        ("kv_a_proj_with_mqa", "kv_a"),
        ("kv_a_layernorm", None),
        ("kv_b_proj", None),
        ("o_proj", None),
    ]


def _rope_row_order(cfg: ModelConfig, rows: str) -> torch.Tensor:
    """Row index `order` with hf_weight = our_weight[order]: rotate-half rotary rows -> interleaved pairs."""
    r = cfg.qk_rope_head_dim
    interleave = torch.stack((torch.arange(r // 2), torch.arange(r // 2) + r // 2), dim=1).reshape(
        r
    )  # 0, r/2, 1, ..
    if rows == "kv_a":  # kv_a_proj_with_mqa: C latent rows, then the r rotary-key rows
        return torch.cat((torch.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + interleave))
    qk, n = cfg.qk_head_dim, cfg.qk_nope_head_dim  # q: per head, n non-rotary rows then r rotary rows
    head = torch.cat((torch.arange(n), n + interleave))
    return torch.cat([h * qk + head for h in range(cfg.num_heads)])


def _key_plan(cfg: ModelConfig) -> list[_KeyMap]:
    """Every HF tensor of the exported layout, in file order."""
    plan = [_KeyMap("model.embed_tokens.weight", "embed_tokens.weight")]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        plan.append(_KeyMap(hf + "input_layernorm.weight", ours + "attn_norm.weight"))
        if cfg.is_mla:
            for mod, rows in _mla_attention_keys(cfg):
                plan.append(
                    _KeyMap(f"{hf}self_attn.{mod}.weight", f"{ours}attn.{mod}.weight", rope_rows=rows)
                )
        else:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                plan.append(_KeyMap(f"{hf}self_attn.{proj}.weight", f"{ours}attn.{proj}.weight"))
        plan.append(_KeyMap(hf + "post_attention_layernorm.weight", ours + "mlp_norm.weight"))
        if cfg.is_mla and cfg.is_moe:
            plan.extend(deepseek_v3_moe_key_plan(cfg, i))
            continue
        if not cfg.is_moe:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                plan.append(_KeyMap(f"{hf}mlp.{proj}.weight", f"{ours}mlp.{proj}.weight"))
            continue
        if hf_architecture(cfg) == "mixtral":
            moe = hf + "block_sparse_moe."
            plan.append(_KeyMap(moe + "gate.weight", ours + "mlp.router.weight"))
            for e in range(cfg.num_experts):
                for w, param in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_down")):
                    plan.append(_KeyMap(f"{moe}experts.{e}.{w}.weight", f"{ours}mlp.{param}", e))
            continue
        plan.append(_KeyMap(hf + "mlp.gate.weight", ours + "mlp.router.weight"))
        for e in range(cfg.num_experts):
            for proj, param in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
                plan.append(_KeyMap(f"{hf}mlp.experts.{e}.{proj}.weight", f"{ours}mlp.{param}", e))
        if cfg.num_shared_experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                plan.append(
                    _KeyMap(f"{hf}mlp.shared_expert.{proj}.weight", f"{ours}mlp.shared.{proj}.weight")
                )
            plan.append(_KeyMap(hf + "mlp.shared_expert_gate.weight", ours + "mlp.shared_gate.weight"))
    plan.append(_KeyMap("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        plan.append(_KeyMap("lm_head.weight", "lm_head.weight"))
    return plan


def deepseek_v3_moe_key_plan(cfg: ModelConfig, layer: int) -> list[_KeyMap]:
    """The HF tensors of MoE layer `layer` in DeepseekV3ForCausalLM's checkpoint layout, in file order.

    Experts are per-expert tensors (`mlp.experts.{e}.gate_proj.weight`), as the original DeepSeek-V3 checkpoints
    store them: vLLM reads them, and transformers converts them to its fused in-memory `experts.gate_up_proj` /
    `experts.down_proj` on load (the qwen2_moe conversion, which `_split_fused_experts` undoes on import).
    `mlp.gate.e_score_correction_bias` must stay float32 in every export dtype (transformers keeps it in fp32,
    vLLM allocates it so).

        model.layers.i.mlp.gate.weight                       layers.i.mlp.router.weight
        model.layers.i.mlp.gate.e_score_correction_bias      layers.i.mlp.router_bias
        model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight   layers.i.mlp.w_{gate,up,down}[e]
        model.layers.i.mlp.shared_experts.X.weight           layers.i.mlp.shared.X.weight
    """
    check_deepseek_v3_moe(cfg)
    hf, ours = f"model.layers.{layer}.mlp.", f"layers.{layer}.mlp."
    plan = [
        _KeyMap(hf + "gate.weight", ours + "router.weight"),
        _KeyMap(hf + "gate.e_score_correction_bias", ours + "router_bias"),
    ]
    for e in range(cfg.num_experts):
        for proj, param in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            plan.append(_KeyMap(f"{hf}experts.{e}.{proj}.weight", ours + param, e))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        plan.append(_KeyMap(f"{hf}shared_experts.{proj}.weight", f"{ours}shared.{proj}.weight"))
    return plan


def hf_module_names(cfg: ModelConfig) -> dict[str, str]:
    """Our module name -> HF module name for every module whose whole `.weight` is one HF tensor.

    E.g. `layers.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`, `layers.0.mlp.shared.up_proj` ->
    `model.layers.0.mlp.shared_expert.up_proj`. Stacked MoE experts are left out (not one tensor each).
    Used to name PEFT LoRA adapter tensors (llm_core/lora.py).
    """
    return {
        m.ours.removesuffix(".weight"): m.hf.removesuffix(".weight")
        for m in _key_plan(cfg)
        if m.expert is None and m.ours.endswith(".weight")
    }


def _qkv_bias_sizes(cfg: ModelConfig) -> dict[str, int]:
    """HF names and lengths of the q/k/v bias tensors a Qwen2-MoE checkpoint with qkv_bias=true holds."""
    sizes = {"q_proj": cfg.num_heads * cfg.head_dim, "k_proj": cfg.num_kv_heads * cfg.head_dim}
    sizes["v_proj"] = sizes["k_proj"]
    return {
        f"model.layers.{i}.self_attn.{proj}.bias": n
        for i in range(cfg.num_layers)
        for proj, n in sizes.items()
    }


_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")  # (padded vocab, dim) in llm_core, (vocab, dim) in HF


def to_hf_state_dict(model: Transformer, *, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF key names, as independent contiguous CPU tensors (optionally cast to `dtype`).

    MoE experts use the legacy per-expert layout, and Qwen2-MoE models get all-zero q/k/v biases when
    QWEN2_MOE_ZERO_QKV_BIAS is set; `lm_head.weight` is left out when embeddings are tied, except for MLA
    (DeepseekV3) exports, which vLLM can only serve with an explicit lm_head.weight.
    """
    model = unwrap_model(model)
    cfg = model.cfg
    check_exportable(cfg)
    target = DTYPES[_dtype_name(dtype)] if dtype is not None else None
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for m in _key_plan(cfg):
        t = ours[m.ours] if m.expert is None else ours[m.ours][m.expert]
        if m.ours in _VOCAB_ROWS:  # the real vocabulary only: padding rows are never scored
            t = t[: cfg.vocab_size]
        if m.rope_rows is not None:  # rotate-half -> interleaved rotary rows (see the module docstring)
            t = t[_rope_row_order(cfg, m.rope_rows).to(t.device)]
        keep = m.hf.endswith("e_score_correction_bias")  # DeepSeek-V3's selection bias stays float32
        t = t.detach().to(device="cpu", dtype=t.dtype if keep else (target or t.dtype))
        out[m.hf] = t.clone(memory_format=torch.contiguous_format)  # own storage: safetensors refuses shared
    if cfg.is_mla and cfg.tie_embeddings:
        # vLLM 0.32's DeepseekV2/V3ForCausalLM ignores tie_word_embeddings and leaves a missing lm_head.weight
        # uninitialised (uniform logits); transformers ties it to the embedding either way. An explicit copy is
        # exact in both, and load_hf checks it equals the embedding.
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    if hf_architecture(cfg) == "qwen2_moe" and QWEN2_MOE_ZERO_QKV_BIAS:
        bias_dtype = target or model.embed_tokens.weight.dtype
        for name, n in _qkv_bias_sizes(cfg).items():
            out[name] = torch.zeros(n, dtype=bias_dtype)
    return out


# -------------------------------------------------------------------------------------------- export


def _generation_config(
    bos: int | None, eos: int | None, pad: int | None, generation: dict[str, Any] | None
) -> dict[str, Any]:
    gen: dict[str, Any] = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    extra = dict(generation or {})
    unknown = sorted(set(extra) - GENERATION_KEYS)
    if unknown:
        raise ValueError(
            f"unknown generation keys {unknown}: generation_config.json accepts {sorted(GENERATION_KEYS)}"
        )
    temperature = extra.get("temperature")
    if temperature is not None and temperature < 0:
        raise ValueError(f"generation temperature = {temperature} must be >= 0 (0 means greedy)")
    if temperature == 0:  # greedy: HF expresses it as do_sample=false (temperature must be > 0 there)
        del extra["temperature"]
        extra.setdefault("do_sample", False)
    elif temperature is not None:
        extra.setdefault("do_sample", True)
    gen.update(extra)
    return gen


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer: TokenizerLike | None = None,
    dtype: str = "float32",
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and `tokenizer`, if given) as an HF model directory; returns its path.

    `generation` sets sampling defaults in generation_config.json (keys in GENERATION_KEYS; temperature 0 = greedy).
    The directory is built beside `out_dir` and renamed into place, so readers never see a half-written export;
    an existing `out_dir` is replaced.
    """
    model = unwrap_model(model)
    cfg = model.cfg
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"export path {str(out_dir)!r} exists and is not a directory: choose a directory path"
        )
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    config = hf_config(cfg, dtype=dtype, **ids)  # validates everything before any file is written
    gen = _generation_config(ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"], generation)
    tensors = to_hf_state_dict(model, dtype=dtype)

    # an interrupted or failed export (a full disk: StorageFullError) leaves the previous one in place
    with atomic_dir(out_dir, expected_bytes=tensor_bytes(tensors)) as tmp:
        _write_json(tmp / "config.json", config)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "generation_config.json", gen)
        _write_json(tmp / "tulpar_config.json", cfg.model_dump(mode="json"))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


# -------------------------------------------------------------------------------------------- import


def _unsupported(what: str, fix: str) -> ValueError:
    return ValueError(f"unsupported HF config: {what}; {fix}")


def _rope_scaling_from_hf(rope: dict[str, Any], max_pos: int) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0):
        raise _unsupported(
            f"rope_parameters.partial_rotary_factor = {partial}",
            "llm_core rotates the whole head (needs 1.0)",
        )
    if rope_type == "default":
        return None
    original = rope.get("original_max_position_embeddings", max_pos)
    if rope_type == "llama3":
        return RopeScaling(
            type="llama3",
            factor=rope["factor"],
            original_max_seq_len=original,
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
        )
    if rope_type == "yarn":
        factor = rope.get("factor") or max_pos / original
        attention_factor = rope.get("attention_factor")
        if attention_factor is not None and not math.isclose(attention_factor, 0.1 * math.log(factor) + 1.0):
            raise _unsupported(
                f"yarn attention_factor = {attention_factor}",
                "llm_core uses YaRN's default 0.1 * ln(factor) + 1; remove attention_factor or set it to that",
            )
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            raise _unsupported(
                f"yarn mscale = {rope['mscale']}, mscale_all_dim = {rope['mscale_all_dim']} (DeepSeek-style)",
                "llm_core supports plain YaRN only; remove mscale/mscale_all_dim",
            )
        if rope.get("truncate", True) is not True:
            raise _unsupported(
                "yarn truncate = false", "llm_core floors/ceils the correction range (truncate=true)"
            )
        return RopeScaling(
            type="yarn",
            factor=factor,
            original_max_seq_len=original,
            beta_fast=rope.get("beta_fast") or 32.0,
            beta_slow=rope.get("beta_slow") or 1.0,
        )
    raise _unsupported(
        f"rope_type = {rope_type!r}", "llm_core supports rope_type 'default', 'llama3' and 'yarn' only"
    )


def model_config_from_hf(raw: dict[str, Any], name: str = "custom") -> ModelConfig:
    """A ModelConfig equivalent to an HF Llama, Qwen2-MoE or Mixtral `config.json` dict; ValueError if none is exact.

    The dict goes through transformers' own config class first, so its defaults and legacy fields (`rope_scaling`,
    top-level `rope_theta`, `torch_dtype`) are read exactly as transformers reads them.
    """
    # heavy import, only needed to import checkpoints
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

    model_type = raw.get("model_type")
    classes = {
        "llama": LlamaConfig,
        "qwen2_moe": Qwen2MoeConfig,
        "mixtral": MixtralConfig,
        "deepseek_v3": DeepseekV3Config,
    }
    if model_type not in classes:
        raise _unsupported(
            f"model_type = {model_type!r}",
            "load_hf imports 'llama' (dense), 'qwen2_moe' and 'mixtral' (MoE) and dense 'deepseek_v3' (MLA) "
            "checkpoints only",
        )
    try:
        hf = classes[model_type].from_dict(dict(raw))
    except Exception as exc:  # transformers' strict validation: wrong types or values
        raise ValueError(f"invalid {model_type} config.json: {exc}") from exc

    if hf.hidden_act != "silu":
        raise _unsupported(f"hidden_act = {hf.hidden_act!r}", "llm_core's MLPs are SwiGLU (silu)")
    heads, hidden = hf.num_attention_heads, hf.hidden_size
    head_dim = getattr(hf, "head_dim", None) or raw.get("head_dim")
    if model_type != "deepseek_v3" and head_dim is not None and head_dim * heads != hidden:
        raise _unsupported(
            f"head_dim = {head_dim} != hidden_size / num_attention_heads = {hidden}/{heads}",
            "llm_core derives head_dim = hidden_size / num_attention_heads",
        )
    kv_heads = hf.num_key_value_heads or heads
    rope = dict(hf.rope_parameters or {})
    if any(k in rope for k in ("full_attention", "sliding_attention")):
        raise _unsupported("per-layer-type rope_parameters", "llm_core uses one RoPE for every layer")
    rope_theta = rope.get("rope_theta") or 10000.0
    rope_scaling = _rope_scaling_from_hf(rope, hf.max_position_embeddings)
    fields: dict[str, Any] = {
        "name": name,
        "vocab_size": hf.vocab_size,
        "dim": hidden,
        "num_layers": hf.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "ffn_hidden_dim": hf.intermediate_size,
        "max_seq_len": hf.max_position_embeddings,
        "rope_theta": float(rope_theta),
        "rope_scaling": rope_scaling,
        "norm_eps": hf.rms_norm_eps,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "init_std": hf.initializer_range or 0.02,
    }
    if model_type == "llama":
        if hf.attention_bias:
            raise _unsupported("attention_bias = true", "llm_core's attention projections have no bias")
        if hf.mlp_bias:
            raise _unsupported("mlp_bias = true", "llm_core's MLP projections have no bias")
    elif model_type == "deepseek_v3":
        first_dense = hf.first_k_dense_replace or 0
        moe_layer_freq = raw.get("moe_layer_freq", 1)  # vLLM's key; transformers' DeepseekV3Config has none
        if 0 < first_dense < hf.num_hidden_layers or (first_dense == 0 and moe_layer_freq != 1):
            raise _unsupported(
                f"first_k_dense_replace = {hf.first_k_dense_replace}, moe_layer_freq = {moe_layer_freq} "
                f"with num_hidden_layers = {hf.num_hidden_layers} (dense and MoE layers mixed)",
                "llm_core imports DeepseekV3 checkpoints whose layers are all dense (first_k_dense_replace = "
                "num_hidden_layers) or all MoE (first_k_dense_replace = 0, moe_layer_freq = 1)",
            )
        if first_dense == 0:  # every layer MoE: sigmoid router + ungated shared experts
            if (hf.n_group or 1) != 1 or (hf.topk_group or 1) != 1:
                raise _unsupported(
                    f"n_group = {hf.n_group}, topk_group = {hf.topk_group}",
                    "llm_core's sigmoid router is DeepSeek-V3's with one expert group (n_group = topk_group = 1)",
                )
            if not hf.n_shared_experts:
                raise _unsupported("n_shared_experts = 0", "llm_core's DeepSeek-V3 MoE needs shared experts")
            fields.update(
                num_experts=hf.n_routed_experts,
                num_experts_per_token=hf.num_experts_per_tok,
                num_shared_experts=hf.n_shared_experts,
                moe_ffn_hidden_dim=hf.moe_intermediate_size,
                norm_topk_prob=bool(hf.norm_topk_prob),
                router_score="sigmoid",
                routed_scaling_factor=float(hf.routed_scaling_factor),
                shared_expert_gate=False,
            )
        if hf.attention_bias:
            raise _unsupported("attention_bias = true", "llm_core's attention projections have no bias")
        if not hf.rope_interleave:
            raise _unsupported(
                "rope_interleave = false", "llm_core imports the interleaved rotary layout only"
            )
        if hf.rms_norm_eps != 1e-6:
            raise _unsupported(
                f"rms_norm_eps = {hf.rms_norm_eps:g}",
                "transformers normalises DeepseekV3 latents with eps 1e-6 whatever rms_norm_eps says and llm_core "
                "uses one eps for every norm: only rms_norm_eps = 1e-6 imports exactly",
            )
        fields.update(
            attention="mla",
            kv_lora_rank=hf.kv_lora_rank,
            q_lora_rank=hf.q_lora_rank,
            qk_nope_head_dim=hf.qk_nope_head_dim,
            qk_rope_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
        )
    elif model_type == "mixtral":
        if hf.sliding_window is not None:
            raise _unsupported(
                f"sliding_window = {hf.sliding_window}", "llm_core uses full attention (sliding_window: null)"
            )
        if hf.num_local_experts < 1:
            raise _unsupported(
                f"num_local_experts = {hf.num_local_experts}",
                "a mixtral checkpoint needs num_local_experts >= 1",
            )
        # router_jitter_noise only perturbs training inputs in transformers: inference logits do not depend on it
        fields.update(
            num_experts=hf.num_local_experts,
            num_experts_per_token=hf.num_experts_per_tok,
            num_shared_experts=0,
            moe_ffn_hidden_dim=hf.intermediate_size,
            norm_topk_prob=True,  # Mixtral always renormalises the top-k weights
            aux_loss_coef=hf.router_aux_loss_coef,
        )
    else:
        if hf.use_sliding_window or any(t != "full_attention" for t in hf.layer_types or []):
            raise _unsupported("sliding-window attention", "llm_core uses full attention in every layer")
        if hf.decoder_sparse_step != 1 or hf.mlp_only_layers:
            raise _unsupported(
                f"decoder_sparse_step = {hf.decoder_sparse_step}, mlp_only_layers = {hf.mlp_only_layers}",
                "llm_core needs every layer sparse (decoder_sparse_step=1, mlp_only_layers=[])",
            )
        if hf.num_experts < 1:
            raise _unsupported(
                f"num_experts = {hf.num_experts}", "a qwen2_moe checkpoint needs num_experts >= 1"
            )
        h, shared = hf.moe_intermediate_size, hf.shared_expert_intermediate_size
        if shared < 1 or shared % h:
            raise _unsupported(
                f"shared_expert_intermediate_size = {shared} with moe_intermediate_size = {h}",
                "llm_core's shared expert width is num_shared_experts * moe_intermediate_size (a positive multiple)",
            )
        fields.update(
            num_experts=hf.num_experts,
            num_experts_per_token=hf.num_experts_per_tok,
            num_shared_experts=shared // h,
            moe_ffn_hidden_dim=h,
            norm_topk_prob=bool(hf.norm_topk_prob),
            aux_loss_coef=hf.router_aux_loss_coef,
        )
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ValueError(
            f"HF config cannot be represented as an llm_core ModelConfig: {problems}. For RoPE scaling, "
            "max_position_embeddings must equal factor * original_max_position_embeddings"
        ) from None


def _arch_signature(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that determine the forward pass (MoE-only fields dropped for dense models, the dense MLP width
    for MoE models: Mixtral's config.json has no place for it)."""
    sig = cfg.model_dump(mode="json", exclude=set(_NON_ARCH_FIELDS) | {"moe_ffn_hidden_dim"})
    if cfg.is_moe:
        sig["expert_hidden_dim"] = cfg.expert_hidden_dim
        sig.pop("ffn_hidden_dim")
    else:
        for key in ("num_experts_per_token", "num_shared_experts", "norm_topk_prob"):
            sig.pop(key)
    return sig


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"shards listed in {index} are missing: {absent}")
        return files
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise ValueError(
            f"{str(path)!r} holds pytorch_model.bin weights: only safetensors are imported; re-save the model with "
            "save_pretrained(dir) (safetensors is transformers' default)"
        )
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the .safetensors files (shards of one model); a key in two files is a ValueError."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        check_safetensors(f)  # a truncated file is a ValueError naming it, not a SafetensorError
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if key in tensors:
                    raise ValueError(f"tensor {key!r} appears in more than one shard ({f.name})")
                tensors[key] = sf.get_tensor(key)
    return tensors


def _split_fused_experts(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Rewrite transformers 5's fused expert tensors into the per-expert keys of `_key_plan`, in place.

    `mlp.experts.gate_up_proj` is (E, 2h, D) with gate rows first, `mlp.experts.down_proj` is (E, D, h). Mixtral's
    in-memory router `mlp.gate.weight` becomes `block_sparse_moe.gate.weight`, its experts w1 (gate), w3 (up), w2.
    """
    E, h, D = cfg.num_experts, cfg.expert_hidden_dim, cfg.dim
    mixtral = hf_architecture(cfg) == "mixtral"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        target = f"model.layers.{i}.block_sparse_moe.experts." if mixtral else prefix
        if mixtral and f"model.layers.{i}.mlp.gate.weight" in tensors:
            tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"] = tensors.pop(
                f"model.layers.{i}.mlp.gate.weight"
            )
        for fused, want, parts in (
            ("gate_up_proj", (E, 2 * h, D), ((gate, 0), (up, h))),
            ("down_proj", (E, D, h), ((down, 0),)),
        ):
            t = tensors.pop(prefix + fused, None)
            if t is None:
                continue
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{prefix}{fused} has shape {tuple(t.shape)}, expected {want} from config.json"
                )
            rows = t.shape[1] // len(parts)
            for e in range(E):
                for name, start in parts:
                    tensors[f"{target}{e}.{name}.weight"] = t[e, start : start + rows]


def _check_qkv_bias(tensors: dict[str, torch.Tensor], cfg: ModelConfig, *, qkv_bias: bool) -> None:
    """Drop a Qwen2-MoE checkpoint's q/k/v biases, in place, after checking they are all zero.

    llm_core's attention has no bias, so only zero biases (what export_hf writes) import exactly. With
    qkv_bias=false there are none to drop, and any bias tensor is left for the strict key check to report.
    """
    if not qkv_bias:
        return
    names = _qkv_bias_sizes(cfg)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(
            f"config.json has qkv_bias = true but the checkpoint lacks [{_listing(missing)}]: "
            "add the bias tensors or set qkv_bias to false"
        )
    nonzero = [name for name in names if bool(tensors.pop(name).any())]
    if nonzero:
        raise _unsupported(
            f"nonzero attention biases ({_listing(nonzero)})",
            "llm_core's attention projections have no bias; only checkpoints with all-zero q/k/v biases "
            "(or qkv_bias=false and none) import",
        )


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_hf(path: str | Path, *, dtype: str | None = None) -> Transformer:
    """Import an HF Llama, Qwen2-MoE or Mixtral directory as an llm_core Transformer (in eval mode).

    Reads config.json (or tulpar_config.json, checked against it, when the directory was written by `export_hf`)
    and model.safetensors or sharded model-*.safetensors. MoE experts may be per-expert (legacy) or fused
    (transformers 5 in-memory layout); Qwen2-MoE q/k/v biases must be all zero (or absent with qkv_bias=false).
    Loading is strict: missing or unexpected tensors raise ValueError.
    `dtype` ("float32" | "bfloat16" | "float16") defaults to the checkpoint's embedding dtype.
    """
    checkpoint = read_hf_checkpoint(path)
    return transformer_from_hf(checkpoint, dtype=dtype)


@dataclass
class HFCheckpoint:
    """An HF directory read by `read_hf_checkpoint`: its config.json dict, the llm_core config it maps to, and
    every tensor of its weight files under HF names (callers may take out tensors of heads llm_core lacks)."""

    path: Path
    raw: dict[str, Any]
    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]


def read_hf_checkpoint(path: str | Path) -> HFCheckpoint:
    """The config and tensors of an HF Llama, Qwen2-MoE or Mixtral directory, checked as `load_hf` checks them (config.json
    against tulpar_config.json when present); ValueError naming the directory and the fix otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"HF model directory {str(path)!r} does not exist: pass the directory export_hf wrote"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(path)!r} has no config.json: pass an HF model directory")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    cfg = model_config_from_hf(raw, name=path.name)
    tulpar_path = path / "tulpar_config.json"
    if tulpar_path.is_file():
        try:
            tulpar = ModelConfig.model_validate_json(tulpar_path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise ValueError(
                f"{tulpar_path} is not a valid llm_core ModelConfig ({exc.error_count()} errors: "
                f"{exc.errors()[0]['msg']}); delete it to import from config.json alone"
            ) from None
        ours, theirs = _arch_signature(tulpar), _arch_signature(cfg)
        diff = {
            k: (ours.get(k), theirs.get(k))
            for k in ours.keys() | theirs.keys()
            if ours.get(k) != theirs.get(k)
        }
        if diff:
            detail = ", ".join(
                f"{k}: {a!r} vs {b!r}" for k, a, b in ((k, *v) for k, v in sorted(diff.items()))
            )
            raise ValueError(
                f"tulpar_config.json and config.json in {str(path)!r} disagree ({detail}): config.json was edited "
                "after export; delete tulpar_config.json to import from config.json alone"
            )
        cfg = tulpar
    return HFCheckpoint(path, raw, cfg, read_tensors(_weight_files(path)))


def transformer_from_hf(checkpoint: HFCheckpoint, *, dtype: str | None = None) -> Transformer:
    """The llm_core Transformer (eval mode) of a checkpoint read by `read_hf_checkpoint`: strict, as `load_hf`.
    Consumes `checkpoint.tensors` (entries are removed or replaced while mapping)."""
    path, raw, cfg, tensors = checkpoint.path, checkpoint.raw, checkpoint.cfg, checkpoint.tensors
    # old checkpoints store RoPE's inv_freq, a buffer both sides recompute from the config
    for key in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        del tensors[key]
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            raise ValueError(
                "lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings is true: "
                "set tie_word_embeddings to false in config.json"
            )
    if raw.get("model_type") == "qwen2_moe":
        _check_qkv_bias(tensors, cfg, qkv_bias=raw.get("qkv_bias", True))  # Qwen2MoeConfig's default is true
    if cfg.is_moe:
        _split_fused_experts(tensors, cfg)

    plan = _key_plan(cfg)
    expected = {m.hf for m in plan}
    missing = [m.hf for m in plan if m.hf not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match its config: "
            f"missing tensors [{_listing(missing)}]; unexpected tensors [{_listing(unexpected)}]"
        )

    model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor | None]] = {}
    for m in plan:
        t = tensors[m.hf]
        want = shapes[m.ours] if m.expert is None else shapes[m.ours][1:]
        if m.ours in _VOCAB_ROWS and want[0] != t.shape[0] == cfg.vocab_size:  # pad to llm_core's row count
            t = torch.cat([t, t.new_zeros(want[0] - t.shape[0], *t.shape[1:])])
        if tuple(t.shape) != want:
            raise ValueError(f"{m.hf} has shape {tuple(t.shape)}, expected {want} from config.json")
        if m.rope_rows is not None:  # interleaved -> rotate-half rotary rows
            t = t[torch.argsort(_rope_row_order(cfg, m.rope_rows))]
        if m.expert is None:
            state[m.ours] = t
        else:
            experts.setdefault(m.ours, [None] * cfg.num_experts)[m.expert] = t
    for name, per_expert in experts.items():
        state[name] = torch.stack(per_expert)  # type: ignore[arg-type]  (every slot is filled: no key is missing)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    target = DTYPES[_dtype_name(dtype)] if dtype is not None else tensors["model.embed_tokens.weight"].dtype
    # Cast the weights only: the RoPE cos/sin tables stay fp32, as transformers keeps them. A tied lm_head is the
    # same Parameter as the embedding, so it stays tied.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(target)
    return model.eval()
