"""The fast encoder gives Hugging Face tokenizers' ids, or refuses; preprocessing's DocEncoder checks it as it goes."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from jobs.prep.encoding import DocEncoder, EncoderMismatch
from llm_core.fast_encoder import FastEncoder, UnsupportedTokenizer, fast_encoder
from llm_core.text import sample_language
from llm_core.tokenizer import train_bpe

TRICKY = [
    "a<|endoftext|>b <|im_start|>user\nhi<|im_end|> <think></think>",  # special tokens written in the text
    "Cafe\u0301 e\u0301te\u0301 Ａｂｃ",  # NFC composes e + combining acute; full-width letters stay
    "x\r\n\t  \n\n  y   z\u00a0w\u2003v ",  # whitespace runs, CRLF, no-break and em spaces
    "1 12 123 1234 12345678 ١٢٣ ½ ²",  # digit grouping, Arabic-Indic digits, numeric non-digits
    "Сәлем, әлем! Привет… Hello?! 😀👍🏽 ‘quotes’ — dash",
    "don't we'll I'M it's 'tis",
    "",
]


@pytest.fixture(scope="module")
def corpus_texts(data_dir):
    return [
        d for lang in ("kk", "ru", "en") for d in sample_language(data_dir / "corpus" / lang, 300_000, 20)
    ]


@pytest.fixture(scope="module")
def phrase_tokenizer(corpus_texts):
    """Our production recipe at a small size: gpt2 split, digits in threes, superword merges over phrases."""
    return train_bpe(corpus_texts, 2048, pre_tokenizer="gpt2", digits="group3", superword_fraction=0.15).tk


def hf_ids(tk: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]


def test_same_ids_as_hf_on_the_corpus_and_edge_cases(phrase_tokenizer, corpus_texts):
    texts = corpus_texts + TRICKY
    fast = FastEncoder.from_tokenizer(phrase_tokenizer)
    assert fast.encode_batch(texts) == hf_ids(phrase_tokenizer, texts)
    assert fast.encode(TRICKY[0]).count(phrase_tokenizer.token_to_id("<|endoftext|>")) == 1


def test_same_ids_for_the_qwen3_tokenizer(data_dir, corpus_texts):
    qwen = HFTokenizer.from_file(str(data_dir / "tokenizers" / "qwen3" / "tokenizer.json"))
    texts = corpus_texts[:400] + TRICKY
    assert FastEncoder.from_tokenizer(qwen).encode_batch(texts) == hf_ids(qwen, texts)


def test_tokenizers_it_cannot_prove_equal_are_refused(data_dir):
    gemma = HFTokenizer.from_file(str(data_dir / "tokenizers" / "gemma3" / "tokenizer.json"))  # SentencePiece
    with pytest.raises(UnsupportedTokenizer, match="not a plain BPE"):
        FastEncoder.from_tokenizer(gemma)
    assert fast_encoder(gemma) is None
    with pytest.raises(ValueError, match="tokenizer.encoder=fast cannot encode.*tokenizer.encoder: auto"):
        DocEncoder(gemma, "fast")
    auto = DocEncoder(gemma, "auto")  # auto falls back to HF tokenizers
    assert auto.name == "hf"
    assert auto.encode_batch(["Сәлем, әлем!"]) == hf_ids(gemma, ["Сәлем, әлем!"])


def test_a_merge_list_out_of_id_order_is_refused(phrase_tokenizer):
    import json

    spec = json.loads(phrase_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]  # HF would now merge in another order than the ids say
    with pytest.raises(UnsupportedTokenizer, match="merge order"):
        FastEncoder.from_tokenizer(HFTokenizer.from_str(json.dumps(spec)))


def test_doc_encoder_checks_the_fast_encoder_against_hf(phrase_tokenizer, corpus_texts):
    enc = DocEncoder(phrase_tokenizer, "auto", check_every=8)
    assert enc.name == "fast"
    texts = corpus_texts[:64]
    assert enc.encode_batch(texts) == hf_ids(phrase_tokenizer, texts)
    assert DocEncoder(phrase_tokenizer, "hf").encode_batch(texts) == hf_ids(phrase_tokenizer, texts)

    real = enc.fast.encode_batch

    def wrong_on_the_ninth(batch):  # a (hypothetical) disagreement on a document the check samples
        ids = real(batch)
        ids[8] = ids[8][::-1]
        return ids

    enc.fast.encode_batch = wrong_on_the_ninth
    with pytest.raises(EncoderMismatch, match="tokenizer.encoder: hf"):
        enc.encode_batch(texts)
