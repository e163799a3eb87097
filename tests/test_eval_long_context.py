"""Long-context evaluation (jobs/evaluation/long_context.py): passkey prompts, their scoring, bits-per-byte by
position, and the eval stage's outputs for them."""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import pytest
import torch

from jobs.evaluation.config import PASSKEY_TEXT, EvalConfig, PasskeySpec, PositionBpbSpec, metric_direction
from jobs.evaluation.long_context import (
    PasskeyResult,
    answer_matches,
    build_passkey_prompts,
    evaluate_bpb_by_position,
    evaluate_passkey,
    score_passkey,
)
from jobs.platform.runtime import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    from llm_core.tokenizer import train_bpe

    texts = [t.replace("{key}", "31415") for lang in PASSKEY_TEXT.values() for t in lang.values()]
    texts += ["The cat sat on the mat. A dog ran in the park near the river."]
    return train_bpe(texts * 20, 1000)


def settings_for(home: Path, data: Path) -> Settings:
    return Settings(
        data=data,
        home=home,
        storage=str(home),
        mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        ray_address=None,
    )


class BigramLM(torch.nn.Module):
    """logits[t] = table[token t]: log-likelihoods computable by hand."""

    def __init__(self, table: torch.Tensor, max_seq_len: int):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)
        self.cfg = types.SimpleNamespace(max_seq_len=max_seq_len, vocab_size=table.shape[0])

    def forward(self, ids):
        return types.SimpleNamespace(logits=self.table[ids])


# ---------------------------------------------------------------------------------------- the prompts


def test_passkey_prompts_have_the_length_and_the_key_at_its_depth(tokenizer):
    spec = PasskeySpec(lengths=[64, 96], depths=[0.0, 0.5, 1.0], samples=2, languages=["en", "kk"])
    prompts, notes = build_passkey_prompts(spec, tokenizer, max_seq_len=512)
    assert notes == [] and len(prompts) == 2 * 2 * 3 * 2
    for p in prompts:
        text = PASSKEY_TEXT[p.language]
        intro, question = tokenizer.encode(text["intro"]), tokenizer.encode(text["question"])
        needle = tokenizer.encode(text["needle"].format(key=p.key))
        n_filler = p.length - 1 - len(intro) - len(needle) - len(question)
        assert len(p.ids) == p.length
        assert p.ids[0] == tokenizer.eos_id and p.ids[1 : 1 + len(intro)] == intro
        assert p.ids[-len(question) :] == question
        assert p.needle_offset == 1 + len(intro) + round(p.depth * n_filler)
        assert p.ids[p.needle_offset : p.needle_offset + len(needle)] == needle
        assert re.fullmatch(r"[1-9]\d{4}", p.key)
    assert prompts[0].needle_offset == 1 + len(tokenizer.encode(PASSKEY_TEXT["en"]["intro"]))  # depth 0
    assert len({p.key for p in prompts}) > len(prompts) // 2  # keys differ between cells


def test_passkey_prompts_are_deterministic_from_the_seed(tokenizer):
    spec = PasskeySpec(lengths=[64], depths=[0.25, 0.75], samples=3)
    a, _ = build_passkey_prompts(spec, tokenizer, 512)
    b, _ = build_passkey_prompts(spec, tokenizer, 512)
    c, _ = build_passkey_prompts(spec.model_copy(update={"seed": 1}), tokenizer, 512)
    assert a == b
    assert [p.key for p in a] != [p.key for p in c]


def test_corpus_filler_is_drawn_from_the_language_corpus(tokenizer, data_dir, tmp_path):
    spec = PasskeySpec(lengths=[200], depths=[0.5], samples=2, languages=["ru"], filler="corpus")
    settings = settings_for(tmp_path, data_dir)
    a, _ = build_passkey_prompts(spec, tokenizer, 512, settings)
    b, _ = build_passkey_prompts(spec, tokenizer, 512, settings)
    assert a == b and all(len(p.ids) == 200 for p in a)
    assert a[0].ids != a[1].ids  # the samples start at different corpus sentences
    repeat, _ = build_passkey_prompts(spec.model_copy(update={"filler": "repeat"}), tokenizer, 512)
    assert a[0].ids[: a[0].needle_offset] != repeat[0].ids[: repeat[0].needle_offset]


def test_lengths_beyond_the_context_are_skipped_with_a_note_and_too_short_ones_refused(tokenizer):
    spec = PasskeySpec(lengths=[64, 120, 128], depths=[0.5], samples=1)  # answer: 5 + 3 tokens
    prompts, notes = build_passkey_prompts(spec, tokenizer, max_seq_len=128)
    assert sorted({p.length for p in prompts}) == [64, 120]
    assert len(notes) == 1 and "passkey length 128 skipped" in notes[0] and "max_seq_len 128" in notes[0]
    with pytest.raises(ValueError, match=r"passkey length 8 is too short.*raise passkey.lengths"):
        build_passkey_prompts(PasskeySpec(lengths=[8]), tokenizer, 512)


