"""Tulpar's model: a Llama-style decoder, dense or Mixture-of-Experts, in one file.

Notation used in shape comments:
  B batch, T new tokens this call, S keys attended (cached + new), D dim, V vocab,
  H query heads, K key/value heads (GQA), hd head_dim = D / H, E routed experts, k experts per token,
  N = B * T tokens; MLA: C kv_lora_rank, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim.

Dense layers map 1:1 onto Hugging Face `LlamaForCausalLM`, MoE layers onto `Qwen2MoeForCausalLM`
(softmax top-k router, fused shared experts behind a sigmoid gate) or, without shared experts, onto
`MixtralForCausalLM`; multi-head latent attention (MLA) models onto `DeepseekV3ForCausalLM`, whose MoE is a
sigmoid router with ungated shared experts; see export_hf.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_core.config import ModelConfig
from llm_core.losses import cross_entropy

# ----------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (hd/2,) and the attention scale applied to cos/sin (YaRN's mscale, else 1).
    hd is the rotated width per head: head_dim, or qk_rope_head_dim with MLA."""
    hd, base = cfg.rope_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # (hd/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    if rs.type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        low_wavelen = rs.original_max_seq_len / rs.low_freq_factor
        high_wavelen = rs.original_max_seq_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_seq_len / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0

    # YaRN: interpolate low frequencies, extrapolate high ones, blend by a linear ramp over dimensions.
    def correction_dim(num_rotations: float) -> float:
        return (hd * math.log(rs.original_max_seq_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), hd - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, hd, 2).float() / hd)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (rs.factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight
    return inv_freq, 0.1 * math.log(rs.factor) + 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, scale = rope_inv_freq(cfg)
        freqs = torch.outer(
            torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq
        )  # (max_seq_len, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, hd)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, 1, T, hd), broadcast over heads
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, heads, T, hd); rotate the two halves of each head (the HF "rotate_half" layout)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------ KV cache


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, K, max_len, hd). `length` tokens are filled.

    With MLA (cfg.attention == "mla") it holds instead, per layer, the normed latent c_kv (B, max_len, C) and the
    shared rotary key k_pe (B, 1, max_len, r): C + r numbers per token and layer rather than 2 * K * hd.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > cfg.max_seq_len:
            raise ValueError(
                f"KV cache length {max_len} exceeds max_seq_len {cfg.max_seq_len}: shorten the prompt or "
                "max_new_tokens, or use a model with a longer context"
            )
        self.max_len = max_len
        self.length = 0
        if cfg.is_mla:
            L, C, r = cfg.num_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim
            self.latent = torch.zeros((L, batch_size, max_len, C), device=device, dtype=dtype)
            self.rope_key = torch.zeros((L, batch_size, 1, max_len, r), device=device, dtype=dtype)
            return
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v (B, K, T, hd) for the new tokens -> all keys/values so far (B, K, S, hd)
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_latent(
        self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # MLA: c_kv (B, T, C), k_pe (B, 1, T, r) for the new tokens -> all so far, (B, S, C) and (B, 1, S, r)
        start, end = self.length, self.length + c_kv.size(1)
        self.latent[layer, :, start:end] = c_kv
        self.rope_key[layer, :, :, start:end] = k_pe
        return self.latent[layer, :, :end], self.rope_key[layer, :, :, :end]


# ------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (as Llama does), scale in the input dtype
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, hd)
        # GQA: each K/V head serves H/K query heads. SDPA's enable_gqa does that without materialising repeated
        # K/V (exact on CPU, masked or not); CUDA's fused kernels take it only without a mask, so repeat there.
        gqa = self.num_kv_heads != self.num_heads
        if gqa and mask is not None and x.device.type != "cpu":
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            gqa = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=gqa,
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, D)


