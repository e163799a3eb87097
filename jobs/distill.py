"""Distillation: `python -m jobs.distill --config configs/distill/<name>.yaml [key=value ...]`.

white-box: the student learns the teacher's token distributions (KL at a temperature, mixed with cross-entropy)
on chat data; teacher and student may differ in size but share the tokenizer.
black-box: the teacher is any OpenAI-compatible endpoint (Tulpar's own serving or another). Its answers to the
prompts of the data files are collected with concurrency and retries into an SFT dataset with provenance
($TULPAR_HOME/datasets/distill/<name>.jsonl), then the student is fine-tuned on it (reasoning traces in
<think>...</think> are kept as part of the assistant turn).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.platform.registry import hf_model
from jobs.platform.results import ModelVersionOutputs, StageResult, model_reference, take_inputs
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.sft import ChatDataSpec, data_files, limited, prepare_sft
from jobs.training.distributed import RayTrainConfig
from jobs.training.posttrain import ChatSampleSpec, run_posttrain
from jobs.training.tasks import SFTTask, WhiteboxDistillTask
from llm_core.chat_data import read_jsonl, record_to_messages
from llm_core.config import StrictModel
from llm_core.io import atomic_write_text
from llm_core.lora import LoRAConfig
from llm_core.tokenizer import Tokenizer
from llm_core.trainer import TrainConfig

log = logging.getLogger("tulpar.distill")


class TeacherEndpoint(StrictModel):
    """An OpenAI-compatible chat endpoint serving the teacher."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the served model name")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key, if any")
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0)
    concurrency: int = Field(4, gt=0)
    max_retries: int = Field(3, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    reasoning: bool = Field(False, description="ask for and keep <think>...</think> reasoning traces")


class DistillConfig(StrictModel):
    name: str = Field(description="registered model name of the student")
    mode: Literal["whitebox", "blackbox"]
    init: str = Field(description="the student: models:/<name>@<alias> or an HF directory")
    teacher: str | None = Field(None, description="white-box teacher: models:/... or an HF directory")
    endpoint: TeacherEndpoint | None = Field(None, description="black-box teacher")
    data: ChatDataSpec
    temperature: float = Field(2.0, gt=0, description="white-box softmax temperature")
    alpha: float = Field(0.5, ge=0, le=1, description="white-box weight of the KL term (1 - alpha on CE)")
    lora: LoRAConfig | None = None
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=10, seq_len=512))
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)
    sample: ChatSampleSpec = Field(default_factory=ChatSampleSpec)
    register_model: bool = True

    def with_inputs(self, inputs: dict[str, StageResult]) -> DistillConfig:
        """`--input init=<student result>` and `--input teacher=<teacher result>` (registered model versions)."""
        got = take_inputs(
            "distill", inputs, {"init": (ModelVersionOutputs,), "teacher": (ModelVersionOutputs,)}
        )
        data = self.model_dump()
        for role, outputs in got.items():
            data[role] = model_reference(outputs, role)
        return DistillConfig.model_validate(data)


# ------------------------------------------------------------------------------------------- black-box


def teacher_client(endpoint: TeacherEndpoint, api_key: str | None):
    """One OpenAI client for all requests to the teacher (its connection pool is shared by the threads);
    retries are ask_teacher's."""
    from openai import OpenAI

    return OpenAI(
        base_url=endpoint.base_url, api_key=api_key or "none", timeout=endpoint.timeout_s, max_retries=0
    )


