"""A faster encoder for byte-level BPE tokenizers: tiktoken's BPE over the same vocabulary and merges, same ids.

Hugging Face `tokenizers` encodes our 32k tokenizer at ~2 MB/s per core; tiktoken runs the same byte-level BPE at
~10 MB/s (benchmarks in docs/benchmarks.md). The two algorithms agree when

- the text is split into pieces by the same regex (one `Split` pre-tokenizer with `Isolated` behaviour, or
  ByteLevel's own GPT-2 regex) and mapped to bytes (ByteLevel without a prefix space);
- merges apply in the same order: tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF
  the pair that comes first in the merge list; with ranks = ids and ids given in merge order, these are the same
  pair, and `from_tokenizer` checks that the ids follow the merge list;
- tiktoken's shortcut (a piece that is itself a token becomes that token) is what HF's merges give too:
  `from_tokenizer` runs HF's BPE on every token's bytes and checks that it returns that token alone.

A tokenizer that fails a check raises `UnsupportedTokenizer` (a ValueError naming the reason); callers then use HF.
Preprocessing also compares a sample of every block with HF and stops on a difference (jobs.prep.blocks).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class UnsupportedTokenizer(ValueError):
    """The tokenizer cannot be encoded by tiktoken with provably the same ids."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character standing for each byte -> the byte. Printable Latin-1
    bytes stand for themselves; the other 68 bytes, in order, for chr(256), chr(257), ..."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    mapping = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    mapping.update({chr(256 + n): b for n, b in enumerate(others)})
    return mapping


def _split_pattern(pre: dict | None) -> str:
    """The regex that cuts text into pieces, from a tokenizer.json `pre_tokenizer`."""
    if pre is None:
        raise UnsupportedTokenizer("no pre-tokenizer: not a byte-level BPE tokenizer")
    parts = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    byte_level = parts[-1]
    if byte_level["type"] != "ByteLevel" or byte_level.get("add_prefix_space"):
        raise UnsupportedTokenizer("the last pre-tokenizer is not ByteLevel without a prefix space")
    if len(parts) == 1:
        if not byte_level.get("use_regex", True):
            raise UnsupportedTokenizer("ByteLevel without a split regex")
        return GPT2_PATTERN
    if len(parts) != 2 or byte_level.get("use_regex", True):
        raise UnsupportedTokenizer(
            "only one Split pre-tokenizer before ByteLevel(use_regex=false) is supported"
        )
    split = parts[0]
    if (
        split["type"] != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split["pattern"]
    ):
        raise UnsupportedTokenizer("the split pre-tokenizer is not a non-inverted Isolated regex Split")
    return split["pattern"]["Regex"]


class FastEncoder:
    """`encode_batch(texts) -> list of id lists`, equal to `tokenizers.Tokenizer.encode_batch(texts,
    add_special_tokens=False)` for a supported tokenizer (see the module docstring)."""

    def __init__(self, encoding, nfc: bool):
        self.encoding = encoding
        self.nfc = nfc

    @classmethod
    def from_tokenizer(cls, tk) -> FastEncoder:
        """Build from a `tokenizers.Tokenizer`; raises UnsupportedTokenizer when the ids could differ."""
        import tiktoken

        spec = json.loads(tk.to_str())
        model = spec["model"]
        if model["type"] != "BPE" or model.get("byte_fallback") or model.get("dropout"):
            raise UnsupportedTokenizer("the model is not a plain BPE (byte fallback or dropout set)")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise UnsupportedTokenizer("subword prefixes/suffixes are not byte-level BPE")
        norm = spec.get("normalizer")
        if norm is not None and norm.get("type") != "NFC":
            raise UnsupportedTokenizer(f"normalizer {norm.get('type')} (only none or NFC)")
        pattern = _split_pattern(spec.get("pre_tokenizer"))
        added = spec.get("added_tokens", [])
        for a in (
            added
        ):  # tiktoken matches added tokens as plain strings anywhere in the (NFC) text, as HF does here
            if a.get("single_word") or a.get("lstrip") or a.get("rstrip"):
                raise UnsupportedTokenizer(f"added token {a['content']!r} has single_word/lstrip/rstrip")
            if unicodedata.normalize("NFC", a["content"]) != a["content"]:
                raise UnsupportedTokenizer(f"added token {a['content']!r} changes under NFC")
        special = {a["content"]: a["id"] for a in added}
        decoder = _byte_decoder()
        ranks: dict[bytes, int] = {}
        for token, i in model["vocab"].items():
            if token in special:
                continue
            try:
                ranks[bytes(decoder[c] for c in token)] = i
            except KeyError:
                raise UnsupportedTokenizer(f"token {token!r} is not byte-level") from None
        vocab = model["vocab"]
        last = -1
        for merge in model["merges"]:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            made = vocab.get(a + b)
            if made is None or made <= last:
                raise UnsupportedTokenizer("token ids do not follow the merge order")
            last = made
        for token, i in vocab.items():
            if token not in special and [t.id for t in tk.model.tokenize(token)] != [i]:
                raise UnsupportedTokenizer(f"HF's merges do not rebuild token {token!r} as itself")
        encoding = tiktoken.Encoding(
            "tulpar-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
        )
        return cls(encoding, nfc=norm is not None)

    def encode(self, text: str) -> list[int]:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        # HF matches added (special) tokens written in the text before splitting; so does allowed_special="all"
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def fast_encoder(tk) -> FastEncoder | None:
    """The fast encoder of a `tokenizers.Tokenizer`, or None when it is not provably the same (use HF then)."""
    try:
        return FastEncoder.from_tokenizer(tk)
    except UnsupportedTokenizer:
        return None
