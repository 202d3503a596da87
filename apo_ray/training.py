"""Learners as plain functions (layer 2): one epoch-loop each, from given initial weights.

- :func:`train_reward_model`: APO RM loss on D_APO + D_P (or plain Bradley-Terry on D_P).
- :func:`train_policy`: rejection-sampling SFT on (x, y_best), or DPO on (x, y_best, y_worst).

Both run the same on one process and inside a Ray Train worker: the caller passes ``rank`` /
``world_size`` (each rank takes its slice of every optimiser step) and ``prepare_model`` (Ray
Train's ``prepare_model`` wraps in DDP; the default leaves the model as it is). Both return a CPU
state dict of the trained weights and a stats dict.

Gradient accumulation is exact: each micro-batch's loss is a sum over its examples divided by the
number of such examples in the whole step (across ranks), so the accumulated gradient is that of
the step's mean loss whatever the micro-batch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from apo_ray.losses import dpo_loss, sequence_logprobs
from apo_ray.models import (
    Encoded,
    encode_prompt_response,
    format_prompt,
    freeze_lower_layers,
    load_policy,
    load_reward_model,
    load_tokenizer,
    model_attention_mask,
    pad_batch,
    resolve_dtype,
    reward_forward,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankedPair:
    """One comparison for the RM: ``good`` should score above ``bad``. ``kind``: "apo" (gold vs
    policy sample, D_APO) or "pref" (human chosen vs rejected, D_P)."""

    prompt: str
    good: str
    bad: str
    kind: str = "pref"


class ScalarRewardModel(nn.Module):
    """Wraps a sequence-classification model so ``forward`` returns [B] rewards; DDP can wrap this."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return reward_forward(self.model, input_ids, attention_mask)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16-autocast`` where bf16 matmuls are fast on ``device``, else ``fp32``."""
    if precision == "auto":
        return "bf16-autocast" if resolve_dtype("auto", device) == "bfloat16" else "fp32"
    return precision


def _autocast(precision: str, device: str):
    if precision == "bf16-autocast":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Stepper:
    """Backward and optimiser step for one strategy. Plain/DDP: torch AdamW, and DDP's gradient
    all-reduce only on the last micro-batch of a step (``no_sync`` before). DeepSpeed ZeRO: the
    engine owns the optimiser and the (partitioned) gradient reduction."""

    def __init__(self, model: nn.Module, settings: TrainSettings):
        self.settings = settings
        self.engine = None
        self.skipped_steps = 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        if settings.strategy == "deepspeed":
            import deepspeed

            config = {
                "train_micro_batch_size_per_gpu": settings.micro_examples,
                "gradient_accumulation_steps": 1,  # we mark step boundaries ourselves (ragged last steps)
                "zero_optimization": {"stage": settings.zero_stage, "overlap_comm": True},
                "bf16": {"enabled": settings.precision.startswith("bf16")},
                "optimizer": {"type": "AdamW", "params": {"lr": settings.lr, "weight_decay": settings.weight_decay}},
                "gradient_clipping": settings.max_grad_norm or 0.0,
                "steps_per_print": 10**9,
            }
            self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
            self.model = self.engine
        else:
            self.model = model
            self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                         fused=settings.device.startswith("cuda"))

    def lr(self) -> float:
        """The learning rate of the next step."""
        if self.engine is not None:
            return float(self.engine.get_lr()[0])
        return float(self.opt.param_groups[0]["lr"])

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
        sync = last or not hasattr(self.model, "no_sync")
        with contextlib.nullcontext() if sync else self.model.no_sync():
            loss.backward()

    def step(self) -> None:
        if self.engine is not None:
            self.engine.step()
            return
        # Clip, and skip a step whose gradients are not finite (as AMP's loss scaler does) rather
        # than let one bad batch turn every weight into NaN.
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm or float("inf"))
        if not torch.isfinite(norm):
            self.skipped_steps += 1
            log.warning("skipping an optimiser step: gradient norm is %s", float(norm))
            self.opt.zero_grad(set_to_none=True)
            return
        self.opt.step()


