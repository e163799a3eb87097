"""Conversation data for post-training: SFT examples (loss on assistant tokens only), packing or padding into
fixed-length rows, preference pairs for DPO, and a resumable row sampler.

Accepted SFT records (jsonl, one per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
Accepted preference records: {"prompt": str | messages, "chosen": str, "rejected": str}; a string prompt in the
Anthropic HH form ("\\n\\nHuman: ...\\n\\nAssistant:") is split into turns, any other string is one user turn.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llm_core.data import DataError, StepSampler
from llm_core.text import iter_jsonl
from llm_core.tokenizer import Tokenizer

Messages = list[dict[str, str]]


@dataclass
class Example:
    """A tokenized conversation: ids and which of them the model learns to produce."""

    ids: list[int]
    learn: list[bool]


@dataclass
class Stats:
    """What happened to the records: kept, and skipped or changed per reason (all counted, none silent)."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
        }


# ---------------------------------------------------------------------------------------------- reading


def read_jsonl(paths: Iterable[str | Path]) -> Iterator[tuple[str, dict]]:
    """(where, record) for every line of the files; a malformed line is a DataError naming file and line."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data file {str(p)!r} not found: fix the path in the config")
        for lineno, rec in iter_jsonl(p):
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield f"{p}:{lineno}", rec


def record_to_messages(rec: dict, where: str) -> Messages:
    """Normalise one SFT record to chat messages; DataError names the record and what is wrong."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise DataError(
                    f"{where}: message {i} has role {m.get('role') if isinstance(m, dict) else m!r}; "
                    "use system, user or assistant"
                )
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} content must be a string")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "instruction" in rec and "output" in rec:
        user = rec["instruction"].strip()
        if rec.get("input"):
            user = f"{user}\n\n{str(rec['input']).strip()}"
        msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        return msgs + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": str(rec["output"])},
        ]
    raise DataError(
        f"{where}: unknown record format (keys {sorted(rec)}): use {{'messages': [...]}} or "
        "{'instruction', 'input', 'output'}"
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):\s?")


def prompt_to_messages(prompt: str | list, where: str) -> Messages:
    """A preference prompt as chat messages (the final assistant turn is the response being compared)."""
    if isinstance(prompt, list):
        return record_to_messages({"messages": prompt}, where)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
    parts = _HH_TURN.split("\n\n" + prompt.lstrip("\n") if prompt.lstrip().startswith("Human:") else prompt)
    if len(parts) == 1:
        return [{"role": "user", "content": prompt.strip()}]
    msgs = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if text.strip():
            msgs.append({"role": role, "content": text.strip()})
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn (an empty 'Assistant:' to answer)")
    return msgs


# ------------------------------------------------------------------------------------------ tokenizing


def last_turn_only(ids: list[int], learn: list[bool], im_start_id: int) -> list[bool]:
    """Keep the learn mask of the final assistant turn only (for preference pairs)."""
    last = max(i for i, t in enumerate(ids) if t == im_start_id)
    return [m and i > last for i, m in enumerate(learn)]


def encode_examples(
    conversations: Iterable[tuple[str, Messages]],
    tokenizer: Tokenizer,
    max_tokens: int,
    overflow: Literal["truncate", "drop"],
    stats: Stats,
) -> list[Example]:
    """Tokenize with the chat template; examples longer than max_tokens are truncated or dropped (counted)."""
    out = []
    for _where, msgs in conversations:
        stats.read += 1
        if not any(m["role"] == "assistant" for m in msgs):
            stats.skipped["no assistant turn"] += 1
            continue
        ids, learn = tokenizer.encode_chat(msgs)
        if len(ids) > max_tokens:
            if overflow == "drop":
                stats.skipped["longer than max tokens"] += 1
                continue
            ids, learn = ids[:max_tokens], learn[:max_tokens]
            stats.truncated += 1
        if not any(learn[1:]):
            stats.skipped["no assistant tokens left after truncation"] += 1
            continue
        out.append(Example(ids, learn))
        stats.kept += 1
    return out


def _pairs(ex: Example) -> tuple[list[int], list[int]]:
    """Next-token (inputs, targets) of one example: target t is ids[t+1] where it is learned, else -100."""
    targets = [tok if learn else -100 for tok, learn in zip(ex.ids[1:], ex.learn[1:])]
    return ex.ids[:-1], targets


