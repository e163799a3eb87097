"""The app's model deployment: Ray Serve LLM's `LLMServer`, whose streamed answers send their first output at once.

Ray Serve LLM batches a streamed answer's outputs: every `stream_batching_interval_ms` (default 50 ms) the
replica sends what the engine produced since the last send, in one message to the ingress. That keeps the number
of Ray messages per answer low under load, but it also holds back the first output: an answer's first token waited
up to one interval before it left the replica (at concurrency 1 on the tiny model, TTFT 81 ms against vLLM's own
server's 18 ms). Here the first output goes out as soon as the engine has it; the rest is batched as before.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ray.llm._internal.serve.utils.batcher import Batcher
from ray.serve.llm.deployment import LLMServer


async def first_then_batched(generator: AsyncGenerator[Any, None], interval_ms: float | None):
    """[first output] as soon as it exists, then lists of the outputs produced during each `interval_ms`."""
    try:
        first = await generator.__anext__()
    except StopAsyncIteration:
        return
    try:
        yield [first]
    except GeneratorExit:  # the caller went away after the first output: end the engine's request too
        await generator.aclose()
        raise
    async for batch in Batcher(generator, interval_ms=interval_ms).stream():  # cancels its reader when closed
        yield batch


class TulparLLMServer(LLMServer):
    def _batch_output_stream(self, generator):
        return first_then_batched(generator, self._get_batch_interval_ms())
