"""The model deployment's streamed-answer batching (services/llm_serve/server.py): the first output at once, the rest
batched per interval, nothing lost or reordered, errors passed on."""

import asyncio
import time

import pytest

from services.llm_serve.server import first_then_batched


async def engine_outputs(n: int, gap_s: float, fail_after: int | None = None):
    """Like an engine's stream: output 0 at once, then one every gap_s."""
    for i in range(n):
        if i:
            await asyncio.sleep(gap_s)
        if fail_after is not None and i == fail_after:
            raise RuntimeError("engine died")
        yield i


async def collect(gen) -> list[tuple[float, list[int]]]:
    t0 = time.perf_counter()
    return [(time.perf_counter() - t0, batch) async for batch in gen]


def test_first_output_is_sent_at_once_and_the_rest_per_interval():
    interval_ms = 300
    batches = asyncio.run(collect(first_then_batched(engine_outputs(6, 0.01), interval_ms)))
    first_at, first = batches[0]
    assert first == [0] and first_at < 0.1  # not held back for an interval (Ray's Batcher waits 300 ms here)
    rest = [b for _, b in batches[1:]]
    assert [i for b in rest for i in b] == [1, 2, 3, 4, 5]  # everything, in order
    assert len(rest) == 1  # the five later outputs (50 ms) went out together, one message


def test_interval_zero_sends_every_output_and_an_empty_stream_sends_nothing():
    batches = asyncio.run(collect(first_then_batched(engine_outputs(4, 0.001), 0)))
    assert [b for _, b in batches] == [[0], [1], [2], [3]]
    assert asyncio.run(collect(first_then_batched(engine_outputs(0, 0.0), 50))) == []


@pytest.mark.parametrize("fail_after", [0, 3])
def test_an_engine_error_reaches_the_caller(fail_after):
    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(collect(first_then_batched(engine_outputs(6, 0.001, fail_after), 20)))


def test_a_caller_that_leaves_after_the_first_output_ends_the_engine_stream():
    ended = []

    async def engine():
        try:
            for i in range(100):
                yield i
                await asyncio.sleep(0.001)
        finally:
            ended.append(True)  # vLLM aborts the request here

    async def take_first():
        stream = first_then_batched(engine(), 50)
        first = await stream.__anext__()
        await stream.aclose()
        return first, list(ended)  # before the event loop's shutdown would close a forgotten generator

    assert asyncio.run(take_first()) == ([0], [True])