def pad_rows(examples: list[Example], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """One example per row, right-padded to seq_len (examples must fit: len(ids) <= seq_len + 1)."""
    rows = []
    for ex in examples:
        x, y = _pairs(ex)
        n = len(x)
        rows.append(
            {
                "input_ids": torch.tensor(x + [pad_id] * (seq_len - n)),
                "targets": torch.tensor(y + [-100] * (seq_len - n)),
            }
        )
    return rows


def pack_rows(examples: list[Example], seq_len: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Several examples per row (next-fit, in order). Each keeps its own segment id and positions starting at 0,
    so attention never crosses examples: a packed row trains exactly like its examples padded one per row."""
    rows: list[dict[str, torch.Tensor]] = []
    cur_x: list[int] = []
    cur_y: list[int] = []
    cur_seg: list[int] = []
    cur_pos: list[int] = []

    def flush() -> None:
        if not cur_x:
            return
        n = len(cur_x)
        pad = seq_len - n
        rows.append(
            {
                "input_ids": torch.tensor(cur_x + [pad_id] * pad),
                "targets": torch.tensor(cur_y + [-100] * pad),
                "segment_ids": torch.tensor(cur_seg + [-1] * pad),  # padding is its own segment
                "position_ids": torch.tensor(cur_pos + list(range(pad))),
            }
        )
        cur_x.clear(), cur_y.clear(), cur_seg.clear(), cur_pos.clear()

    for ex in examples:
        x, y = _pairs(ex)
        if len(cur_x) + len(x) > seq_len:
            flush()
        seg = (cur_seg[-1] + 1) if cur_seg else 0
        cur_x += x
        cur_y += y
        cur_seg += [seg] * len(x)
        cur_pos += list(range(len(x)))
    flush()
    return rows


def preference_rows(
    records: Iterable[tuple[str, dict]], tokenizer: Tokenizer, seq_len: int, stats: Stats
) -> list[dict[str, torch.Tensor]]:
    """One row per pair: "input_ids"/"targets" (2, seq_len) = chosen then rejected, learning only the response.

    Pairs whose prompt leaves no room for a response in seq_len + 1 tokens are dropped (counted); responses are
    truncated to fit (counted)."""
    rows = []
    for where, rec in records:
        stats.read += 1
        for key in ("prompt", "chosen", "rejected"):
            if key not in rec:
                raise DataError(
                    f"{where}: missing {key!r}: preference records need prompt, chosen and rejected"
                )
        if not str(rec["chosen"]).strip() or not str(rec["rejected"]).strip():
            stats.skipped["empty chosen or rejected"] += 1
            continue
        if rec["chosen"] == rec["rejected"]:
            stats.skipped["chosen equals rejected"] += 1
            continue
        prompt = prompt_to_messages(rec["prompt"], where)
        pair = []
        for key in ("chosen", "rejected"):
            msgs = prompt + [{"role": "assistant", "content": str(rec[key]).strip()}]
            ids, learn = tokenizer.encode_chat(msgs)
            learn = last_turn_only(ids, learn, tokenizer.im_start_id)
            if len(ids) > seq_len + 1:
                ids, learn = ids[: seq_len + 1], learn[: seq_len + 1]
                stats.truncated += 1
            pair.append(Example(ids, learn))
        if not all(any(ex.learn[1:]) for ex in pair):
            stats.skipped["prompt longer than seq_len"] += 1
            continue
        padded = pad_rows(pair, seq_len, tokenizer.pad_id)
        rows.append(
            {
                "input_ids": torch.stack([r["input_ids"] for r in padded]),
                "targets": torch.stack([r["targets"] for r in padded]),
            }
        )
        stats.kept += 1
    return rows


# ---------------------------------------------------------------------------------------------- sampler


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows; preference rows (2, T) become (2B, T) with all chosen first, then all rejected."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    if batch["input_ids"].dim() == 3:  # (B, 2, T) pairs
        pairs = len(rows)
        batch = {k: torch.cat([v[:, 0], v[:, 1]]) if v.dim() == 3 else v for k, v in batch.items()}
        batch["weight"] = torch.tensor(pairs)
    return batch


def batches_of(rows: list[dict[str, torch.Tensor]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Rows collated into consecutive batches (for evaluation)."""
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


class RowSampler(StepSampler):
    """Global batches of rows drawn epoch by epoch from a seeded permutation: deterministic, resumable (the
    position is `step`) and, like RandomWindows, the same rows per optimizer step for any world size and
    accumulation (rank r's micro-batch m is rows [(m * world + r) * B, ... + B) of the step's global batch)."""

    def __init__(
        self,
        rows: list[dict[str, torch.Tensor]],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not rows:
            raise DataError("no training rows left after filtering: check the data files and the skip counts")
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        self.rows = rows
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _row_at(self, global_index: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(global_index, len(self.rows))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perm_epoch = epoch
        return self.rows[int(self._perm[offset])]

    def batches_at(self, step: int, accum_steps: int = 1) -> list[dict[str, torch.Tensor]]:
        B, W = self.batch_size, self.world_size
        base = step * accum_steps * W * B
        out = []
        for m in range(accum_steps):
            first = base + (m * W + self.rank) * B
            out.append(collate([self._row_at(first + j) for j in range(B)]))
        return out

    def epochs(self, accum_steps: int = 1) -> float:
        return self.step * accum_steps * self.world_size * self.batch_size / len(self.rows)


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) by a seeded shuffle; at least one held-out item when fraction > 0."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(items) * fraction)) if fraction > 0 and len(items) > 1 else 0
    val = {order[i] for i in range(n_val)}
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]
