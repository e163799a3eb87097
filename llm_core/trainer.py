"""The one training loop every stage uses (pretraining now; SFT/DPO/distillation plug in their loss).

It knows nothing of Ray: a Ray Train worker (or a plain process) builds a Trainer, calls `fit`, and passes
callbacks that report metrics and checkpoints wherever they must go. Gradient accumulation weights each
micro-batch by its number of target tokens, so accumulating k micro-batches equals one batch k times larger.
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from llm_core.artifacts import check_state_shapes
from llm_core.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from llm_core.config import StrictModel
from llm_core.data import StepSampler, TokenStream, sequential_windows
from llm_core.io import atomic_dir
from llm_core.model import MoE, Transformer
from llm_core.optim import build_optimizer, build_scheduler

# A batch is a dict of tensors with at least "input_ids" and "targets" (B, T) (-100 = no loss), and optionally
# "segment_ids"/"position_ids" (packed samples) and task keys (e.g. DPO's "ref_logps"). "weight" (a 0-d tensor)
# says how many units the batch's mean loss averages over (default: its number of target tokens); micro-batches
# and ranks are weighted by it. Samplers may also yield (input_ids, targets) tuples.
Batch = dict[str, torch.Tensor]
# loss_fn(model, batch) -> (loss averaged over the batch's units, extra float metrics; "ce_loss" if it differs)
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


def as_batch(b: Batch | tuple[torch.Tensor, torch.Tensor]) -> Batch:
    return {"input_ids": b[0], "targets": b[1]} if isinstance(b, tuple) else b


def batch_weight(b: Batch) -> int:
    w = b.get("weight")
    return int(w) if w is not None else int((b["targets"] != -100).sum())


def batch_tokens(b: Batch) -> int:
    """Tokens a batch trains on, for tokens/s: its real tokens ("attention_mask") when it has a mask (e.g. reward
    model pairs, weighted per pair), else its target tokens."""
    mask = b.get("attention_mask")
    return int(mask.sum()) if mask is not None else int((b["targets"] != -100).sum())


class TrainingError(ValueError):
    """Training cannot go on because of a setting (e.g. the loss diverged); the message says what to change."""


class TrainConfig(StrictModel):
    steps: int = Field(300, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch per worker")
    seq_len: int = Field(256, gt=1)
    grad_accum_steps: int = Field(
        1, gt=0, description="micro-batches per optimizer step (ignored if tokens_per_step)"
    )
    tokens_per_step: int | None = Field(
        None, gt=0, description="target tokens per optimizer step, all workers"
    )
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    eval_every: int = Field(50, gt=0)
    eval_windows: int = Field(32, gt=0, description="validation windows of seq_len per language per eval")
    log_every: int = Field(10, gt=0)
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    compile: bool = False
    activation_checkpointing: bool = False
    peak_flops: float | None = Field(
        None, gt=0, description="per-device peak FLOP/s for MFU; None: known GPUs"
    )

    def accum_steps(self, world_size: int) -> int:
        if self.tokens_per_step is None:
            return self.grad_accum_steps
        per_micro = self.batch_size * self.seq_len * world_size
        return max(1, round(self.tokens_per_step / per_micro))


@dataclass
class EvalSet:
    """Held-out tokens of one language (or 'all') and its bytes per token, for bits-per-byte. `tokens` is an array
    or a `TokenStream` over a dataset's shards; only the windows evaluated are read."""

    name: str
    tokens: np.ndarray | TokenStream
    bytes_per_token: float

    def batches(self, seq_len: int, batch_size: int, max_windows: int) -> list[Batch]:
        windows = list(sequential_windows(self.tokens, seq_len, max_windows))
        return [
            {
                "input_ids": torch.cat([w[0] for w in windows[i : i + batch_size]]),
                "targets": torch.cat([w[1] for w in windows[i : i + batch_size]]),
            }
            for i in range(0, len(windows), batch_size)
        ]


@dataclass
class EvalBatches:
    """Held-out batches (e.g. SFT conversations or DPO pairs) evaluated with the training loss function."""

    name: str
    items: list[Batch]
    bytes_per_token: float | None = None

    def batches(self, seq_len: int, batch_size: int, max_windows: int) -> list[Batch]:
        return self.items


@dataclass
class FitResult:
    step: int
    best_val_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # `should_stop` ended the run before cfg.steps (e.g. a preemption notice)


def lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over targets != -100 (+ MoE load-balancing loss); reports expert utilisation."""
    out = lm_output(model, batch)
    return out.loss, lm_extras(model, out)


def lm_output(model: torch.nn.Module, batch: Batch):
    """The model's output (logits and loss) for a batch, as lm_loss scores it."""
    return model(
        batch["input_ids"],
        batch["targets"],
        segment_ids=batch.get("segment_ids"),
        position_ids=batch.get("position_ids"),
    )


