"""Context extension's training data (repeated spans: llm_core.data.RepeatedSpanWindows) and its acceptance: the
tiny model extended x4 with them retrieves a passkey at the new length better than before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_core.data import RandomWindows, RepeatedSpanWindows

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
