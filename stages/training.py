"""The training policy every trainer imports: device, optimizer, schedule, clipping, clock, checkpoints.

Copy the loop, import the policy (torchtune's recipes, nanochat's `compute_init` / `setup_optimizer`):
each trainer (pretrain, sft, reward, dpo, grpo, ...) keeps its loop inline in its own file, read top
to bottom, and takes every decision that must be the same in all of them from here, as small
functions, so a fix lands in every trainer at once:

- `TrainConfig`: the knobs below, which every trainer's Config extends (re-declaring its defaults).
- `setup_runtime(ctx)`: the device, the autocast context (bf16 on CUDA, none on CPU), TF32 on CUDA,
  and the process group when torchrun started several processes.
- `adamw(model, cfg, device)`: AdamW (Loshchilov & Hutter 2019) over the
  trainable parameters, whose groups never decay a 1-D parameter (norm gains, biases): decay pulls a
  gain towards 0, which changes what the layer computes rather than regularising it (nanoGPT,
  GPT-3, Llama decay matrices only).
- `lr_multiplier(step, total, warmup, schedule, min_ratio, decay_ratio)` (`set_lr` applies it): linear warmup, then
  "cosine" (to min_ratio), "wsd" (warmup-stable-decay: constant, then linear to min_ratio over the
  last decay_ratio of the steps; Hu et al. 2024, MiniCPM) or "constant".
- `clip_gradients(params, max_norm)`: clips the global L2 norm (0 = no clipping) and returns the
  norm before clipping, which every trainer logs as train/grad_norm.
- `Clock`: training seconds, paused during evaluation, resumed from a checkpoint; it measures
  throughput (tokens/s or samples/s without evaluation) and tells when `max_minutes` is spent.
- `checkpoint(...)` / `resume(...)`: the checkpoint-every-N, keep-K tail and the exact resume.
- `open_model_input(inputs, name, stage)`: an input model directory, or one line saying what is wrong.
- `budget_warnings(...)`: what a stage must say loudly when a time cap, not its step budget, ended it.

Step budgets are the contract: a trainer's amount of work is set in steps (or epochs, or tokens);
`max_minutes` is only a safety net. When it fires the stage still evaluates and saves, and its result
carries `stopped_by: max_minutes` as a warning that `family status` and the run's summary show.

Metric names, the same in every trainer: `train/loss`, `train/lr`, `train/grad_norm`,
`train/tokens_per_s` (or `train/samples_per_s`), stage-specific ones under `train/`, and held-out
curves under `val/`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from models.gpt import GPT
from models.tokenizer import Tokenizer
from stages.contract import StageContext, StageError
from storage import checkpoints
from storage.artifacts import Artifact

SCHEDULES = ("cosine", "wsd", "constant")


# -- the knobs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The policy's knobs, the same in every trainer: each trainer's Config extends this and
    re-declares only the defaults it changes (pretrain: lr 3e-3, cosine, weight decay 0.1; ...)."""

    # AdamW
    lr: float = 1e-4
    weight_decay: float = 0.0  # on matrices only (param_groups)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    # the LR schedule: linear warmup, then cosine / wsd / constant (lr_multiplier)
    schedule: Literal["cosine", "wsd", "constant"] = "constant"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine and wsd: the floor, as a fraction of lr
    decay_ratio: float = 0.2  # wsd: the last fraction of the steps decays linearly
    # budget: steps are the contract; max_minutes is a safety cap that ends training early (it still
    # evaluates and saves) and says so loudly
    max_steps: int = 100
    max_minutes: float = 15.0
    # cadence
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2

    def validate(self) -> None:
        """ValueError for a policy knob out of range; every trainer's validate() calls it."""
        for name in ("log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0) or self.adam_eps <= 0:
            raise ValueError(f"beta1 and beta2 must be in [0, 1) and adam_eps > 0, got {self.beta1}, {self.beta2}, {self.adam_eps}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.max_steps < 0:
            raise ValueError("weight_decay, grad_clip, warmup_steps and max_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 < self.decay_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1] and decay_ratio in (0, 1], got {self.min_lr_ratio}, {self.decay_ratio}")
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes (a safety cap) must be > 0, got {self.max_minutes}")


# -- device ----------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where a trainer computes. `autocast` is re-entered around every forward pass."""

    device: torch.device
    autocast: contextlib.AbstractContextManager
    ddp: bool = False  # torchrun started several processes
    own_group: bool = False  # this stage created the process group and must destroy it

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def close(self) -> None:
        if self.own_group:
            dist.barrier()
            dist.destroy_process_group()
            self.own_group = False


def setup_runtime(ctx: StageContext, seed: bool = True) -> Runtime:
    """The device and autocast of `ctx.device`; under torchrun (world_size > 1) one process per device
    and the process group (nccl on CUDA, gloo on CPU); the torch seed from ctx.seed unless seed=False.

    bf16 autocast and TF32 matmuls on CUDA only: a CPU has no fast bf16 path for these sizes, and the
    CPU numbers must not change with the torch build.
    """
    ddp = ctx.world_size > 1
    cuda = ctx.device.startswith("cuda")
    if cuda:
        index = int(os.environ.get("LOCAL_RANK", "0")) if ddp else torch.device(ctx.device).index or 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    own_group = ddp and not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if seed:
        torch.manual_seed(ctx.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    return Runtime(device, autocast, ddp, own_group)


def data_parallel(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """`model` wrapped in DDP when torchrun started several processes (gradients all-reduced, averaged
    over ranks, in backward), else `model` itself (also when FSDP already shards it). Keep the
    unwrapped model for evaluation, sampling and checkpoints: they must not run DDP's collectives."""
    if not rt.ddp or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.device.index] if rt.cuda else None)


def gradient_sync(model: torch.nn.Module, rt: Runtime, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: reduce gradients over ranks (DDP's all-reduce,
    FSDP's reduce-scatter) only when `sync`, i.e. on the last micro-batch of a step."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if not rt.ddp or sync else model.no_sync()


def fully_shard_model(model: GPT, ctx: StageContext) -> GPT | None:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023) in place: one unit per decoder
    block, whose weights are gathered for its forward and backward and freed after, and the root (the
    embeddings, the tied head, the final norm). Gradients are reduce-scattered and averaged over
    ranks, like DDP's. Call it before building the optimizer: that must hold the sharded parameters.
    Forward passes are collectives: every rank must run the same ones (generate() calls submodules
    and so needs an `unsharded_copy`): returns, on rank 0, a plain copy of the model taken before
    sharding to gather the weights into (None on the other ranks)."""
    from torch.distributed.fsdp import fully_shard

    plain = copy.deepcopy(model) if ctx.is_main else None
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    if ctx.is_main:
        ctx.logger.info("%s: FSDP2 over %d processes", ctx.stage, ctx.world_size)
    return plain


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options(cpu_offload: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gathered (full) model and optimizer state of a sharded model on rank 0, in the layout of a
    plain `model.state_dict()` / `optimizer.state_dict()` (parameters numbered in param-group order), so
    that one process or DDP resumes from it; ({}, {}) on the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint import state_dict as dcp

    model_state = dcp.get_model_state_dict(model, options=_full_options(True))
    by_name = dcp.get_optimizer_state_dict(model, optimizer, options=_full_options(True))
    if not by_name:
        return model_state, {}
    names = [n for g in by_name["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    optim_state = {"state": {index[n]: v for n, v in by_name["state"].items()},
                   "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}
    return model_state, optim_state


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                          optim_state: dict[str, Any]) -> None:
    """Load a plain (full) checkpoint into a sharded model and its optimizer: every rank gives the whole
    state and keeps its shard. The inverse of `full_state_dicts`."""
    from torch.distributed.checkpoint import state_dict as dcp

    dcp.set_model_state_dict(model, model_state, options=_full_options(False))
    # the parameter names in param-group order, as torch.distributed.checkpoint numbers them
    names = [n for g in dcp.get_optimizer_state_dict(model, optimizer, options=_full_options(False))["param_groups"] for n in g["params"]]
    by_name = {"state": {names[int(i)]: v for i, v in optim_state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]}
    dcp.set_optimizer_state_dict(model, optimizer, by_name, options=_full_options(False))


def unsharded_copy(model: torch.nn.Module, into: torch.nn.Module | None) -> torch.nn.Module | None:
    """On rank 0, `into` (a plain model of the same config) holding the sharded model's gathered
    weights, for what must run on one process (sampling, decoding, export); None elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(True))
    if into is None:
        return None
    into.load_state_dict(state)
    return into


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous block of n items split over world_size ranks as evenly as possible
    (the first n % world_size ranks take one more; a rank may get none when n < world_size)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


def all_ranks_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """`t` summed over ranks, in place (gloo has no AVG); `t` itself with one process."""
    if world_size > 1:
        dist.all_reduce(t)
    return t


def all_ranks_max(value: float, world_size: int, device: torch.device) -> float:
    """The largest `value` over ranks, so that every rank takes the same stop decision."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# -- optimizer, schedule, clipping -----------------------------------------------------------------


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups of the trainable `params`: matrices (dim >= 2: embeddings, projections) with
    `weight_decay`, and every 1-D parameter (norm gains, biases) without. Empty groups are left out."""
    trainable = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def adamw(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model` with the config's lr, betas, eps and weight
    decay, 1-D parameters never decayed (fused on CUDA)."""
    groups = param_groups(model.parameters(), cfg.weight_decay)
    if not groups:
        raise StageError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.0, decay_ratio: float = 0.2) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak.

    warmup (step < warmup_steps): (step + 1) / warmup_steps.
    cosine:   min + (1 - min) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (total - 1 - warmup),
              so the last step (total - 1) runs at min_lr_ratio.
    wsd:      1 until the last round(decay_ratio * total) steps, then 1 - (1 - min) * q with q rising
              linearly to 1 at the last step.
    constant: 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        p = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_ratio * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - min_lr_ratio) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Set the learning rate of optimizer step `step` of `total_steps` by the config's schedule; returns it."""
    lr = cfg.lr * lr_multiplier(step, total_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to max_norm (0 = no clipping); returns the norm before
    clipping (a tensor: reading it is a host sync, so trainers read it only when they log)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor of the global norm


# -- the clock -------------------------------------------------------------------------------------


class Clock:
    """Training time in seconds: runs from construction, pauses inside `paused()` (evaluation,
    sampling, checkpoint writes are a trainer's choice), and starts from `start_s` after a resume.

    `lap(count)` gives the throughput of the work counted since the previous lap, in training time
    only; `rate(count)` the same over the whole run. `over(max_minutes)` is the safety cap.
    """

    def __init__(self, start_s: float = 0.0):
        self._banked = start_s  # seconds of earlier runs and of closed intervals
        self._since: float | None = time.perf_counter()
        self._run_start = start_s
        self._lap_s = start_s
        self.paused_s = 0.0  # evaluation seconds of this run

    @property
    def seconds(self) -> float:
        """Training seconds so far (earlier runs included)."""
        return self._banked + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self._since is None:  # nested: already paused
            yield
            return
        now = time.perf_counter()
        self._banked += now - self._since
        self._since = None
        try:
            yield
        finally:
            resumed = time.perf_counter()
            self.paused_s += resumed - now
            self._since = resumed

    def lap(self, count: float) -> float:
        """count / training seconds since the previous lap (count: tokens or samples of this lap)."""
        now = self.seconds
        rate = count / max(1e-9, now - self._lap_s)
        self._lap_s = now
        return rate

    def rate(self, count: float) -> float:
        """count / training seconds of this run (count: the work of this run, not of earlier ones)."""
        spent = self.seconds - self._run_start
        return count / spent if spent > 0 else 0.0

    def over(self, max_minutes: float) -> bool:
        return self.seconds > 60.0 * max_minutes


def stopped_by(step: int, total_steps: int) -> str:
    """Why a loop that ended at `step` ended: its step budget, or the time cap before it."""
    return "max_steps" if step >= total_steps else "max_minutes"


def budget_warnings(stage: str, stop: str, step: int, total_steps: int, max_minutes: float) -> list[str]:
    """The loud line a stage returns when the safety cap, not the step budget, ended its training."""
    if stop != "max_minutes":
        return []
    return [f"stopped_by: max_minutes: {stage} stopped at step {step} of {total_steps} after the "
            f"{max_minutes:g}-minute safety cap; its result depends on this machine's speed. "
            f"Lower {stage}.max_steps or raise {stage}.max_minutes"]


# -- checkpoints -----------------------------------------------------------------------------------


def resume(ctx: StageContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
           **stateful: Any) -> dict[str, Any]:
    """Load the latest checkpoint of ctx.checkpoint_dir into model and optimizer, restore the RNG and
    every `stateful` object (a data loader, a batch order: anything with load_state_dict) from the
    entry of its name; return the checkpoint's meta (step, elapsed_s and what the trainer saved), or
    {} when there is none. A checkpoint that does not load is an error naming it: delete it to start over.

        ck = resume(ctx, model, optimizer, device, order=order)
        step, curve, clock = ck.get("step", 0), ck.get("curve", []), Clock(ck.get("elapsed_s", 0.0))
    """
    try:
        if is_sharded(model):  # a full checkpoint (any world size, DDP or FSDP) into this rank's shards
            found = None
            latest = checkpoints.latest(ctx.checkpoint_dir)
            if latest is not None:
                weights, state, meta = checkpoints.load(latest, map_location="cpu")
                load_full_state_dicts(model, optimizer, weights, state["optimizer"])
                checkpoints.restore_rng(state)
                found = latest, meta
        else:
            found = checkpoints.resume(ctx.checkpoint_dir, model, optimizer, map_location=str(device))
        if found is not None:
            for name, obj in stateful.items():
                obj.load_state_dict(found[1][name])
    except Exception as e:  # safetensors' SafetensorError, a torch.load error, a state of another shape
        latest = checkpoints.latest(ctx.checkpoint_dir)
        raise StageError(f"{ctx.stage}: checkpoint {latest} does not load ({type(e).__name__}: {str(e)[:200]}); "
                         f"delete it to start from the previous one or from step 0") from None
    if found is None:
        return {}
    path, meta = found
    if ctx.is_main:
        ctx.logger.info("%s: resumed from %s at step %d", ctx.stage, path, meta["step"])
    return meta


def checkpoint(ctx: StageContext, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               clock: Clock, final: bool = False, **state: Any) -> bool:
    """Save a checkpoint when step % cfg.ckpt_every == 0, or when `final` and the latest one is older
    than `step` (a crash during evaluation or export then resumes here); keep the last
    cfg.keep_checkpoints. The meta holds the training seconds, the config and every `state` entry
    (an object with state_dict() is saved as its state). Only the main process writes. Returns
    whether one was written.

    A sharded (FSDP) model is gathered into a full state dict first, on every rank (a collective): the
    checkpoint is the same files as a plain one and resumes on any world size, with or without FSDP."""
    sharded = is_sharded(model)
    if not ctx.is_main and not sharded:
        return False
    if final:
        latest = checkpoints.latest(ctx.checkpoint_dir) if ctx.is_main else None
        due = latest is None or int(latest.name.removeprefix(checkpoints.PREFIX)) < step
        if sharded:  # rank 0 decides, so that every rank joins the gather or none
            due = all_ranks_max(float(due and ctx.is_main), ctx.world_size, next(model.parameters()).device) > 0
        if not due:
            return False
    elif step % cfg.ckpt_every:
        return False
    model_state, optim_state = full_state_dicts(model, optimizer) if sharded else (model.state_dict(), optimizer.state_dict())
    if not ctx.is_main:
        return False
    meta = {"elapsed_s": clock.seconds, "config": dataclasses.asdict(cfg),
            **{k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}}
    checkpoints.save(ctx.checkpoint_dir, step, model_state, optim_state, meta, keep=cfg.keep_checkpoints)
    return True


# -- input models ----------------------------------------------------------------------------------


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def open_model_input(inputs: dict[str, Artifact], name: str, stage: str,
                     device: str | torch.device = "cpu") -> tuple[Path, Tokenizer, GPT]:
    """The model directory of input `name`, its tokenizer and its GPT on `device`.

    A missing directory or file, a config or tokenizer that does not parse, or weights that do not
    load (truncated, another shape) is a StageError: one line naming the stage, the file and the
    stage to rebuild, never a traceback.
    """
    if name not in inputs:
        raise StageError(f"{stage}: no input {name!r}; give it in inputs.json")
    d = Path(inputs[name].path)
    rebuild = f"rebuild the stage that writes {name!r}"
    for f in MODEL_FILES:
        if not (d / f).is_file():
            raise StageError(f"{stage}: input {name!r} at {d} is not a model directory (no {f}); {rebuild}")
    try:
        tok = Tokenizer.load(d)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        raise StageError(f"{stage}: input {name!r}: {d / 'tokenizer.json'} does not load ({str(e)[:200]}); {rebuild}") from None
    try:
        model = GPT.from_pretrained(d, device=device)
    except Exception as e:  # safetensors' SafetensorError, json errors, a shape mismatch
        raise StageError(f"{stage}: input {name!r} at {d} does not load as a model "
                         f"({type(e).__name__}: {str(e)[:200]}); {rebuild}") from None
    if tok.vocab_size > model.cfg.vocab_size:
        raise StageError(f"{stage}: input {name!r}: {d / 'tokenizer.json'} has {tok.vocab_size} tokens, the model "
                         f"{model.cfg.vocab_size}; {rebuild}")
    return d, tok, model


# -- the run's record --------------------------------------------------------------------------------


def is_timing(key: str) -> bool:
    """A measurement of this machine's speed (seconds, throughput, MFU), not a result of the run."""
    return key.endswith(("_seconds", "_per_s", "elapsed_s", "_s_this_run")) or key in ("mfu", "train/mfu", "seconds")


def without_timings(value: Any) -> Any:
    """`value` with every timing key (is_timing) dropped from the mappings in it, at any depth."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not is_timing(str(k))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def write_run_meta(out: Path, stage: str, step: int, total_steps: int, stop: str, result_metrics: dict[str, float],
                   derived: dict[str, Any], cfg: Any, curve: list[dict[str, Any]], **extra: Any) -> Path:
    """meta.json of a trained model directory: what the run did, in the same keys for every trainer
    (steps, total_steps, stopped_by, metrics, derived sizes, config, curve), plus the stage's own
    `extra` keys. No timings and no paths: the directory's bytes are a function of the inputs and
    the config, so two homes (or a rerun) that train the same model publish the same content and
    everything downstream is shared or reused. Timings go to the stage's result and MLflow."""
    meta = {"stage": stage, "steps": step, "total_steps": total_steps, "stopped_by": stop, "metrics": result_metrics,
            "derived": derived, "config": dataclasses.asdict(cfg), "curve": curve, **extra}
    path = out / "meta.json"
    path.write_text(json.dumps(without_timings(meta), indent=2, default=str))
    return path
