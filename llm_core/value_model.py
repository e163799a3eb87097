"""A transformer with a scalar head: a reward model (one score per sequence) or a PPO critic (one value per token).

The trunk is an llm_core `Transformer` (its final normed hidden states, `Transformer.hidden_states`); the head is
one linear layer dim -> 1. A reward model reads the score at each sequence's last real token (right padding,
`attention_mask` 1 on real tokens), as Hugging Face's *ForSequenceClassification models do; a critic reads every
position. The head is initialised on construction (`init_weights`), the trunk keeps its weights.

`export_hf_reward_model` writes a reward model as an HF `LlamaForSequenceClassification` directory (num_labels 1,
the head as `score.weight`) and `load_hf_reward_model` reads it back with bit-equal scores.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_core.config import ModelConfig
from llm_core.model import Transformer


class ScalarHeadModel(nn.Module):
    def __init__(self, base: Transformer):
        super().__init__()
        self.base = base
        self.head = nn.Linear(
            base.cfg.dim, 1, bias=False
        )  # bias-free, like HF's sequence-classification score
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The head only (the trunk comes from a trained model): Normal(0, 1/sqrt(dim + 1)) weights, so initial
        scores have about unit scale."""
        nn.init.normal_(self.head.weight, std=1.0 / (self.base.cfg.dim + 1) ** 0.5)

    @property
    def cfg(self) -> ModelConfig:
        """The trunk's config (what the Trainer reads for checkpoints and logging)."""
        return self.base.cfg

    @property
    def gradient_checkpointing(self) -> bool:
        return self.base.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.base.gradient_checkpointing = value  # the trunk's blocks are what is recomputed

    def num_params(self) -> int:
        """Parameters used to score: the trunk's (embedding padding rows excluded) without an untied LM head, plus
        the head's dim weights."""
        lm_head = 0 if self.cfg.tie_embeddings else self.cfg.require_vocab_size() * self.cfg.dim
        return self.base.num_params() - lm_head + self.head.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: the trunk's without the LM head (never computed here), plus the scalar head."""
        lm_head = 6.0 * self.cfg.padded_vocab_size * self.cfg.dim
        return self.cfg.flops_per_token(seq_len) - lm_head + 6.0 * self.cfg.dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T) scalar per position."""
        h = self.base.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, D)
        return self.head(h).squeeze(-1).float()

    def sequence_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) the score at each sequence's last real token (attention_mask: (B, T), 1 = real, right padding)."""
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        last_token_index(attention_mask)  # checks every sequence has a real token before the forward
        return last_token_values(self(input_ids, attention_mask=attention_mask), attention_mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each right-padded sequence's last real token (attention_mask: (B, T), 1 = real)."""
    lengths = attention_mask.long().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("a sequence without any real token cannot be scored")
    return lengths - 1


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the per-position values (B, T) of a ScalarHeadModel read at each sequence's last real token: its
    score. For a loss that must call the model itself (e.g. wrapped in DistributedDataParallel)."""
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def export_hf_reward_model(
    model: ScalarHeadModel, out_dir, *, pad_token_id: int, tokenizer=None, dtype: str = "float32"
):
    """Write the model as an HF `LlamaForSequenceClassification` (num_labels 1) directory: transformers scores a
    right-padded batch at each sequence's last non-pad token, as `sequence_scores` does (pad_token_id must not occur
    inside a sequence). Dense models only."""
    import json

    from safetensors.torch import save_file

    from llm_core.export_hf import hf_config, to_hf_state_dict
    from llm_core.io import atomic_dir, tensor_bytes

    cfg = model.base.cfg
    if cfg.is_moe:
        raise ValueError("reward model export: MoE trunks are not supported; use a dense model")
    config = hf_config(cfg, pad_token_id=pad_token_id, dtype=dtype)
    config.update(
        architectures=["LlamaForSequenceClassification"],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
    )
    tensors = {k: v for k, v in to_hf_state_dict(model.base, dtype=dtype).items() if k != "lm_head.weight"}
    tensors["score.weight"] = (
        model.head.weight.detach().to("cpu", dtype=tensors["model.norm.weight"].dtype).clone()
    )
    with atomic_dir(out_dir, expected_bytes=tensor_bytes(tensors)) as tmp:
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


def load_hf_reward_model(path, *, dtype: str | None = None) -> ScalarHeadModel:
    """A reward model from an HF 1-label sequence-classification directory (what `export_hf_reward_model` writes),
    in eval mode: the trunk through llm_core.export_hf's loading (strict: missing or unexpected tensors are
    errors), the head from `score.weight`. Anything else (a causal LM export, several labels, a head of the wrong
    shape) is a ValueError naming the directory."""
    import json
    from pathlib import Path

    from llm_core.export_hf import read_hf_checkpoint, transformer_from_hf

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"reward model {str(path)!r} has no config.json: pass the directory export_hf_reward_model wrote"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"reward model {str(path)!r}: config.json is not valid JSON ({exc})") from None
    architectures = raw.get("architectures") or []
    labels = raw.get("num_labels", len(raw.get("id2label") or {}))
    if architectures != ["LlamaForSequenceClassification"] or labels != 1:
        raise ValueError(
            f"{str(path)!r} is not a reward model: its config.json has architectures {architectures} and "
            f"num_labels {labels}, a reward model needs ['LlamaForSequenceClassification'] with num_labels 1; "
            "pass a directory written by llm_core.value_model.export_hf_reward_model"
        )
    checkpoint = read_hf_checkpoint(path)
    head = checkpoint.tensors.pop("score.weight", None)
    cfg = checkpoint.cfg
    if head is None or tuple(head.shape) != (1, cfg.dim):
        shape = None if head is None else tuple(head.shape)
        raise ValueError(
            f"reward model {str(path)!r}: score.weight has shape {shape}, expected (1, {cfg.dim}) "
            "(one label on hidden_size): re-export it with export_hf_reward_model"
        )
    if not cfg.tie_embeddings and "lm_head.weight" not in checkpoint.tensors:
        # A sequence classifier has no language-model head; the trunk never reads it (scores come from the
        # hidden states), so an untied one is left all zeros rather than random.
        embed = checkpoint.tensors.get("model.embed_tokens.weight")  # if absent, the strict load names it
        if embed is not None:
            checkpoint.tensors["lm_head.weight"] = torch.zeros_like(embed)
    base = transformer_from_hf(checkpoint, dtype=dtype)
    model = ScalarHeadModel(base)
    weight_dtype = base.embed_tokens.weight.dtype
    with torch.no_grad():
        model.head.to(weight_dtype).weight.copy_(head.to(weight_dtype))
    return model.eval()
