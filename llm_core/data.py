"""Token data for training: token streams and a seeded, resumable random-window sampler.

A token stream is a sequence of token ids (uint16 when the vocabulary fits, else uint32) in which documents follow
each other, each ending with the tokenizer's end-of-text id. In memory it is a 1-D array; on disk it is one or more
raw `.bin` files (a dataset's shards), read as one stream by `TokenStream` without ever loading them: the samplers
below only need `len(tokens)` and `tokens[a:b]`, which both give.
"""

from __future__ import annotations

import contextlib
import operator
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

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


class TokenStream:
    """The read-only concatenation of token files on disk (e.g. a dataset's shards), in the given order.

    >>> stream = TokenStream([("a.bin", 1000), ("b.bin", 0), ("c.bin", 500)], np.uint16)
    >>> len(stream)       # 1500: from the token counts given, nothing is read
    >>> stream[990:1010]  # a new ndarray of 20 tokens: the last 10 of a.bin, then the first 10 of c.bin

    A slice `[a:b]` (step 1, negative bounds as in numpy) finds the first file it touches by binary search over the
    files' start offsets and reads each file's part with one seek and read straight into the result, so a read
    costs what it returns, whatever the size of the dataset. Files are opened on first use; at most `max_open`
    stay open (least recently used closed first). The files are not memory-mapped on purpose: every page a mapping
    touches counts in the process's resident memory until the kernel reclaims it, so a long run of random windows
    over a mapped dataset grows the worker's RSS towards the dataset's size; read like this, the worker holds only
    the windows it asked for, and the OS page cache (shared by all workers on a node) keeps hot data in memory.

    The stream is never materialised implicitly (`np.asarray(stream)` raises): read the range you need, e.g.
    `stream[:]` for all of a small one. Not safe to share between threads that read at the same time; a pickled
    stream (e.g. shipped to a Ray worker) reopens its files where it is read.
    """

    def __init__(
        self, files: Sequence[tuple[str | Path, int]], dtype: np.dtype | type | str, *, max_open: int = 64
    ):
        self.dtype = np.dtype(dtype)
        self.files = [(Path(path), int(n)) for path, n in files]
        if any(n < 0 for _, n in self.files):
            raise ValueError(f"token counts must be >= 0, got {[n for _, n in self.files]}")
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        # offsets[i] is where file i starts in the stream; offsets[-1] is the stream's length
        self._offsets = np.zeros(len(self.files) + 1, dtype=np.int64)
        np.cumsum([n for _, n in self.files], out=self._offsets[1:])
        self._open: OrderedDict[int, object] = OrderedDict()  # file index -> unbuffered binary file

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError(f"TokenStream slices must be contiguous (step 1), got step {key.step}")
            return self._read(start, max(start, stop))
        try:
            i = operator.index(key)  # ints and numpy integers, not floats or strings
        except TypeError:
            raise TypeError(
                f"TokenStream indices are ints or contiguous slices, not {type(key).__name__}"
            ) from None
        if not -n <= i < n:
            raise IndexError(f"token index {key} is out of range for a stream of {n} tokens")
        i %= n
        return self._read(i, i + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.dtype)
        if stop == start:
            return out
        # the last file starting at or before `start` holds it (empty files share their start with the next one)
        f = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            file_start, file_end = int(self._offsets[f]), int(self._offsets[f + 1])
            end = min(stop, file_end)
            if end > pos:
                self._read_file(f, pos - file_start, out[pos - start : end - start])
            pos, f = end, f + 1
        return out

    def _read_file(self, f: int, first: int, into: np.ndarray) -> None:
        fh = self._file(f)
        fh.seek(first * self.dtype.itemsize)
        want = into.nbytes
        got = fh.readinto(memoryview(into).cast("B"))
        if got != want:
            path, n = self.files[f]
            raise DataError(
                f"token file {path} ended early: read {got} of {want} bytes at token {first} (the manifest says "
                f"{n} tokens, {n * self.dtype.itemsize} bytes): the file changed after it was written, re-run "
                "preprocessing"
            )

    def _file(self, f: int):
        fh = self._open.get(f)
        if fh is not None:
            self._open.move_to_end(f)
            return fh
        while len(self._open) >= self.max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        path = self.files[f][0]
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open across reads, closed by close()/LRU
        except FileNotFoundError:
            raise DataError(f"token file {path} is missing: re-run preprocessing") from None
        self._open[f] = fh
        return fh

    def close(self) -> None:
        """Close the open files (a later read reopens what it needs)."""
        while self._open:
            self._open.popitem()[1].close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # e.g. at interpreter shutdown: nothing left to release
            self.close()

    def __reduce__(self):
        return (type(self), (self.files, self.dtype.str), {"max_open": self.max_open})

    def __setstate__(self, state: dict) -> None:
        self.max_open = state["max_open"]

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"a TokenStream of {len(self):,} tokens is not converted to an array implicitly: read the range you "
            "need with stream[a:b]"
        )

    def __repr__(self) -> str:
        return f"TokenStream({len(self):,} tokens of {self.dtype.name} in {len(self.files)} file(s))"


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
    """Random (input, target) windows of `seq_len` tokens from a token stream, for data-parallel training.

    Deterministic, resumable and world-size invariant: optimizer step s draws one *global* batch of
    accum_steps x world_size x batch_size window starts from a generator seeded by (seed, s); rank r's micro-batch m
    is rows [(m * world_size + r) * batch_size, ... + batch_size). So 1 worker x batch 8, 1 worker x batch 4 x
    accumulation 2 and 2 workers x batch 4 all train on the same 8 windows per step, and the data position saved
    in a checkpoint is just `step`. Each worker reads only its own rows: `tokens` is an array or a `TokenStream`
    over the dataset's shards (the same windows either way: window starts index the stream, not its files).
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenStream,
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
        # The valid starts are 0 .. num_windows - 1 (a window needs seq_len + 1 tokens). Earlier releases drew up to
        # num_windows inclusive and failed on the rare draw of the last value; it is folded onto the last valid
        # start instead of narrowing the draw, so every other draw, and every training run, stays the same.
        starts = torch.randint(0, self.num_windows + 1, (count,), generator=gen)
        return starts.clamp_(max=self.num_windows - 1).tolist()

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


class RepeatedSpanWindows(RandomWindows):
    """RandomWindows in which a share of the windows repeat a span of their own text further on: synthetic
    long-range recall for context extension (recalling a span seen hundreds of tokens earlier pays only when the
    model attends that far back, the skill a passkey or a quotation needs).

    For each window w = tokens[start : start + seq_len + 1] (inputs w[:-1], targets w[1:]), a generator seeded by
    (seed, step, the window's row in the global batch) decides, with probability `share`, to copy a span:

        m ~ U{min_tokens .. max_tokens}               span length
        d ~ U{m + min_distance .. seq_len + 1 - m}    distance from the span's source to its copy
        a ~ U{0 .. seq_len + 1 - m - d}               source start;  w[a + d : a + d + m] = w[a : a + m]

    so copies reach every distance up to the window (the new context), from the dataset's own text: no template,
    words or numbers of any evaluation. World-size invariant like RandomWindows (the row index is global).
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenStream,
        seq_len: int,
        batch_size: int,
        *,
        share: float,
        min_tokens: int,
        max_tokens: int,
        min_distance: int = 0,
        source: str = "text",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        name: str = "train",
    ):
        if source not in ("text", "shuffled"):
            raise ValueError(f"repeated spans: source must be 'text' or 'shuffled', got {source!r}")
        if not 0 < share <= 1 or not 0 < min_tokens <= max_tokens or min_distance < 0:
            raise ValueError(
                f"repeated spans: need 0 < share <= 1 (got {share}), 0 < min_tokens <= max_tokens (got "
                f"{min_tokens}, {max_tokens}) and min_distance >= 0 (got {min_distance})"
            )
        if 2 * max_tokens + min_distance > seq_len + 1:
            raise ValueError(
                f"repeated spans of up to {max_tokens} tokens at least {min_distance} apart do not fit a window of "
                f"{seq_len} + 1 tokens: need 2 x max_tokens + min_distance <= seq_len + 1"
            )
        super().__init__(tokens, seq_len, batch_size, seed=seed, rank=rank, world_size=world_size, name=name)
        self.share, self.min_tokens, self.max_tokens = share, min_tokens, max_tokens
        self.min_distance, self.source = min_distance, source

    def repeat_span(self, window: np.ndarray, step: int, row: int) -> tuple[int, int, int] | None:
        """Copy a span of `window` (seq_len + 1 tokens, in place) as the class docstring says; (source, copy,
        length), or None when this window is left as it is."""
        rng = np.random.default_rng([self.seed, step, row])
        if rng.random() >= self.share:
            return None
        n = len(window)
        m = int(rng.integers(self.min_tokens, self.max_tokens + 1))
        d = int(rng.integers(m + self.min_distance, n - m + 1))
        a = int(rng.integers(0, n - m - d + 1))
        if self.source == "shuffled":
            window[a : a + m] = rng.permutation(window[a : a + m])
        window[a + d : a + d + m] = window[a : a + m]
        return a, a + d, m

    def batches_at(self, step: int, accum_steps: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        B, W = self.batch_size, self.world_size
        starts = self._starts(step, accum_steps * W * B)
        out = []
        for m in range(accum_steps):
            first = (m * W + self.rank) * B  # this micro-batch's first row in the global batch
            rows = np.stack(
                [
                    np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64)
                    for s in starts[first : first + B]
                ]
            )
            for i, window in enumerate(rows):
                self.repeat_span(window, step, first + i)
            t = torch.from_numpy(rows)
            out.append((t[:, :-1], t[:, 1:]))
        return out