def _steps(n_items: int, per_step: int, seed: int, epochs: int) -> list[list[int]]:
    """Indices of each optimiser step: every epoch is a fresh seeded shuffle cut into steps."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n_items))
        random.Random(seed * 7919 + epoch).shuffle(order)
        steps += [order[i:i + per_step] for i in range(0, n_items, per_step)]
    return steps


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if hasattr(model, "_zero3_consolidated_16bit_state_dict") and model.zero_optimization_stage() == 3:
        # DeepSpeed ZeRO-3 partitions the parameters: gather them (on rank 0).
        full = model._zero3_consolidated_16bit_state_dict()
        prefix = "model." if isinstance(model.module, ScalarRewardModel) else ""
        return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in (full or {}).items()}
    inner = getattr(model, "module", model)  # unwrap DDP / DeepSpeed
    if isinstance(inner, ScalarRewardModel):
        inner = inner.model
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in inner.state_dict().items()}


@dataclass
class TrainSettings:
    """What every learner takes besides its data; the fields map onto RMConfig / PolicyConfig."""

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
    strategy: str = "ddp"  # ddp (also plain, one process) | deepspeed
    zero_stage: int = 2
    log_every_steps: int = 0  # 0: about ten progress lines per run


def _run_steps(model: nn.Module, settings: TrainSettings, n_items: int,
               micro_loss: Callable[[nn.Module, list[int], dict[str, int]], tuple[torch.Tensor, int]],
               step_counts: Callable[[list[int]], dict[str, int]], what: str) -> dict:
    """The shared optimiser loop: this rank's slice of each step, in micro-batches, one update.

    ``micro_loss(model, indices, step_counts)`` returns (loss already divided by the step's counts,
    tokens); ``model`` is what to call forward on (the DDP module or the DeepSpeed engine).
    Returns (stats, the trained model/engine).
    """
    if settings.compile:
        model = torch.compile(model)
    stepper = _Stepper(model, settings)
    model.train()
    losses, lrs, tokens, start = [], [], 0, time.perf_counter()
    steps = _steps(n_items, settings.examples_per_step, settings.seed, settings.epochs)
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
        lrs.append(stepper.lr())  # the rate this step applies (for the trackers)
        stepper.step()
        losses.append(step_loss)
        if settings.rank == 0 and (step_no + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            log.info("%s step %d/%d loss %.4f (%.0f tokens/s on rank 0)", what, step_no + 1, len(steps),
                     step_loss, tokens / max(elapsed, 1e-9))
    elapsed = time.perf_counter() - start
    return stepper.model, {"steps": len(steps), "loss_first": losses[0] if losses else float("nan"),
            "loss_last": losses[-1] if losses else float("nan"),
            "loss_mean": sum(losses) / max(len(losses), 1), "seconds": elapsed,
            "tokens_per_s": tokens / max(elapsed, 1e-9), "skipped_steps": stepper.skipped_steps,
            "precision": settings.precision, "losses": losses, "lrs": lrs}


def _load_for_training(load, model_name: str, init_state: dict | None, settings: TrainSettings):
    """Seeded load of a model (``load``: load_policy or load_reward_model) and its right-padding
    tokenizer, with the given initial weights and the settings' memory options."""
    assert settings.precision != "auto", "resolve_precision first"
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(model_name, padding_side="right")
    model = load(model_name, dtype="bfloat16" if settings.precision == "bf16" else "float32")
    if init_state is not None:
        model.load_state_dict(init_state)
    trainable = freeze_lower_layers(model, settings.trainable_layers)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    log.info("%s: %.1fM of %.1fM parameters trainable, precision %s", model_name, trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6, settings.precision)
    return tokenizer, model


def train_reward_model(model_name: str, init_state: dict[str, torch.Tensor] | None,
                       pairs: Sequence[RankedPair], settings: TrainSettings, *, beta2: float = 1.0,
                       apo_weight: float = 1.0,
                       prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m) -> tuple[dict, dict]:
    """One run of RM training. The step loss is ``apo_rm_loss`` over the step's pairs:
    ``apo_weight * mean_apo(-log sigmoid(r_gold - r_sample)) + beta2 * mean_pref(-log sigmoid(r_good - r_bad))``.
    With only "pref" pairs and beta2=1 this is plain Bradley-Terry (RM_Base, evaluation RMs)."""
    if not pairs:
        raise ValueError("train_reward_model: no pairs to train on")
    settings = dataclasses.replace(settings, precision=resolve_precision(settings.precision, settings.device))
    tokenizer, hf_model = _load_for_training(load_reward_model, model_name, init_state, settings)
    if hf_model.config.pad_token_id is None:
        hf_model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_model(ScalarRewardModel(hf_model).to(settings.device))
    prompts = {p.prompt: format_prompt(tokenizer, p.prompt) for p in pairs}
    weights = {"apo": apo_weight, "pref": beta2}

    def encode(prompt: str, response: str) -> Encoded:
        return encode_prompt_response(tokenizer, prompts[prompt], response, settings.max_length)

    def step_counts(step):
        return {"apo": sum(pairs[i].kind == "apo" for i in step), "pref": sum(pairs[i].kind == "pref" for i in step)}

    def micro_loss(model, chunk, counts):
        # One forward over [good_1..good_k, bad_1..bad_k]: [2k, T] -> rewards [2k].
        enc = [encode(pairs[i].prompt, pairs[i].good) for i in chunk] + \
              [encode(pairs[i].prompt, pairs[i].bad) for i in chunk]
        batch = pad_batch(enc, tokenizer.pad_token_id, side="right")
        rewards = model(batch["input_ids"].to(settings.device), batch["attention_mask"].to(settings.device))
        margin = rewards[:len(chunk)] - rewards[len(chunk):]  # [k]
        loss = rewards.new_zeros(())
        for kind, weight in weights.items():
            sel = torch.tensor([pairs[i].kind == kind for i in chunk], device=margin.device)
            if counts[kind] and sel.any():
                loss = loss + weight * (-F.logsigmoid(margin[sel])).sum() / counts[kind]
        return loss, int(batch["attention_mask"].sum())

    model, stats = _run_steps(model, settings, len(pairs), micro_loss, step_counts, "rm")
    stats.update(pairs=len(pairs), apo_pairs=sum(p.kind == "apo" for p in pairs))
    return _cpu_state_dict(model), stats


