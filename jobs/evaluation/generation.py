"""Generation checks: the model answers a fixed prompt set per language (greedy by default). Chat models get each
prompt as a user turn of the chat template; base (pretrain) models get "Question: <prompt>\nAnswer:" with the
labels in the prompt's language.

Per language (and `all`): mean answer length in tokens and characters, `truncated_rate` (answers that hit
max_new_tokens), `refusal_rate` (answers matching any refusal pattern), `lang_consistency` (answers whose language,
by the preprocessing stage's detector `jobs.prep.langid.detect`, is the prompt's; undetected answers count as
inconsistent), `undetected_rate` (answers too short or too unclear for the detector), and the decoding speed
`tokens_per_s` / `bytes_per_s`: generated tokens / UTF-8 bytes of the decoded answers over the wall time of
generating them. Prompts are generated one at a time (a batch of one, as a single user is served), after one
untimed warm-up call, so the time is one stream's; a tokenizer whose tokens cover more bytes generates more text per second at the same tokens/s.
"""

from __future__ import annotations

import re
import time

from jobs.evaluation.config import GenerationSpec
from jobs.evaluation.multiple_choice import LABELS
from jobs.prep.langid import detect
from llm_core.generate import SamplingParams, generate
from llm_core.tokenizer import Tokenizer


def use_chat(spec: GenerationSpec, stage: str | None) -> bool:
    if spec.chat == "auto":
        return stage != "pretrain"
    return spec.chat == "always"


def prompt_ids(tokenizer: Tokenizer, prompt: str, chat: bool, lang: str = "en") -> list[int]:
    """A chat turn (chat models), or for base models a document start and "Question: ...\nAnswer:" in the
    prompt's language, so that the answer is a continuation rather than the end of the document."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        return tokenizer.encode(text)
    _, q_label, a_label = LABELS.get(lang, LABELS["en"])
    return [tokenizer.eos_id, *tokenizer.encode(f"{q_label}: {prompt}\n{a_label}:")]


def run_generation(model, tokenizer: Tokenizer, spec: GenerationSpec, *, chat: bool) -> list[dict]:
    """One record per prompt: {lang, prompt, answer, tokens, chars, bytes, seconds, truncated, refusal, detected,
    confidence}; `bytes` counts the decoded answer before stripping, `seconds` the wall time of its generation."""
    params = SamplingParams(
        max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=spec.seed,
        stop_token_ids=[tokenizer.im_end_id, tokenizer.eos_id],
        min_new_tokens=spec.min_new_tokens if spec.min_new_tokens is not None else (0 if chat else 16),
    )
    refusal = [re.compile(p, re.IGNORECASE) for p in spec.refusal_patterns]
    records = []
    first = next(((lang, ps[0]) for lang, ps in spec.prompts.items() if ps), None)
    if first is not None:  # untimed warm-up: the first call's one-off start-up would count as slow decoding
        warm = params.model_copy(update={"max_new_tokens": 2, "min_new_tokens": 0})
        generate(model, [prompt_ids(tokenizer, first[1], chat, first[0])], warm, pad_id=tokenizer.pad_id)
    for lang, prompts in spec.prompts.items():
        for prompt in prompts:
            ids = prompt_ids(tokenizer, prompt, chat, lang)
            started = time.perf_counter()
            (out,) = generate(model, [ids], params, pad_id=tokenizer.pad_id)
            seconds = time.perf_counter() - started
            text = tokenizer.decode(out)
            answer = text.strip()
            detected, confidence = detect(answer, spec.langid) if answer else ("", 0.0)
            records.append(
                {
                    "lang": lang,
                    "prompt": prompt,
                    "answer": answer,
                    "tokens": len(out),
                    "chars": len(answer),
                    "bytes": len(text.encode("utf-8")),
                    "seconds": seconds,
                    "truncated": len(out) >= spec.max_new_tokens,
                    "refusal": any(r.search(answer) for r in refusal),
                    "detected": detected,
                    "confidence": round(confidence, 4),
                }
            )
    return records


def generation_metrics(records: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["lang"], []).append(r)
    if records:
        groups["all"] = records
    for lang, rs in groups.items():
        n = len(rs)
        out[f"gen/{lang}/mean_tokens"] = sum(r["tokens"] for r in rs) / n
        out[f"gen/{lang}/mean_chars"] = sum(r["chars"] for r in rs) / n
        out[f"gen/{lang}/truncated_rate"] = sum(r["truncated"] for r in rs) / n
        out[f"gen/{lang}/refusal_rate"] = sum(r["refusal"] for r in rs) / n
        out[f"gen/{lang}/lang_consistency"] = sum(r["detected"] == r["lang"] for r in rs) / n
        out[f"gen/{lang}/undetected_rate"] = sum(r["detected"] == "" for r in rs) / n
        seconds = sum(r["seconds"] for r in rs)
        if seconds > 0:
            out[f"gen/{lang}/tokens_per_s"] = sum(r["tokens"] for r in rs) / seconds
            out[f"gen/{lang}/bytes_per_s"] = sum(r["bytes"] for r in rs) / seconds
    return out