# ---------------------------------------------------------------------------------------- scoring


def test_answer_matches_the_leading_digits_exactly():
    assert answer_matches(" 12345. Remember", "12345")
    assert answer_matches("12345", "12345")
    assert not answer_matches(" 123456", "12345")
    assert not answer_matches(" 1234", "12345")
    assert not answer_matches(" the key is 12345", "12345")


def test_scoring_with_a_generator_that_sees_only_the_last_tokens(tokenizer):
    """A stub 'model' that reads the key when the key sentence lies in its last 40 tokens: accuracy 1 at the
    depths where it does, 0 elsewhere, cell by cell."""
    spec = PasskeySpec(lengths=[64, 160], depths=[0.0, 0.5, 1.0], samples=2)
    prompts, _ = build_passkey_prompts(spec, tokenizer, 512)
    window = 40
    assert all(
        p.needle_tokens + len(tokenizer.encode(PASSKEY_TEXT["en"]["question"])) <= window for p in prompts
    )

    def short_sighted(batch: list[list[int]]) -> list[str]:
        assert len({len(ids) for ids in batch}) == 1  # one length per call
        found = [re.search(r"\d{5}", tokenizer.decode(ids[-window:])) for ids in batch]
        return [f" {m.group(0)}." if m else " I do not know" for m in found]

    records = score_passkey(prompts, short_sighted, batch_size=4)
    res = PasskeyResult(records, [], [64, 160], [0.0, 0.5, 1.0])
    for p, r in zip(prompts, records):
        if p.needle_offset >= p.length - window:  # the whole key sentence is in view
            assert r["correct"], (p.length, p.depth)
        elif p.needle_offset + p.needle_tokens <= p.length - window:  # none of it is
            assert not r["correct"], (p.length, p.depth)
    m = res.metrics()
    assert m["passkey/160/depth100/acc"] == 1.0 and m["passkey/160/depth0/acc"] == 0.0
    assert m["passkey/64/depth100/acc"] == 1.0
    assert m["passkey/all/acc"] == sum(r["correct"] for r in records) / len(records)
    assert m["passkey/160/acc"] == pytest.approx(
        sum(m[f"passkey/160/depth{d}/acc"] for d in (0, 50, 100)) / 3
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    from llm_core.export_hf import load_hf
    from llm_core.tokenizer import Tokenizer
    from tests.factory import train_tiny_hf

    hf = train_tiny_hf(tmp_path_factory.mktemp("tiny") / "hf", data_dir, steps=40)
    return types.SimpleNamespace(dir=hf, model=load_hf(hf).eval(), tokenizer=Tokenizer.from_dir(hf))


def test_real_tiny_model_passkey_answers_are_its_greedy_continuations(tiny):
    spec = PasskeySpec(lengths=[128, 509, 600], depths=[0.0, 1.0], samples=1, max_new_tokens=4)
    res = evaluate_passkey(tiny.model, tiny.tokenizer, spec)
    assert (
        res.lengths == [128] and len(res.notes) == 2
    )  # 509 + 6 and 600 + 6 > 512: skipped (the key: 6 tokens)
    prompts, _ = build_passkey_prompts(spec, tiny.tokenizer, tiny.model.cfg.max_seq_len)
    for p, r in zip(prompts, res.records):
        ids = list(p.ids)
        with torch.no_grad():  # reference: argmax of a full forward pass per step, no KV cache
            for _ in range(4):
                nxt = int(tiny.model(torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == tiny.tokenizer.eos_id:
                    break
                ids.append(nxt)
        assert r["answer"] == tiny.tokenizer.decode(ids[len(p.ids) :])
        assert r["correct"] == answer_matches(r["answer"], p.key)
    assert 0.0 <= res.metrics()["passkey/128/acc"] <= 1.0
    assert res.metrics()["passkey/128/nll"] == pytest.approx(sum(r["key_nll"] for r in res.records) / 2)


def bigram_nll(table: torch.Tensor, tokens: list[int], first: int) -> float:
    """-sum_{p >= first} ln softmax(table[tokens[p-1]])[tokens[p]], in Python floats."""
    total = 0.0
    for p in range(first, len(tokens)):
        row = [float(x) for x in table[tokens[p - 1]]]
        m = max(row)
        total += m + math.log(sum(math.exp(x - m) for x in row)) - row[tokens[p]]
    return total


def test_key_nll_is_the_teacher_forced_key_likelihood(tokenizer):
    from jobs.evaluation.long_context import key_nll

    torch.manual_seed(1)
    table = torch.randn(tokenizer.vocab_size, tokenizer.vocab_size)
    model = BigramLM(table, max_seq_len=128)
    prompts, _ = build_passkey_prompts(PasskeySpec(lengths=[100], depths=[0.5], samples=3), tokenizer, 128)
    got = key_nll(model, tokenizer, prompts)
    for p, nll in zip(prompts, got):
        key = tokenizer.encode(" " + p.key)
        assert nll == pytest.approx(bigram_nll(table, [*p.ids, *key], len(p.ids)) / len(key), rel=1e-6)


class InductionLM(torch.nn.Module):
    """Predicts, at each position, the token that followed the last earlier occurrence of the current token (logit
    8, every other 0): a model that reads its context back, as passkey retrieval needs."""

    def __init__(self, vocab: int, max_seq_len: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.cfg = types.SimpleNamespace(max_seq_len=max_seq_len, vocab_size=vocab)

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.cfg.vocab_size)
        for b, row in enumerate(ids.tolist()):
            last: dict[int, int] = {}
            for t, tok in enumerate(row):
                if tok in last:
                    logits[b, t, row[last[tok] + 1]] = 8.0
                last[tok] = t
        return types.SimpleNamespace(logits=logits)


def test_key_gain_is_zero_for_a_model_that_cannot_read_the_key_back(tokenizer):
    """The control beside the key NLL: the key scored after the cell's prompt of seed + 1 (another key) minus after
    its own. A bigram model predicts the key from the question's last token alone: gain exactly 0 whatever its key
    NLL; a model that copies from its context gains."""
    spec = PasskeySpec(lengths=[100], depths=[0.0, 1.0], samples=2, languages=["en"])
    never = lambda batch: [" no" for _ in batch]  # noqa: E731  (accuracy is not what this test is about)
    torch.manual_seed(2)
    bigram = evaluate_passkey(
        BigramLM(torch.randn(tokenizer.vocab_size, tokenizer.vocab_size), 128),
        tokenizer,
        spec,
        continue_fn=never,
    )
    assert all(r["key_gain"] == pytest.approx(0.0, abs=1e-6) for r in bigram.records)
    assert bigram.metrics()["passkey/all/nll"] > 1.0 and bigram.metrics()[
        "passkey/all/key_gain"
    ] == pytest.approx(0)
    copier = evaluate_passkey(InductionLM(tokenizer.vocab_size, 128), tokenizer, spec, continue_fn=never)
    m = copier.metrics()
    assert m["passkey/100/key_gain"] > 2.0 and m["passkey/100/nll"] < bigram.metrics()["passkey/100/nll"]
    assert metric_direction("passkey/100/key_gain") == "higher"


# ---------------------------------------------------------------------------------------- bpb by position


def test_bpb_by_position_equals_the_hand_computation(tokenizer, tmp_path):
    text = " ".join(["The cat sat on the mat. A dog ran in the park near the river."] * 12)
    (tmp_path / "en.txt").write_text(text + "\n")
    torch.manual_seed(0)
    table = torch.randn(tokenizer.vocab_size, tokenizer.vocab_size)
    model = BigramLM(table, max_seq_len=40)
    spec = PositionBpbSpec(files={"en": str(tmp_path / "en.txt")}, bucket=16, max_sequences=3)
    (res,), notes = evaluate_bpb_by_position(model, tokenizer, spec, settings_for(tmp_path, tmp_path))
    ids = tokenizer.encode(text)
    seqs = [ids[i * 40 : (i + 1) * 40] for i in range(3)]
    assert res.length == 40 and res.sequences == 3 and notes == []
    assert [(b["lo"], b["hi"]) for b in res.buckets] == [(0, 16), (16, 32), (32, 40)]
    for b in res.buckets:
        nll, n_bytes = 0.0, 0
        for seq in seqs:
            full = [tokenizer.eos_id, *seq]
            for p in range(b["lo"], b["hi"]):  # -ln softmax(table[prev])[cur], in Python floats
                row = [float(x) for x in table[full[p]]]
                m = max(row)
                nll += m + math.log(sum(math.exp(x - m) for x in row)) - row[full[p + 1]]
                n_bytes += len(tokenizer.decode([seq[p]]).encode("utf-8"))  # ASCII text: bytes per token
        assert b["bytes"] == n_bytes and b["tokens"] == 3 * (b["hi"] - b["lo"])
        assert b["bpb"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)  # float32 logits


def test_bpb_by_position_of_a_real_model_sums_to_the_scorer_total(tiny, data_dir, tmp_path):
    """Over all buckets, the NLL equals llm_core.scoring's for the same sequences (a second code path)."""
    from llm_core.scoring import Scorer, ScoreRequest

    spec = PositionBpbSpec(
        files={"kk": "corpus/kk/kazqad_wiki_passages.jsonl"}, length=128, bucket=32, max_sequences=2
    )
    settings = settings_for(tmp_path, data_dir)
    (res,), _ = evaluate_bpb_by_position(tiny.model, tiny.tokenizer, spec, settings)
    from jobs.evaluation.long_context import sequences_for

    seqs = sequences_for(spec, tiny.tokenizer, data_dir / spec.files["kk"], 128)
    scores = Scorer(tiny.model, window=128).score(
        [ScoreRequest([tiny.tokenizer.eos_id, *s], 1) for s in seqs]
    )
    assert sum(b["nll"] for b in res.buckets) == pytest.approx(-sum(s.logprob for s in scores), rel=1e-5)
    text_bytes = sum(len(tiny.tokenizer.decode(s).strip("\ufffd").encode()) for s in seqs)
    assert abs(sum(b["bytes"] for b in res.buckets) - text_bytes) <= 3 * len(res.buckets) * len(seqs)
    with pytest.raises(ValueError, match="bpb_by_position.length 1024 > the model's max_seq_len 512"):
        evaluate_bpb_by_position(
            tiny.model, tiny.tokenizer, spec.model_copy(update={"length": 1024}), settings
        )


# ---------------------------------------------------------------------------------------- the eval stage


def test_eval_stage_writes_the_long_context_table_heatmap_and_metrics(tiny, data_dir, tmp_path):
    from jobs.eval import check_config, evaluate
    from jobs.evaluation.models import load_model

    cfg = EvalConfig.model_validate(
        {
            "name": "lc",
            "model": {"source": str(tiny.dir), "device": "cpu"},
            "long_context": {
                "passkey": {"lengths": [128, 160, 1024], "depths": [0.0, 0.5, 1.0], "samples": 1},
                "bpb_by_position": {
                    "files": {"en": "corpus/en/war_and_peace_en_gutenberg2600.txt"},
                    "length": 256,
                    "bucket": 64,
                    "max_sequences": 2,
                },
            },
            "gate": {
                "rules": [
                    {"metric": "passkey/all/acc", "min": 0.0},
                    {"metric": "bpb_by_position/en/192-256", "max_regression": 0.05},
                ]
            },
        }
    )
    check_config(cfg)
    settings = settings_for(tmp_path, data_dir)
    out = evaluate(load_model(cfg.model, settings), cfg, settings, tmp_path / "out")
    m = out.metrics
    assert {"passkey/128/acc", "passkey/160/depth50/acc", "passkey/all/acc", "passkey/all/nll"} <= set(m)
    assert {"passkey/128/key_gain", "passkey/all/key_gain"} <= set(m)
    assert "passkey/1024/acc" not in m
    assert [k for k in m if k.startswith("bpb_by_position/")] == [
        f"bpb_by_position/en/{lo}-{lo + 64}" for lo in (0, 64, 128, 192)
    ]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"long_context.md", "long_context.json", "passkey_heatmap.png", "bpb_by_position.png"} <= files
    assert (tmp_path / "out" / "passkey_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out" / "long_context.md").read_text()
    assert "passkey length 1024 skipped" in md and "| 160 |" in md and "192-256" in md
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["long_context"]["passkey"]["lengths"] == [128, 160]
    assert (
        metric_direction("passkey/64/acc") == "higher"
        and metric_direction("bpb_by_position/en/0-64") == "lower"
    )


def test_gate_rules_on_long_context_metrics_are_checked_against_the_suite():
    from jobs.eval import check_config

    base = {"name": "lc", "model": {"source": "x"}, "long_context": {"passkey": {"lengths": [64]}}}
    check_config(
        EvalConfig.model_validate(
            {**base, "gate": {"rules": [{"metric": "passkey/64/depth25/acc", "min": 0.5}]}}
        )
    )
    with pytest.raises(ValueError, match="passkey/128/acc.*is not produced"):
        check_config(
            EvalConfig.model_validate(
                {**base, "gate": {"rules": [{"metric": "passkey/128/acc", "min": 0.5}]}}
            )
        )
    for bad, match in [
        ({"passkey": {"depths": [1.5]}}, r"passkey.depths \[1.5\]"),
        ({"passkey": {"languages": ["de"]}}, r"passkey.languages \['de'\]"),
        ({"passkey": {"lengths": [4]}}, r"passkey.lengths \[4\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            EvalConfig.model_validate({"name": "lc", "long_context": bad})
    shipped = EvalConfig.model_validate(
        __import__("yaml").safe_load((REPO / "configs/eval/long-context.yaml").read_text())
    )
    assert shipped.long_context.passkey is not None and shipped.long_context.bpb_by_position is not None
