"""Bradley-Terry reward model training and evaluation on preference pairs, Ray-free (issue 17's reward model).

Pairs are token sequences (chosen, rejected) of the same prompt, e.g. DPO-format records rendered through the
chat template (`encode_pairs`). The model is a `ScalarHeadModel` (an llm_core trunk + a linear head); its score
of a sequence is the head's output at the sequence's last token. Training minimises -log sigmoid(s_chosen -
s_rejected); evaluation reports held-out pairwise accuracy with its Wilson 95% interval and the mean margin.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from llm_core.rl_losses import bradley_terry_loss
from llm_core.value_model import ScalarHeadModel

Pair = tuple[list[int], list[int]]  # (chosen ids, rejected ids)


def encode_pairs(records: Iterable[dict], tokenizer, seq_len: int) -> list[Pair]:
    """{"prompt", "chosen", "rejected"} records -> token pairs through the chat template, each sequence cut to
    seq_len tokens. A record without those keys is a ValueError naming it; empty or equal answers are skipped."""
    from llm_core.chat_data import prompt_to_messages

    pairs = []
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise ValueError(
                f"preference record {n}: missing {missing} (records need prompt, chosen, rejected)"
            )
        chosen, rejected = str(rec["chosen"]).strip(), str(rec["rejected"]).strip()
        if not chosen or not rejected or chosen == rejected:
            continue
        prompt = prompt_to_messages(rec["prompt"], f"record {n}")
        pair = [
            tokenizer.encode_chat(prompt + [{"role": "assistant", "content": text}])[0][:seq_len]
            for text in (chosen, rejected)
        ]
        pairs.append((pair[0], pair[1]))
    return pairs


def preference_pair_rows(
    records: Iterable[tuple[str, dict]], tokenizer, seq_len: int, stats
) -> list[dict[str, torch.Tensor]]:
    """Training rows of a reward model from (where, record) preference records (`llm_core.chat_data.read_jsonl`):
    one row per pair, "input_ids" and "attention_mask" (2, seq_len) = chosen then rejected, right-padded with the
    tokenizer's pad id. Each sequence is the whole chat (prompt + answer) through the chat template; a longer one
    keeps its last seq_len tokens (counted in stats.truncated), so the score is always read at the end of the
    answer and only the start of a long prompt is lost. A pair is skipped (counted by reason) when an answer is
    empty, the answers are equal, or both sequences are equal once cut. A record without prompt, chosen and
    rejected is a DataError naming it."""
    from llm_core.chat_data import prompt_to_messages
    from llm_core.data import DataError

    rows = []
    for where, rec in records:
        stats.read += 1
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise DataError(
                f"{where}: missing {missing}: preference records need prompt, chosen and rejected"
            )
        chosen, rejected = str(rec["chosen"]).strip(), str(rec["rejected"]).strip()
        if not chosen or not rejected:
            stats.skipped["empty chosen or rejected"] += 1
            continue
        if chosen == rejected:
            stats.skipped["chosen equals rejected"] += 1
            continue
        prompt = prompt_to_messages(rec["prompt"], where)
        seqs = []
        for text in (chosen, rejected):
            ids = tokenizer.encode_chat(prompt + [{"role": "assistant", "content": text}])[0]
            if len(ids) > seq_len:
                ids = ids[-seq_len:]
                stats.truncated += 1
            seqs.append(ids)
        if seqs[0] == seqs[1]:
            stats.skipped["equal once cut to seq_len"] += 1
            continue
        ids, mask = pair_batch([(seqs[0], seqs[1])], tokenizer.pad_id)
        pad = seq_len - ids.size(1)
        rows.append(
            {
                "input_ids": torch.nn.functional.pad(ids, (0, pad), value=tokenizer.pad_id),
                "attention_mask": torch.nn.functional.pad(mask, (0, pad), value=0),
            }
        )
        stats.kept += 1
    return rows


def rows_to_pairs(rows: Sequence[dict[str, torch.Tensor]]) -> list[Pair]:
    """The (chosen ids, rejected ids) pairs of `preference_pair_rows` rows, padding removed."""
    return [
        tuple(row["input_ids"][i][row["attention_mask"][i].bool()].tolist() for i in (0, 1))  # type: ignore[misc]
        for row in rows
    ]


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (2B, T), right-padded: all chosen sequences, then all rejected."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an empty sequence cannot be scored")
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default)."""
    if n <= 0:
        raise ValueError("no held-out pairs: the accuracy has no interval")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@dataclass
class PairwiseEval:
    accuracy: float
    pairs: int
    ci_low: float
    ci_high: float
    margin: float  # mean s_chosen - s_rejected


@torch.no_grad()
def evaluate(
    model: ScalarHeadModel, pairs: Sequence[Pair], pad_id: int, batch_size: int = 16
) -> PairwiseEval:
    model.eval()
    wins, margins = 0, []
    for s in range(0, len(pairs), batch_size):
        part = pairs[s : s + batch_size]
        ids, mask = pair_batch(part, pad_id)
        scores = model.sequence_scores(ids, mask)
        diff = scores[: len(part)] - scores[len(part) :]
        wins += int((diff > 0).sum())
        margins += diff.tolist()
    low, high = wilson_interval(wins, len(pairs))
    return PairwiseEval(wins / len(pairs), len(pairs), low, high, sum(margins) / len(margins))


def train(
    model: ScalarHeadModel,
    pairs: Sequence[Pair],
    pad_id: int,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
) -> list[float]:
    """AdamW on the Bradley-Terry loss over shuffled batches of pairs; the loss per step."""
    if not pairs:
        raise ValueError("no training pairs")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(pairs)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask = pair_batch([pairs[i] for i in idx], pad_id)
        scores = model.sequence_scores(ids, mask)
        loss, _ = bradley_terry_loss(scores[: len(idx)], scores[len(idx) :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
