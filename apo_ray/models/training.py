"""Learners as plain functions: one epoch-loop each, from given initial weights.

- :func:`train_reward_model`: the APO RM loss (``losses.apo_rm_loss``) on D_APO + D_P, or plain
  Bradley-Terry on D_P.
- :func:`train_policy`: a registered policy objective (``objectives.py``: rejection-sampling SFT on
  the best of S, or DPO on best vs worst).
- :class:`LearnerJob`: what one learner phase trains and how (model, :class:`TrainSettings`, loss
  options), built from the config in one place; :func:`run_job` runs it, in one process or on
  every rank of a Ray Train worker group.

Both learners run the same on one process and inside a Ray Train worker: each rank takes its slice
of every optimiser step under the job's strategy (``TrainSettings.strategy``):

- ``ddp``: every rank holds the whole model; ``prepare_model`` wraps it (Ray Train's DDP; in one
  process it is left as it is);
- ``fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder block and
  the root: parameters, gradients and AdamW state sharded over the ranks (CPU/gloo and GPU/NCCL);
- ``deepspeed``: DeepSpeed ZeRO stage 1, 2 or 3 around the same torch AdamW.

After the last step the trained weights are read once, as a :class:`TrainedWeights` stream (under
FSDP/ZeRO-3 each tensor is gathered from its shards in turn), and handed to ``publish``: by default
rank 0 returns a CPU state dict (other ranks ``None``); the Ray learners pack the stream straight
into the object-store buffer. Every rank also returns a stats dict.

Gradient accumulation is exact: each micro-batch's loss is its share of the step's mean (the loss
functions take the item counts of the whole step, across ranks), so the accumulated gradient is
that of the step's mean loss whatever the micro-batch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from apo_ray.core.losses import apo_rm_loss, sequence_logprobs
from apo_ray.core.objectives import policy_objective
from apo_ray.data import RankedPair
from apo_ray.models import lora as lora_mod
from apo_ray.models.frozen_cache import cached_reward_forward, prefix_cache_for, supports_prefix_cache
from apo_ray.models.loading import (
    Encoded,
    decoder_layers,
    encode_prompt_response,
    format_prompt,
    freeze_lower_layers,
    load_policy,
    load_reward_model,
    load_tokenizer,
    model_attention_mask,
    pad_batch,
    resolve_dtype,
    resolve_model,
    reward_forward,
)
from apo_ray.models.weights import TensorSpec

if TYPE_CHECKING:
    from apo_ray.config import Config

log = logging.getLogger(__name__)


class ScalarRewardModel(nn.Module):
    """Wraps a sequence-classification model so ``forward`` returns [B] rewards; DDP can wrap this.
    With a ``prefix_cache`` the frozen lower blocks' states are read from it (frozen_cache.py)."""

    def __init__(self, model, prefix_cache=None):
        super().__init__()
        self.model = model
        self.prefix_cache = prefix_cache

    def forward(self, input_ids, attention_mask):
        if self.prefix_cache is not None:
            return cached_reward_forward(self.model, input_ids, attention_mask, self.prefix_cache)
        return reward_forward(self.model, input_ids, attention_mask)