def ask_teacher(endpoint: TeacherEndpoint, messages: list[dict], client) -> dict:
    """One chat completion with retries (exponential backoff); returns {"content", "finish_reason", "usage"}."""
    delay = 1.0
    for attempt in range(endpoint.max_retries + 1):
        try:
            resp = client.chat.completions.create(
                model=endpoint.model,
                messages=messages,
                max_tokens=endpoint.max_tokens,
                temperature=endpoint.temperature,
            )
            choice = resp.choices[0]
            content = choice.message.content or ""
            reasoning = getattr(choice.message, "reasoning_content", None)
            if endpoint.reasoning and reasoning and "<think>" not in content:
                content = f"<think>\n{reasoning.strip()}\n</think>\n\n{content}"
            usage = resp.usage.model_dump() if resp.usage else {}
            return {"content": content, "finish_reason": choice.finish_reason, "usage": usage}
        except Exception as exc:  # network errors, timeouts, 5xx, rate limits
            if attempt == endpoint.max_retries:
                raise ValueError(
                    f"teacher endpoint {endpoint.base_url} failed {attempt + 1} times ({type(exc).__name__}: {exc}): "
                    "check that it is up and serves model " + repr(endpoint.model)
                ) from None
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def collect_teacher_answers(cfg: DistillConfig, settings: Settings) -> Path:
    """Ask the teacher for the prompts of the data files; write an SFT jsonl with provenance (atomically)."""
    import os

    endpoint = cfg.endpoint
    assert endpoint is not None
    prompts = []
    for where, rec in limited(read_jsonl(data_files(cfg.data, settings)), cfg.data.max_records_per_file):
        msgs = record_to_messages(rec, where)
        prefix = msgs[
            : max(i for i, m in enumerate(msgs) if m["role"] == "user") + 1
        ]  # up to the last user turn
        prompts.append((where, prefix))
    client = teacher_client(endpoint, os.environ.get(endpoint.api_key_env))
    out = settings.path("datasets", "distill", f"{cfg.name}.jsonl")
    started = dt.datetime.now(dt.UTC).isoformat()
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
        answers = list(
            tqdm(
                pool.map(lambda p: ask_teacher(endpoint, p[1], client), prompts),
                total=len(prompts),
                desc="teacher",
                disable=None,
            )
        )
    lines = []
    for (where, prefix), ans in zip(prompts, answers):
        record = {
            "messages": prefix + [{"role": "assistant", "content": ans["content"]}],
            "provenance": {
                "source": where,
                "teacher_model": endpoint.model,
                "endpoint": endpoint.base_url,
                "temperature": endpoint.temperature,
                "max_tokens": endpoint.max_tokens,
                "finish_reason": ans["finish_reason"],
                "usage": ans["usage"],
                "collected_at": started,
            },
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def main(cfg: DistillConfig, settings: Settings) -> JobResult:
    if cfg.mode == "whitebox":
        if not cfg.teacher:
            raise ValueError("mode=whitebox needs teacher: models:/<name>@<alias> or an HF directory")
        teacher = hf_model(cfg.teacher, settings)
        teacher_dir, teacher_uri = teacher.path, teacher.uri
        student_dir = hf_model(cfg.init, settings).path
        t_tok, s_tok = Tokenizer.from_dir(teacher_dir), Tokenizer.from_dir(student_dir)
        if t_tok.sha256 != s_tok.sha256:
            raise ValueError(
                "white-box distillation needs teacher and student to share one tokenizer: their tokenizer.json "
                f"differ ({t_tok.sha256[:12]} vs {s_tok.sha256[:12]}); use mode=blackbox instead"
            )
        return run_posttrain(
            stage="distill",
            cfg=cfg,
            settings=settings,
            init=cfg.init,
            prepare=lambda tokenizer, _d: prepare_sft(cfg, settings, tokenizer),  # type: ignore[arg-type]
            task=functools.partial(
                WhiteboxDistillTask, teacher=str(teacher_dir), temperature=cfg.temperature, alpha=cfg.alpha
            ),
            lora=cfg.lora,
            tags={"tulpar.teacher_model_uri": teacher_uri, "tulpar.distill_mode": "whitebox"},
        )
    if cfg.endpoint is None:
        raise ValueError("mode=blackbox needs endpoint: {base_url, model} of an OpenAI-compatible teacher")
    generated = collect_teacher_answers(cfg, settings)
    print(f"teacher answers written to {generated}", flush=True)
    sft_cfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"files": [str(generated)], "hub_files": []})}
    )
    return run_posttrain(
        stage="distill",
        cfg=cfg,
        settings=settings,
        init=cfg.init,
        prepare=lambda tokenizer, _d: prepare_sft(sft_cfg, settings, tokenizer),  # type: ignore[arg-type]
        task=SFTTask,
        lora=cfg.lora,
        tags={
            "tulpar.teacher_endpoint": cfg.endpoint.base_url,
            "tulpar.teacher_model": cfg.endpoint.model,
            "tulpar.distill_mode": "blackbox",
            "tulpar.distill_dataset": str(generated),
        },
    )


if __name__ == "__main__":
    main_entry("distill", DistillConfig, main)
