"""apo_ray.models.frozen_cache: the frozen lower blocks' states computed once per text give the same
scores and training as the full forward; full-model training never uses them."""

from __future__ import annotations

import pytest
import torch

from apo_ray.data import RankedPair
from apo_ray.models.frozen_cache import _caches
from apo_ray.models.loading import load_reward_model
from apo_ray.models.scoring import RewardScorer
from apo_ray.models.training import RMLoss, TrainSettings, train_reward_model

TINY = "tiny-random-llama"  # 2 blocks: trainable_layers=1 freezes the embedding and block 0


@pytest.fixture(autouse=True)
def fresh_caches():
    _caches.clear()
    yield
    _caches.clear()


@pytest.fixture(scope="module")
def pairs(hh_pairs) -> list[RankedPair]:
    return [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in hh_pairs[:10]] + [
        RankedPair(p.prompt, p.chosen, "I don't know.", "apo") for p in hh_pairs[10:14]]


@pytest.fixture(scope="module")
def rm_init(tiny_model) -> dict:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in load_reward_model(TINY).state_dict().items()}


def scorer(cache_mib: float, trainable_layers: int | None = 1) -> RewardScorer:
    return RewardScorer(TINY, max_length=96, score_batch=3, dtype="float32", device="cpu",
                        trainable_layers=trainable_layers, frozen_cache_mib=cache_mib)


def test_cached_scores_equal_the_full_forward(tiny_model, rm_init, pairs):
    prompts, responses = [p.prompt for p in pairs], [p.good for p in pairs]
    whole, cached = scorer(0), scorer(64)
    for s in (whole, cached):
        s.load_weights(rm_init)
    assert whole.prefix_cache is None and cached.prefix_cache is not None
    expected = whole.score(prompts, responses)
    first = cached.score(prompts, responses)  # computes and keeps every text's block-0 states
    assert cached.prefix_cache.stats()["misses"] == len(pairs) and cached.prefix_cache.stats()["hits"] == 0
    # again in other batches (reversed order): every state read from the cache, same scores
    again = cached.score(prompts[::-1], responses[::-1])[::-1]
    assert cached.prefix_cache.stats()["hits"] == len(pairs)
    assert first == pytest.approx(expected, abs=1e-5) and again == pytest.approx(expected, abs=1e-5)
    # another RM with the same frozen blocks (a trained top) shares the cache and still scores right
    other = {k: v + 0.01 if k.startswith("model.layers.1.") or k == "score.weight" else v for k, v in rm_init.items()}
    whole.load_weights(other)
    cached.load_weights(other)
    assert cached.prefix_cache.stats()["texts"] == len(pairs)
    assert cached.score(prompts, responses) == pytest.approx(whole.score(prompts, responses), abs=1e-5)
    # other frozen weights: another cache, never the old states
    lower = {k: v + 0.01 if k.startswith("model.layers.0.") else v for k, v in rm_init.items()}
    before = cached.prefix_cache
    whole.load_weights(lower)
    cached.load_weights(lower)
    assert cached.prefix_cache is not before and cached.prefix_cache.stats()["texts"] == 0
    assert cached.score(prompts, responses) == pytest.approx(whole.score(prompts, responses), abs=1e-5)


def settings(**kw) -> TrainSettings:
    base = {"lr": 1e-3, "examples_per_step": 4, "micro_examples": 2, "max_length": 96, "epochs": 2,
            "precision": "fp32", "seed": 0}
    return TrainSettings(**(base | kw))


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_cached_training_gives_the_same_losses_and_weights(tiny_model, rm_init, pairs):
    loss = RMLoss(beta2=2.0, apo_weight=1.0)
    s_whole, st_whole = train_reward_model(TINY, rm_init, pairs, settings(trainable_layers=1), loss=loss)
    s_cached, st_cached = train_reward_model(TINY, rm_init, pairs, settings(trainable_layers=1, frozen_cache_mib=64),
                                             loss=loss)
    assert st_whole["frozen_cache"] is None and st_cached["frozen_cache"]["texts"] == 2 * len(pairs)
    assert st_cached["losses"] == pytest.approx(st_whole["losses"], abs=1e-5)
    assert max_abs_diff(s_cached, s_whole) < 5e-5 and max_abs_diff(s_cached, rm_init) > 1e-3
    # the lower blocks did not move, in either path
    assert all(torch.equal(s_cached[k], rm_init[k]) for k in rm_init if k.startswith(("model.layers.0.", "model.embed")))
    # a second RM of the same backbone (another arm, round or seed) reads every text from the cache
    _, st_again = train_reward_model(TINY, rm_init, pairs, settings(trainable_layers=1, frozen_cache_mib=64, seed=1),
                                     loss=loss)
    assert st_again["frozen_cache"]["misses"] == st_cached["frozen_cache"]["misses"]  # no new text computed


def test_full_model_training_never_uses_the_cache(tiny_model, rm_init, pairs):
    loss = RMLoss(beta2=2.0)
    s_off, st_off = train_reward_model(TINY, rm_init, pairs, settings(), loss=loss)
    s_on, st_on = train_reward_model(TINY, rm_init, pairs, settings(frozen_cache_mib=64), loss=loss)
    assert st_on["frozen_cache"] is None and not _caches
    assert st_on["losses"] == st_off["losses"] and max_abs_diff(s_on, s_off) == 0
    assert max_abs_diff(s_on, rm_init) > 1e-3 and scorer(64, trainable_layers=None).prefix_cache is None
