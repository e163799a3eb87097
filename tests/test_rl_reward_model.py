"""Bradley-Terry reward model (jobs/rlhf/reward_model.py): learns a preference, held-out accuracy with its interval."""

from __future__ import annotations

import random

import pytest
import torch

from jobs.rlhf import reward_model as rm
from llm_core.value_model import ScalarHeadModel
from tests.test_rl_grpo import PAD, tiny


def synthetic_pairs(n: int, seed: int) -> list[rm.Pair]:
    """Chosen answers contain token 7, rejected ones do not: a preference a tiny model can learn."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randint(2, 6) for _ in range(3)]
        body = [rng.choice([2, 3, 4, 5, 6, 8, 9]) for _ in range(rng.randint(2, 5))]
        chosen = prompt + body[:1] + [7] + body[1:]
        rejected = prompt + body
        pairs.append((chosen, rejected))
    return pairs


def test_reward_model_learns_a_preference_and_reports_its_interval():
    torch.manual_seed(0)
    model = ScalarHeadModel(tiny(seed=0))
    train, held = synthetic_pairs(200, seed=0), synthetic_pairs(80, seed=1)
    before = rm.evaluate(model, held, PAD)
    losses = rm.train(model, train, PAD, steps=120, lr=3e-3, batch_size=16)
    after = rm.evaluate(model, held, PAD)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert after.accuracy >= 0.9 and after.ci_low > 0.5 > before.ci_low  # above chance, with confidence
    assert after.margin > 0 and after.pairs == 80


def test_wilson_interval_by_hand():
    low, high = rm.wilson_interval(8, 10)
    # Wilson's formula with p = 0.8, n = 10, z = 1.96
    z = 1.959964
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * ((0.8 * 0.2 / 10 + z * z / 400) ** 0.5) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook value for 8/10
    with pytest.raises(ValueError, match="no held-out pairs"):
        rm.wilson_interval(0, 0)


def test_encode_pairs_checks_records():
    class FakeTokenizer:
        def encode_chat(self, msgs):
            text = " ".join(m["content"] for m in msgs)
            return [len(w) for w in text.split()], None

    tok = FakeTokenizer()
    got = rm.encode_pairs(
        [
            {"prompt": "a bb", "chosen": "ccc", "rejected": "dddd"},
            {"prompt": "x", "chosen": "same", "rejected": "same"},  # skipped: nothing to prefer
        ],
        tok,
        seq_len=8,
    )
    assert got == [([1, 2, 3], [1, 2, 4])]
    with pytest.raises(ValueError, match=r"record 1: missing \['rejected'\]"):
        rm.encode_pairs([{"prompt": "a", "chosen": "b"}], tok, seq_len=8)


class ChatTokenizer:
    """Token ids = word lengths of the rendered chat; pad 0 (no word has length 0)."""

    pad_id = 0

    def encode_chat(self, msgs):
        text = " ".join(m["content"] for m in msgs)
        return [len(w) for w in text.split()], None


def test_preference_pair_rows_keep_the_end_of_long_chats_and_count_every_skip():
    from llm_core.chat_data import Stats
    from llm_core.data import DataError

    stats = Stats()
    records = [
        ("f:1", {"prompt": "a bb", "chosen": "ccc", "rejected": "dddd ee"}),
        ("f:2", {"prompt": "x", "chosen": "same", "rejected": "same"}),
        ("f:3", {"prompt": "x", "chosen": " ", "rejected": "y"}),
        ("f:4", {"prompt": "a bb ccc dddd eeeee", "chosen": "z", "rejected": "yy"}),  # 6 words > seq_len 4
        ("f:5", {"prompt": "a bb ccc dddd", "chosen": "x x x x", "rejected": "yy x x x x"}),  # equal once cut
    ]
    rows = rm.preference_pair_rows(records, ChatTokenizer(), 4, stats)
    assert [r["input_ids"].tolist() for r in rows] == [
        [[1, 2, 3, 0], [1, 2, 4, 2]],
        [[3, 4, 5, 1], [3, 4, 5, 2]],  # the start of the prompt is dropped, the answer kept
    ]
    assert rows[0]["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert rm.rows_to_pairs(rows) == [([1, 2, 3], [1, 2, 4, 2]), ([3, 4, 5, 1], [3, 4, 5, 2])]
    assert stats.to_dict() == {
        "read": 5,
        "kept": 2,
        "truncated": 4,
        "skipped": {
            "chosen equals rejected": 1,
            "empty chosen or rejected": 1,
            "equal once cut to seq_len": 1,
        },
    }
    with pytest.raises(DataError, match=r"f:9: missing \['chosen'\]"):
        rm.preference_pair_rows([("f:9", {"prompt": "a", "rejected": "b"})], ChatTokenizer(), 4, Stats())


def pair_rows(pairs: list[rm.Pair], seq_len: int) -> list[dict[str, torch.Tensor]]:
    rows = []
    for pair in pairs:
        ids, mask = rm.pair_batch([pair], PAD)
        pad = seq_len - ids.size(1)
        rows.append(
            {
                "input_ids": torch.nn.functional.pad(ids, (0, pad), value=PAD),
                "attention_mask": torch.nn.functional.pad(mask, (0, pad)),
            }
        )
    return rows


def test_the_trainer_trains_a_reward_model_counts_its_tokens_and_resumes_exactly(tmp_path):
    """llm_core's Trainer with a ScalarHeadModel and the stage's Bradley-Terry loss: tokens are the real tokens of
    the pairs, FLOPs leave out the LM head, a checkpoint resumes to the same losses, and val_loss is the held-out
    Bradley-Terry loss (the evaluation's own reference: rl_losses.bradley_terry_loss on sequence_scores)."""
    from jobs.training.tasks import make_bradley_terry_loss
    from llm_core.chat_data import RowSampler, batches_of
    from llm_core.rl_losses import bradley_terry_loss
    from llm_core.trainer import EvalBatches, TrainConfig, Trainer

    train_rows, val_rows = (
        pair_rows(synthetic_pairs(32, seed=0), 12),
        pair_rows(synthetic_pairs(8, seed=1), 12),
    )
    cfg = TrainConfig(
        steps=6, batch_size=4, seq_len=12, lr=3e-3, warmup_steps=0, activation_checkpointing=True
    )

    def trainer() -> tuple[Trainer, RowSampler]:
        torch.manual_seed(0)
        model = ScalarHeadModel(tiny(seed=0))
        return Trainer(model, cfg, loss_fn=make_bradley_terry_loss()), RowSampler(train_rows, 4, seed=0)

    a, sampler = trainer()
    assert a.model.base.gradient_checkpointing  # the setting reaches the trunk's blocks
    assert (
        a.flops_per_token == a.model.cfg.flops_per_token(12) - 6 * a.model.cfg.padded_vocab_size * 32 + 6 * 32
    )
    losses = []
    for step in range(6):
        batches = sampler.next_step(1)
        metrics = a.train_step(batches)
        assert metrics["tokens"] == float(batches[0]["attention_mask"].sum())
        losses.append(metrics["loss"])
        if step == 2:
            a.save_to(tmp_path / "ckpt", sampler, {})
    b, sampler_b = trainer()
    b.resume(tmp_path / "ckpt", sampler_b)
    assert [b.train_step(sampler_b.next_step(1))["loss"] for _ in range(3)] == losses[3:]

    val = b.evaluate([EvalBatches("pairs", batches_of(val_rows, 4))])
    b.model.eval()
    with torch.no_grad():
        ids = torch.cat([r["input_ids"] for r in val_rows])
        scores = b.model.sequence_scores(ids, torch.cat([r["attention_mask"] for r in val_rows]))
    want, accuracy = bradley_terry_loss(scores[0::2], scores[1::2])
    assert val["val_loss"] == pytest.approx(float(want), rel=1e-5)
    assert val["val_accuracy/pairs"] == pytest.approx(accuracy)
