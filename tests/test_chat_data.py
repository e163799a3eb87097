import json

import pytest
import torch

from llm_core.chat_data import (
    RowSampler,
    Stats,
    collate,
    encode_examples,
    pack_rows,
    pad_rows,
    preference_rows,
    prompt_to_messages,
    read_jsonl,
    record_to_messages,
)
from llm_core.data import DataError
from llm_core.model import Transformer
from llm_core.text import sample_language
from llm_core.tokenizer import IM_END, train_bpe
from llm_core.trainer import lm_loss
from tests.conftest import small_config


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    docs = [d for lang in ("kk", "ru", "en") for d in sample_language(data_dir / "corpus" / lang, 60_000, 20)]
    return train_bpe(docs, 512)


def test_both_record_forms_and_errors():
    msgs = record_to_messages({"instruction": "Аудар", "input": "Hello", "output": "Сәлем"}, "x")
    assert msgs == [{"role": "user", "content": "Аудар\n\nHello"}, {"role": "assistant", "content": "Сәлем"}]
    with_system = record_to_messages({"system": "S", "instruction": "I", "output": "O"}, "x")
    assert with_system[0] == {"role": "system", "content": "S"}
    with pytest.raises(DataError, match="x: message 0 has role 'robot'"):
        record_to_messages({"messages": [{"role": "robot", "content": "hi"}]}, "x")
    with pytest.raises(DataError, match="unknown record format"):
        record_to_messages({"text": "hi"}, "x")


def test_hh_prompt_is_split_into_turns():
    p = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert prompt_to_messages(p, "x") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert prompt_to_messages("Just a question", "x") == [{"role": "user", "content": "Just a question"}]


def test_labels_are_exactly_the_assistant_spans(tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Қазақстанның астанасы?"},
        {"role": "assistant", "content": "Астана."},
        {"role": "user", "content": "And Russia?"},
        {"role": "assistant", "content": "Москва."},
    ]
    stats = Stats()
    (ex,) = encode_examples([("x", conv)], tokenizer, 512, "truncate", stats)
    (row,) = pad_rows([ex], 64, tokenizer.pad_id)
    labelled = [int(t) for t in row["targets"] if t != -100]
    assert tokenizer.decode(labelled, skip_special_tokens=False) == f"Астана.{IM_END}Москва.{IM_END}"
    # the loss is the mean cross-entropy over exactly those positions
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=tokenizer.vocab_size)).eval()
    batch = collate([row])
    loss, _ = lm_loss(model, batch)
    logits = model(batch["input_ids"]).logits[0]
    pos = (batch["targets"][0] != -100).nonzero().flatten()
    manual = torch.nn.functional.cross_entropy(logits[pos], batch["targets"][0, pos])
    torch.testing.assert_close(loss, manual)


def test_packing_and_padding_give_the_same_loss(tokenizer):
    convs = [
        (
            "a",
            [
                {"role": "user", "content": "Сәлем!"},
                {"role": "assistant", "content": "Сәлеметсіз бе, қалыңыз қалай?"},
            ],
        ),
        (
            "b",
            [
                {"role": "user", "content": "Привет"},
                {"role": "assistant", "content": "Здравствуйте! Чем помочь?"},
            ],
        ),
        (
            "c",
            [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nsimple\n</think>\n\n4"},
            ],
        ),
    ]
    examples = encode_examples(convs, tokenizer, 200, "truncate", Stats())
    packed = pack_rows(examples, 128, tokenizer.pad_id)
    padded = pad_rows(examples, 128, tokenizer.pad_id)
    assert len(packed) == 1 and len(padded) == 3
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        lp, _ = lm_loss(model, collate(packed))
        lq, _ = lm_loss(model, collate(padded))
    torch.testing.assert_close(lp, lq, atol=1e-5, rtol=0)
    # without segment ids the packed samples would see each other: the loss changes
    no_seg = {k: v for k, v in collate(packed).items() if k not in ("segment_ids",)}
    with torch.no_grad():
        leaky, _ = lm_loss(model, no_seg)
    assert abs(float(leaky) - float(lp)) > 1e-4


def test_overflow_skips_are_counted(tokenizer):
    long = [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "ok"}]
    no_answer = [{"role": "user", "content": "hello"}]
    stats = Stats()
    kept = encode_examples([("l", long), ("n", no_answer)], tokenizer, 64, "drop", stats)
    assert kept == [] and stats.skipped == {"longer than max tokens": 1, "no assistant turn": 1}
    stats = Stats()
    encode_examples([("l", long)], tokenizer, 64, "truncate", stats)
    assert stats.skipped == {"no assistant tokens left after truncation": 1} and stats.truncated == 1


def test_preference_rows_learn_only_the_final_response(tokenizer, tmp_path):
    f = tmp_path / "p.jsonl"
    recs = [
        {
            "prompt": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Capital of Kazakhstan?\n\nAssistant:",
            "chosen": " Astana.",
            "rejected": " I don't know.",
        },
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "", "rejected": "x"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in recs))
    stats = Stats()
    rows = preference_rows(read_jsonl([f]), tokenizer, 64, stats)
    assert len(rows) == 1 and stats.skipped == {"chosen equals rejected": 1, "empty chosen or rejected": 1}
    batch = collate(rows)
    assert batch["input_ids"].shape == (2, 64) and int(batch["weight"]) == 1
    chosen = [int(t) for t in batch["targets"][0] if t != -100]
    assert tokenizer.decode(chosen, skip_special_tokens=False) == f"Astana.{IM_END}"


def test_row_sampler_is_world_size_invariant_and_resumable():
    rows = [{"input_ids": torch.full((4,), i), "targets": torch.full((4,), i)} for i in range(10)]
    one = RowSampler(rows, 4, seed=3)
    two = [RowSampler(rows, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses epoch boundaries
        a = one.next_step()[0]["input_ids"][:, 0]
        b = torch.cat([s.next_step()[0]["input_ids"][:, 0] for s in two])
        assert torch.equal(a, b)
    resumed = RowSampler(rows, 4, seed=3)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next_step()[0]["input_ids"], one.next_step()[0]["input_ids"])


def test_batches_of_keeps_every_row_in_order():
    from llm_core.chat_data import batches_of

    rows = [{"input_ids": torch.full((3,), i), "targets": torch.full((3,), i)} for i in range(5)]
    out = batches_of(rows, 2)
    assert [b["input_ids"].shape[0] for b in out] == [2, 2, 1]
    assert torch.cat([b["input_ids"][:, 0] for b in out]).tolist() == [0, 1, 2, 3, 4]


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"messages": []}\n\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3 is not valid JSON"):
        list(read_jsonl([f]))
    with pytest.raises(DataError, match="not found"):
        list(read_jsonl([tmp_path / "missing.jsonl"]))
