"""How the clean pass encodes kept documents: Hugging Face `tokenizers`, or the same ids faster.

`DocEncoder` uses llm_core's `FastEncoder` (tiktoken's BPE over the tokenizer's own vocabulary and merges) where
the tokenizer allows it, and checks it as it goes: every `check_every`-th document of each batch is encoded by HF
as well, and a difference stops the run (fail closed: shards are never written with ids HF would not give).
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_core.fast_encoder import FastEncoder, UnsupportedTokenizer

CHECK_EVERY = 64


class EncoderMismatch(RuntimeError):
    """The fast encoder gave other ids than HF tokenizers for a document."""


class DocEncoder:
    def __init__(self, tk, encoder: str = "auto", check_every: int = CHECK_EVERY):
        """`tk`: a `tokenizers.Tokenizer`; `encoder`: auto | fast | hf (`tokenizer.encoder` in the config)."""
        self.hf, self.check_every = tk, check_every
        self.fast: FastEncoder | None = None
        if encoder != "hf":
            try:
                self.fast = FastEncoder.from_tokenizer(tk)
            except UnsupportedTokenizer as e:
                if encoder == "fast":
                    raise ValueError(
                        f"tokenizer.encoder=fast cannot encode this tokenizer: {e}; set tokenizer.encoder: auto "
                        "(or hf) to use Hugging Face tokenizers"
                    ) from None

    @property
    def name(self) -> str:
        return "fast" if self.fast is not None else "hf"

    def _hf(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.fast is None:
            return self._hf(texts)
        ids = self.fast.encode_batch(texts)
        sample = range(0, len(texts), self.check_every)
        for i, ref in zip(sample, self._hf([texts[i] for i in sample])):
            if ref != ids[i]:
                raise EncoderMismatch(
                    f"the fast encoder and HF tokenizers disagree on a document ({texts[i][:80]!r}...: first "
                    f"ids {ids[i][:8]} vs {ref[:8]}); nothing was written for this block. Set "
                    "tokenizer.encoder: hf and report the document"
                )
        return ids
