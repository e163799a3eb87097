import pytest

from llm_core.text import sample_language
from llm_core.tokenizer import IM_END, Tokenizer, train_bpe


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    docs = []
    for lang in ("kk", "ru", "en"):
        docs += sample_language(data_dir / "corpus" / lang, 150_000, 20)
    return train_bpe(docs, 1024)


MESSAGES = [
    {"role": "system", "content": "Сен көмекшісің."},
    {"role": "user", "content": "Қазақстанның астанасы қай қала?"},
    {"role": "assistant", "content": "<think>\nАстана туралы сұрақ.\n</think>\n\nАстана."},
    {"role": "user", "content": "And in English?"},
    {"role": "assistant", "content": "Astana."},
]


def test_round_trip_in_three_languages(tokenizer):
    for text in ["Қазақ тілі — түркі тілдерінің бірі.", "Москва — столица России.", "Hello, world! 12345"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("2024") == [tokenizer.tk.token_to_id(c) for c in "2024"], "digits are split"


def test_saved_tokenizer_loads_in_transformers_with_same_chat_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == IM_END and hf.pad_token_id == tokenizer.pad_id
    for gen in (False, True):
        assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == (
            tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        )
    no_think = hf.apply_chat_template(
        MESSAGES[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    text = "Алматы — ең ірі қала. Big city."
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    again = Tokenizer.from_dir(tmp_path)
    assert again.sha256 == tokenizer.sha256


def test_chat_encoding_masks_only_assistant_tokens(tokenizer):
    ids, mask = tokenizer.encode_chat(MESSAGES)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES))
    learned = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == (MESSAGES[2]["content"] + IM_END + MESSAGES[4]["content"] + IM_END)
    assert "<think>" in learned, "reasoning traces are trained on"


def test_bad_messages_and_sizes(tokenizer):
    with pytest.raises(ValueError, match="message 0 must be"):
        tokenizer.encode_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], 100)


def test_reference_tokenizer_without_our_special_tokens_is_rejected(data_dir):
    with pytest.raises(ValueError, match="lacks Tulpar's special tokens"):
        Tokenizer.from_dir(data_dir / "tokenizers" / "llama3")