class LatentAttention(nn.Module):
    """DeepSeek-V3 multi-head latent attention (MLA); module names as in HF's DeepseekV3Attention.

    Keys/values come from one latent c_kv = norm(x W_kv_a) of width C: head h's non-rotary key is c_kv W_uk[h] and
    its value c_kv W_uv[h] (W_uk, W_uv: the two parts of kv_b_proj). The rotary key k_pe is one r-wide vector per
    token shared by all heads. Without a cache, or when prefilling an empty one, keys and values are decompressed
    (the "naive" form). Decoding from a filled cache uses the absorbed form: q_nope W_uk[h]^T maps each query into
    the latent space, attention runs over the cached (c_kv, k_pe) directly as one shared KV head, and the output
    latent goes through W_uv[h]; no per-head key or value is ever built for the S cached tokens.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.dropout, D, H = layer_idx, cfg.dropout, cfg.dim, cfg.num_heads
        self.num_heads, self.C, self.n, self.r, self.v = (
            H,
            cfg.kv_lora_rank,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.C + self.r, bias=False)
        self.kv_a_layernorm = RMSNorm(self.C, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.C, H * (self.n + self.v), bias=False)
        self.o_proj = nn.Linear(H * self.v, D, bias=False)
        self.scale = cfg.qk_head_dim**-0.5

    def forward(self, x, cos, sin, mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = (
            q.view(B, T, self.num_heads, -1).transpose(1, 2).split([self.n, self.r], -1)
        )  # (B, H, T, n|r)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.C, self.r], -1)  # (B, T, C), (B, T, r)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe.unsqueeze(1), cos, sin)  # (B, H|1, T, r)
        absorbed = kv_cache is not None and kv_cache.length > 0
        if kv_cache is not None:
            c_kv, k_pe = kv_cache.update_latent(self.layer_idx, c_kv, k_pe)  # (B, S, C), (B, 1, S, r)
        attend = self.attend_absorbed if absorbed else self.attend_naive
        y = attend(q_nope, q_pe, c_kv, k_pe, mask)  # (B, H, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.v))  # (B, T, D)

    def _sdpa(self, q, k, v, mask, gqa: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and q.size(2) > 1,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=gqa,
        )

    def attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Decompress per-head keys/values from the latent, then ordinary attention; -> (B, H, T, v)."""
        B, S, _ = c_kv.shape
        kv = (
            self.kv_b_proj(c_kv).view(B, S, self.num_heads, self.n + self.v).transpose(1, 2)
        )  # (B, H, S, n+v)
        k_nope, value = kv.split([self.n, self.v], -1)  # (B, H, S, n), (B, H, S, v)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), -1)  # (B, H, S, n+r)
        return self._sdpa(torch.cat((q_nope, q_pe), -1), k, value, mask)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Attention in the latent space over the cached (c_kv, k_pe), one KV head for all; -> (B, H, T, v)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.n + self.v, self.C)
        w_uk, w_uv = w.split([self.n, self.v], 1)  # (H, n, C), (H, v, C)
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # (B, H, T, C)
        k = torch.cat((c_kv.unsqueeze(1), k_pe), -1)  # (B, 1, S, C+r): the cache as one key head
        q = torch.cat((q_latent, q_pe), -1)  # (B, H, T, C+r)
        value = c_kv.unsqueeze(1)  # (B, 1, S, C)
        if mask is not None and q.device.type != "cpu":  # CUDA's fused kernels take GQA only unmasked
            k, value = k.expand(-1, self.num_heads, -1, -1), value.expand(-1, self.num_heads, -1, -1)
        out_latent = self._sdpa(q, k, value, mask, gqa=k.size(1) != self.num_heads)  # (B, H, T, C)
        return torch.einsum("bhtc,hvc->bhtv", out_latent, w_uv)  # (B, H, T, v)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus always-on shared experts (behind a sigmoid gate unless shared_expert_gate
    is false).

    router_score softmax (Qwen2-MoE, Mixtral): weights = the top-k softmax probabilities (renormalised when
    norm_topk_prob). router_score sigmoid (DeepSeek-V3, n_group = topk_group = 1): scores = sigmoid(logits); the
    experts are the top-k of scores + router_bias (the bias only selects); weights = their unbiased scores
    (renormalised when norm_topk_prob) times routed_scaling_factor. router_bias is a float32 buffer, not a
    parameter: the trainer moves it toward balanced load after each optimizer step (`update_router_bias`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, D = cfg.num_experts, cfg.expert_hidden_dim, cfg.dim
        self.num_experts, self.top_k, self.norm_topk_prob = E, cfg.num_experts_per_token, cfg.norm_topk_prob
        self.routed_scaling_factor, self.router_bias_update_rate = (
            cfg.routed_scaling_factor,
            cfg.router_bias_update_rate,
        )
        self.router = nn.Linear(D, E, bias=False)
        # (E,) float32 selection bias of the sigmoid router (None with softmax); persistent: checkpoints carry it
        sigmoid = cfg.router_score == "sigmoid"
        self.register_buffer("router_bias", torch.zeros(E, dtype=torch.float32) if sigmoid else None)
        # expert weights stacked on a leading expert axis (nn.Linear layout: out_features x in_features)
        self.w_gate = nn.Parameter(torch.empty(E, h, D))
        self.w_up = nn.Parameter(torch.empty(E, h, D))
        self.w_down = nn.Parameter(torch.empty(E, D, h))
        self.shared = MLP(D, h * cfg.num_shared_experts) if cfg.num_shared_experts else None
        gated = cfg.num_shared_experts and cfg.shared_expert_gate
        self.shared_gate = nn.Linear(D, 1, bias=False) if gated else None
        self.aux_loss = torch.zeros(())
        self.last_expert_counts = torch.zeros(E, dtype=torch.long)

    def route(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xf (N, D) -> probs (N, E) fp32 (each row sums to 1, for the aux loss), weights (N, k) fp32, experts (N, k)."""
        if self.router_bias is None:
            probs = F.softmax(self.router(xf), dim=-1, dtype=torch.float32)  # (N, E)
            top_w, top_e = probs.topk(self.top_k, dim=-1)  # (N, k) weights and expert ids
            if self.norm_topk_prob:
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
            return probs, top_w, top_e
        with torch.autocast(xf.device.type, enabled=False):  # routing in fp32, as DeepSeek-V3 (and HF) do
            scores = torch.sigmoid(F.linear(xf.float(), self.router.weight.float()))  # (N, E)
        # the bias only selects: the experts are the top-k of scores + bias, their weights the unbiased scores
        top_e = (scores + self.router_bias.float()).topk(self.top_k, dim=-1).indices  # (N, k)
        top_w = scores.gather(1, top_e)  # (N, k)
        if self.norm_topk_prob:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return scores / scores.sum(dim=-1, keepdim=True), top_w * self.routed_scaling_factor, top_e

    @torch.no_grad()
    def update_router_bias(self, counts: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e), from one step's expert
        counts (E,) (over all data-parallel ranks, so every rank makes the same update)."""
        load = counts.to(self.router_bias.device, torch.float32)
        self.router_bias += self.router_bias_update_rate * torch.sign(load.mean() - load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        xf = x.reshape(-1, D)  # (N, D)
        probs, top_w, top_e = self.route(xf)
        top_w = top_w.to(x.dtype)
        # Dispatch: sort the N*k (token, expert) assignments by expert so each expert sees one contiguous slice.
        flat_e = top_e.reshape(-1)  # (N*k,)
        order = flat_e.argsort(stable=True)  # (N*k,)
        token_of = order // self.top_k  # token row of each sorted assignment
        counts = torch.bincount(flat_e, minlength=self.num_experts)  # (E,)
        xs = xf[token_of]  # (N*k, D)
        outs = []
        for e, chunk in enumerate(xs.split(counts.tolist())):  # loop over experts, never over tokens
            if chunk.numel():
                hidden = F.silu(chunk @ self.w_gate[e].t()) * (chunk @ self.w_up[e].t())  # (n_e, h)
                outs.append(hidden @ self.w_down[e].t())  # (n_e, D)
        ys = torch.cat(outs) * top_w.reshape(-1)[order].unsqueeze(-1)  # (N*k, D), weighted by router
        out = torch.zeros_like(xf).index_add_(0, token_of, ys)  # (N, D): sum the k expert outputs per token
        if self.shared is not None:
            shared = self.shared(xf)  # (N, D)
            out = out + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(xf)) * shared)
        # Switch-style load balancing: E * sum_e (share of assignments to e) * (mean router prob of e); 1.0 if
        # uniform. With sigmoid scores, probs are the scores normalised per token (DeepSeek-V3's balance loss,
        # over the batch rather than per sequence).
        frac = counts.to(probs.dtype) / flat_e.numel()
        self.aux_loss = self.num_experts * (frac * probs.mean(dim=0)).sum()
        self.last_expert_counts = counts.detach()
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LatentAttention(cfg, layer_idx) if cfg.is_mla else Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe else MLP(cfg.dim, cfg.ffn_hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, kv_cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# -------------------------------------------------------------------------------------------- model


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # ce_loss + aux_loss_coef * aux_loss
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE load balancing, mean over layers (None when dense)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab_size  # the tokenizer's vocabulary rounded up to cfg.vocab_multiple
        self.embed_tokens = nn.Embedding(V, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; output projections scaled by 1/sqrt(2 * num_layers) (GPT-2 style)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def num_params(self) -> int:
        """Parameters, without the embedding/head padding rows (never used; see ModelConfig.padded_vocab_size)."""
        padding = (self.cfg.padded_vocab_size - self.cfg.require_vocab_size()) * self.cfg.dim
        padding *= 1 if self.cfg.tie_embeddings else 2
        return sum(p.numel() for p in self.parameters()) - padding

    def _mask(self, B, T, start, attention_mask, segment_ids, device) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True = may attend; None when plain causal attention is exact."""
        if attention_mask is None and segment_ids is None and (start == 0 or T == 1):
            return None  # SDPA's is_causal (prefill) or attend-to-everything (one new token)
        S = start + T
        q_pos = torch.arange(start, S, device=device)  # (T,)
        k_pos = torch.arange(S, device=device)  # (S,)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S) causal
        if attention_mask is not None:  # key padding, (B, S) with 1 for real tokens
            mask = mask & attention_mask[:, None, None, :S].bool()
        if segment_ids is not None:  # packed sequences: attend only within one's own segment, (B, T)
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        # every query sees at least itself, so fully padded rows give finite (ignored) outputs, not NaN
        return mask | (k_pos[None, :] == q_pos[:, None])[None, None]

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """(B, T, D): the final normed hidden states, what the LM head reads (and a scalar head: reward, value)."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {start + T} exceeds max_seq_len {self.cfg.max_seq_len}: use a shorter seq_len "
                f"or a model with max_seq_len >= {start + T}"
            )
        if segment_ids is not None and kv_cache is not None:
            raise ValueError("segment_ids (packed training) cannot be combined with a KV cache")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids)  # (B, 1, T, hd)
        mask = self._mask(B, T, start, attention_mask, segment_ids, input_ids.device)
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, D)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        targets: torch.Tensor | None = None,  # (B, T), -100 = ignored
        *,
        position_ids: torch.Tensor | None = None,  # (B, T); default start + arange(T)
        attention_mask: torch.Tensor | None = None,  # (B, S) key padding over cached + new tokens
        segment_ids: torch.Tensor | None = None,  # (B, T) packed-sample ids, no attention across them
        kv_cache: KVCache | None = None,
    ) -> ModelOutput:
        h = self.hidden_states(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            kv_cache=kv_cache,
        )
        logits = self.lm_head(h)  # (B, T, padded V)
        if logits.size(-1) != self.cfg.vocab_size:  # padding rows are never scored: (B, T, V)
            logits = logits[..., : self.cfg.vocab_size]
        aux = None
        if self.cfg.is_moe:
            aux = torch.stack([layer.mlp.aux_loss for layer in self.layers]).mean()
        if targets is None:
            return ModelOutput(logits=logits, aux_loss=aux)
        ce = cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss = ce if aux is None else ce + self.cfg.aux_loss_coef * aux
        return ModelOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux)
