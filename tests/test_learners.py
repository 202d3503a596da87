"""Tests for apo_ray.models.training: the RM learner (APO loss on D_APO + D_P), the policy learners (RJS
and DPO), the exactness of gradient accumulation and the per-rank slicing of optimiser steps.

All on the tiny random Llama on CPU with real HH-RLHF pairs.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from apo_ray.core.losses import masked_lm_loss, sequence_logprobs
from apo_ray.data import RankedPair
from apo_ray.models.loading import (
    encode_prompt_response,
    format_prompt,
    load_policy,
    load_reward_model,
    pad_batch,
)
from apo_ray.models.scoring import RewardScorer
from apo_ray.models.training import (
    PolicyLoss,
    RMLoss,
    TrainSettings,
    _steps,
    train_policy,
    train_reward_model,
)

TINY = "tiny-random-llama"
STAT_FIELDS = {"steps", "loss_first", "loss_last", "loss_mean", "seconds", "tokens_per_s", "losses", "precision"}


def settings(**kw) -> TrainSettings:
    base = {"lr": 1e-3, "examples_per_step": 4, "micro_examples": 4, "max_length": 96, "epochs": 1,
            "precision": "fp32", "seed": 0}
    return TrainSettings(**(base | kw))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def pref_pairs(hh_pairs) -> list[RankedPair]:
    return [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in hh_pairs[:8]]


@pytest.fixture(scope="module")
def apo_pairs(hh_pairs) -> list[RankedPair]:
    samples = ["I don't know.", "No.", "Maybe ask someone else about that.", "ok"]
    return [RankedPair(p.prompt, p.chosen, s, "apo") for p, s in zip(hh_pairs[8:12], samples)]


@pytest.fixture(scope="module")
def rm_init(tiny_model) -> dict:
    """A fixed starting RM (the scalar head is random, so it is drawn once under a seed)."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in load_reward_model(TINY).state_dict().items()}


@pytest.fixture(scope="module")
def scorer(tiny_model):
    return RewardScorer(TINY, max_length=96, score_batch=16, dtype="float32", device="cpu")


def accuracy(scorer, state, pairs) -> float:
    scorer.load_weights(state)
    good = scorer.score([p.prompt for p in pairs], [p.good for p in pairs])
    bad = scorer.score([p.prompt for p in pairs], [p.bad for p in pairs])
    return sum(g > b for g, b in zip(good, bad)) / len(pairs)


# ------------------------------------------------------------------------------ steps / ranks


def test_steps_are_seeded_shuffles_cut_into_steps():
    steps = _steps(10, 4, seed=3, epochs=2)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    epoch1 = [i for step in steps[:3] for i in step]
    epoch2 = [i for step in steps[3:] for i in step]
    assert sorted(epoch1) == sorted(epoch2) == list(range(10))  # every item once per epoch
    assert epoch1 != epoch2  # a fresh shuffle each epoch
    assert _steps(10, 4, seed=3, epochs=2) == steps  # deterministic
    assert _steps(10, 4, seed=4, epochs=2) != steps


def test_rank_slices_partition_each_step():
    world = 2
    for step in _steps(9, 5, seed=0, epochs=2):
        slices = [step[r::world] for r in range(world)]
        assert sorted(slices[0] + slices[1]) == sorted(step)
        assert not set(slices[0]) & set(slices[1])
        assert abs(len(slices[0]) - len(slices[1])) <= 1


def test_rank_losses_sum_to_the_single_process_loss(tiny_model, rm_init, pref_pairs, apo_pairs):
    """Each rank divides by the counts of the *whole* step, so (with DDP summing the ranks' gradients)
    the ranks' partial losses add up to the one-process step loss."""
    pairs = pref_pairs[:4] + apo_pairs[:3]
    kw = {"examples_per_step": len(pairs), "micro_examples": 2, "epochs": 1}
    _, full = train_reward_model(TINY, rm_init, pairs, settings(**kw), loss=RMLoss(beta2=3.0, apo_weight=0.5))
    runs = [train_reward_model(TINY, rm_init, pairs, settings(**kw, rank=r, world_size=2),
                               loss=RMLoss(beta2=3.0, apo_weight=0.5)) for r in range(2)]
    parts = [stats for _, stats in runs]
    assert runs[0][0] is not None and runs[1][0] is None  # only rank 0 hands back a state dict
    assert parts[0]["loss_first"] != pytest.approx(full["loss_first"], abs=1e-3)
    assert parts[0]["loss_first"] + parts[1]["loss_first"] == pytest.approx(full["loss_first"], abs=1e-5)


