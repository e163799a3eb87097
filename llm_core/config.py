"""Typed model configuration: the strict pydantic base every Tulpar config uses, and the model config itself.

Reading YAML files, presets and dotted overrides is platform code (`jobs.platform.configfile`), not model code.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, model_serializer, model_validator

# Serialization context of `config_sha256`: ModelConfig leaves out the fields in _ADDED_MODEL_FIELDS while they hold
# the value that reproduces the model as it was before they existed.
_HASH_CONTEXT = "tulpar_config_sha256"
_ADDED_MODEL_FIELDS: dict[str, Any] = {
    "router_score": "softmax",
    "routed_scaling_factor": 1.0,
    "router_bias_update_rate": 0.001,
    "shared_expert_gate": True,
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class StrictModel(BaseModel):
    """Base for every Tulpar config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RopeScaling(StrictModel):
    """RoPE frequency scaling for contexts longer than the model was pretrained on.

    `llama3` is Llama 3.1's piecewise rescaling; `yarn` is YaRN (NTK-by-parts with attention temperature).
    `factor` must equal max_seq_len / original_max_seq_len.
    """

    type: Literal["llama3", "yarn"]
    factor: float = Field(gt=1.0)
    original_max_seq_len: int = Field(gt=0)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn


# Fields of multi-head latent attention: set exactly when attention is "mla", and left out of a "gqa" config's
# dump, so configs written before MLA existed keep their JSON and their config_sha256.
MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class ModelConfig(StrictModel):
    """A Llama-style decoder (dense, or MoE with shared experts when num_experts > 0), with grouped-query
    attention or DeepSeek-V3's multi-head latent attention (MLA)."""

    name: str = "custom"
    vocab_size: int | None = Field(
        None,
        gt=0,
        description="the tokenizer's vocabulary, special tokens included: training jobs set it from the tokenizer "
        "(presets never state it, so model and tokenizer cannot disagree)",
    )
    vocab_multiple: int = Field(
        64, gt=0, description="embedding/head rows are padded to a multiple of this for matmul kernels"
    )
    dim: int = Field(gt=0, description="hidden size")
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0, description="key/value heads (GQA); num_heads must be a multiple")
    ffn_hidden_dim: int = Field(gt=0, description="SwiGLU hidden size of the dense MLP")
    max_seq_len: int = Field(gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    # Attention. "gqa": Llama's grouped-query attention (num_kv_heads key/value heads of head_dim).
    # "mla": DeepSeek-V3's multi-head latent attention. Keys and values are decompressed per head from one
    # kv_lora_rank-wide latent (kv_b_proj); each query/key head is qk_nope_head_dim non-rotary dims plus
    # qk_rope_head_dim rotary dims, the rotary key being one vector shared by all heads; values are v_head_dim
    # wide. The KV cache stores only the latent and the rotary key. q_lora_rank: low-rank query (q_a_proj ->
    # norm -> q_b_proj); None = one q_proj. MLA needs num_kv_heads == num_heads (it has no head grouping).
    attention: Literal["gqa", "mla"] = "gqa"
    kv_lora_rank: int | None = Field(None, gt=0)
    q_lora_rank: int | None = Field(None, gt=0)
    qk_nope_head_dim: int | None = Field(None, gt=0)
    qk_rope_head_dim: int | None = Field(None, gt=0)
    v_head_dim: int | None = Field(None, gt=0)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # MoE (num_experts == 0 means dense). Routed experts use top-k routing on softmax scores (Qwen2-MoE/Mixtral) or
    # on sigmoid scores with a per-expert selection bias (DeepSeek-V3's auxiliary-loss-free balancing); the
    # shared experts are always active and fused into one SwiGLU of width num_shared_experts * moe_ffn_hidden_dim,
    # behind a sigmoid gate (Qwen2-MoE's `shared_expert` + `shared_expert_gate`) or ungated (DeepSeek-V3's
    # `shared_experts`). Which HF architecture each combination exports to: export_hf.check_exportable.
    num_experts: int = Field(0, ge=0)
    num_experts_per_token: int = Field(2, gt=0)
    num_shared_experts: int = Field(0, ge=0)
    moe_ffn_hidden_dim: int | None = Field(
        None, gt=0, description="per-expert hidden size; default ffn_hidden_dim"
    )
    aux_loss_coef: float = Field(0.01, ge=0.0)
    norm_topk_prob: bool = True
    router_score: Literal["softmax", "sigmoid"] = Field(
        "softmax",
        description="softmax: top-k of softmax probabilities (Qwen2-MoE, Mixtral); sigmoid: DeepSeek-V3's router, "
        "top-k of sigmoid scores + a per-expert bias that the trainer moves toward balanced load",
    )
    routed_scaling_factor: float = Field(
        1.0, gt=0, description="router_score sigmoid only: the routed experts' weights are multiplied by it"
    )
    router_bias_update_rate: float = Field(
        0.001,
        ge=0,
        description="router_score sigmoid only: after each optimizer step every expert's selection bias moves "
        "by this much toward balanced load (DeepSeek-V3's gamma); 0 keeps the bias fixed",
    )
    shared_expert_gate: bool = Field(
        True,
        description="shared experts behind a learned sigmoid gate (Qwen2-MoE); false: always on, ungated "
        "(DeepSeek-V3)",
    )
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim % num_heads != 0 ({self.dim} % {self.num_heads}): pick dim divisible by num_heads"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads % num_kv_heads != 0 ({self.num_heads} % {self.num_kv_heads}): "
                "num_kv_heads must divide num_heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads = {self.head_dim} must be even for RoPE")
        self._check_attention()
        if self.num_experts and self.num_experts_per_token > self.num_experts:
            raise ValueError(
                f"num_experts_per_token ({self.num_experts_per_token}) > num_experts ({self.num_experts})"
            )
        if self.num_shared_experts and not self.num_experts:
            raise ValueError("num_shared_experts > 0 needs num_experts > 0 (a dense model has no experts)")
        defaults = type(self).model_fields
        if self.router_score == "sigmoid" and not self.num_experts:
            raise ValueError(
                "router_score = 'sigmoid' needs num_experts > 0 (a dense model has no router): set "
                "num_experts or remove router_score"
            )
        if self.router_score != "sigmoid":
            for key in ("routed_scaling_factor", "router_bias_update_rate"):
                if getattr(self, key) != defaults[key].default:
                    raise ValueError(
                        f"{key} = {getattr(self, key)} applies to router_score: sigmoid only (router_score is "
                        f"{self.router_score!r}): set router_score: sigmoid or remove {key}"
                    )
        if not self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError(
                "shared_expert_gate = false has no shared expert to act on (num_shared_experts = 0): set "
                "num_shared_experts > 0 or remove shared_expert_gate"
            )
        rs = self.rope_scaling
        if rs is not None:
            if rs.original_max_seq_len >= self.max_seq_len:
                raise ValueError(
                    f"rope_scaling.original_max_seq_len ({rs.original_max_seq_len}) must be < max_seq_len "
                    f"({self.max_seq_len})"
                )
            want = self.max_seq_len / rs.original_max_seq_len
            if not math.isclose(rs.factor, want, rel_tol=1e-6):
                raise ValueError(
                    f"rope_scaling.factor ({rs.factor}) must equal max_seq_len / original_max_seq_len = {want:g}"
                )
        return self

    def _check_attention(self) -> None:
        if self.attention == "gqa":
            stray = [f for f in MLA_FIELDS if getattr(self, f) is not None]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} only apply to attention: mla (this config has attention: gqa): set "
                    "attention: mla or remove them"
                )
            return
        missing = [f for f in MLA_FIELDS if f != "q_lora_rank" and getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"attention: mla needs {', '.join(missing)}: set them (e.g. kv_lora_rank: 512, qk_nope_head_dim: "
                "64, qk_rope_head_dim: 64, v_head_dim: 64, the shapes vLLM's MLA kernels serve)"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim = {self.qk_rope_head_dim} must be even for RoPE")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"attention: mla needs num_kv_heads == num_heads (got {self.num_kv_heads} vs {self.num_heads}): "
                "every head decompresses its own key and value from the shared latent; set num_kv_heads: "
                f"{self.num_heads}"
            )

    @model_serializer(mode="wrap")
    def _dump(self, handler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        if self.attention == "gqa":  # configs from before MLA keep their exact dump (and config_sha256)
            for key in ("attention", *MLA_FIELDS):
                data.pop(key, None)
        if is_hash_context(info):  # config_sha256: see _ADDED_MODEL_FIELDS
            for key, value in _ADDED_MODEL_FIELDS.items():
                if data.get(key) == value:
                    del data[key]
        return data

    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head: head_dim (GQA), qk_rope_head_dim (MLA)."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head (what the attention softmax scale is computed from)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    def kv_cache_values_per_token(self) -> int:
        """Numbers the KV cache holds per token, all layers: K and V heads (GQA), latent + rotary key (MLA)."""
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token of context (default 2: bf16/fp16 cache)."""
        return self.kv_cache_values_per_token() * dtype_bytes

    def attention_params(self) -> int:
        """Parameters of one attention block (projections, and MLA's latent norms)."""
        d, H = self.dim, self.num_heads
        if not self.is_mla:
            return d * H * self.head_dim * 2 + d * self.num_kv_heads * self.head_dim * 2  # q, o, k, v
        q_out = H * self.qk_head_dim
        q = (
            d * q_out
            if self.q_lora_rank is None
            else d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
        )
        kv = (
            d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        )  # kv_a_proj_with_mqa, its norm
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)  # kv_b_proj
        return q + kv + H * self.v_head_dim * d  # + o_proj

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: vocab_size rounded up to vocab_multiple. The padding rows are
        never scored (the model returns logits for the real vocabulary only) and not counted in num_params."""
        v = self.require_vocab_size()
        return -(-v // self.vocab_multiple) * self.vocab_multiple

    def require_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError(
                f"model {self.name!r} has no vocab_size: it comes from the tokenizer; training jobs set it from "
                "the dataset's tokenizer, or pass vocab_size when building a model by hand"
            )
        return self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_hidden_dim(self) -> int:
        return self.moe_ffn_hidden_dim or self.ffn_hidden_dim

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the config (equals the built model's count)."""
        d = self.dim
        attn = self.attention_params()
        if self.is_moe:
            h = self.expert_hidden_dim
            mlp = self.num_experts * 3 * d * h + d * self.num_experts  # experts + router
            if self.num_shared_experts:
                mlp += 3 * d * h * self.num_shared_experts  # fused shared experts
                mlp += d if self.shared_expert_gate else 0  # their sigmoid gate
        else:
            mlp = 3 * d * self.ffn_hidden_dim
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        total = self.num_layers * per_layer + d  # final norm
        if include_embeddings:  # real vocabulary rows only: the padding rows are not parameters anyone uses
            total += self.require_vocab_size() * d * (1 if self.tie_embeddings else 2)
        return total

    def num_active_params(self) -> int:
        """Parameters touched per token (routed experts counted num_experts_per_token times)."""
        if not self.is_moe:
            return self.num_params()
        unused = (self.num_experts - self.num_experts_per_token) * 3 * self.dim * self.expert_hidden_dim
        return self.num_params() - self.num_layers * unused

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * active matmul params + attention scores."""
        matmul = self.num_active_params() - self.require_vocab_size() * self.dim * (
            1 if self.tie_embeddings else 2
        )
        matmul += self.padded_vocab_size * self.dim  # LM head, padding rows included (they are computed)
        # QK^T and AV, fwd+bwd (PaLM appendix B accounting: 6 * 2 * L * S * (H * (qk width + v width)) / 2);
        # H * hd = dim for GQA, so this is 12 * L * S * dim there
        H = self.num_heads
        width = H * (self.qk_head_dim + self.v_head_dim) / 2 if self.is_mla else self.dim
        attn = 12.0 * self.num_layers * seq_len * width
        return 6.0 * matmul + attn


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def is_hash_context(info: SerializationInfo) -> bool:
    """True while `config_sha256` serializes: a config class added after runs were stored leaves a new field out of
    its dump here while it holds the value that reproduces the earlier behaviour, so those runs keep their keys."""
    return bool(info.context and info.context.get(_HASH_CONTEXT))


def config_sha256(cfg: BaseModel) -> str:
    """sha256 of the config's JSON (run keys, MLflow tags). Model fields added later are left out while at the value
    that reproduces the earlier model (_ADDED_MODEL_FIELDS), so stored runs keep their keys and still resume."""
    data = cfg.model_dump(mode="json", context={_HASH_CONTEXT: True})
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
