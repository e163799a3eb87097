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
        self.head = nn.Linear(base.cfg.dim, 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The head only (the trunk comes from a trained model): Normal(0, 1/sqrt(dim + 1)) weights, bias 0, so
        initial scores have about unit scale."""
        nn.init.normal_(self.head.weight, std=1.0 / (self.base.cfg.dim + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

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