class _CountingForwards(torch.nn.Module):
    """Stands in for DDP in ``prepare_model``: counts forward passes (each is a DDP collective point)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.forwards = module, 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.module(*args, **kwargs)


def test_every_rank_runs_the_same_number_of_micro_batches(tiny_model, rm_init, pref_pairs):
    pairs = pref_pairs[:3]  # one step of 3: rank 0 takes 2 pairs, rank 1 takes 1
    counted = []

    def prepare(model):
        counted.append(_CountingForwards(model))
        return counted[-1]

    for rank in range(2):
        train_reward_model(TINY, rm_init, pairs, settings(examples_per_step=3, micro_examples=1, rank=rank,
                                                          world_size=2), prepare_model=prepare)
    assert counted[0].forwards == counted[1].forwards


def test_trained_weights_stream_the_whole_state_dict_to_rank_0_only(tiny_model):
    from apo_ray.models.training import TrainedWeights

    model = load_policy(TINY)
    expected = model.state_dict()
    on_0 = TrainedWeights(model, rank=0)
    assert [s.name for s in on_0.specs] == list(expected)  # tied lm_head included: loads with strict names
    assert [s.shape for s in on_0.specs] == [tuple(v.shape) for v in expected.values()]
    state = on_0.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert state["model.embed_tokens.weight"].data_ptr() != expected["model.embed_tokens.weight"].data_ptr()  # a copy
    on_1 = TrainedWeights(model, rank=1)
    assert on_1.state_dict() is None
    with pytest.raises(RuntimeError, match="only rank 0"):
        next(on_1.tensors())


# ------------------------------------------------------------------------------ reward model


def test_train_reward_model_with_apo_and_preference_pairs(tiny_model, rm_init, pref_pairs, apo_pairs):
    pairs = apo_pairs + pref_pairs
    state, stats = train_reward_model(
        TINY, rm_init, pairs, settings(precision="bf16-autocast", examples_per_step=6, micro_examples=3),
        loss=RMLoss(beta2=10.0, apo_weight=1.0))
    assert STAT_FIELDS | {"pairs", "apo_pairs"} <= stats.keys()
    assert stats["pairs"] == 12 and stats["apo_pairs"] == 4
    assert stats["steps"] == 2 and len(stats["losses"]) == 2
    assert all(math.isfinite(x) for x in stats["losses"])
    # beta2 = 10 on a near-chance RM: the loss is about (1 + 10) * log 2
    assert 0.5 * 11 * math.log(2) < stats["loss_first"] < 2 * 11 * math.log(2)
    assert stats["tokens_per_s"] > 0
    assert state.keys() == rm_init.keys()
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())
    assert max_abs_diff(state, rm_init) > 1e-4  # the weights moved
    assert not torch.equal(state["score.weight"], rm_init["score.weight"])  # the head too


def test_train_reward_model_rejects_no_pairs(tiny_model):
    with pytest.raises(ValueError):
        train_reward_model(TINY, None, [], settings())


def test_reward_model_learns_its_training_pairs(tiny_model, rm_init, pref_pairs, scorer):
    before = accuracy(scorer, rm_init, pref_pairs)
    state, stats = train_reward_model(TINY, rm_init, pref_pairs, settings(lr=3e-3, epochs=6))
    after = accuracy(scorer, state, pref_pairs)
    first_epoch = sum(stats["losses"][:2]) / 2
    last_epoch = sum(stats["losses"][-2:]) / 2
    assert last_epoch < first_epoch
    assert after >= before and after >= 0.75, (before, after)


@pytest.mark.parametrize("reduction", ["per_term", "pooled"])
def test_gradient_accumulation_is_exact(tiny_model, rm_init, pref_pairs, apo_pairs, reduction):
    """Micro-batches of 1 and one micro-batch per step give the same losses and weights: the loss
    of each micro-batch is normalised by the step's per-kind counts, not the micro-batch's."""
    pairs = pref_pairs[:5] + apo_pairs
    loss = RMLoss(beta2=2.0, apo_weight=0.5, reduction=reduction, samples_per_query=4)
    runs = [train_reward_model(TINY, rm_init, pairs, settings(examples_per_step=6, micro_examples=m, epochs=2),
                               loss=loss) for m in (1, 6)]
    (s1, stats1), (s6, stats6) = runs
    assert stats1["losses"] == pytest.approx(stats6["losses"], abs=1e-5)
    moved = max_abs_diff(s6, rm_init)
    assert moved > 1e-3
    assert max_abs_diff(s1, s6) < 5e-5  # float summation order only (Adam magnifies tiny gradients)


@pytest.mark.parametrize("micro", [1, 4])
def test_skipped_apo_slots_keep_apos_steps_and_read_nothing(tiny_model, rm_init, pref_pairs, apo_pairs, micro):
    """The ablation's RM: APO's step schedule (same number of steps, the same D_P pairs in each)
    with the APO pairs left out. Equals APO's own training with the APO term weighted 0, which reads
    the real pairs: so the slots' content is never used, and only the APO pairs differ."""
    slots = [RankedPair("", "", "", "apo")] * len(apo_pairs)
    kw = {"examples_per_step": 4, "micro_examples": micro, "epochs": 2}
    zero = RMLoss(beta2=2.0, apo_weight=0.0)
    s_real, st_real = train_reward_model(TINY, rm_init, apo_pairs + pref_pairs, settings(**kw), loss=zero)
    s_slot, st_slot = train_reward_model(TINY, rm_init, slots + pref_pairs, settings(**kw),
                                         loss=dataclasses.replace(zero, skip_apo_pairs=True))
    _, st_apo = train_reward_model(TINY, rm_init, apo_pairs + pref_pairs, settings(**kw), loss=RMLoss(beta2=2.0))
    assert st_slot["steps"] == st_apo["steps"] == 2 * 3  # 12 pairs / 4 a step, 2 epochs
    assert st_slot["losses"] == pytest.approx(st_real["losses"], abs=1e-6)
    # other batch widths (padding) change float summation order only; Adam magnifies tiny gradients
    assert max_abs_diff(s_slot, s_real) < 5e-5 and max_abs_diff(s_slot, rm_init) > 1e-3
    assert st_slot["apo_slots_skipped"] == 4 and st_slot["apo_pairs"] == 0 and st_slot["pairs"] == 8
    with pytest.raises(ValueError, match="skipped APO slot"):
        train_reward_model(TINY, rm_init, slots, settings(), loss=dataclasses.replace(zero, skip_apo_pairs=True))


