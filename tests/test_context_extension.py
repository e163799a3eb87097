"""Context extension: its optional training data (repeated spans: llm_core.data.RepeatedSpanWindows; recall rows:
llm_core.data.RecallRows), and the tiny model extended x4 scoring the passkey key better at the new length than
before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_core.data import RandomWindows, RecallRows, RepeatedSpanWindows

TOKENS = np.arange(5000, dtype=np.int64) % 4093  # no span of it repeats within a window by itself


def spans_of(sampler: RepeatedSpanWindows, step: int) -> list[tuple[int, int, int] | None]:
    """What repeat_span decides for each row of the global batch of `step` (on a scratch window)."""
    n = sampler.seq_len + 1
    return [sampler.repeat_span(np.zeros(n, dtype=np.int64), step, row) for row in range(sampler.batch_size)]


def test_repeated_spans_copy_a_span_of_the_window_further_on():
    spans = RepeatedSpanWindows(TOKENS, 63, 8, share=0.5, min_tokens=4, max_tokens=8, min_distance=10, seed=3)
    plain = RandomWindows(TOKENS, 63, 8, seed=3)
    edited = 0
    for step in range(30):
        ((x, y),), ((px, py),) = spans.batches_at(step), plain.batches_at(step)
        full, original = torch.cat([x, y[:, -1:]], 1), torch.cat([px, py[:, -1:]], 1)
        assert x[:, 1:].equal(y[:, :-1])  # targets are still the inputs shifted by one
        for row, span in enumerate(spans_of(spans, step)):
            if span is None:
                assert full[row].equal(original[row])
                continue
            edited += 1
            a, copy, m = span
            assert 4 <= m <= 8 and copy - (a + m) >= 10 and copy + m <= 64
            assert full[row, copy : copy + m].equal(original[row, a : a + m])
            changed = (full[row] != original[row]).nonzero().flatten().tolist()
            assert changed == list(range(copy, copy + m))  # only the copy differs from the plain window
    assert 0.35 < edited / (30 * 8) < 0.65


def test_shuffled_spans_repeat_a_permutation_of_the_source_in_both_places():
    """source=shuffled: the same windows and spans as source=text, but the span's tokens are put in a random order
    at its source and at its copy, so a memorised continuation of the corpus cannot predict the copy."""
    shuffled = RepeatedSpanWindows(
        TOKENS, 127, 8, share=1.0, min_tokens=8, max_tokens=16, seed=5, source="shuffled"
    )
    text = RepeatedSpanWindows(TOKENS, 127, 8, share=1.0, min_tokens=8, max_tokens=16, seed=5)
    plain = RandomWindows(TOKENS, 127, 8, seed=5)
    reordered = 0
    for step in range(10):
        ((x, y),), ((px, py),) = shuffled.batches_at(step), plain.batches_at(step)
        full, original = torch.cat([x, y[:, -1:]], 1), torch.cat([px, py[:, -1:]], 1)
        assert spans_of(shuffled, step) == spans_of(text, step)
        for row, (a, copy, m) in enumerate(spans_of(shuffled, step)):
            source = full[row, a : a + m]
            assert full[row, copy : copy + m].equal(source)
            assert sorted(source.tolist()) == sorted(original[row, a : a + m].tolist())
            reordered += not source.equal(original[row, a : a + m])
            changed = set((full[row] != original[row]).nonzero().flatten().tolist())
            assert changed <= set(range(a, a + m)) | set(range(copy, copy + m))
    assert (
        reordered >= 75
    )  # of 80 spans of 8-16 distinct tokens, all but a chance few come out in a new order
    with pytest.raises(ValueError, match="source must be"):
        RepeatedSpanWindows(TOKENS, 127, 8, share=1.0, min_tokens=8, max_tokens=16, source="random")


def test_repeated_spans_reach_every_distance_and_are_world_size_invariant():
    one = RepeatedSpanWindows(TOKENS, 255, 8, share=1.0, min_tokens=8, max_tokens=8, seed=1)
    distances = [copy - a for step in range(40) for a, copy, _ in spans_of(one, step)]
    assert min(distances) < 40 and max(distances) > 200  # well beyond a 64-token training length
    for rank in range(2):  # 2 workers x 4 rows see the rows of 1 worker x 8, spans included
        two = RepeatedSpanWindows(
            TOKENS, 255, 4, share=1.0, min_tokens=8, max_tokens=8, seed=1, rank=rank, world_size=2
        )
        for step in range(5):
            ((x1, y1),), ((x8, y8),) = two.batches_at(step), one.batches_at(step)
            assert x1.equal(x8[rank * 4 : rank * 4 + 4]) and y1.equal(y8[rank * 4 : rank * 4 + 4])


def test_repeated_spans_that_do_not_fit_the_window_are_refused():
    from jobs.platform.configfile import load_config
    from jobs.pretrain import PretrainConfig
    from llm_core.config import ConfigError
    from tests.conftest import REPO

    with pytest.raises(ValueError, match=r"2 x max_tokens \+ min_distance <= seq_len \+ 1"):
        RepeatedSpanWindows(TOKENS, 31, 2, share=0.5, min_tokens=8, max_tokens=16, min_distance=1)
    extend = REPO / "configs/pretrain/tiny-extend.yaml"
    with pytest.raises(ConfigError, match=r"data\.repeated_spans: a span of max_tokens 300"):
        load_config(
            PretrainConfig,
            extend,
            ["data.repeated_spans={share: 0.5, max_tokens: 300}"],
        )
    with pytest.raises(ConfigError, match=r"repeated_spans\.min_tokens \(40\) > repeated_spans\.max_tokens"):
        load_config(PretrainConfig, extend, ["data.repeated_spans={share: 0.5, min_tokens: 40}"])


def recall_rows(batch_size=4, rows=3, rank=0, world_size=1, seed=2):
    base = RandomWindows(TOKENS, 128, batch_size, seed=seed, rank=rank, world_size=world_size)
    ids = np.arange(5, 4096)  # the ids of a 4,096-token vocabulary but its 5 special tokens
    return base, RecallRows(
        base, 128, rows=rows, segment_tokens=32, min_tokens=4, max_tokens=12, token_ids=ids
    )


def test_recall_rows_add_copy_only_segments_beside_the_unchanged_text_windows():
    base, recall = recall_rows()
    spans = []
    for step in range(6):
        ((x, y),), (batch,) = base.batches_at(step), recall.batches_at(step)
        inputs, targets, segments = batch["input_ids"], batch["targets"], batch["segment_ids"]
        assert inputs.shape == targets.shape == segments.shape == (4 + 3, 128)
        assert (
            inputs[:4].equal(x) and targets[:4].equal(y) and not segments[:4].any()
        )  # text rows as they were
        assert segments[4:].equal(torch.arange(4).repeat_interleave(32).expand(3, 128))
        rx, ry = inputs[4:].reshape(-1, 32), targets[4:].reshape(-1, 32)  # one segment per row
        assert rx.min() >= 5  # never a special token
        for seg_x, seg_y in zip(rx.tolist(), ry.tolist()):
            learnt = [j for j, t in enumerate(seg_y) if t != -100]
            m = len(learnt) + 1  # the copy's tokens 2..m are learnt
            first = learnt[0]  # the input position holding the copy's first token
            assert 4 <= m <= 12 and learnt == list(range(first, first + m - 1))
            assert all(seg_y[j] == seg_x[j + 1] for j in learnt if j + 1 < 32)  # next-token targets
            copy = seg_x[first : first + m - 1]  # the copy, as far as the inputs hold it
            sources = [a for a in range(first - m + 1) if seg_x[a : a + m - 1] == copy]
            assert sources, "the copied span is not written earlier in its segment"
            spans.append(first - sources[-1])
    assert min(spans) < 16 and max(spans) > 20  # copies at many distances, never one fixed offset
    assert recall.batches_at(3)[0]["input_ids"].equal(
        recall_rows()[1].batches_at(3)[0]["input_ids"]
    )  # seeded


def test_recall_rows_are_world_size_invariant_and_refuse_what_does_not_fit():
    _, one = recall_rows(batch_size=4, rows=4)
    for step in range(3):
        (whole,) = one.batches_at(step)
        for rank in range(2):  # 2 workers x (2 text + 2 recall rows) see the rows of 1 worker x (4 + 4)
            (part,) = recall_rows(batch_size=2, rows=2, rank=rank, world_size=2)[1].batches_at(step)
            for key in ("input_ids", "targets", "segment_ids"):
                text, rec = whole[key][:4], whole[key][4:]
                assert part[key].equal(
                    torch.cat([text[2 * rank : 2 * rank + 2], rec[2 * rank : 2 * rank + 2]])
                )
    base = RandomWindows(TOKENS, 128, 2)
    with pytest.raises(ValueError, match="segment_tokens dividing seq_len"):
        RecallRows(base, 128, rows=1, segment_tokens=48, min_tokens=4, max_tokens=8, token_ids=np.arange(10))
    with pytest.raises(ValueError, match=r"2 x max_tokens <= segment_tokens \+ 1"):
        RecallRows(base, 128, rows=1, segment_tokens=32, min_tokens=4, max_tokens=20, token_ids=np.arange(10))

    from jobs.platform.configfile import load_config
    from jobs.pretrain import PretrainConfig
    from llm_core.config import ConfigError
    from tests.conftest import REPO

    tiny = REPO / "configs/pretrain/tiny.yaml"
    with pytest.raises(
        ConfigError, match=r"data\.recall\.segment_tokens 48 does not divide train\.seq_len 128"
    ):
        load_config(PretrainConfig, tiny, ["data.recall={rows: 8, segment_tokens: 48}"])
    with pytest.raises(ConfigError, match=r"recall\.max_tokens 40: a span and its copy do not fit"):
        load_config(PretrainConfig, tiny, ["data.recall={rows: 8, max_tokens: 40}"])


NUMBER_STARTS, NUMBER_PIECES = [4100, 4101, 4102], [4200, 4201, 4202, 4203]  # ids no other source draws


def kinds_rows(kinds, rows=8, seed=5):
    base = RandomWindows(TOKENS, 128, 2, seed=seed)
    return RecallRows(
        base,
        128,
        rows=rows,
        segment_tokens=64,
        min_tokens=4,
        max_tokens=12,
        token_ids=np.arange(5000, 5100),  # ids the text (TOKENS: 0..4092) never holds
        kinds=kinds,
        text=TOKENS,
        number_start_ids=NUMBER_STARTS,
        number_piece_ids=NUMBER_PIECES,
    )


def segments_of(sampler: RecallRows, step: int):
    """(inputs w[:-1], learnt positions) of every recall segment of a step."""
    (batch,) = sampler.batches_at(step)
    x = batch["input_ids"][2:].reshape(-1, 64).tolist()
    y = batch["targets"][2:].reshape(-1, 64).tolist()
    for seg_x, seg_y in zip(x, y):
        learnt = [j for j, t in enumerate(seg_y) if t != -100]
        assert all(seg_y[j] == seg_x[j + 1] for j in learnt if j + 1 < 64)  # next-token targets
        yield seg_x, learnt


def is_text(tokens: list[int]) -> bool:
    """tokens are consecutive tokens of TOKENS (which counts up by one, modulo 4093)."""
    return all((b - a) % 4093 == 1 for a, b in zip(tokens, tokens[1:]))


def test_recall_kinds_write_their_span_into_text_and_learn_only_the_copy():
    """Each kind's segment as RecallRows documents it, and the default kinds are the rows of a sampler without
    them, draw for draw."""
    shuffled = []
    for kind in ("random_in_text", "shuffled_in_text", "number_in_text"):
        sampler = kinds_rows({kind: 1.0})
        for step in range(3):
            for seg_x, learnt in segments_of(sampler, step):
                first, m = learnt[0], len(learnt) + 1  # the copy starts at input position `first`
                assert learnt == list(range(first, first + m - 1))
                copy = seg_x[first : first + m - 1]
                a = next(a for a in range(first - m + 1) if seg_x[a : a + m - 1] == copy)
                span = seg_x[a : a + m]
                # outside the span and its copy, the segment is one stretch of text
                rest = seg_x[:a] + ["cut"] + seg_x[a + m : first] + ["cut"] + seg_x[first + m :]
                pieces = " ".join(map(str, rest)).split("cut")
                assert all(is_text([int(t) for t in piece.split()]) for piece in pieces)
                if kind == "random_in_text":
                    assert 4 <= m <= 12 and all(5000 <= t < 5100 for t in span)
                elif kind == "shuffled_in_text":
                    assert 4 <= m <= 12 and is_text(sorted(span)) and all(t < 4093 for t in span)
                    shuffled.append(span != sorted(span))  # in a random order
                else:
                    numbers = [i for i, t in enumerate(span) if t >= 4100]
                    start = numbers[0]
                    assert 1 <= start <= 4 and numbers == list(range(start, m)), span  # text, then the number
                    assert span[start] in NUMBER_STARTS and all(t in NUMBER_PIECES for t in span[start + 1 :])
                    assert m - start <= 4 and is_text(sorted(span[:start]))
                    assert (
                        first + start - 1 in learnt
                    )  # the number's first token is learnt, from the text before
    assert sum(shuffled) > 0.8 * len(shuffled)
    # several kinds mix with their weights
    counts = {"random": 0, "number": 0}
    mixed = kinds_rows({"random": 0.25, "number_in_text": 0.75}, rows=16)
    for step in range(4):
        for seg_x, _ in segments_of(mixed, step):
            counts["number" if any(4100 <= t < 5000 for t in seg_x) else "random"] += 1
    assert 0.6 < counts["number"] / sum(counts.values()) < 0.9, counts
    # the default kinds draw exactly the rows RecallRows drew before kinds existed
    plain, explicit = (
        recall_rows()[1],
        RecallRows(
            RandomWindows(TOKENS, 128, 4, seed=2),
            128,
            rows=3,
            segment_tokens=32,
            min_tokens=4,
            max_tokens=12,
            token_ids=np.arange(5, 4096),
            kinds={"random": 1.0},
            text=TOKENS,
        ),
    )
    for step in range(3):
        assert plain.batches_at(step)[0]["input_ids"].equal(explicit.batches_at(step)[0]["input_ids"])


def test_recall_kinds_that_cannot_be_drawn_are_refused():
    base = RandomWindows(TOKENS, 128, 2)
    common = dict(rows=1, segment_tokens=64, min_tokens=4, max_tokens=8, token_ids=np.arange(10))
    with pytest.raises(ValueError, match=r"kinds \{'quotes': 1.0\}: each must be one of"):
        RecallRows(base, 128, **common, kinds={"quotes": 1.0}, text=TOKENS)
    with pytest.raises(ValueError, match="write into text: need text of at least"):
        RecallRows(base, 128, **common, kinds={"shuffled_in_text": 1.0})
    with pytest.raises(ValueError, match="number_in_text needs the tokenizer's number tokens"):
        RecallRows(base, 128, **common, kinds={"number_in_text": 1.0}, text=TOKENS)

    from jobs.platform.configfile import load_config
    from jobs.pretrain import PretrainConfig
    from llm_core.config import ConfigError
    from tests.conftest import REPO

    tiny = REPO / "configs/pretrain/tiny.yaml"
    with pytest.raises(ConfigError, match=r"recall\.kinds \{'quotes': 1\.0\}: each key must be one of"):
        load_config(PretrainConfig, tiny, ["data.recall={rows: 8, kinds: {quotes: 1.0}}"])
    with pytest.raises(ConfigError, match=r"recall\.kinds \{'random': 0\.0\}"):
        load_config(PretrainConfig, tiny, ["data.recall={rows: 8, kinds: {random: 0.0}}"])
    with pytest.raises(
        ConfigError, match="number_in_text: its spans of up to 8 tokens .* raise segment_tokens"
    ):
        load_config(
            PretrainConfig,
            tiny,
            [
                "data.recall={rows: 8, segment_tokens: 8, min_tokens: 2, max_tokens: 4, kinds: {number_in_text: 1}}"
            ],
        )


def test_number_tokens_are_the_tokenizers_and_cover_a_passkey(data_dir):
    """jobs.pretrain hands recall rows the tokenizer's number tokens: a passkey-like number as the tokenizer writes
    it is one start token (a space and digits) and pieces (digits), the forms number_in_text draws."""
    import random

    from jobs.pretrain import number_token_ids
    from tests.factory import tiny_corpus

    tokenizer, _ = tiny_corpus(data_dir)
    ids = number_token_ids(tokenizer)
    starts, pieces = set(ids["number_start_ids"]), set(ids["number_piece_ids"])
    starts_as_text = {tokenizer.decode([i]) for i in starts}
    assert all(t[0] == " " and (t[1:].isdecimal() or t == " ") for t in starts_as_text), starts_as_text
    assert all(tokenizer.decode([i]).isdecimal() for i in pieces)
    rng = random.Random(0)
    for n in (rng.randint(10**4, 10**5 - 1) for _ in range(200)):
        key = tokenizer.encode(f" {n}")
        assert key[0] in starts and set(key[1:]) <= pieces and 2 <= len(key) <= 6, (n, key)


def test_recall_rows_train_with_the_lm_loss_and_report_the_copies_apart():
    """jobs.pretrain with data.recall: its loss is lm_loss's, to the bit (one forward over text and recall rows);
    recall_loss / recall_copy_acc / text_loss are those of the rows scored on their own."""
    from jobs.platform.configfile import model_config_from_preset
    from jobs.training.tasks import recall_lm_loss
    from llm_core.model import Transformer
    from llm_core.trainer import EvalSet, TrainConfig, Trainer, lm_loss

    torch.manual_seed(0)
    model = Transformer(model_config_from_preset("tiny", ["vocab_size=4096", "num_layers=2"])).eval()
    _, recall = recall_rows()
    (batch,) = recall.batches_at(0)
    loss, extra = recall_lm_loss(model, batch)
    reference, reference_extra = lm_loss(model, batch)
    assert torch.equal(loss, reference) and extra["ce_loss"] == reference_extra["ce_loss"]
    with torch.no_grad():
        text = model(batch["input_ids"][:4], batch["targets"][:4]).loss
        rows = model(batch["input_ids"][4:], segment_ids=batch["segment_ids"][4:]).logits
    y = batch["targets"][4:]
    keep = y != -100
    assert extra["text_loss"] == pytest.approx(float(text), rel=1e-5)
    assert extra["recall_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(rows[keep], y[keep])), rel=1e-5
    )
    assert extra["recall_copy_acc"] == pytest.approx(float((rows[keep].argmax(-1) == y[keep]).float().mean()))
    # a training step takes these batches as they are (the recall_rows count travels with the tensors)
    trainer = Trainer(
        model.train(), TrainConfig(steps=2, batch_size=4, seq_len=128, eval_every=10), loss_fn=recall_lm_loss
    )
    metrics = trainer.train_step(recall.next_step())
    assert {"recall_loss", "recall_copy_acc", "text_loss"} <= set(metrics) and metrics["loss"] > 0
    # and validates on plain text windows (no recall rows), as lm_loss does
    val = EvalSet("en", TOKENS, 1.0)
    assert trainer.evaluate([val]) == Trainer(model, trainer.cfg).evaluate([val])


# ---------------------------------------------------------------------------------------- acceptance


def extend(base_dir, tokens: np.ndarray, *, steps: int):
    """tiny-extend.yaml's recipe in-process, scaled to the factory model: x4 with YaRN (trained at 64 -> 256),
    continued pretraining at seq_len 256 on random windows of the same text."""
    from jobs.pretrain import ModelChanges, merged_model_config
    from llm_core.export_hf import load_hf
    from llm_core.model import Transformer
    from llm_core.trainer import TrainConfig, Trainer

    base = load_hf(base_dir)
    changes = ModelChanges(
        max_seq_len=256, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64}
    )
    model = Transformer(merged_model_config(base.cfg, changes, str(base_dir)))
    model.load_state_dict(base.state_dict(), strict=True)  # as PretrainWindowsTask.build_model does
    tcfg = TrainConfig(
        steps=steps, batch_size=8, seq_len=256, lr=1e-3, warmup_steps=10, schedule="cosine", eval_every=10**6
    )
    sampler = RandomWindows(tokens, 256, 8, seed=1)
    trainer = Trainer(model, tcfg)
    for _ in range(steps):
        trainer.train_step(sampler.next_step())
    return model.eval()


@pytest.mark.slow
def test_context_extension_lowers_the_passkey_key_nll_at_the_new_length(tmp_path, data_dir):
    """The factory's tiny model, trained on 64-token windows (max_seq_len 256, RoPE unscaled), extended x4 as
    tiny-extend.yaml does: on 240-token passkey prompts (the eval's keys, seed and filler) the key's NLL per token
    falls well below the un-extended model's (measured 4.44 -> 4.01 nats), and exact-match accuracy does not fall.

    What this shows is that the model predicts at positions beyond its training length again, not that it retrieves
    the key: scored after a prompt that holds another key, the key's NLL is the same (docs/evaluation.md, "Context
    extension of the tiny model"); a 1.3M model this short-trained answers no passkey before or after."""
    from jobs.evaluation.config import PasskeySpec
    from jobs.evaluation.long_context import evaluate_passkey
    from llm_core.export_hf import load_hf
    from tests.factory import tiny_corpus, train_tiny_hf

    torch.set_num_threads(1)
    base_dir = train_tiny_hf(tmp_path / "base", data_dir, steps=150, max_seq_len=256)
    tok, tokens = tiny_corpus(data_dir)
    spec = PasskeySpec(lengths=[240], depths=[0.0, 0.5, 1.0], samples=2, languages=["en", "ru", "kk"])
    before = evaluate_passkey(load_hf(base_dir).eval(), tok, spec).metrics()
    after = evaluate_passkey(extend(base_dir, tokens, steps=80), tok, spec).metrics()
    assert after["passkey/240/nll"] < before["passkey/240/nll"] - 0.2, (before, after)
    assert after["passkey/240/acc"] >= before["passkey/240/acc"]
