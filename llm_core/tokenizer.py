"""Tokenizer: a HF `tokenizers` byte-level BPE with Tulpar's special tokens and the ChatML chat template.

The same chat template is used by SFT (to build loss masks), by the HF export (tokenizer_config.json), and
therefore by vLLM when serving. Reasoning traces are written as `<think>...</think>` inside assistant turns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from llm_core.io import atomic_dir

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


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    split_digits: bool = True,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (NFC-normalised, GPT-style pre-tokenisation, digits split one by one)."""
    special_tokens = special_tokens or SPECIAL_TOKENS
    if vocab_size < 256 + len(special_tokens) + 1:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs > {256 + len(special_tokens)}"
        )
    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if split_digits:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk)


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
            added = {
                str(self.tk.token_to_id(t)): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t in SPECIAL_TOKENS
                if self.tk.token_to_id(t) is not None
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
                "additional_special_tokens": [IM_START, IM_END, THINK_START, THINK_END],
                "chat_template": self.chat_template,
            }
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(config, ensure_ascii=False, indent=2), "utf-8"
            )
            special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT}
            (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), "utf-8")
        return Path(path)

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

    def encode_document(self, text: str) -> list[int]:
        """A pretraining document: its tokens followed by `<|endoftext|>`."""
        return self.encode(text) + [self.eos_id]

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
        for m in messages:
            header = self.encode(f"{m['role']}\n")
            body = self.encode(m["content"])
            trailer = self.encode("\n")
            learn = m["role"] == "assistant"
            ids += [self.im_start_id, *header, *body, self.im_end_id, *trailer]
            mask += [False] * (1 + len(header)) + [learn] * (len(body) + 1) + [False] * len(trailer)
        return ids, mask