# ------------------------------------------------------------------------------ policy


@pytest.fixture(scope="module")
def policy_init(tiny_model) -> dict:
    return {k: v.clone() for k, v in load_policy(TINY).state_dict().items()}


@pytest.fixture(scope="module")
def sft_examples(hh_pairs) -> list[tuple[str, str]]:
    return [(p.prompt, p.chosen) for p in hh_pairs[20:24]]


def test_train_policy_rjs_learns_and_uses_response_tokens_only(tiny_model, tiny_tokenizer, policy_init,
                                                               sft_examples):
    s = settings(lr=1e-2, examples_per_step=4, micro_examples=2, max_length=64, epochs=5)
    state, stats = train_policy(TINY, None, sft_examples, s, loss=PolicyLoss("rjs"))
    assert STAT_FIELDS | {"examples"} <= stats.keys() and stats["examples"] == 4
    assert stats["steps"] == 5 and all(math.isfinite(x) for x in stats["losses"])
    assert stats["loss_last"] < stats["loss_first"]
    assert max_abs_diff(state, policy_init) > 1e-3

    # The first step's loss is the token-mean LM loss on the response tokens of the 4 examples,
    # under the initial weights (masked_lm_loss from losses.py), accumulated over 2 micro-batches.
    tok = tiny_tokenizer
    enc = [encode_prompt_response(tok, format_prompt(tok, p), r, 64) for p, r in sft_examples]
    batch = pad_batch(enc, tok.pad_token_id)
    model = load_policy(TINY).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"]).item()
        everything = masked_lm_loss(logits, batch["input_ids"], batch["attention_mask"]).item()
    assert stats["loss_first"] == pytest.approx(expected, abs=1e-4)
    assert abs(everything - expected) > 1e-3  # prompt tokens would have given another value


