"""Token data for training: flat token arrays and a seeded, resumable random-window sampler.

A token stream is a 1-D array of token ids (uint16 when the vocabulary fits, else uint32) in which documents
follow each other, each ending with the tokenizer's end-of-text id. On disk it is a raw `.bin` file that is
memory-mapped, so many workers read the same shard without copies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np
import torch


class DataError(ValueError):
    """Training data is missing or unusable; the message says what to do."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def concat_documents(docs: Iterable[list[int]], vocab_size: int) -> np.ndarray:
    """Concatenate tokenised documents into one flat array of the smallest fitting dtype."""
    arrays = [np.asarray(d, dtype=np.int64) for d in docs]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise DataError(f"token ids outside [0, {vocab_size}): the data was tokenised with another tokenizer")
    return flat.astype(token_dtype(vocab_size))


class StepSampler(ABC):
    """A seeded, resumable training sampler whose whole position is the optimizer step: `batches_at(step, accum)`
    (the subclass's) gives this rank's micro-batches of a step, the same for every run with the same seed."""

    def __init__(self, batch_size: int, *, seed: int, rank: int, world_size: int):
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    @abstractmethod
    def batches_at(self, step: int, accum_steps: int = 1) -> list:
        """This rank's `accum_steps` micro-batches of optimizer step `step`."""

    def next_step(self, accum_steps: int = 1) -> list:
        batches = self.batches_at(self.step, accum_steps)
        self.step += 1
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"data sampler seed {self.seed} differs from the checkpoint's {state.get('seed')}"
            )
        self.step = int(state["step"])


class RandomWindows(StepSampler):
    """Random (input, target) windows of `seq_len` tokens from a flat token array, for data-parallel training.

    Deterministic, resumable and world-size invariant: optimizer step s draws one *global* batch of
    accum_steps x world_size x batch_size window starts from a generator seeded by (seed, s); rank r's micro-batch m
    is rows [(m * world_size + r) * batch_size, ... + batch_size). So 1 worker x batch 8, 1 worker x batch 4 x
    accumulation 2 and 2 workers x batch 4 all train on the same 8 windows per step, and the data position saved
    in a checkpoint is just `step`. Each worker reads only its own rows from the memory-mapped stream.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        name: str = "train",
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        need = seq_len + 1
        if len(tokens) < need:
            raise DataError(
                f"not enough tokens in the {name} data for one training batch: need {need} (seq_len {seq_len} + 1), "
                f"have {len(tokens)}: add text, or lower seq_len"
            )
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        self.tokens = tokens
        self.seq_len = seq_len

    @property
    def num_windows(self) -> int:
        return len(self.tokens) - self.seq_len

    def _starts(self, step: int, count: int) -> list[int]:
        seed = np.random.SeedSequence([self.seed, step]).generate_state(1, dtype=np.uint64)[0]
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randint(0, self.num_windows + 1, (count,), generator=gen).tolist()

    def _rows(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def batches_at(self, step: int, accum_steps: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for optimizer step `step`: accum_steps pairs of (batch_size, seq_len) int64."""
        B, W = self.batch_size, self.world_size
        starts = self._starts(step, accum_steps * W * B)
        return [
            self._rows(starts[(m * W + self.rank) * B : (m * W + self.rank + 1) * B])
            for m in range(accum_steps)
        ]


def sequential_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Non-overlapping (inputs, targets) windows covering the stream in order, for evaluation. Yields (1, T) pairs."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        chunk = torch.from_numpy(np.asarray(tokens[i * seq_len : (i + 1) * seq_len + 1], dtype=np.int64))
        yield chunk[None, :-1], chunk[None, 1:]