RECALL_KINDS = ("random", "random_in_text", "shuffled_in_text", "number_in_text")


class RecallRows(StepSampler):
    """Another sampler's micro-batches with `rows` synthetic recall rows added to each: in-context retrieval to
    learn from the first step (an induction head: find the earlier occurrence of the current token, predict what
    followed it), the skill passkey retrieval and quoting need, which a small model does not pick up from a
    corpus in a CPU budget.

    Each recall row is cut into segments of `segment_tokens`, independent sequences (segment_ids: no attention
    across them). A segment w is segment_tokens + 1 tokens in which a span of m tokens is written twice:

        d ~ U{m .. segment_tokens + 1 - m}             distance from the span to its copy (never a fixed one)
        a ~ U{0 .. segment_tokens + 1 - m - d}         w[a : a + m] = w[a + d : a + d + m] = span

    and only the copy's tokens 2..m are targets (every other target is -100): the only loss a recall row adds is
    for predicting a copy from its first token on, by content. What w and the span are is the segment's kind,
    drawn with the weights `kinds` (default: all `random`):

        random            w: ids drawn uniformly from `token_ids`; the span: the m ~ U{min_tokens..max_tokens}
                          ids already at w[a:], so nothing in the segment is predictable from a corpus
        random_in_text    w: a stretch of `text` (the training tokens); the span: m uniform ids, as above
        shuffled_in_text  w: text; the span: m text tokens from elsewhere in `text`, in a random order (text
                          tokens the language model has an opinion about, predictable only by looking back)
        number_in_text    w: text; the span: 1-4 text tokens from elsewhere, in a random order, then a number:
                          one of `number_start_ids` (" 4", " 19", or a lone space where the tokenizer splits
                          it off) and 0-3 of `number_piece_ids` (digits: "8", "213");
                          the copy's targets include the number's first token, predicted from the tokens before

    A random row learns the copy fastest (the rows' phase change comes after a few hundred steps, see
    docs/evaluation.md); the in-text kinds make the same skill fire inside prose and for digits, where the model's
    language model competes with it. The text rows are the base sampler's, unchanged. Deterministic per (seed,
    step, row of the global batch): world-size invariant and resumable like the base; with the default kinds the
    rows are those of a sampler without `kinds`, draw for draw.
    """

    LONGEST_NUMBER_SPAN = 8  # number_in_text: 4 text tokens + a number of at most 4 tokens

    def __init__(
        self,
        base: StepSampler,
        seq_len: int,
        *,
        rows: int,
        segment_tokens: int,
        min_tokens: int,
        max_tokens: int,
        token_ids: np.ndarray,
        kinds: dict[str, float] | None = None,
        text: np.ndarray | TokenStream | None = None,
        number_start_ids: Sequence[int] = (),
        number_piece_ids: Sequence[int] = (),
    ):
        if rows < 1 or segment_tokens < 1 or seq_len % segment_tokens or not 0 < min_tokens <= max_tokens:
            raise ValueError(
                f"recall rows: need rows >= 1 (got {rows}), segment_tokens dividing seq_len (got {segment_tokens}, "
                f"{seq_len}) and 0 < min_tokens <= max_tokens (got {min_tokens}, {max_tokens})"
            )
        if 2 * max_tokens > segment_tokens + 1:
            raise ValueError(
                f"recall rows: a span of up to {max_tokens} tokens and its copy do not fit a segment of "
                f"{segment_tokens} + 1 tokens: need 2 x max_tokens <= segment_tokens + 1"
            )
        if len(token_ids) < 2:
            raise ValueError(f"recall rows: need at least 2 token ids to draw from, got {len(token_ids)}")
        kinds = dict(kinds or {"random": 1.0})
        unknown = sorted(set(kinds) - set(RECALL_KINDS))
        weights = np.array(list(kinds.values()), dtype=np.float64)
        if unknown or not (weights >= 0).all() or weights.sum() <= 0:
            raise ValueError(
                f"recall rows: kinds {kinds}: each must be one of {list(RECALL_KINDS)} with a weight >= 0, and the "
                "weights must not all be 0"
            )
        if set(kinds) != {"random"} and (text is None or len(text) < segment_tokens + max_tokens + 2):
            raise ValueError(
                f"recall rows: kinds {sorted(kinds)} write into text: need text of at least "
                f"{segment_tokens + max_tokens + 2} tokens, got {0 if text is None else len(text)}"
            )
        if kinds.get("number_in_text", 0) > 0:
            if not len(number_start_ids) or not len(number_piece_ids):
                raise ValueError(
                    "recall rows: number_in_text needs the tokenizer's number tokens (number_start_ids: what a "
                    f"number after a space starts with, number_piece_ids: digits), got {len(number_start_ids)} and "
                    f"{len(number_piece_ids)}"
                )
            if segment_tokens + 1 < 2 * self.LONGEST_NUMBER_SPAN:
                raise ValueError(
                    f"recall rows: a number_in_text span of up to {self.LONGEST_NUMBER_SPAN} tokens and its copy do "
                    f"not fit a segment of {segment_tokens} + 1 tokens: raise segment_tokens"
                )
        super().__init__(base.batch_size, seed=base.seed, rank=base.rank, world_size=base.world_size)
        self.base, self.seq_len, self.rows = base, seq_len, rows
        self.segment_tokens, self.min_tokens, self.max_tokens = segment_tokens, min_tokens, max_tokens
        self.token_ids = np.asarray(token_ids, dtype=np.int64)
        self.kinds, self.kind_p = list(kinds), weights / weights.sum()
        self.text = text
        self.number_start_ids = np.asarray(number_start_ids, dtype=np.int64)
        self.number_piece_ids = np.asarray(number_piece_ids, dtype=np.int64)

    def text_tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n consecutive tokens of `text` from a random place, in a new array (written into: never a view)."""
        start = int(rng.integers(0, len(self.text) - n))
        return np.array(self.text[start : start + n], dtype=np.int64, copy=True)

    def segment(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one segment, (segment_tokens,) each, targets -100 except the copy's tokens 2..m."""
        S = self.segment_tokens
        kind = (
            self.kinds[0] if len(self.kinds) == 1 else self.kinds[rng.choice(len(self.kinds), p=self.kind_p)]
        )
        if kind == "random":
            w = self.token_ids[rng.integers(0, len(self.token_ids), S + 1)]
            span = None  # the ids already at w[a:]
            m = int(rng.integers(self.min_tokens, self.max_tokens + 1))
        else:
            w = self.text_tokens(rng, S + 1)
            if kind == "random_in_text":
                span = self.token_ids[
                    rng.integers(0, len(self.token_ids), rng.integers(self.min_tokens, self.max_tokens + 1))
                ]
            elif kind == "shuffled_in_text":
                span = rng.permutation(
                    self.text_tokens(rng, int(rng.integers(self.min_tokens, self.max_tokens + 1)))
                )
            else:  # number_in_text
                context = rng.permutation(self.text_tokens(rng, int(rng.integers(1, 5))))
                number = [
                    self.number_start_ids[rng.integers(len(self.number_start_ids))],
                    *self.number_piece_ids[
                        rng.integers(0, len(self.number_piece_ids), int(rng.integers(0, 4)))
                    ],
                ]
                span = np.concatenate([context, np.asarray(number, dtype=np.int64)])
            m = len(span)
        d = int(rng.integers(m, S + 2 - m))
        a = int(rng.integers(0, S + 2 - m - d))
        if span is not None:
            w[a : a + m] = span
        w[a + d : a + d + m] = w[a : a + m]
        targets = np.full(S, -100, dtype=np.int64)
        # input position j predicts w[j + 1]: the copy's tokens 2..m are predicted at positions a + d .. a + d + m - 2
        targets[a + d : a + d + m - 1] = w[a + d + 1 : a + d + m]
        return w[:-1], targets

    def recall_batch(self, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, segment_ids), (rows, seq_len) each, for global recall rows first_row .. + rows."""
        per_row = self.seq_len // self.segment_tokens
        inputs = np.empty((self.rows, self.seq_len), dtype=np.int64)
        targets = np.empty_like(inputs)
        for i in range(self.rows):
            rng = np.random.default_rng([self.seed, step, first_row + i, 1])  # 1: not the base's streams
            for k in range(per_row):
                cut = slice(k * self.segment_tokens, (k + 1) * self.segment_tokens)
                inputs[i, cut], targets[i, cut] = self.segment(rng)
        segments = np.repeat(np.arange(per_row), self.segment_tokens)[None].repeat(self.rows, 0)
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(segments)

    def batches_at(self, step: int, accum_steps: int = 1) -> list[dict[str, torch.Tensor]]:
        out = []
        for m, batch in enumerate(self.base.batches_at(step, accum_steps)):
            x, y = (batch["input_ids"], batch["targets"]) if isinstance(batch, dict) else batch
            if x.shape[1] != self.seq_len:
                raise ValueError(
                    f"recall rows: the base sampler's windows are {x.shape[1]} tokens, not {self.seq_len}"
                )
            # this micro-batch's first recall row in the global batch
            rx, ry, rs = self.recall_batch(step, (m * self.world_size + self.rank) * self.rows)
            out.append(
                {
                    "input_ids": torch.cat([x, rx]),
                    "targets": torch.cat([y, ry]),
                    "segment_ids": torch.cat([torch.zeros_like(x), rs]),  # a text row: one segment (causal)
                    # the recall rows are the last ones: the pretrain loss reports them apart
                    "recall_rows": torch.tensor(self.rows),
                }
            )
        return out


def sequential_windows(tokens: np.ndarray | TokenStream, seq_len: int, max_windows: int | None = None):
    """Non-overlapping (inputs, targets) windows covering the stream in order, for evaluation. Yields (1, T) pairs."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        chunk = torch.from_numpy(np.asarray(tokens[i * seq_len : (i + 1) * seq_len + 1], dtype=np.int64))
        yield chunk[None, :-1], chunk[None, 1:]