def test_train_policy_from_an_init_state(tiny_model, policy_init, sft_examples):
    """init_state is loaded: training from a perturbed state gives another first-step loss."""
    perturbed = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in policy_init.items()}
    s = settings(lr=1e-3, examples_per_step=4, micro_examples=4, max_length=64, epochs=1)
    _, from_pretrained = train_policy(TINY, None, sft_examples, s)
    _, from_perturbed = train_policy(TINY, perturbed, sft_examples, s)
    assert from_perturbed["loss_first"] != pytest.approx(from_pretrained["loss_first"], abs=1e-3)


def test_train_policy_dpo_raises_chosen_over_rejected(tiny_model, tiny_tokenizer, policy_init, hh_pairs):
    examples = [(p.prompt, p.chosen, p.rejected) for p in hh_pairs[30:34]]
    s = settings(lr=1e-3, examples_per_step=4, micro_examples=2, max_length=64, epochs=3)
    state, stats = train_policy(TINY, None, examples, s, loss=PolicyLoss("dpo", dpo_beta=0.5))
    assert all(math.isfinite(x) for x in stats["losses"])
    # At the first step the policy is its own reference: -log sigmoid(0) = log 2.
    assert stats["loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    assert stats["loss_last"] < stats["loss_first"]

    tok = tiny_tokenizer

    def margins(weights) -> torch.Tensor:
        model = load_policy(TINY).eval()
        model.load_state_dict(weights)
        out = []
        for which in (1, 2):
            enc = [encode_prompt_response(tok, format_prompt(tok, ex[0]), ex[which], 64) for ex in examples]
            batch = pad_batch(enc, tok.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append(sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"]))
        return out[0] - out[1]

    gain = margins(state) - margins(policy_init)
    assert gain.mean() > 0, gain


def test_train_policy_rejects_unknown_objective_and_no_examples(tiny_model, sft_examples):
    with pytest.raises(ValueError, match=r"\['dpo', 'rjs'\]"):  # the error lists the valid names
        train_policy(TINY, None, sft_examples, settings(), loss=PolicyLoss("ppo"))
    with pytest.raises(ValueError):
        train_policy(TINY, None, [], settings())


def test_trainable_layers_freezes_the_embedding_and_lower_blocks(tiny_model, rm_init, pref_pairs):
    """rm.trainable_layers=1 on the 2-block tiny model: block 0 and the embedding keep their initial
    weights, block 1 and the reward head move, and the loss still falls."""
    state, stats = train_reward_model(TINY, rm_init, pref_pairs, settings(trainable_layers=1, epochs=3))
    moved = {k for k in state if not torch.equal(state[k], rm_init[k])}
    assert moved, "nothing trained"
    assert not any(k.startswith(("model.embed_tokens", "model.layers.0.")) for k in moved), sorted(moved)
    assert any(k.startswith("model.layers.1.") for k in moved) and "score.weight" in moved
    assert stats["loss_last"] < stats["loss_first"]


def test_trainable_layers_counts_and_bounds(tiny_model):
    from apo_ray.models.loading import freeze_lower_layers

    model = load_policy(TINY)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    assert freeze_lower_layers(model, None) == total
    # the tiny model ties its LM head to the embedding, so freezing one freezes both
    assert freeze_lower_layers(model, 1) == total - embed - block
    with pytest.raises(ValueError, match="trainable_layers must be in"):
        freeze_lower_layers(load_policy(TINY), 3)


def test_auto_precision_follows_the_device(monkeypatch):
    from apo_ray.models import loading, training

    for fast, dtype, precision in ((True, "bfloat16", "bf16-autocast"), (False, "float32", "fp32")):
        monkeypatch.setattr(loading, "has_fast_bf16", lambda device_type, fast=fast: fast)
        assert training.resolve_precision("auto", "cpu") == precision
        assert loading.resolve_dtype("auto", "cpu") == dtype
        assert training.resolve_precision("bf16", "cpu") == "bf16"  # explicit settings are kept
        assert loading.resolve_dtype("float32", "cpu") == "float32"


def test_fast_bf16_on_this_cpu_is_what_torch_reports():
    from apo_ray.models import loading

    expected = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    loading.has_fast_bf16.cache_clear()
    assert loading.has_fast_bf16("cpu") is expected


def test_learner_job_carries_every_setting_from_the_config(tiny_cfg):
    """The job is built from the config in one place and travels whole: what the config says is
    what a worker trains with."""
    from dataclasses import fields, replace

    from apo_ray.models.training import LearnerJob

    cfg = replace(tiny_cfg)
    cfg.rm.trainable_layers, cfg.rm.weight_decay, cfg.rm.micro_pairs = 1, 0.01, 3
    cfg.cluster.gradient_checkpointing, cfg.cluster.learner_strategy, cfg.cluster.deepspeed_stage = True, "deepspeed", 3
    job = LearnerJob.rm(cfg, lr=2e-4, epochs=2, seed=5, loss=RMLoss(beta2=4.0))
    s = job.settings
    assert (job.role, job.model, job.loss.beta2) == ("rm", cfg.model.reward, 4.0)
    assert (s.lr, s.epochs, s.seed, s.trainable_layers, s.weight_decay) == (2e-4, 2, 5, 1, 0.01)
    assert (s.examples_per_step, s.micro_examples, s.max_length) == (cfg.rm.pairs_per_batch, 3, cfg.rm.max_length)
    assert (s.gradient_checkpointing, s.strategy, s.zero_stage) == (True, "deepspeed", 3)
    cfg.rm.schedule, cfg.rm.warmup_steps = "cosine", 7
    assert LearnerJob.rm(cfg, lr=1.0, epochs=1, seed=0, loss=RMLoss()).settings.schedule == "cosine"
    assert LearnerJob.rm(cfg, lr=1.0, epochs=1, seed=0, loss=RMLoss()).settings.warmup_steps == 7
    cfg.policy.objective, cfg.policy.dpo_beta = "dpo", 0.3
    policy = LearnerJob.policy(cfg, lr=1e-5, seed=1)
    assert (policy.role, policy.loss.objective, policy.loss.dpo_beta) == ("policy", "dpo", 0.3)
    assert policy.settings.examples_per_step == cfg.policy.sequences_per_batch
    assert {f.name for f in fields(s)} >= {"lr", "epochs", "precision", "compile", "max_grad_norm"}


# ------------------------------------------------------------------------------ learning-rate schedule


def _lrs(schedule: str, total: int, **kw) -> list[float]:
    from apo_ray.models.training import make_lr_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=2.0)
    sched = make_lr_schedule(opt, settings(lr=2.0, schedule=schedule, **kw), total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedule_values_at_a_few_steps():
    # warmup 2 steps from 0, then linear to 0 at step 10: 2 * (10 - k) / 8
    assert _lrs("linear", 10, warmup_steps=2) == pytest.approx([0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25])
    # cosine: 2 * 0.5 * (1 + cos(pi * (k - 2) / 8)) after the same warmup
    cosine = _lrs("cosine", 10, warmup_steps=2)
    assert cosine[:3] == pytest.approx([0.0, 1.0, 2.0])
    assert cosine[4] == pytest.approx(1.0 + math.cos(math.pi * 2 / 8)) and cosine[6] == pytest.approx(1.0)
    assert cosine[9] == pytest.approx(1.0 + math.cos(math.pi * 7 / 8))
    # warmup_ratio counts steps as transformers' Trainer does: ceil(0.25 * 10) = 3
    assert _lrs("constant", 10, warmup_ratio=0.25)[:5] == pytest.approx([0.0, 2 / 3, 4 / 3, 2.0, 2.0])
    assert _lrs("constant", 4) == [2.0] * 4  # no warmup, no decay: the old behaviour
    assert _lrs("linear", 4, warmup_steps=2, warmup_ratio=0.9)[:2] == pytest.approx([0.0, 1.0])  # steps win


def test_learners_follow_the_schedule(tiny_model, rm_init, pref_pairs, sft_examples):
    _, rm_stats = train_reward_model(TINY, rm_init, pref_pairs, settings(
        lr=1e-3, examples_per_step=2, micro_examples=2, schedule="linear", warmup_steps=1))
    assert rm_stats["steps"] == 4 and rm_stats["lrs"] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    _, policy_stats = train_policy(TINY, None, sft_examples[:4], settings(
        lr=1e-3, examples_per_step=1, micro_examples=1, schedule="cosine", warmup_ratio=0.25))
    assert policy_stats["lrs"] == pytest.approx([0.0, 1e-3, 0.5e-3 * (1 + math.cos(math.pi / 3)),
                                                 0.5e-3 * (1 + math.cos(2 * math.pi / 3))])


# ------------------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("role", ["rm", "policy"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, tiny_tokenizer, rm_init, pref_pairs, role):
    """cluster.gradient_checkpointing recomputes activations in the backward pass instead of keeping
    them: the learner's model has it on, and its gradients equal those without it."""
    from apo_ray.models.loading import reward_forward
    from apo_ray.models.training import _load_for_training

    tok = tiny_tokenizer
    enc = [encode_prompt_response(tok, format_prompt(tok, p.prompt), p.good, 64) for p in pref_pairs[:4]]
    batch = pad_batch(enc, tok.pad_token_id, side="right")
    grads = {}
    for on in (False, True):
        load = load_reward_model if role == "rm" else load_policy
        _, model = _load_for_training(load, TINY, rm_init if role == "rm" else None,
                                      settings(gradient_checkpointing=on))
        assert model.is_gradient_checkpointing is on
        model.train()
        if role == "rm":
            loss = reward_forward(model, batch["input_ids"], batch["attention_mask"]).square().sum()
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    assert any(g.abs().max() > 0 for g in grads[False].values())
    for name in grads[False]:
        assert torch.allclose(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7), name


# ------------------------------------------------------------------------------ DeepSpeed's fp32 master weights

DS_MASTER_SCRIPT = """
import dataclasses, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, data, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from apo_ray.data import RankedPair, load_preference_pairs
    from apo_ray.models.loading import load_reward_model
    from apo_ray.models.training import TrainSettings, train_reward_model

    pairs = [RankedPair.from_preference(p) for p in load_preference_pairs(data, limit=8)]
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in load_reward_model("tiny-random-llama").state_dict().items()}  # fp32
    s = TrainSettings(lr=1e-6, examples_per_step=4, micro_examples=2, max_length=48, precision="bf16-autocast",
                      rank=rank, world_size=2, strategy="deepspeed", zero_stage=2)
    first, _ = train_reward_model("tiny-random-llama", init, pairs, s)
    box = [first]
    dist.broadcast_object_list(box, src=0)  # every rank starts the next phase from rank 0's weights
    again, _ = train_reward_model("tiny-random-llama", box[0], pairs, dataclasses.replace(s, lr=0.0))
    if rank == 0:
        torch.save({"init": init, "first": first, "again": again}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=tuple(sys.argv[1:]), nprocs=2)
"""


@pytest.mark.slow  # two DeepSpeed processes over gloo
def test_deepspeed_bf16_hands_back_and_resumes_from_fp32_master_weights(tiny_model, hh_data_path, tmp_path):
    """ZeRO-2 in bf16 (2 gloo processes): the weights handed back are DeepSpeed's fp32 master copies,
    so updates far below bf16's resolution (lr 1e-6 here; the paper's RM uses 1e-8) survive the
    phase, and the next phase starts its master copies from them exactly (lr 0: nothing moves)."""
    pytest.importorskip("deepspeed")
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script, out = tmp_path / "ds_master.py", tmp_path / "weights.pt"
    script.write_text(DS_MASTER_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(hh_data_path), port, str(out)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    w = torch.load(out, weights_only=True)
    init, first, again = w["init"], w["first"], w["again"]
    assert all(v.dtype == torch.float32 for v in first.values())
    moved = max_abs_diff(first, init)
    assert 0 < moved < 1e-5  # Adam steps of ~1e-6: a bf16 copy of init alone would be ~1e-4 off
    bf16_ulp = (init["model.layers.0.mlp.up_proj.weight"].bfloat16().float() - init["model.layers.0.mlp.up_proj.weight"])
    assert bf16_ulp.abs().max() > 10 * moved  # so the change is invisible in bf16 and visible here
    assert all(torch.equal(again[k], first[k]) for k in first)  # the lineage kept its fp32 precision