def lm_extras(model: torch.nn.Module, out) -> dict[str, float]:
    """The metrics lm_loss reports beside the loss of a model output: ce_loss, and a MoE's expert utilisation."""
    extra: dict[str, float] = {"ce_loss": float(out.ce_loss.detach())}
    if out.aux_loss is not None:
        extra["aux_loss"] = float(out.aux_loss.detach())
        core = unwrap_model(model)
        loads = torch.stack([layer.mlp.last_expert_counts.float() for layer in core.layers])  # (L, E)
        share = loads / loads.sum(dim=1, keepdim=True)
        extra["expert_load_max"] = float(share.max() * loads.size(1))  # 1.0 = perfectly balanced
        extra["experts_used_fraction"] = float((loads > 0).float().mean())
    return extra


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known accelerators (per device), for MFU; None when unknown (e.g. CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (
        ("H200", 989e12),
        ("H100", 989e12),
        ("A100", 312e12),
        ("L40S", 362e12),
        ("A10", 125e12),
    ):
        if key in name:
            return flops
    return None


def _dist() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if _dist()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def balanced_routers(model: torch.nn.Module) -> list[MoE]:
    """The MoE layers whose router bias the trainer updates: sigmoid routers (router_bias) with a nonzero update
    rate whose router is trained (a frozen router, e.g. under LoRA, keeps its bias: an adapter could not carry it)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, MoE)
        and m.router_bias is not None
        and m.router_bias_update_rate > 0
        and m.router.weight.requires_grad
    ]


def update_router_biases(routers: list[MoE], counts: torch.Tensor) -> None:
    """One auxiliary-loss-free balancing step: `counts` (layers, E) are this rank's expert counts of the optimizer
    step; summed over data-parallel ranks first, so every rank applies the same update to identical biases."""
    if _dist()[1] > 1:
        torch.distributed.all_reduce(counts)
    for router, layer_counts in zip(routers, counts):
        router.update_router_bias(layer_counts)


def router_bias_spread(routers: list[MoE]) -> float:
    """max - min of the selection bias, the largest over layers: how hard balancing pushes against the router."""
    return max(float(r.router_bias.max() - r.router_bias.min()) for r in routers)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


class Trainer:
    """One model, one optimizer, one schedule. Works alone or inside a torch.distributed process group.

    `parallelism` is "none" (single process), "ddp" (replicated; gradients all-reduced once per optimizer step) or
    "fsdp" (FSDP2 `fully_shard` per block and at the root; checkpoints gather the full state on every rank).
    """

    def __init__(
        self,
        model: Transformer,
        cfg: TrainConfig,
        *,
        device: torch.device | str = "cpu",
        run_config: dict[str, Any] | None = None,
        loss_fn: LossFn = lm_loss,
        parallelism: Literal["none", "ddp", "fsdp"] = "none",
    ):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank, self.world_size = _dist()
        if parallelism != "none" and self.world_size == 1 and not torch.distributed.is_initialized():
            parallelism = "none"
        self.parallelism = parallelism
        self.model = model.to(self.device)
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.run_config = run_config or {
            "model": model.cfg.model_dump(mode="json"),
            "train": cfg.model_dump(),
        }
        self.loss_fn = loss_fn
        self.engine: torch.nn.Module = self.model
        if parallelism == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.engine = DistributedDataParallel(self.model, device_ids=ids)
        elif parallelism == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in self.model.layers:
                fully_shard(block)
            fully_shard(self.model)
        if cfg.compile:
            self.engine = torch.compile(self.engine)
        # the optimizer is built after sharding so that it holds the (sharded) parameters
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            decay_fraction=cfg.wsd_decay_fraction,
        )
        self.accum = cfg.accum_steps(self.world_size)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.step = 0
        self.best_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.peak_flops = cfg.peak_flops or device_peak_flops(self.device)
        # a model that is not a plain Transformer (e.g. a ScalarHeadModel) counts its own FLOPs
        count = getattr(model, "flops_per_token", None) or model.cfg.flops_per_token
        self.flops_per_token = count(cfg.seq_len)
        self.routers = balanced_routers(self.model)  # sigmoid MoE routers whose bias balances load

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """Forward/backward over this rank's micro-batches, clip, step. Returns loss, grad_norm, lr, tokens.

        Each micro-batch's loss is weighted by its share of the step's target tokens over all ranks, so the
        gradient equals that of one big batch whatever the split into workers and micro-batches."""
        self.engine.train()
        micro_batches = [as_batch(b) for b in micro_batches]
        counts = [batch_weight(b) for b in micro_batches]
        local_tokens = sum(batch_tokens(b) for b in micro_batches)
        total_f, tokens = _all_reduce_sum([float(sum(counts)), float(local_tokens)], self.device)
        total = int(total_f)
        if total == 0:
            raise TrainingError(
                "a training batch has no target tokens (all labels are -100): check the loss mask"
            )
        scale = self.world_size / total  # DDP/FSDP average gradients over ranks: undo that, weight by tokens
        loss_sum, extras = 0.0, {}
        # (layers, E) expert counts of this step's micro-batches, for the router bias update
        step_counts = (
            torch.zeros(len(self.routers), self.routers[0].num_experts, dtype=torch.long)
            if self.routers
            else None
        )
        try:
            for i, (batch, n) in enumerate(zip(micro_batches, counts)):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                sync = contextlib.nullcontext()
                if i < len(micro_batches) - 1 and hasattr(self.engine, "no_sync"):
                    sync = self.engine.no_sync()  # DDP: all-reduce once, on the last micro-batch
                with sync:
                    with self._autocast():
                        loss, extra = self.loss_fn(self.engine, batch)
                    (loss * (n * scale)).backward()
                if (
                    step_counts is not None
                ):  # the counts of this micro-batch's forward (recomputed identically)
                    step_counts += torch.stack([r.last_expert_counts.cpu() for r in self.routers])
                loss_sum += float(loss.detach()) * n
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + v / len(micro_batches)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory at micro-batch size {self.cfg.batch_size} x seq_len {self.cfg.seq_len}: lower "
                "train.batch_size and raise train.grad_accum_steps (or set train.tokens_per_step), or enable "
                "train.activation_checkpointing"
            ) from None
        loss_sum = _all_reduce_sum([loss_sum], self.device)[0] / total
        if not math.isfinite(loss_sum):  # every rank sees the same reduced value, so all stop together
            where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingError(
                f"loss became {loss_sum} at step {self.step + 1}{where}: lower the learning rate "
                f"(lr={self.cfg.lr}), keep grad_clip > 0, or use fp32 precision"
            )
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if step_counts is not None:
            update_router_biases(self.routers, step_counts.to(self.device))
            extras["router_bias_spread"] = router_bias_spread(self.routers)
        self.step += 1
        return {"loss": loss_sum, "grad_norm": float(grad_norm), "lr": lr, "tokens": tokens, **extras}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, eval_sets: list[EvalSet | EvalBatches]) -> dict[str, float]:
        """Per set: val_loss (the loss function's `ce_loss`, else its loss), perplexity, bits-per-byte when the
        set knows its bytes per token, and the loss function's other metrics; `val_loss` = mean over sets.

        Batches are split across ranks and sums all-reduced, so every rank returns the same numbers. Ranks run
        the same number of forward passes (padding with zero-weight repeats) because FSDP's forward is collective.
        """
        self.engine.eval()
        metrics: dict[str, float] = {}
        for es in eval_sets:
            batches = es.batches(self.cfg.seq_len, self.cfg.batch_size, self.cfg.eval_windows)
            mine = batches[self.rank :: self.world_size]
            rounds = math.ceil(len(batches) / self.world_size) if batches else 0
            sums: dict[str, float] = {}
            names: set[str] = set()  # every rank runs the same forwards, so every rank finds the same names
            weight_sum = 0.0
            for r in range(rounds):
                real = r < len(mine)
                batch = {k: v.to(self.device) for k, v in (mine[r] if real else batches[0]).items()}
                with self._autocast():
                    loss, extra = self.loss_fn(
                        self.engine if self.parallelism == "fsdp" else self.model, batch
                    )
                names.update(k for k in extra if k != "ce_loss")
                if not real:
                    continue
                w = batch_weight(batch)
                weight_sum += w
                sums["loss"] = sums.get("loss", 0.0) + extra.get("ce_loss", float(loss)) * w
                for k, v in extra.items():
                    if k != "ce_loss":
                        sums[k] = sums.get(k, 0.0) + v * w
            keys = ["loss", *sorted(names - {"loss"})]
            reduced = _all_reduce_sum([weight_sum] + [sums.get(k, 0.0) for k in keys], self.device)
            total, values = reduced[0], dict(zip(keys, reduced[1:]))
            if not total:
                continue
            loss = values.pop("loss") / total
            metrics[f"val_loss/{es.name}"] = loss
            metrics[f"val_ppl/{es.name}"] = math.exp(min(loss, 50.0))
            if es.bytes_per_token:
                metrics[f"val_bpb/{es.name}"] = loss / math.log(2) / es.bytes_per_token
            for k, v in values.items():
                metrics[f"val_{k}/{es.name}"] = v / total
        losses = [v for k, v in metrics.items() if k.startswith("val_loss/")]
        if losses:  # model selection uses the unweighted mean over sets (languages)
            metrics["val_loss"] = sum(losses) / len(losses)
        self.engine.train()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _full_states(self) -> tuple[dict, dict]:
        """Full model and optimizer state dicts (gathered on every rank when sharded)."""
        if self.parallelism != "fsdp":
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(self.model, options=opts),
            get_optimizer_state_dict(self.model, self.optimizer, options=opts),
        )

    def save_to(self, path: Path, sampler: StepSampler, metrics: dict[str, float]) -> Path | None:
        """Write this step's checkpoint to `path` (rank 0 writes; every rank must call it when sharded)."""
        model_state, optim_state = self._full_states()
        if self.rank != 0:
            return None
        save_checkpoint(
            path,
            model=self.model,
            step=self.step,
            config=self.run_config,
            scheduler=self.scheduler,
            data_state=sampler.state_dict(),
            metrics={**metrics, "best_val_loss": self.best_val_loss},
            model_state=model_state,
            optimizer_state=optim_state,
        )
        self.last_checkpoint = Path(path)
        return Path(path)

    def save(self, root: Path, sampler: StepSampler, metrics: dict[str, float], best: bool) -> None:
        """Local layout: root/last (every eval) and root/best (lowest mean validation loss)."""
        if self.save_to(root / "last", sampler, metrics) is not None and best:
            with atomic_dir(root / "best") as tmp:
                for f in (root / "last").iterdir():
                    shutil.copy2(f, tmp / f.name)

    def resume(self, path: Path, sampler: StepSampler) -> None:
        state = load_checkpoint(path, scheduler=self.scheduler, map_location="cpu")
        check_state_shapes(self.model.state_dict(), state["model_state"], Path(path) / "state.pt")
        if self.parallelism == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model_state"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer_state"], options=opts)
        else:
            self.model.load_state_dict(state["model_state"])
            self.optimizer.load_state_dict(state["optimizer_state"])
        self.step = state["step"]
        self.best_val_loss = state["metrics"].get("best_val_loss")
        self.last_checkpoint = Path(path)
        if state["data"] is not None:
            sampler.load_state_dict(state["data"])

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        sampler: StepSampler,
        eval_sets: list[EvalSet],
        *,
        checkpoint_root: Path | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_eval: Callable[[int, dict[str, float], bool], None] | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: bool = True,
    ) -> FitResult:
        """Train until cfg.steps; evaluate every eval_every steps and at the end. With `checkpoint_root`, keep
        root/best and root/last there; otherwise `on_eval` decides where checkpoints go (e.g. Ray Train).
        `on_step` sees every optimizer step (e.g. to move a progress bar drawn elsewhere); `progress` draws a
        tqdm bar on this process's stderr when it is a terminal.

        `should_stop` is asked after every optimizer step (on every rank, so it may be collective): True ends the
        run there with `FitResult.stopped` (with `checkpoint_root`, after writing root/last; otherwise the caller
        saves with `save_to`). Resuming from that checkpoint trains the same steps an uninterrupted run would."""
        from tqdm.auto import tqdm

        history: list[dict[str, float]] = []
        show = progress and self.rank == 0
        bar = tqdm(
            total=self.cfg.steps, initial=self.step, desc="train", disable=None if show else True, leave=False
        )
        window_start, window_tokens = time.perf_counter(), 0.0
        stopped = False
        while self.step < self.cfg.steps:
            metrics = self.train_step(sampler.next_step(self.accum))
            window_tokens += metrics["tokens"]
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if on_step:
                on_step(self.step, metrics)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                tps = window_tokens / elapsed  # all ranks together
                metrics["tokens_per_s"] = tps
                metrics["tflops_per_s"] = tps * self.flops_per_token / 1e12
                if self.peak_flops:
                    metrics["mfu"] = tps * self.flops_per_token / (self.world_size * self.peak_flops)
                metrics["peak_memory_gb"] = peak_memory_gb(self.device)
                window_start, window_tokens = time.perf_counter(), 0.0
                history.append({"step": self.step, **metrics})
                if on_log:
                    on_log(self.step, metrics)
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                val = self.evaluate(eval_sets)
                val_loss = val.get("val_loss")
                is_best = val_loss is not None and (
                    self.best_val_loss is None or val_loss < self.best_val_loss
                )
                if is_best:
                    self.best_val_loss = val_loss
                if checkpoint_root is not None:
                    self.save(checkpoint_root, sampler, val, is_best)
                history.append({"step": self.step, **val})
                if on_eval:
                    on_eval(self.step, val, is_best)
            if should_stop is not None and self.step < self.cfg.steps and should_stop():
                stopped = True
                if checkpoint_root is not None:
                    self.save(checkpoint_root, sampler, {}, best=False)
                break
        bar.close()
        return FitResult(step=self.step, best_val_loss=self.best_val_loss, history=history, stopped=stopped)