@torch.no_grad()
def _reference_logprobs(model, batches) -> torch.Tensor:
    out = []
    for batch in batches:
        mask = model_attention_mask(batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        out.append(sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"]).float())
    return torch.cat(out)


def train_policy(model_name: str, init_state: dict[str, torch.Tensor] | None,
                 examples: Sequence[tuple[str, str] | tuple[str, str, str]], settings: TrainSettings, *,
                 updater: str = "rjs", dpo_beta: float = 0.1,
                 prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m) -> tuple[dict, dict]:
    """Rejection-sampling SFT (``updater="rjs"``, examples ``(prompt, best)``): LM loss on response
    tokens only, averaged over the step's response tokens. DPO (``"dpo"``, examples
    ``(prompt, best, worst)``): the reference is the round's starting policy."""
    if not examples:
        raise ValueError("train_policy: no examples to train on")
    settings = dataclasses.replace(settings, precision=resolve_precision(settings.precision, settings.device))
    tokenizer, hf_model = _load_for_training(load_policy, model_name, init_state, settings)
    hf_model.to(settings.device)
    prompts = {ex[0]: format_prompt(tokenizer, ex[0]) for ex in examples}

    def encode(i: int, which: int) -> Encoded:
        return encode_prompt_response(tokenizer, prompts[examples[i][0]], examples[i][which], settings.max_length)

    def to_device(batch):
        return {k: v.to(settings.device) for k, v in batch.items()}

    if updater == "rjs":
        response_tokens = [sum(encode(i, 1).loss_mask) for i in range(len(examples))]

        def step_counts(step):
            return {"tokens": sum(response_tokens[i] for i in step)}

        model = prepare_model(hf_model)

        def micro_loss(model, chunk, counts):
            batch = to_device(pad_batch([encode(i, 1) for i in chunk], tokenizer.pad_token_id))
            mask = model_attention_mask(batch["attention_mask"])
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
            # Sum of token NLL over this micro-batch / response tokens of the whole step.
            token_logps = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
            return -token_logps.sum() / counts["tokens"], int(batch["attention_mask"].sum())

    elif updater == "dpo":
        hf_model.eval()
        ref = {}
        for lo in range(0, len(examples), settings.micro_examples):
            idx = list(range(lo, min(lo + settings.micro_examples, len(examples))))
            with _autocast(settings.precision, settings.device):
                chosen = _reference_logprobs(hf_model, [to_device(pad_batch([encode(i, 1) for i in idx],
                                                                             tokenizer.pad_token_id))])
                rejected = _reference_logprobs(hf_model, [to_device(pad_batch([encode(i, 2) for i in idx],
                                                                               tokenizer.pad_token_id))])
            for j, i in enumerate(idx):
                ref[i] = (chosen[j], rejected[j])

        def step_counts(step):
            return {"pairs": len(step)}

        model = prepare_model(hf_model)

        def micro_loss(model, chunk, counts):
            enc = [encode(i, 1) for i in chunk] + [encode(i, 2) for i in chunk]
            batch = to_device(pad_batch(enc, tokenizer.pad_token_id))
            mask = model_attention_mask(batch["attention_mask"])
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
            logps = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])  # [2k]
            k = len(chunk)
            ref_c = torch.stack([ref[i][0] for i in chunk]).to(logps.device)
            ref_r = torch.stack([ref[i][1] for i in chunk]).to(logps.device)
            mean = dpo_loss(logps[:k], logps[k:], ref_c, ref_r, beta=dpo_beta)
            return mean * k / counts["pairs"], int(batch["attention_mask"].sum())
    else:
        raise ValueError(f"policy.updater must be 'rjs' or 'dpo', got {updater!r}")

    model, stats = _run_steps(model, settings, len(examples), micro_loss, step_counts, f"policy[{updater}]")
    stats.update(examples=len(examples))
    return _cpu_state_dict(model), stats
