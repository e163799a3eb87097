"""Tokenizer: a HF `tokenizers` byte-level BPE with Tulpar's special tokens and the ChatML chat template.

The same chat template is used by SFT (to build loss masks), by the HF export (tokenizer_config.json), and
therefore by vLLM when serving. Reasoning traces are written as `<think>...</think>` inside assistant turns.

Training options (`train_bpe`): the pre-tokenizer (`bytelevel`: GPT-2's regex inside HF's ByteLevel, the
historical default; `gpt2` / `llama3`: those regexes written out so digits can be handled separately;
`llama-bpe`: exactly the pre-tokenization llama.cpp applies to a GGUF that declares `tokenizer.ggml.pre =
"llama-bpe"` (the Llama 3 regex, digits in threes, no normalization, no superwords), so the tokenizer runs
unchanged in llama.cpp / Ollama, see llm_core/export_gguf.py), digit
handling (`individual`, `group3`, `free`), NFC normalization, and an optional second "superword" stage. The
superword stage (after SuperBPE, Liu et al. 2025) learns the last `superword_fraction` of the merges on chunks
of several words, so frequent phrases (" of the", ", and", " деп айтты") become single tokens; the result is
still a plain HF byte-level BPE `tokenizer.json`. `train_naive_bpe` is the reference point: HF's ByteLevelBPETokenizer
with its defaults. `sample_balanced` draws the language-balanced training sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tqdm.auto import tqdm

from llm_core.io import atomic_dir
from llm_core.text import is_validation

log = logging.getLogger("tulpar.tokenizer")

# Special tokens, in id order for tokenizers we train. `<|endoftext|>` ends every pretraining document, is the
# BOS/EOS of plain text and the padding token; `<|im_end|>` ends a chat turn (the chat EOS).
ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
)
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END]
CHAT_ROLES = ("system", "user", "assistant")

# ChatML. `enable_thinking=false` pre-fills an empty think block, as Qwen3 does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


PreTokenizerName = Literal["bytelevel", "gpt2", "llama3", "llama-bpe"]
DigitMode = Literal["individual", "group3", "free"]
Normalization = Literal["nfc", "none"]
SuperwordSpan = Literal["words", "phrases"]

# Letters, punctuation and whitespace rules of the two regex families; `{num}` is the digit rule.
_CONTRACTIONS = r"'(?:s|t|re|ve|m|ll|d)"
_GPT2_PATTERN = _CONTRACTIONS + r"| ?\p{L}+| ?{num}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|{num}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Superword chunks. `words`: a run of letter words (with their leading single spaces) is one pre-token;
# numbers, punctuation and whitespace are split exactly as by _GPT2_PATTERN. `phrases`: punctuation inside a
# sentence joins the run too (" of the", ", and", ", что"), and sentence-final punctuation (.!?…, with any closing
# quotes or brackets) ends it (" алынады."), so no token spans a sentence boundary (". The"); numbers, line
# breaks and runs of spaces split as before. No stage-1 pre-token holds a letter followed by a space, or
# punctuation followed by a letter, so stage-1 merges stay inside the words of a chunk; and the superword stage
# trains on exactly this chunk-wise encoding, the one the finished tokenizer applies.
_SENTENCE_END = r"[.!?…]"
_SUPERWORD_PATTERNS = {
    "words": r"(?:" + _CONTRACTIONS + r"| ?\p{L}+)+| ?{num}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "phrases": r"(?:"
    + _CONTRACTIONS
    + r"| ?\p{L}+| ?[^\s\p{L}\p{N}.!?…]+)+(?:"
    + _SENTENCE_END
    + r"[^\s\p{L}\p{N}]*)?| ?{num}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
_DIGIT_RULES = {"individual": r"\p{N}", "group3": r"\p{N}{1,3}", "free": r"\p{N}+"}
# `llama-bpe` is the Llama 3 regex with digits in threes and nothing around it: the one llama.cpp knows by that name.
LLAMA_BPE = "llama-bpe"
# Stage-1 token ids are written as one private-use character each while the superword stage trains.
_SYMBOL_BASE = 0xF0000
_MAX_SYMBOLS = 0x10FFFE - _SYMBOL_BASE


def pretokenizer_pattern(
    pre_tokenizer: PreTokenizerName,
    digits: DigitMode,
    superword: bool = False,
    superword_span: SuperwordSpan = "phrases",
) -> str:
    """The split regex of a `gpt2`/`llama3` pre-tokenizer (or of the superword chunks of `gpt2`)."""
    if digits not in _DIGIT_RULES:
        raise ValueError(f"digits={digits!r} is not one of {sorted(_DIGIT_RULES)}")
    num = _DIGIT_RULES[digits]
    if superword:
        if pre_tokenizer != "gpt2":
            raise ValueError(
                f"superword merges need pre_tokenizer='gpt2' (got {pre_tokenizer!r}): set pre_tokenizer=gpt2 "
                "or superword_fraction=0"
            )
        if superword_span not in _SUPERWORD_PATTERNS:
            raise ValueError(f"superword_span {superword_span!r} is not one of {sorted(_SUPERWORD_PATTERNS)}")
        return _SUPERWORD_PATTERNS[superword_span].replace("{num}", num)
    if pre_tokenizer == "gpt2":
        return _GPT2_PATTERN.replace("{num}", num)
    if pre_tokenizer == "llama3":
        return _LLAMA3_PATTERN.replace("{num}", num)
    if pre_tokenizer == LLAMA_BPE:
        if digits != "group3":
            raise ValueError(
                f"pre_tokenizer 'llama-bpe' splits digits in threes (digits='group3'), got digits={digits!r}: "
                "drop the digits setting, or use pre_tokenizer=llama3 (not llama.cpp-compatible)"
            )
        return _LLAMA3_PATTERN.replace("{num}", num)
    raise ValueError(f"pre_tokenizer {pre_tokenizer!r} has no regex: choose gpt2, llama3 or llama-bpe")


def build_pretokenizer(
    pre_tokenizer: PreTokenizerName,
    digits: DigitMode,
    superword: bool = False,
    superword_span: SuperwordSpan = "phrases",
) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer: `bytelevel` is HF's ByteLevel regex (optionally with digits split first); the
    others split with their regex, then map bytes to ByteLevel's printable alphabet."""
    if pre_tokenizer == "bytelevel":
        if superword:
            raise ValueError("superword merges need pre_tokenizer='gpt2': set it, or superword_fraction=0")
        if digits == "group3":
            raise ValueError("digits='group3' needs pre_tokenizer gpt2 or llama3 (bytelevel splits 1 or all)")
        pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if digits == "individual":
            pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return pre_tokenizers.Sequence(pre)
    pattern = pretokenizer_pattern(pre_tokenizer, digits, superword, superword_span)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def check_llama_bpe_recipe(digits: str | None, normalization: str, superword_fraction: float) -> None:
    """The `llama-bpe` recipe is llama.cpp's pre-tokenization and nothing else: ValueError naming what differs."""
    problems = []
    if digits not in (None, "group3"):
        problems.append(f"digits={digits!r} (llama.cpp splits numbers in groups of up to 3: use group3)")
    if normalization != "none":
        problems.append(
            f"normalization={normalization!r} (llama.cpp does not normalize text: use normalization=none)"
        )
    if superword_fraction:
        problems.append(
            f"superword_fraction={superword_fraction} (superword merges cross the spaces llama.cpp splits "
            "on: use superword_fraction=0)"
        )
    if problems:
        raise ValueError("pre_tokenizer 'llama-bpe' must match llama.cpp exactly; fix " + "; ".join(problems))


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    split_digits: bool = True,
    show_progress: bool = False,
    pre_tokenizer: PreTokenizerName = "bytelevel",
    digits: DigitMode | None = None,
    normalization: Normalization = "nfc",
    superword_fraction: float = 0.0,
    superword_span: SuperwordSpan = "phrases",
) -> Tokenizer:
    """Train a byte-level BPE with Tulpar's special tokens.

    The defaults are the historical recipe: NFC-normalised, GPT-2 pre-tokenisation, digits split one by one
    (`split_digits=False` lets digits merge). `pre_tokenizer`, `digits` (overrides `split_digits`) and
    `normalization` choose other recipes; `superword_fraction` > 0 learns that share of the merges in a
    second stage on multi-word chunks (needs `pre_tokenizer="gpt2"`): runs of words with their punctuation
    (`superword_span="phrases"`) or of letter words only (`"words"`). `pre_tokenizer="llama-bpe"` is the
    llama.cpp-compatible recipe: it needs digits group3 (the default for it), normalization "none" and no
    superword stage, and says so otherwise.
    """
    special_tokens = list(special_tokens or SPECIAL_TOKENS)
    if vocab_size < 256 + len(special_tokens) + 1:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs > {256 + len(special_tokens)}"
        )
    if not 0.0 <= superword_fraction < 1.0:
        raise ValueError(
            f"superword_fraction {superword_fraction} must be in [0, 1): e.g. 0.15, or 0 for off"
        )
    if pre_tokenizer == LLAMA_BPE:
        check_llama_bpe_recipe(digits, normalization, superword_fraction)
        digits = "group3"
    if digits is None:
        digits = "individual" if split_digits else "free"
    superword = superword_fraction > 0
    if superword:  # both stages read the text
        texts = texts if isinstance(texts, list) else list(texts)
    tk = HFTokenizer(models.BPE())
    if normalization == "nfc":
        tk.normalizer = normalizers.NFC()
    elif normalization != "none":
        raise ValueError(f"normalization {normalization!r} is not one of nfc, none")
    tk.pre_tokenizer = build_pretokenizer(pre_tokenizer, digits)
    if superword:  # validate the superword pattern before the (long) first stage
        pretokenizer_pattern(pre_tokenizer, digits, superword=True, superword_span=superword_span)
    tk.decoder = decoders.ByteLevel()
    stage1_size = vocab_size - int(round(superword_fraction * vocab_size))
    trainer = trainers.BpeTrainer(
        vocab_size=stage1_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    if superword:
        tk = _train_superword_stage(
            tk, texts, vocab_size, pre_tokenizer, digits, min_frequency, show_progress, superword_span
        )
    return Tokenizer(tk)


def _train_superword_stage(
    tk: HFTokenizer,
    texts: list[str],
    vocab_size: int,
    pre_tokenizer: PreTokenizerName,
    digits: DigitMode,
    min_frequency: int,
    show_progress: bool,
    superword_span: SuperwordSpan = "phrases",
) -> HFTokenizer:
    """Continue BPE across word boundaries: encode the text in multi-word chunks with the stage-1 merges,
    write each stage-1 token as one private-use character, train a BPE over those characters, and append
    its merges (translated back to byte-level strings) after the stage-1 merges."""
    state = json.loads(tk.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list[list[str]] = [m if isinstance(m, list) else m.split(" ") for m in state["model"]["merges"]]
    if len(vocab) > _MAX_SYMBOLS:
        raise ValueError(f"superword stage supports up to {_MAX_SYMBOLS} stage-1 tokens, got {len(vocab)}")
    id_to_token = {i: t for t, i in vocab.items()}
    chunker = build_pretokenizer(pre_tokenizer, digits, superword=True, superword_span=superword_span)
    tk.pre_tokenizer = chunker  # stage-1 merges applied within chunks give the stage-1 segmentation

    def symbol_chunks() -> Iterator[str]:
        batch = 512
        for i in range(0, len(texts), batch):
            for enc in tk.encode_batch(texts[i : i + batch], add_special_tokens=False):
                chunk: list[str] = []
                last = None
                for tid, wid in zip(enc.ids, enc.word_ids):
                    if wid != last and chunk:
                        if len(chunk) > 1:
                            yield "".join(chunk)
                        chunk = []
                    last = wid
                    chunk.append(chr(_SYMBOL_BASE + tid))
                if len(chunk) > 1:
                    yield "".join(chunk)

    n_new = vocab_size - len(vocab)
    alphabet = [chr(_SYMBOL_BASE + i) for i in range(len(vocab))]
    # a few extra merges: some results already exist in the stage-1 vocab and add no token
    trainer = trainers.BpeTrainer(
        vocab_size=len(vocab) + n_new + max(16, n_new // 50),
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=show_progress,
    )
    symbols = HFTokenizer(models.BPE())
    symbols.train_from_iterator(symbol_chunks(), trainer=trainer)
    sym_merges = json.loads(symbols.to_str())["model"]["merges"]

    def to_bytes_level(sym: str) -> str:
        return "".join(id_to_token[ord(c) - _SYMBOL_BASE] for c in sym)

    n_stage1 = len(merges)
    for merge in sym_merges:
        if len(vocab) >= vocab_size:
            break
        a, b = (to_bytes_level(x) for x in (merge if isinstance(merge, list) else merge.split(" ")))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        merges.append([a, b])
    state["model"]["vocab"] = vocab
    state["model"]["merges"] = merges
    out = HFTokenizer.from_str(json.dumps(state, ensure_ascii=False))
    out.pre_tokenizer = chunker
    log.info("superword stage: %d merges after %d, vocab %d", len(merges) - n_stage1, n_stage1, len(vocab))
    return out


def train_naive_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> HFTokenizer:
    """The naive baseline: HF `tokenizers`' ByteLevelBPETokenizer with every default (GPT-2 regex, no
    normalisation, min_frequency 2, no special tokens) at `vocab_size`."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, show_progress=show_progress)
    return bpe._tokenizer


# ------------------------------------------------------------------ language-balanced training sample


@dataclass(frozen=True)
class DocumentSource:
    """A named stream of documents of one language; `size` (bytes, or any proportional measure) weighs it
    against the language's other sources."""

    name: str
    size: int
    open: Callable[[], Iterator[str]]


@dataclass
class SourceStats:
    language: str
    source: str
    weight: float
    target_chars: int
    read_chars: int = 0
    sampled_chars: int = 0
    documents: int = 0
    heldout_documents: int = 0
    repeats: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BalancedSample:
    """Training documents per language, held-out documents per language, and what was drawn from where."""

    train: dict[str, list[str]]
    heldout: dict[str, list[str]]
    stats: list[SourceStats]

    def chars(self, language: str) -> int:
        return sum(len(d) for d in self.train[language])

    def documents(self) -> list[str]:
        """All training documents, languages interleaved deterministically (BPE counts are order-free)."""
        return [d for lang in self.train for d in self.train[lang]]


def sample_balanced(
    sources: Mapping[str, Sequence[DocumentSource]],
    budgets: Mapping[str, int | None],
    *,
    temperature: float = 0.5,
    upsample: bool = True,
    max_repeat: float = 4.0,
    holdout_fraction: float = 0.0,
    heldout_chars: int = 200_000,
    min_chars: int = 1,
    seed: int = 0,
    show_progress: bool = False,
) -> BalancedSample:
    """Draw about `budgets[lang]` characters of each language (None: everything), so a small language is not
    drowned by a big one.

    Within a language, source s gets a share of the budget proportional to size_s ** temperature (1: natural
    proportions, 0: equal shares). Documents are read in file order; a source that runs out before its share is
    repeated (at most `max_repeat` times in all) when `upsample`. Documents whose content hash falls in
    `holdout_fraction` (`llm_core.text.is_validation`, the same split pretraining uses) are never trained on;
    up to `heldout_chars` of them per language are returned for measuring the tokenizer on unseen text.
    """
    if not 0.0 <= temperature <= 1.0:
        raise ValueError(f"temperature {temperature} must be in [0, 1] (1 = natural source mix, 0 = equal)")
    train: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    stats: list[SourceStats] = []
    rng = random.Random(seed)
    for lang, lang_sources in sources.items():
        if not lang_sources:
            raise ValueError(f"no text sources for language {lang!r}: add files or remove the language")
        budget = budgets.get(lang)
        weights = [max(s.size, 1) ** temperature for s in lang_sources]
        total_w = sum(weights)
        train[lang], heldout[lang] = [], []
        held_cap = heldout_chars / len(lang_sources)
        for src, w in zip(lang_sources, weights):
            target = None if budget is None else int(budget * w / total_w)
            st = SourceStats(lang, src.name, w / total_w, -1 if target is None else target)
            docs: list[str] = []
            held_here = 0
            bar = tqdm(
                total=target,
                desc=f"sample {lang} {Path(src.name).name}",
                unit="char",
                unit_scale=True,
                disable=not show_progress,
                leave=False,
            )
            for doc in src.open():
                if len(doc) < min_chars:
                    continue
                st.read_chars += len(doc)
                if holdout_fraction > 0 and is_validation(doc, holdout_fraction):
                    st.heldout_documents += 1
                    if held_here < held_cap:
                        heldout[lang].append(doc)
                        held_here += len(doc)
                    continue
                docs.append(doc)
                st.sampled_chars += len(doc)
                bar.update(len(doc))
                if target is not None and st.sampled_chars >= target:
                    break
            bar.close()
            unique_chars = st.sampled_chars
            if upsample and target is not None and docs and st.sampled_chars < target:
                cap = min(target, int(max_repeat * unique_chars))
                extra = docs.copy()
                while st.sampled_chars < cap:
                    rng.shuffle(extra)
                    for doc in extra:
                        docs.append(doc)
                        st.sampled_chars += len(doc)
                        if st.sampled_chars >= cap:
                            break
            st.documents = len(docs)
            st.repeats = st.sampled_chars / unique_chars if unique_chars else 0.0
            train[lang].extend(docs)
            stats.append(st)
        if not train[lang]:
            raise ValueError(
                f"language {lang!r}: no training documents in {[s.name for s in lang_sources]} "
                f"(after holding out {holdout_fraction:.0%} and dropping documents under {min_chars} chars)"
            )
    return BalancedSample(train, heldout, stats)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special-token ids and the chat template."""

    def __init__(self, tk: HFTokenizer, chat_template: str = CHAT_TEMPLATE, model_max_length: int = 32768):
        self.tk = tk
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if tk.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks Tulpar's special tokens {missing}: train it with llm_core.tokenizer.train_bpe "
                "(or add them as special tokens) before using it for chat/training"
            )
        self.eos_id = self.bos_id = self.pad_id = tk.token_to_id(ENDOFTEXT)
        self.im_start_id, self.im_end_id = tk.token_to_id(IM_START), tk.token_to_id(IM_END)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise ValueError(
                f"no tokenizer.json at {str(p)!r}: train one (make tokenizer) or pass its directory"
            )
        tk = HFTokenizer.from_file(str(file))
        template, max_len = CHAT_TEMPLATE, 32768
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
            template = meta.get("chat_template") or CHAT_TEMPLATE
            max_len = int(meta.get("model_max_length", max_len))
        return cls(tk, template, max_len)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (AutoTokenizer/vLLM-loadable)."""
        with atomic_dir(path, merge=True) as tmp:
            self.tk.save(str(tmp / "tokenizer.json"))
            specials = self.special_tokens
            added = {
                str(self.tk.token_to_id(t)): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t in specials
            }
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": IM_END,
                "pad_token": ENDOFTEXT,
                "unk_token": None,
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": self.model_max_length,
                "added_tokens_decoder": added,
                "additional_special_tokens": [t for t in specials if t != ENDOFTEXT],
                "chat_template": self.chat_template,
            }
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(config, ensure_ascii=False, indent=2), "utf-8"
            )
            special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT}
            (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), "utf-8")
        return Path(path)

    @property
    def special_tokens(self) -> list[str]:
        """Tulpar's special tokens present in the vocabulary, then any other special added tokens, by id."""
        extra = [
            (i, t.content)
            for i, t in sorted(self.tk.get_added_tokens_decoder().items())
            if t.special and t.content not in SPECIAL_TOKENS
        ]
        return [t for t in SPECIAL_TOKENS if self.tk.token_to_id(t) is not None] + [c for _, c in extra]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tk.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def iter_documents(self, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
        batch: list[str] = []
        for t in texts:
            batch.append(t)
            if len(batch) == batch_size:
                yield from (ids + [self.eos_id] for ids in self.encode_batch(batch))
                batch = []
        if batch:
            yield from (ids + [self.eos_id] for ids in self.encode_batch(batch))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    @staticmethod
    def _check_messages(messages: list[dict]) -> None:
        if not messages:
            raise ValueError("a chat needs at least one message")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in CHAT_ROLES
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"message {i} must be {{'role': one of {CHAT_ROLES}, 'content': str}}, got {m!r}"
                )

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = True
    ) -> str:
        """Render messages as ChatML text, identical to the Jinja template shipped with the tokenizer."""
        self._check_messages(messages)
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
            if not enable_thinking:
                text += f"{THINK_START}\n\n{THINK_END}\n\n"
        return text

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered chat and a mask that is True on tokens the model learns to produce:
        each assistant turn's content and its closing `<|im_end|>` (never the prompt, roles or other turns)."""
        self._check_messages(messages)
        ids: list[int] = []
        mask: list[bool] = []
        trailer = self.encode("\n")
        for m in messages:
            header = self.encode(f"{m['role']}\n")
            body = self.encode(m["content"])
            learn = m["role"] == "assistant"
            ids += [self.im_start_id, *header, *body, self.im_end_id, *trailer]
            mask += [False] * (1 + len(header)) + [learn] * (len(body) + 1) + [False] * len(trailer)
        return ids, mask
