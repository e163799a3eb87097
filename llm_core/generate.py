"""Batched autoregressive generation with a KV cache: greedy or sampled, with streaming.

Prompts of different lengths are left-padded; an attention mask hides the padding and position ids restart at 0 at
each prompt's first real token, so a prompt generates the same tokens alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field

from llm_core.config import StrictModel
from llm_core.model import KVCache, Transformer


class SamplingParams(StrictModel):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="0 disables")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="1.0 disables; >1 discourages repeats")
    stop_token_ids: list[int] = Field(default_factory=list)
    min_new_tokens: int = Field(0, ge=0, description="stop tokens cannot be chosen before this many tokens")
    seed: int | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present. logits (B, V) float, seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus-p set to -inf. logits (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V) -> (B,)."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, pad_id: int = 0
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, each sequence's new token id (None once that sequence has stopped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(
            "every prompt needs at least one token (an empty prompt has nothing to condition on)"
        )
    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise ValueError(
            f"prompt of {longest} tokens leaves no room in max_seq_len {cfg.max_seq_len}: shorten the prompt"
        )
    max_new = min(params.max_new_tokens, cfg.max_seq_len - longest)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)  # left-padded (B, P)
    attn = torch.zeros((B, longest + max_new), dtype=torch.long, device=device)  # (B, P + max_new)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, device=device)
        attn[i, longest - len(p) : longest] = 1
    positions = (attn[:, :longest].cumsum(-1) - 1).clamp(min=0)  # (B, P)
    seen = torch.zeros((B, cfg.vocab_size), dtype=torch.bool, device=device)
    seen.scatter_(1, ids, attn[:, :longest].bool())
    stops = torch.tensor(params.stop_token_ids or [-1], device=device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(cfg, B, longest + max_new, device=device, dtype=dtype)
        out = model(ids, position_ids=positions, attention_mask=attn[:, :longest], kv_cache=cache)
        last_pos = positions[:, -1]  # (B,)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new):
            logits = out.logits[:, -1]
            if step < params.min_new_tokens and params.stop_token_ids:
                logits = logits.index_fill(-1, stops, float("-inf"))
            tok = next_token(logits, seen, params, generator)  # (B,)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            is_stop = torch.isin(tok, stops) & ~done
            yield [
                None if (d or s) else int(t) for t, d, s in zip(tok.tolist(), done.tolist(), is_stop.tolist())
            ]
            done |= is_stop
            if bool(done.all()) or step == max_new - 1:
                break
            seen.scatter_(1, tok[:, None], True)
            attn[:, longest + step] = 1  # the token just chosen becomes a key for the next step
            last_pos = last_pos + 1
            out = model(
                tok[:, None],
                position_ids=last_pos[:, None],
                attention_mask=attn[:, : longest + step + 1],
                kv_cache=cache,
            )
    finally:
        model.train(was_training)


def generate(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, pad_id: int = 0
) -> list[list[int]]:
    """Generated token ids per prompt (prompt and stop token excluded)."""
    results: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params, pad_id=pad_id):
        for i, tok in enumerate(step):
            if tok is not None:
                results[i].append(tok)
    return results
