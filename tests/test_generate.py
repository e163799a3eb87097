import pytest
import torch

from llm_core.generate import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    generate,
    generate_stream,
)
from llm_core.model import Transformer
from tests.conftest import small_config, small_moe_config


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def greedy_reference(model, prompt, n):
    """Greedy decoding by re-running the full sequence each step (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("make_cfg", [small_config, small_moe_config], ids=["dense", "moe"])
def test_batched_cached_greedy_equals_uncached_reference(make_cfg):
    model = build(make_cfg())
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [42]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for p, o in zip(prompts, out):
        assert o == greedy_reference(model, p, 12)


def test_stream_yields_same_tokens_as_generate_and_stops():
    model = build(small_config())
    prompts = [[1, 2, 3], [4, 5]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0))
    stop = free[0][3]  # make the 4th token of the first sequence a stop token
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    streamed = [[], []]
    for step in generate_stream(model, prompts, params):
        for i, t in enumerate(step):
            if t is not None:
                streamed[i].append(t)
    first_stop = free[0].index(stop)
    assert streamed[0] == free[0][:first_stop]
    assert streamed == generate(model, prompts, params)


def test_sampling_is_seeded_and_respects_top_k():
    model = build(small_config())
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3)
    greedy = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=0))
    assert generate(model, [[1, 2, 3]], p) == greedy  # top_k=1 is greedy
    s = SamplingParams(max_new_tokens=16, temperature=1.5, seed=7)
    assert generate(model, [[1, 2, 3]], s) == generate(model, [[1, 2, 3]], s)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_top_k_top_p(logits.clone(), 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits.clone(), 0, 0.5))
    assert kept.tolist() == [[True, False, False, False]]
    kept = torch.isfinite(filter_top_k_top_p(logits.clone(), 2, 1.0))
    assert kept.tolist() == [[True, True, False, False]]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_prompt_too_long_and_empty_prompt():
    model = build(small_config(max_seq_len=16))
    with pytest.raises(ValueError, match="no room in max_seq_len 16"):
        generate(model, [list(range(16))], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingParams())
    # a long request is capped at the context length instead of failing
    out = generate(model, [list(range(10))], SamplingParams(max_new_tokens=50, temperature=0))
    assert len(out[0]) == 6
