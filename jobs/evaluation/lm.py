"""Text-level scoring on top of llm_core.scoring: documents and (context, continuation) pairs, tokenized the way
the model was trained (documents start after `<|endoftext|>`, the separator of pretraining streams)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jobs.evaluation.config import ScoringSpec
from llm_core.scoring import Scorer, ScoreRequest, ScoreResult
from llm_core.tokenizer import Tokenizer


class LMEvaluator:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, scoring: ScoringSpec):
        self.model, self.tokenizer = model, tokenizer
        max_len = model.cfg.max_seq_len if hasattr(model, "cfg") else None
        window = scoring.window or max_len
        if window is None:
            raise ValueError("scoring.window must be set for a model without a max_seq_len")
        if max_len is not None and window > max_len:
            raise ValueError(
                f"scoring.window {window} > the model's max_seq_len {max_len}: lower scoring.window"
            )
        self.window = window
        self.stride = scoring.stride or window
        self.scorer = Scorer(model, window=window, stride=self.stride, batch_tokens=scoring.batch_tokens)

    @property
    def start_id(self) -> int:
        """The token every document is conditioned on (pretraining documents follow `<|endoftext|>`)."""
        return self.tokenizer.eos_id

    def score_documents(self, docs: Sequence[str]) -> list[ScoreResult]:
        """Log-likelihood of each document's tokens given the document start (the start token not scored)."""
        ids = self.tokenizer.encode_batch(list(docs))
        return self.scorer.score([ScoreRequest([self.start_id, *x], 1) for x in ids])

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[ScoreResult]:
        """log P(continuation | document start + context) for each (context, continuation) pair. Context and
        continuation are tokenized separately (continuations usually start with a space), so the scored
        tokens are exactly the continuation's. A context too long for the window is cut from the left."""
        contexts = self.tokenizer.encode_batch([c for c, _ in pairs])
        conts = self.tokenizer.encode_batch([c for _, c in pairs])
        reqs = []
        for (ctx_text, _), ctx, cont in zip(pairs, contexts, conts):
            if not cont:
                raise ValueError(
                    f"empty continuation after context {ctx_text[-60:]!r}: every choice needs text"
                )
            reqs.append(ScoreRequest([self.start_id, *ctx, *cont], 1 + len(ctx)))
        return self.scorer.score(reqs)