def _rm_prefix_cache(hf_model: nn.Module, settings: TrainSettings):
    """The shared frozen-block cache for this learner, or None where it does not apply: no frozen
    blocks (full-model training), the cache off, a sharded strategy, a LoRA learner, or a backbone
    it cannot split."""
    if (settings.trainable_layers is None or settings.frozen_cache_mib <= 0 or settings.strategy != "ddp"
            or settings.lora is not None  # peft wraps the blocks: the split forward does not apply
            or settings.gradient_checkpointing or settings.compile or not supports_prefix_cache(hf_model)):
        return None
    n_frozen = hf_model.config.num_hidden_layers - settings.trainable_layers
    if n_frozen <= 0:
        return None
    compute = f"{next(hf_model.parameters()).dtype}/{'autocast-bf16' if settings.precision == 'bf16-autocast' else 'none'}"
    return prefix_cache_for(hf_model, n_frozen, compute, max_mib=settings.frozen_cache_mib)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16-autocast`` where bf16 matmuls are fast on ``device``, else ``fp32``."""
    if precision == "auto":
        return "bf16-autocast" if resolve_dtype("auto", device) == "bfloat16" else "fp32"
    return precision


def _autocast(precision: str, device: str):
    if precision == "bf16-autocast":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_lr_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int):
    """The phase's learning-rate schedule (transformers' ``get_scheduler``, a torch ``LambdaLR``):
    linear warmup from 0 over ``warmup_steps`` (or ``ceil(warmup_ratio * total_steps)``, as
    transformers' Trainer counts it), then constant, or linear / cosine decay to 0 at ``total_steps``."""
    from transformers import get_scheduler

    warmup = settings.warmup_steps or math.ceil(settings.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(settings.schedule, settings.schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _deepspeed():
    """Import DeepSpeed for a CPU or GPU learner. On CPU its communication layer would JIT-compile a
    shared-memory all-reduce kernel at the first ``initialize`` (minutes of C++ compilation, once
    per machine); it is marked unavailable there so DeepSpeed keeps to gloo (DeepSpeed recomputes
    its table of usable kernels once per process and keeps edits to it)."""
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def shard_fsdp(model: nn.Module, blocks: Sequence[nn.Module], precision: str) -> nn.Module:
    """FSDP2 over the current process group: each decoder block is its own unit (gathered for its
    forward and backward, resharded after), the root holds the rest (embedding, norm, heads).
    ``bf16-autocast``: fp32 shards, bf16 gathers and compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16-autocast":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def wrap_for_strategy(model: nn.Module, hf_model: nn.Module, settings: TrainSettings,
                      prepare_model: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The module to train (``model``, which holds ``hf_model``) under the settings' strategy:
    DDP through ``prepare_model``, FSDP2 sharded here, DeepSpeed left to :class:`_Stepper` (its
    engine wraps the model). Without a process group (one process) FSDP leaves the model whole."""
    if settings.strategy == "ddp":
        return prepare_model(model)
    if settings.strategy == "fsdp":
        return shard_fsdp(model, decoder_layers(hf_model), settings.precision) if _distributed() else model
    if settings.strategy == "deepspeed":
        return model
    raise ValueError(f"strategy must be one of ddp, deepspeed, fsdp; got {settings.strategy!r}")


class _Stepper:
    """Backward and optimiser step for one strategy, all with torch AdamW and the settings'
    learning-rate schedule over ``total_steps`` optimiser steps (stepped here, so every strategy
    follows it identically).

    - DDP: gradient all-reduce only on the last micro-batch of a step (``no_sync`` before).
    - FSDP2: gradient reduce-scatter only on the last micro-batch (``set_requires_gradient_sync``).
    - DeepSpeed ZeRO: the engine wraps the optimiser and owns the (partitioned) gradient reduction
      and clipping; we mark the step boundaries (``set_gradient_accumulation_boundary``).
    """

    def __init__(self, model: nn.Module, settings: TrainSettings, total_steps: int,
                 master_weights: Callable[[], Iterator[tuple[nn.Parameter, torch.Tensor]]] | None = None):
        self.settings = settings
        self.engine = None
        self.skipped_steps = 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        # fused AdamW on CUDA; FSDP's DTensor parameters take the default (foreach) implementation
        fused = settings.device.startswith("cuda") and settings.strategy != "fsdp"
        self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                     **({"fused": True} if fused else {}))
        self.scheduler = make_lr_schedule(self.opt, settings, total_steps)
        self.model = model
        if settings.strategy == "deepspeed":
            config = {
                "train_micro_batch_size_per_gpu": settings.micro_examples,
                "gradient_accumulation_steps": 1,  # we mark step boundaries ourselves (ragged last steps)
                "zero_optimization": {"stage": settings.zero_stage,
                                      "overlap_comm": settings.device.startswith("cuda")},
                "bf16": {"enabled": settings.precision.startswith("bf16")},
                "gradient_clipping": settings.max_grad_norm or 0.0,
                "steps_per_print": 10**9,
            }
            self.engine, _, _, _ = _deepspeed().initialize(model=model, optimizer=self.opt, config=config)
            self.model = self.engine
            if config["bf16"]["enabled"] and master_weights is not None:
                # DeepSpeed made its fp32 master copies from the bf16 working weights; start them from
                # the job's fp32 initial weights instead, so a lineage of phases keeps its precision.
                from deepspeed.utils import safe_set_full_fp32_param

                for param, value in master_weights():
                    safe_set_full_fp32_param(param, value.to(param.device, torch.float32))

    def lr(self) -> float:
        """The learning rate the next optimiser step uses."""
        return float(self.scheduler.get_last_lr()[0])

    def zero_grad(self) -> None:
        if self.engine is None:
            self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # Learners average gradients over ranks; our loss is already the global mean, so undo that.
        loss = loss * self.settings.world_size
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
            self.engine.backward(loss)
            return
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
            loss.backward()
            return
        sync = last or not hasattr(self.model, "no_sync")
        with contextlib.nullcontext() if sync else self.model.no_sync():
            loss.backward()

    def step(self) -> None:
        if self.engine is not None:
            self.engine.step()  # clips to gradient_clipping, steps AdamW over this rank's partition
        else:
            # Clip, and skip a step whose gradients are not finite (as AMP's loss scaler does) rather
            # than let one bad batch turn every weight into NaN.
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm or float("inf"))
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                norm = norm.full_tensor()
            if not torch.isfinite(norm):
                self.skipped_steps += 1
                log.warning("skipping an optimiser step: gradient norm is %s", float(norm))
                self.opt.zero_grad(set_to_none=True)
            else:
                self.opt.step()
        self.scheduler.step()  # a skipped step still counts: the schedule follows the step index


def _steps(n_items: int, per_step: int, seed: int, epochs: int) -> list[list[int]]:
    """Indices of each optimiser step: every epoch is a fresh seeded shuffle cut into steps."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n_items))
        random.Random(seed * 7919 + epoch).shuffle(order)
        steps += [order[i:i + per_step] for i in range(0, n_items, per_step)]
    return steps


class TrainedWeights:
    """The trained weights of a learner job, read once after its last step: a
    :class:`apo_ray.models.weights.TensorStream` of ``hf_model``'s state dict.

    ``specs`` (name, dtype, full shape of every tensor) are known on every rank without
    communication. :meth:`tensors` yields the full tensors in turn on rank 0; under FSDP2 (DTensor
    shards) and ZeRO-3 (partitioned parameters) each one is gathered from the ranks' shards as it is
    asked for, so *every* rank must iterate to the end (the others get nothing: use :meth:`drain`),
    and no rank holds more than one gathered tensor at a time besides its shards. Rank 0 copies each
    into wherever it packs (the object-store buffer), so the full state dict exists only there.

    ``deepspeed_master``: read each trainable parameter from DeepSpeed's fp32 master copy (gathered
    from the optimiser partitions, a collective under every ZeRO stage) instead of the module's
    bf16 working copy, so a DeepSpeed learner hands back what a DDP or FSDP one does under
    ``bf16-autocast``: fp32 weights that keep updates smaller than bf16 can represent (the paper's
    RM learning rate, 1e-8, moves weights far below bf16's resolution).
    """

    def __init__(self, hf_model: nn.Module, rank: int, *, deepspeed_master: bool = False,
                 state: dict[str, torch.Tensor] | None = None):
        self.rank = rank
        # tensors or parameters (sharded or not); ``state``: another selection of them (a LoRA
        # learner's adapter, under its exchange names: apo_ray/models/lora.py)
        self._state = hf_model.state_dict(keep_vars=True) if state is None else state
        self._adapter = state is not None
        self._master = deepspeed_master
        self.collective = deepspeed_master or any(
            hasattr(t, "full_tensor") or hasattr(t, "ds_id") for t in self._state.values())
        self.specs = [TensorSpec(name, torch.float32 if self._from_master(t) else t.dtype,
                                 tuple(getattr(t, "ds_shape", None) or t.shape)) for name, t in self._state.items()]

    @property
    def trained_names(self) -> list[str]:
        """Names of the tensors this job trained (parameters with ``requires_grad``); every other
        tensor is still the one the job started from, in the dtype of ``specs`` (what a checkpoint
        leaves out: :func:`apo_ray.game.store.write_checkpoint`)."""
        if self._adapter:  # a LoRA version is its adapter: stored whole (a few MB), no base to fill in from
            return list(self._state)
        return [name for name, t in self._state.items() if isinstance(t, nn.Parameter) and t.requires_grad]

    def _from_master(self, t: torch.Tensor) -> bool:
        return self._master and isinstance(t, nn.Parameter) and t.requires_grad  # frozen ones have no master

    def _full_tensors(self) -> Iterator[torch.Tensor]:
        for t in self._state.values():
            if self._from_master(t):
                from deepspeed.utils import safe_get_full_fp32_param

                yield safe_get_full_fp32_param(t)  # a collective (all-reduce / all-gather of the partitions)
            elif hasattr(t, "full_tensor"):  # an FSDP2 DTensor shard: all-gather (a collective)
                yield t.full_tensor()
            elif hasattr(t, "ds_id"):  # a ZeRO-3 partitioned parameter: gather it (a collective)
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                    yield t.data
            else:  # whole on every rank (DDP, ZeRO-1/2 working copies, buffers)
                yield t.data if isinstance(t, nn.Parameter) else t

    def tensors(self) -> Iterator[torch.Tensor]:
        """Rank 0: each full tensor in ``specs`` order, valid until the next one is asked for."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 receives the trained weights; other ranks call drain()")
        for t in self._full_tensors():
            yield t.detach()

    def drain(self) -> None:
        """What a rank other than 0 does with the stream: take part in every gather (nothing to do
        where nothing is sharded)."""
        if self.collective:
            for _ in self._full_tensors():
                pass

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: the weights as a CPU state dict (one copy); other ranks: ``None`` (after
        :meth:`drain`). The default ``publish`` of the learners."""
        if self.rank != 0:
            self.drain()
            return None
        return {spec.name: t.to("cpu", copy=True).contiguous() for spec, t in zip(self.specs, self.tensors())}


def _publish_state_dict(trained: TrainedWeights) -> dict[str, torch.Tensor] | None:
    return trained.state_dict()


def _trained_weights(hf_model: nn.Module, settings: TrainSettings, adapter=None) -> TrainedWeights:
    """The stream of what a learner hands back: its weights in the precision it keeps its master
    copy in (fp32 unless ``bf16``, whatever the strategy). ``adapter`` ((peft model, spec) of a LoRA
    learner): only the adapter, the RM's head and the metadata naming the base model."""
    state = None
    if adapter is not None:
        state = lora_mod.adapter_parameters(adapter[0]) | {lora_mod.META_KEY: lora_mod.meta_tensor(adapter[1])}
    return TrainedWeights(hf_model, settings.rank, state=state,
                          deepspeed_master=settings.strategy == "deepspeed" and settings.precision != "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """What every learner takes besides its data and loss; built from RMConfig / PolicyConfig /
    ClusterConfig by :meth:`for_role`. ``device``/``rank``/``world_size`` say where this copy runs
    (filled in by :func:`run_job`)."""

    lr: float
    examples_per_step: int
    micro_examples: int
    max_length: int
    epochs: int = 1
    weight_decay: float = 0.0
    precision: str = "auto"  # fp32 | bf16-autocast | bf16 | auto (bf16-autocast where bf16 is fast)
    seed: int = 0
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    gradient_checkpointing: bool = False
    trainable_layers: int | None = None  # train only the top N decoder blocks (+ head); None: all
    compile: bool = False  # torch.compile the model before the loop
    max_grad_norm: float | None = 1.0  # clip to this global norm; None: no clipping
    schedule: str = "constant"  # learning rate after warmup: constant | linear | cosine (decay to 0)
    warmup_steps: int = 0  # linear warmup from 0 over these optimiser steps
    warmup_ratio: float = 0.0  # ... or over this fraction of the phase's steps (when warmup_steps is 0)
    strategy: str = "ddp"  # ddp (also plain, one process) | fsdp (FSDP2) | deepspeed (ZeRO)
    zero_stage: int = 2  # deepspeed only
    log_every_steps: int = 0  # 0: about ten progress lines per run
    lora: Any = None  # a config.LoraConfig with rank > 0: train LoRA adapters (apo_ray/models/lora.py); None: weights
    max_response_tokens: int | None = None  # response tokens kept (models.response_token_budget); None: derived
    frozen_cache_mib: float = 0.0  # RMs with trainable_layers: share the frozen blocks' states (frozen_cache.py)

    @classmethod
    def for_role(cls, cfg: Config, role: str, *, lr: float, seed: int, epochs: int | None = None) -> TrainSettings:
        """The settings of an RM (``role="rm"``) or policy (``"policy"``) learner under ``cfg``."""
        c = cfg.cluster
        section = cfg.rm if role == "rm" else cfg.policy
        common = {"lora": section.lora if section.lora.rank > 0 else None, "lr": lr, "seed": seed, "precision": cfg.model.train_precision,
                  "gradient_checkpointing": c.gradient_checkpointing, "compile": c.learner_compile,
                  "strategy": c.learner_strategy,
                  "zero_stage": c.deepspeed_stage}
        if role == "rm":
            r = cfg.rm
            return cls(examples_per_step=r.pairs_per_batch, micro_examples=r.micro_pairs, max_length=r.max_length,
                       epochs=r.epochs if epochs is None else epochs, weight_decay=r.weight_decay,
                       trainable_layers=r.trainable_layers, schedule=r.schedule, warmup_steps=r.warmup_steps,
                       warmup_ratio=r.warmup_ratio, max_response_tokens=r.max_response_tokens,
                       frozen_cache_mib=r.frozen_cache_mib, **common)
        if role == "policy":
            p = cfg.policy
            return cls(examples_per_step=p.sequences_per_batch, micro_examples=p.micro_sequences,
                       max_length=p.max_length, epochs=p.epochs if epochs is None else epochs,
                       weight_decay=p.weight_decay, trainable_layers=p.trainable_layers, schedule=p.schedule,
                       warmup_steps=p.warmup_steps, warmup_ratio=p.warmup_ratio, **common)
        raise ValueError(f"role must be 'rm' or 'policy', got {role!r}")


@dataclass(frozen=True)
class RMLoss:
    """Options of ``losses.apo_rm_loss``. The defaults are plain Bradley-Terry on D_P (RM_Base)."""

    beta2: float = 1.0
    apo_weight: float = 0.0
    reduction: str = "per_term"  # per_term (paper, eq. 15) | pooled (authors' code)
    samples_per_query: int = 1
    # The ablation (RM_Base-AB): its "apo" pairs are slots, not data. They keep their places in the
    # shuffled steps, so every step holds the same D_P pairs as APO's step of the same seed and the
    # phase runs as many optimiser steps; they are never read, so only the APO pairs differ.
    skip_apo_pairs: bool = False


@dataclass(frozen=True)
class PolicyLoss:
    """Which registered policy objective trains the policy (``objectives.POLICY_OBJECTIVES``)."""

    objective: str = "rjs"
    dpo_beta: float = 0.1


@dataclass(frozen=True)
class LearnerJob:
    """One learner phase: the model to load, how to train it, and with which loss. The whole object
    travels to every Ray Train rank, so a setting added here reaches every worker."""

    model: str
    settings: TrainSettings
    loss: RMLoss | PolicyLoss

    @property
    def role(self) -> str:
        return "rm" if isinstance(self.loss, RMLoss) else "policy"

    @classmethod
    def rm(cls, cfg: Config, *, lr: float, epochs: int, seed: int, loss: RMLoss) -> LearnerJob:
        return cls(cfg.model.reward, TrainSettings.for_role(cfg, "rm", lr=lr, epochs=epochs, seed=seed), loss)

    @classmethod
    def policy(cls, cfg: Config, *, lr: float, seed: int) -> LearnerJob:
        return cls(cfg.model.policy, TrainSettings.for_role(cfg, "policy", lr=lr, seed=seed),
                   PolicyLoss(cfg.policy.objective, cfg.policy.dpo_beta))


def run_job(job: LearnerJob, init_state: dict[str, torch.Tensor] | None, data: Sequence, *, device: str = "cpu",
            rank: int = 0, world_size: int = 1,
            prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m,
            publish: Callable[[TrainedWeights], Any] = _publish_state_dict) -> tuple[Any, dict]:
    """Run ``job`` on ``data`` (RankedPairs for an RM, (prompt, response...) tuples for a policy)
    as ``rank`` of ``world_size``; returns (``publish(trained weights)``: by default rank 0's CPU
    state dict, else None; stats)."""
    settings = dataclasses.replace(job.settings, device=device, rank=rank, world_size=world_size)
    train = train_reward_model if job.role == "rm" else train_policy
    return train(job.model, init_state, data, settings, loss=job.loss, prepare_model=prepare_model, publish=publish)


def _run_steps(model: nn.Module, settings: TrainSettings, n_items: int,
               micro_loss: Callable[[nn.Module, list[int], dict[str, int]], tuple[torch.Tensor, int]],
               step_counts: Callable[[list[int]], dict[str, int]], what: str,
               master_weights: Callable[[], Iterator[tuple[nn.Parameter, torch.Tensor]]] | None = None,
               ) -> tuple[nn.Module, dict]:
    """The shared optimiser loop: this rank's slice of each step, in micro-batches, one update.

    ``micro_loss(model, indices, step_counts)`` returns (this micro-batch's share of the step's
    loss, tokens); ``model`` is what to call forward on (the DDP module or the DeepSpeed engine).
    Returns (the trained model/engine, stats).
    """
    if settings.compile:
        model = torch.compile(model)
    steps = _steps(n_items, settings.examples_per_step, settings.seed, settings.epochs)
    stepper = _Stepper(model, settings, total_steps=len(steps), master_weights=master_weights)
    model.train()
    losses, lrs, tokens, start = [], [], 0, time.perf_counter()
    log_every = settings.log_every_steps or max(1, len(steps) // 10)
    for step_no, step in enumerate(steps):
        counts = step_counts(step)
        mine = step[settings.rank::settings.world_size]
        # Every rank runs the same number of micro-batches (DDP all-reduces on the last one of each
        # rank, and they must line up); a rank short of examples pads with zero-weight repeats.
        largest = -(-len(step) // settings.world_size)
        n_micro = -(-largest // settings.micro_examples)
        chunks = [(mine[lo:lo + settings.micro_examples], 1.0) for lo in range(0, len(mine), settings.micro_examples)]
        chunks += [(step[:1], 0.0)] * (n_micro - len(chunks))
        step_loss = torch.zeros(())
        stepper.zero_grad()
        for i, (chunk, weight) in enumerate(chunks):
            with _autocast(settings.precision, settings.device):
                loss, n_tokens = micro_loss(stepper.model, chunk, counts)
            stepper.backward(loss * weight, last=i == len(chunks) - 1)
            step_loss += float(loss.detach()) * weight
            tokens += n_tokens
        if settings.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(step_loss)  # each rank holds its share of the step's mean
        step_loss = float(step_loss)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{what}: non-finite loss at step {step_no}")
        lrs.append(stepper.lr())
        stepper.step()
        losses.append(step_loss)
        if settings.rank == 0 and (step_no + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            log.info("%s step %d/%d loss %.4f (%.0f tokens/s on rank 0)", what, step_no + 1, len(steps),
                     step_loss, tokens / max(elapsed, 1e-9))
    elapsed = time.perf_counter() - start
    if steps and stepper.skipped_steps == len(steps):
        log.error("%s: EVERY one of its %d optimiser steps was skipped (non-finite gradients): the phase left the "
                  "model unchanged; check the loss weights and the learning rate", what, len(steps))
    return stepper.model, {"steps": len(steps), "loss_first": losses[0] if losses else float("nan"),
                           "loss_last": losses[-1] if losses else float("nan"),
                           "loss_mean": sum(losses) / max(len(losses), 1), "seconds": elapsed,
                           "tokens_per_s": tokens / max(elapsed, 1e-9), "skipped_steps": stepper.skipped_steps,
                           "precision": settings.precision, "losses": losses, "lrs": lrs}


def _fp32_init(hf_model: nn.Module, init_state: dict[str, torch.Tensor] | None, adapter=None):
    """(trainable parameter, its fp32 initial value) pairs, when the job starts from fp32 weights
    (a previous phase's): what DeepSpeed's fp32 master copies should start from. ``adapter``: a
    LoRA learner's (peft model, spec); the initial values are then keyed by exchange names."""
    if init_state is None or not any(v.dtype == torch.float32 for v in init_state.values()):
        return None
    if adapter is not None:
        named = lora_mod.adapter_parameters(adapter[0])
        return lambda: ((param, init_state[name]) for name, param in named.items()
                        if name in init_state and init_state[name].dtype == torch.float32)
    return lambda: ((param, init_state[name]) for name, param in hf_model.named_parameters()
                    if param.requires_grad and init_state.get(name) is not None
                    and init_state[name].dtype == torch.float32)


def _load_for_training(load, model_name: str, init_state: dict | None, settings: TrainSettings):
    """(tokenizer, model) of :func:`_load_learner_model` (no LoRA adapter)."""
    tokenizer, model, _ = _load_learner_model(load, model_name, init_state, settings)
    return tokenizer, model


def _load_learner_model(load, model_name: str, init_state: dict | None, settings: TrainSettings,
                        role: str = "policy"):
    """Seeded load of a model (``load``: load_policy or load_reward_model) and its right-padding
    tokenizer, with the given initial weights and the settings' memory options. Returns (tokenizer,
    model, adapter): ``adapter`` is (peft model, spec) with ``settings.lora`` (the adapters injected
    into ``model`` in place and started from ``init_state``, an adapter state dict), else None.

    Every rank loads the whole model here, before any sharding: in bf16 for ``bf16`` and for
    DeepSpeed's bf16 modes (its engine casts the module to bf16 anyway and keeps the fp32 master
    copy in its optimiser partitions, so loading fp32 first would only double this peak), else fp32."""
    assert settings.precision != "auto", "resolve_precision first"
    # Fill the model cache before seeding (a cold cache converts or builds a model; that build is
    # kept off the caller's streams anyway): the seeded stream's first draws are then the RM's
    # scalar head whatever was cached before, so a cold and a warm cache train the same weights.
    resolve_model(model_name)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(model_name, padding_side="right")
    bf16 = settings.precision == "bf16" or (settings.strategy == "deepspeed" and settings.precision.startswith("bf16"))
    model = load(model_name, dtype="bfloat16" if bf16 else "float32")
    adapter = None
    if settings.lora is not None and (settings.strategy == "fsdp" or
                                      (settings.strategy == "deepspeed" and settings.zero_stage == 3)):
        raise ValueError(f"{role}.lora: LoRA learners run under ddp or deepspeed ZeRO-1/2, not "
                         f"{settings.strategy}" + (" stage 3" if settings.strategy == "deepspeed" else ""))
    if settings.lora is not None:
        if init_state is not None and not lora_mod.is_adapter(init_state):
            raise ValueError(f"{role}.lora.rank={settings.lora.rank}: the initial weights are a full state dict, "
                             f"not an adapter (a checkpoint of a run without LoRA?)")
        spec = lora_mod.spec_for(model, model_name, role, settings.lora, settings.trainable_layers)
        peft_model = lora_mod.apply_lora(model, spec)
        if init_state is not None:
            lora_mod.check_spec(init_state, spec, f"{role} learner")
            lora_mod.load_adapter(peft_model, init_state)
        adapter = (peft_model, spec)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        if init_state is not None:
            model.load_state_dict(init_state)
        trainable = freeze_lower_layers(model, settings.trainable_layers)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if adapter is not None:
            model.enable_input_require_grads()  # the frozen embedding's output must carry grad into checkpoints
    log.info("%s: %.1fM of %.1fM parameters trainable, precision %s%s", model_name, trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6, settings.precision,
             f", LoRA rank {settings.lora.rank}" if adapter is not None else "")
    return tokenizer, model, adapter


def train_reward_model(model_name: str, init_state: dict[str, torch.Tensor] | None,
                       pairs: Sequence[RankedPair], settings: TrainSettings, *, loss: RMLoss = RMLoss(),
                       prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m,
                       publish: Callable[[TrainedWeights], Any] = _publish_state_dict) -> tuple[Any, dict]:
    """One run of RM training: each step minimises ``losses.apo_rm_loss`` over the step's pairs
    ("apo" pairs: gold vs sample; "pref": chosen vs rejected). With only "pref" pairs and the
    default loss this is plain Bradley-Terry (RM_Base, evaluation RMs)."""
    if not pairs:
        raise ValueError("train_reward_model: no pairs to train on")
    settings = dataclasses.replace(settings, precision=resolve_precision(settings.precision, settings.device))
    tokenizer, hf_model, adapter = _load_learner_model(load_reward_model, model_name, init_state, settings, "rm")
    if hf_model.config.pad_token_id is None:
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    cache = _rm_prefix_cache(hf_model, settings)
    model = wrap_for_strategy(ScalarRewardModel(hf_model, cache).to(settings.device), hf_model, settings,
                              prepare_model)
    read = [p for p in pairs if not (loss.skip_apo_pairs and p.kind == "apo")]
    if not read:
        raise ValueError("train_reward_model: every pair is a skipped APO slot; nothing to train on")
    prompts = {p.prompt: format_prompt(tokenizer, p.prompt) for p in read}
    first_read = next(i for i, p in enumerate(pairs) if not (loss.skip_apo_pairs and p.kind == "apo"))

    def encode(prompt: str, response: str) -> Encoded:
        return encode_prompt_response(tokenizer, prompts[prompt], response, settings.max_length,
                                      settings.max_response_tokens)

    def step_counts(step):
        return {"apo": sum(pairs[i].kind == "apo" for i in step), "pref": sum(pairs[i].kind == "pref" for i in step)}

    def micro_loss(model, chunk, counts):
        weight = 1.0
        if loss.skip_apo_pairs:
            chunk = [i for i in chunk if pairs[i].kind != "apo"]
            if not chunk:  # only APO slots here: a zero-weighted pair keeps every rank's backward in step
                chunk, weight = [first_read], 0.0
        # One forward over [good_1..good_k, bad_1..bad_k]: [2k, T] -> rewards [2k].
        enc = [encode(pairs[i].prompt, pairs[i].good) for i in chunk] + \
              [encode(pairs[i].prompt, pairs[i].bad) for i in chunk]
        batch = pad_batch(enc, tokenizer.pad_token_id, side="right")
        rewards = model(batch["input_ids"].to(settings.device), batch["attention_mask"].to(settings.device))
        good, bad = rewards[:len(chunk)], rewards[len(chunk):]  # [k] each
        is_apo = torch.tensor([pairs[i].kind == "apo" for i in chunk], device=rewards.device)
        value = apo_rm_loss(good[is_apo], bad[is_apo], good[~is_apo], bad[~is_apo], beta2=loss.beta2,
                            apo_weight=loss.apo_weight, reduction=loss.reduction,
                            samples_per_query=loss.samples_per_query, n_apo=counts["apo"], n_pref=counts["pref"])
        return value * weight, int(batch["attention_mask"].sum())

    model, stats = _run_steps(model, settings, len(pairs), micro_loss, step_counts, "rm",
                              _fp32_init(hf_model, init_state, adapter))
    n_apo = sum(p.kind == "apo" for p in pairs)
    stats.update(pairs=len(read), apo_pairs=len(read) - (len(pairs) - n_apo),
                 apo_slots_skipped=n_apo if loss.skip_apo_pairs else 0,
                 frozen_cache=cache.stats() if cache is not None else None, **_lora_stats(adapter))
    trained = _trained_weights(hf_model, settings, adapter)
    if adapter is None:  # a LoRA version is small: its checkpoint keeps all of it
        stats["trained_tensors"] = trained.trained_names  # the checkpoint stores these alone
    return publish(trained), stats


@torch.no_grad()
def _sequence_logprobs_of(model, batch) -> torch.Tensor:
    mask = model_attention_mask(batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"]).float()


def train_policy(model_name: str, init_state: dict[str, torch.Tensor] | None,
                 examples: Sequence[tuple[str, ...]], settings: TrainSettings, *, loss: PolicyLoss = PolicyLoss(),
                 prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m,
                 publish: Callable[[TrainedWeights], Any] = _publish_state_dict) -> tuple[Any, dict]:
    """Train the policy on ``examples`` = (prompt, response_1, ..., response_R) tuples with the
    objective ``loss.objective`` (R = its ``responses_per_example``). An objective that
    ``uses_reference`` compares against the starting weights (its log-probs are taken before the
    first step)."""
    objective = policy_objective(loss.objective, dpo_beta=loss.dpo_beta)
    if not examples:
        raise ValueError("train_policy: no examples to train on")
    n_responses = objective.responses_per_example
    if any(len(ex) != 1 + n_responses for ex in examples):
        raise ValueError(f"train_policy: objective {objective.name!r} takes (prompt, {n_responses} responses) "
                         f"examples")
    settings = dataclasses.replace(settings, precision=resolve_precision(settings.precision, settings.device))
    tokenizer, hf_model, adapter = _load_learner_model(load_policy, model_name, init_state, settings, "policy")
    hf_model.to(settings.device)
    prompts = {ex[0]: format_prompt(tokenizer, ex[0]) for ex in examples}

    def encode(i: int, which: int) -> Encoded:
        return encode_prompt_response(tokenizer, prompts[examples[i][0]], examples[i][which], settings.max_length)

    def batch_of(chunk: list[int]) -> dict[str, torch.Tensor]:
        # [R * k, T]: every example's first response, then every second response, ...
        enc = [encode(i, which) for which in range(1, n_responses + 1) for i in chunk]
        return {k: v.to(settings.device) for k, v in pad_batch(enc, tokenizer.pad_token_id).items()}

    reference = None
    if objective.uses_reference:
        hf_model.eval()
        reference = {}
        for lo in range(0, len(examples), settings.micro_examples):
            chunk = list(range(lo, min(lo + settings.micro_examples, len(examples))))
            with _autocast(settings.precision, settings.device):
                logps = _sequence_logprobs_of(hf_model, batch_of(chunk)).cpu()  # [R * k]
            for j, i in enumerate(chunk):
                reference[i] = logps[j::len(chunk)]  # [R]: this example's responses
    if objective.count_unit == "tokens":
        response_tokens = [sum(sum(encode(i, w).loss_mask) for w in range(1, n_responses + 1))
                           for i in range(len(examples))]

        def step_counts(step):
            return {"n": sum(response_tokens[i] for i in step)}
    else:
        def step_counts(step):
            return {"n": len(step)}

    model = wrap_for_strategy(hf_model, hf_model, settings, prepare_model)

    def micro_loss(model, chunk, counts):
        batch = batch_of(chunk)
        mask = model_attention_mask(batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        ref = None if reference is None else torch.stack([reference[i] for i in chunk], dim=1).reshape(-1)
        value = objective.loss(logits, batch["input_ids"], batch["loss_mask"], n_step=counts["n"],
                               reference_logps=ref)
        return value, int(batch["attention_mask"].sum())

    model, stats = _run_steps(model, settings, len(examples), micro_loss, step_counts, f"policy[{objective.name}]",
                              _fp32_init(hf_model, init_state, adapter))
    stats.update(examples=len(examples), **_lora_stats(adapter))
    trained = _trained_weights(hf_model, settings, adapter)
    if adapter is None:  # a LoRA version is small: its checkpoint keeps all of it
        stats["trained_tensors"] = trained.trained_names  # the checkpoint stores these alone
    return publish(trained), stats


def _lora_stats(adapter) -> dict:
    """What a LoRA phase records beside its weights (the phase checkpoint's marker holds it): the
    base model the adapter belongs to and its shape."""
    if adapter is None:
        return {}
    spec = adapter[1]
    return {"lora": {"base_model": spec.base_model, "rank": spec.rank, "alpha": spec.alpha,
                     "target_modules": list(spec.target_modules),
                     "layers": None if spec.layers is None else list(spec.layers),
                     "modules_to_save": list(spec.modules_to_save)}}
