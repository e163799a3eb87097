"""A transformer with a scalar head: a reward model (one score per sequence) or a PPO critic (one value per token).

The trunk is an llm_core `Transformer` (its final normed hidden states, `Transformer.hidden_states`); the head is
one linear layer dim -> 1. A reward model reads the score at each sequence's last real token (right padding,
`attention_mask` 1 on real tokens), as Hugging Face's *ForSequenceClassification models do; a critic reads every
position. The head is initialised on construction (`init_weights`), the trunk keeps its weights.
"""

from __future__ import annotations

import torch
from torch import nn

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
        lengths = attention_mask.long().sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("a sequence without any real token cannot be scored")
        values = self(input_ids, attention_mask=attention_mask)  # (B, T)
        return values.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)


def export_hf_reward_model(
    model: ScalarHeadModel, out_dir, *, pad_token_id: int, tokenizer=None, dtype: str = "float32"
):
    """Write the model as an HF `LlamaForSequenceClassification` (num_labels 1) directory: transformers scores a
    right-padded batch at each sequence's last non-pad token, as `sequence_scores` does (pad_token_id must not occur
    inside a sequence). Dense models only."""
    import json

    from safetensors.torch import save_file

    from llm_core.export_hf import hf_config, to_hf_state_dict
    from llm_core.io import atomic_dir

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
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir
