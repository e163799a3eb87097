"""Long-context checks: passkey retrieval and bits-per-byte by position bucket.

Passkey retrieval (after Mohtashami & Jaggi, 2023). For each language, length L and depth d, `samples` prompts of
exactly L tokens are built offline from the seed:

    <|endoftext|> instruction  filler[:k]  key sentence  filler[k:]  question        k = round(d * filler tokens)

The key sentence holds a random `digits`-digit number (first digit non-zero) twice; the filler is neutral sentences
repeated, or corpus sentences shuffled by the seed. The model continues the question greedily (llm_core.generate,
temperature 0); a prompt is answered when the continuation, stripped, starts with exactly the key (its leading run
of digits equals it). Accuracy is reported per (length, depth) cell, per length (over depths) and overall, beside
the key's teacher-forced NLL per token, -ln P(" <key>" | prompt) / key tokens, a soft score (per length, overall),
and its control, the key gain: the same key's NLL after the cell's prompt built from seed + 1 (another key) minus
after its own prompt, in nats per key token. A gain near 0 means a lower key NLL came from expecting a number there,
not from reading the key back. A length whose prompt plus answer does not fit the model's max_seq_len is skipped
with a note, never truncated.

Bits-per-byte by position. Texts (e.g. a long book, or a text set's lines joined) are tokenized and cut into
sequences of `length` tokens c_0..c_{L-1}; each is scored in one forward pass after `<|endoftext|>`, so token c_p
is predicted from p tokens of context. For each bucket [lo, hi) of positions:

    bpb[lo, hi) = sum over sequences of -ln P(c_p | <|endoftext|>, c_<p) for lo <= p < hi  /  bytes of c_lo..c_hi-1  / ln 2

A model that uses long context has lower bpb in later buckets; one that fails beyond its trained length has higher.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from jobs.evaluation.config import PASSKEY_TEXT, PasskeySpec, PositionBpbSpec, depth_label
from jobs.evaluation.text import read_documents, resolve_path
from jobs.platform.runtime import Settings
from llm_core.text import sample_language
from llm_core.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------- passkey prompts


@dataclass(frozen=True)
class PasskeyPrompt:
    language: str
    length: int  # tokens in `ids`
    depth: float
    sample: int
    key: str
    ids: list[int]
    needle_offset: int  # index in `ids` of the key sentence's first token
    needle_tokens: int


def filler_sentences(spec: PasskeySpec, language: str, settings: Settings | None) -> list[str]:
    """The sentences filler is made of, in the order they are used (before cycling)."""
    if spec.filler == "repeat":
        return [s.strip() + "." for s in PASSKEY_TEXT[language]["filler"].split(".") if s.strip()]
    if settings is None:
        raise ValueError("passkey.filler=corpus reads TULPAR_DATA/corpus/<lang>: settings are needed")
    directory = settings.data / "corpus" / language
    if not directory.is_dir():
        raise ValueError(
            f"passkey.filler=corpus: {directory} does not exist (set TULPAR_DATA, or use passkey.filler=repeat)"
        )
    docs = sample_language(directory, 400_000, 20)
    sentences = [" ".join(d.split()) for d in docs if len(d) <= 400]
    if not sentences:
        raise ValueError(f"passkey.filler=corpus: no sentences under {directory}: use passkey.filler=repeat")
    random.Random(f"{spec.seed}-filler-{language}").shuffle(sentences)
    return sentences


def filler_ids(tokenizer: Tokenizer, sentences: list[str], n: int, offset: int = 0) -> list[int]:
    """Exactly n filler tokens: sentences (each tokenized after a space) from index `offset` on, cycled."""
    encoded = tokenizer.encode_batch([" " + s for s in sentences])
    if not any(encoded):
        raise ValueError("the passkey filler sentences tokenize to nothing")
    out: list[int] = []
    i = offset
    while len(out) < n:
        out.extend(encoded[i % len(encoded)])
        i += 1
    return out[:n]


def passkey_key(spec: PasskeySpec, language: str, length: int, depth: float, sample: int) -> str:
    rng = random.Random(f"{spec.seed}-{language}-{length}-{depth}-{sample}")
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(spec.digits - 1))


def build_passkey_prompts(
    spec: PasskeySpec, tokenizer: Tokenizer, max_seq_len: int, settings: Settings | None = None
) -> tuple[list[PasskeyPrompt], list[str]]:
    """(prompts, notes): every prompt of the grid whose length leaves room for the answer in max_seq_len; a note
    for each length skipped. A length too short for the instruction, key sentence and question is a ValueError."""
    prompts: list[PasskeyPrompt] = []
    notes: list[str] = []
    lengths = []
    room = max(spec.answer_tokens, spec.digits + 1)  # the answer, and the key scored after the prompt
    for n in spec.lengths:
        if n + room > max_seq_len:
            notes.append(
                f"passkey length {n} skipped: {n} prompt + {room} answer tokens exceed the model's "
                f"max_seq_len {max_seq_len}"
            )
        else:
            lengths.append(n)
    for lang in spec.languages:
        text = PASSKEY_TEXT[lang]
        sentences = filler_sentences(spec, lang, settings)
        intro = tokenizer.encode(text["intro"])
        question = tokenizer.encode(text["question"])
        for n in lengths:
            for depth in spec.depths:
                for sample in range(spec.samples):
                    key = passkey_key(spec, lang, n, depth, sample)
                    needle = tokenizer.encode(text["needle"].format(key=key))
                    n_filler = n - 1 - len(intro) - len(needle) - len(question)
                    if n_filler < 0:
                        raise ValueError(
                            f"passkey length {n} is too short for the {lang} instruction, key sentence and question "
                            f"({n - n_filler} tokens): raise passkey.lengths"
                        )
                    rng = random.Random(f"{spec.seed}-{lang}-{n}-{depth}-{sample}-offset")
                    start = rng.randrange(len(sentences)) if spec.filler == "corpus" else 0
                    filler = filler_ids(tokenizer, sentences, n_filler, start)
                    k = round(depth * n_filler)
                    head = [tokenizer.eos_id, *intro, *filler[:k]]
                    ids = [*head, *needle, *filler[k:], *question]
                    prompts.append(PasskeyPrompt(lang, n, depth, sample, key, ids, len(head), len(needle)))
    return prompts, notes


# ---------------------------------------------------------------------------------------- passkey scoring


def answer_matches(continuation: str, key: str) -> bool:
    """The continuation, stripped, starts with exactly the key: its leading run of digits equals it."""
    text = continuation.strip()
    digits = ""
    for ch in text:
        if not ch.isdigit():
            break
        digits += ch
    return digits == key


@dataclass
class PasskeyResult:
    records: list[dict] = field(default_factory=list)  # one per prompt
    notes: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # evaluated (not skipped)
    depths: list[float] = field(default_factory=list)

    def cell(self, length: int, depth: float) -> float:
        rs = [r for r in self.records if r["length"] == length and r["depth"] == depth]
        return sum(r["correct"] for r in rs) / len(rs)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.lengths:
            for d in self.depths:
                out[f"passkey/{n}/{depth_label(d)}/acc"] = self.cell(n, d)
            rs = [r for r in self.records if r["length"] == n]
            out[f"passkey/{n}/acc"] = sum(r["correct"] for r in rs) / len(rs)
            if all("key_nll" in r for r in rs):
                out[f"passkey/{n}/nll"] = sum(r["key_nll"] for r in rs) / len(rs)
            if all("key_gain" in r for r in rs):
                out[f"passkey/{n}/key_gain"] = sum(r["key_gain"] for r in rs) / len(rs)
        if self.records:
            out["passkey/all/acc"] = sum(r["correct"] for r in self.records) / len(self.records)
            if all("key_nll" in r for r in self.records):
                out["passkey/all/nll"] = sum(r["key_nll"] for r in self.records) / len(self.records)
            if all("key_gain" in r for r in self.records):
                out["passkey/all/key_gain"] = sum(r["key_gain"] for r in self.records) / len(self.records)
        return out

    def to_dict(self) -> dict:
        return {
            "lengths": self.lengths,
            "depths": self.depths,
            "notes": self.notes,
            "accuracy": {str(n): {str(d): self.cell(n, d) for d in self.depths} for n in self.lengths},
        }


def score_passkey(
    prompts: Sequence[PasskeyPrompt], continue_fn: Callable[[list[list[int]]], list[str]], batch_size: int = 8
) -> list[dict]:
    """Records {language, length, depth, sample, key, answer, correct}; continue_fn maps prompt ids (one length per
    call) to the continuation texts."""
    records = []
    batches: list[list[PasskeyPrompt]] = []
    for p in prompts:  # consecutive prompts of one length, at most batch_size at a time
        if batches and batches[-1][0].length == p.length and len(batches[-1]) < batch_size:
            batches[-1].append(p)
        else:
            batches.append([p])
    for batch in batches:
        answers = continue_fn([p.ids for p in batch])
        if len(answers) != len(batch):
            raise RuntimeError(f"the generator answered {len(answers)} of {len(batch)} prompts")
        for p, answer in zip(batch, answers):
            records.append(
                {
                    "language": p.language,
                    "length": p.length,
                    "depth": p.depth,
                    "sample": p.sample,
                    "key": p.key,
                    "needle_offset": p.needle_offset,
                    "answer": answer,
                    "correct": answer_matches(answer, p.key),
                }
            )
    return records


def greedy_continuation(
    model, tokenizer: Tokenizer, max_new_tokens: int
) -> Callable[[list[list[int]]], list[str]]:
    """llm_core's generator, greedy, stopping at end-of-text: the continuation texts of a batch of prompts."""
    from llm_core.generate import SamplingParams, generate

    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[tokenizer.eos_id, tokenizer.im_end_id]
    )

    def run(ids: list[list[int]]) -> list[str]:
        return [tokenizer.decode(out) for out in generate(model, ids, params, pad_id=tokenizer.pad_id)]

    return run


def key_nll(model, tokenizer: Tokenizer, prompts: Sequence[PasskeyPrompt]) -> list[float]:
    """Per prompt, -ln P(" <key>" | prompt) per key token (nats), teacher-forced: a soft score that moves before
    exact-match accuracy does (a model that half-remembers the key gets a lower NLL, not a higher accuracy)."""
    from llm_core.scoring import Scorer, ScoreRequest

    keys = tokenizer.encode_batch([" " + p.key for p in prompts])
    scorer = Scorer(model, window=model.cfg.max_seq_len, batch_tokens=16384)
    scores = scorer.score([ScoreRequest([*p.ids, *k], len(p.ids)) for p, k in zip(prompts, keys)])
    return [-s.logprob / s.tokens for s in scores]


def evaluate_passkey(
    model,
    tokenizer: Tokenizer,
    spec: PasskeySpec,
    settings: Settings | None = None,
    continue_fn: Callable[[list[list[int]]], list[str]] | None = None,
) -> PasskeyResult:
    max_len = model.cfg.max_seq_len
    prompts, notes = build_passkey_prompts(spec, tokenizer, max_len, settings)
    fn = continue_fn or greedy_continuation(model, tokenizer, spec.answer_tokens)
    # one length per batch: no padding, and the longest prompts do not hold the short ones back
    batch = max(1, 16384 // max(spec.lengths))
    records = score_passkey(prompts, fn, batch_size=batch)
    # the control: each key scored after the prompt of the same cell built from the next seed (same length, depth
    # and filler, another key), where it is just a number
    others, _ = build_passkey_prompts(
        spec.model_copy(update={"seed": spec.seed + 1}), tokenizer, max_len, settings
    )
    decoys = [replace(o, key=p.key) for p, o in zip(prompts, others, strict=True)]
    own, other = key_nll(model, tokenizer, prompts), key_nll(model, tokenizer, decoys)
    for r, nll, nll_other in zip(records, own, other):
        r["key_nll"], r["key_gain"] = nll, nll_other - nll
    lengths = sorted({p.length for p in prompts})
    return PasskeyResult(records=records, notes=notes, lengths=lengths, depths=list(spec.depths))


# ---------------------------------------------------------------------------------------- bpb by position


@dataclass
class PositionBpb:
    language: str
    file: str
    length: int
    sequences: int
    buckets: list[dict]  # {lo, hi, tokens, bytes, nll, bpb}

    def to_dict(self) -> dict:
        return asdict(self)


def prefix_bytes(tokenizer: Tokenizer, ids: list[int], k: int) -> int:
    """UTF-8 bytes of the text of ids[:k]; a character split at either end (byte-level tokens) is left out, so
    it counts in the bucket that completes it."""
    return len(tokenizer.decode(ids[:k]).strip("\ufffd").encode("utf-8"))


def position_logprobs(model, ids: list[int], start_id: int) -> torch.Tensor:
    """ln P(ids[p] | start, ids[:p]) for every p, from one forward pass over [start, ids[:-1]] (float64, (L,))."""
    device = next(model.parameters()).device
    x = torch.tensor([[start_id, *ids[:-1]]], device=device)
    with torch.inference_mode():
        out = model(x)
        logits = (out.logits if hasattr(out, "logits") else out)[0].float()  # (L, V)
        target = torch.tensor(ids, device=logits.device)
        lp = logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return lp.double().cpu()


def sequences_for(spec: PositionBpbSpec, tokenizer: Tokenizer, path: Path, length: int) -> list[list[int]]:
    """Up to max_sequences sequences of exactly `length` tokens from the file's documents (joined when
    `concatenate`); the remainder of each stream shorter than `length` is not used."""
    docs = read_documents(path, spec.unit, spec.text_field)
    # only the first `budget` characters are tokenized (no tokenizer needs more than 16 characters per token)
    budget = 16 * length * spec.max_sequences
    streams = ["\n".join(docs)[:budget]] if spec.concatenate else [d[:budget] for d in docs]
    out: list[list[int]] = []
    for stream in streams:
        ids = tokenizer.encode(stream)
        for a in range(0, len(ids) - length + 1, length):
            out.append(ids[a : a + length])
            if len(out) == spec.max_sequences:
                return out
    return out


def position_length(spec: PositionBpbSpec, max_seq_len: int) -> int:
    """The sequence length bpb by position uses; longer than the model's context is a ValueError."""
    length = spec.length or max_seq_len
    if length > max_seq_len:
        raise ValueError(
            f"bpb_by_position.length {length} > the model's max_seq_len {max_seq_len}: lower bpb_by_position.length"
        )
    return length


def evaluate_bpb_by_position(
    model, tokenizer: Tokenizer, spec: PositionBpbSpec, settings: Settings
) -> tuple[list[PositionBpb], list[str]]:
    """(results per language, notes). A file with no sequence of `length` tokens is a ValueError naming it."""
    length = position_length(spec, model.cfg.max_seq_len)
    results, notes = [], []
    was_training = model.training
    model.eval()
    try:
        for lang, file in spec.files.items():
            path = resolve_path(file, settings)
            seqs = sequences_for(spec, tokenizer, path, length)
            if not seqs:
                raise ValueError(
                    f"bpb_by_position: {path} has no stretch of {length} tokens: give a longer text, set "
                    "concatenate: true or lower bpb_by_position.length"
                )
            if len(seqs) < spec.max_sequences:
                notes.append(
                    f"bpb_by_position/{lang}: {len(seqs)} of {spec.max_sequences} sequences ({path})"
                )
            buckets = [
                {"lo": lo, "hi": hi, "tokens": 0, "bytes": 0, "nll": 0.0} for lo, hi in spec.buckets(length)
            ]
            for ids in seqs:
                lp = position_logprobs(model, ids, tokenizer.eos_id)
                for b in buckets:
                    b["tokens"] += b["hi"] - b["lo"]
                    b["nll"] -= float(lp[b["lo"] : b["hi"]].sum())
                    b["bytes"] += prefix_bytes(tokenizer, ids, b["hi"]) - prefix_bytes(
                        tokenizer, ids, b["lo"]
                    )
            for b in buckets:
                b["bpb"] = b["nll"] / b["bytes"] / math.log(2) if b["bytes"] else float("nan")
            results.append(PositionBpb(lang, str(path), length, len(seqs), buckets))
    finally:
        model.train(was_training)
    return results, notes


def position_metrics(results: list[PositionBpb]) -> dict[str, float]:
    return {
        f"bpb_by_position/{r.language}/{b['lo']}-{b['hi']}": b["bpb"]
        for r in results
        for b in r.buckets
        if b["bytes"]
    }


# ---------------------------------------------------------------------------------------- outputs


def long_context_markdown(
    passkey: PasskeyResult | None, positions: list[PositionBpb], notes: list[str]
) -> str:
    from jobs.evaluation.report import md_table

    parts = ["## Long context", ""]
    if passkey is not None:
        langs = sorted({r["language"] for r in passkey.records})
        per_cell = len(passkey.records) // max(1, len(passkey.lengths) * len(passkey.depths))
        parts += [
            f"### Passkey retrieval (accuracy; {per_cell} prompts per cell, languages {', '.join(langs) or '-'})",
            "",
            "Rows: prompt length in tokens; columns: depth of the key in the filler (0% = start, 100% = just "
            "before the question).",
            "",
        ]
        if passkey.lengths:
            parts.append(
                md_table(
                    [
                        "length",
                        *[f"{d:.0%}" for d in passkey.depths],
                        "all depths",
                        "key NLL/token",
                        "key gain",
                    ],
                    [
                        [
                            n,
                            *[passkey.cell(n, d) for d in passkey.depths],
                            passkey.metrics()[f"passkey/{n}/acc"],
                            passkey.metrics().get(f"passkey/{n}/nll"),
                            passkey.metrics().get(f"passkey/{n}/key_gain"),
                        ]
                        for n in passkey.lengths
                    ],
                )
            )
        parts.append("")
    if positions:
        parts += [
            "### Bits-per-byte by position",
            "",
            "Lower in later buckets = the model uses the longer context.",
            "",
            md_table(
                ["positions", *[f"{r.language} bpb" for r in positions]],
                [
                    [f"{b['lo']}-{b['hi']}", *[r.buckets[i]["bpb"] for r in positions]]
                    for i, b in enumerate(positions[0].buckets)
                ],
            ),
            "",
            f"{positions[0].length}-token sequences: "
            + ", ".join(f"{r.language} {r.sequences}" for r in positions),
            "",
        ]
    parts += [f"- note: {n}" for n in notes]
    return "\n".join(parts).rstrip() + "\n"


def passkey_heatmap(passkey: PasskeyResult, path: Path, title: str) -> Path:
    from jobs.reporting.plots import plot_heatmap

    values = [[passkey.cell(n, d) for d in passkey.depths] for n in passkey.lengths]
    return plot_heatmap(
        values,
        [str(n) for n in passkey.lengths],
        [f"{d:.0%}" for d in passkey.depths],
        path,
        title=title,
        xlabel="depth of the key",
        ylabel="prompt length (tokens)",
        vmin=0.0,
        vmax=1.0,
    )


def position_plot(positions: list[PositionBpb], path: Path, title: str) -> Path:
    from jobs.reporting.plots import plot_lines

    curves = {
        r.language: [((b["lo"] + b["hi"]) / 2, b["bpb"]) for b in r.buckets if b["bytes"]] for r in positions
    }
    return plot_lines(
        curves,
        path,
        title=title,
        xlabel="position in the sequence (bucket centre, tokens)",
        ylabel="bits per byte",
    )
