"""Exact log-likelihoods of token sequences under a causal LM, for evaluation (bits-per-byte, multiple choice).

A request is a token sequence `tokens` and the index `first` of the first token to score (>= 1: token 0 only
conditions). Every token at positions first..len-1 is scored exactly once, as log P(tokens[p] | tokens[:p]) with as
much of tokens[:p] as the window allows:

- a sequence that fits (len - 1 <= window) is scored in one forward pass with its full left context;
- a longer one is cut into windows, each scoring the next `stride` tokens (positions [a, b)) from an input of at
  most `window` tokens ending just before b (tokens[max(0, b - 1 - window) : b - 1]). With stride == window the
  windows are disjoint: each one conditions on its own tokens plus the one token before them (lm-evaluation-
  harness's `loglikelihood_rolling`, which this reproduces exactly). With stride < window every scored token sees
  at least window - stride tokens of context (a sliding window; slower by window / stride).

Windows of all requests are sorted by length and batched right-padded (padding after the last real token never
changes a causal LM's earlier logits, so no attention mask is needed) under a token budget per forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreRequest:
    tokens: list[int]
    first: int = 1  # first position scored; tokens before it only condition


@dataclass
class ScoreResult:
    logprob: float = 0.0  # sum of natural-log probabilities of the scored tokens
    tokens: int = 0  # number of scored tokens
    greedy: bool = True  # every scored token was the model's argmax


def plan_windows(n: int, first: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (s, a, b) covering positions [first, n) of an n-token sequence: the input is tokens[s : b - 1] and
    it scores positions a..b-1 (the logits at index p - 1 - s predict token p)."""
    if first < 1:
        raise ValueError(f"first scored position must be >= 1 (token 0 only conditions), got {first}")
    if not 1 <= stride <= window:
        raise ValueError(f"scoring stride {stride} must be in [1, window={window}]")
    out = []
    a = first
    while a < n:
        b = min(n, a + stride)
        out.append((max(0, b - 1 - window), a, b))
        a = b
    return out


class Scorer:
    """Scores ScoreRequests with `model(input_ids) -> object with .logits (B, T, V)` (llm_core or transformers)."""

    def __init__(
        self, model: torch.nn.Module, *, window: int, stride: int | None = None, batch_tokens: int = 4096
    ):
        if window < 1:
            raise ValueError(f"scoring window must be >= 1 token, got {window}")
        self.model = model
        self.window = window
        self.stride = stride or window
        if not 1 <= self.stride <= window:
            raise ValueError(f"scoring stride {self.stride} must be in [1, window={window}]")
        self.batch_tokens = batch_tokens
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        results = [ScoreResult() for _ in requests]
        jobs = []  # (input length, request index, s, a, b)
        for i, req in enumerate(requests):
            for s, a, b in plan_windows(len(req.tokens), req.first, self.window, self.stride):
                jobs.append((b - 1 - s, i, s, a, b))
        jobs.sort(key=lambda j: -j[0])
        was_training = self.model.training
        self.model.eval()
        try:
            start = 0
            while start < len(jobs):
                longest = jobs[start][0]
                rows = max(1, self.batch_tokens // max(longest, 1))
                batch = jobs[start : start + rows]
                start += len(batch)
                self._run(batch, longest, requests, results)
        finally:
            self.model.train(was_training)
        return results

    def _run(self, batch, longest: int, requests: list[ScoreRequest], results: list[ScoreResult]) -> None:
        B = len(batch)
        ids = torch.zeros((B, longest), dtype=torch.long)
        targets = torch.zeros((B, longest), dtype=torch.long)
        mask = torch.zeros((B, longest), dtype=torch.bool)
        for r, (length, i, s, a, b) in enumerate(batch):
            toks = requests[i].tokens
            ids[r, :length] = torch.tensor(toks[s : b - 1])
            # logits at index p - 1 - s predict token p, for p in [a, b)
            targets[r, a - 1 - s : b - 1 - s] = torch.tensor(toks[a:b])
            mask[r, a - 1 - s : b - 1 - s] = True
        out = self.model(ids.to(self.device))
        logits = (out.logits if hasattr(out, "logits") else out).float()  # (B, T, V)
        targets, mask = targets.to(logits.device), mask.to(logits.device)
        target_logit = logits.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
        logprob = (target_logit - torch.logsumexp(logits, dim=-1)).masked_fill(~mask, 0.0)
        greedy = (logits.argmax(-1) == targets) | ~mask
        per_row = logprob.double().sum(-1).tolist()
        all_greedy = greedy.all(-1).tolist()
        for r, (_, i, _s, a, b) in enumerate(batch):
            res = results[i]
            res.logprob += per_row[r]
            res.tokens += b - a
            res.greedy = res.greedy and bool(all_greedy[r])
