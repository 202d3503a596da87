"""The game's machinery in one process, no Ray: one generator, one scorer, learners as function calls.

Weights handles are CPU state dicts (``None`` = the pretrained weights). The generator and scorer
are built once and reloaded with each version they are asked for, tracked by id so an unchanged
model is not reloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apo_ray.config import Config, DecodingConfig
from apo_ray.game import Weights
from apo_ray.generation import make_generator
from apo_ray.scoring import RewardScorer
from apo_ray.training import RankedPair, TrainSettings, train_policy, train_reward_model


def generator_kwargs(cfg: Config) -> dict:
    g = cfg.generation
    longest = max(g.sampling.max_new_tokens, g.testing.max_new_tokens)
    return {"decoding": g.sampling, "stop": list(g.stop), "max_prompt_tokens": g.max_prompt_tokens,
            "prompts_per_batch": g.prompts_per_batch, "seed": g.seed, "dtype": cfg.model.dtype,
            "fast": g.fast_sampler, "max_model_len": g.max_prompt_tokens + longest,
            "engine_kwargs": dict(g.engine_kwargs)}


def scorer_kwargs(cfg: Config) -> dict:
    return dict(max_length=cfg.rm.max_length, score_batch=cfg.rm.score_batch, dtype=cfg.model.dtype)


def rm_settings(cfg: Config, *, lr: float, epochs: int, seed: int, device: str = "cpu", rank: int = 0,
                world_size: int = 1) -> TrainSettings:
    return TrainSettings(lr=lr, examples_per_step=cfg.rm.pairs_per_batch, micro_examples=cfg.rm.micro_pairs,
                         max_length=cfg.rm.max_length, epochs=epochs, weight_decay=cfg.rm.weight_decay,
                         precision=cfg.model.train_precision, seed=seed, device=device, rank=rank,
                         world_size=world_size, gradient_checkpointing=cfg.cluster.gradient_checkpointing,
                         trainable_layers=cfg.rm.trainable_layers, compile=cfg.cluster.learner_compile)


def policy_settings(cfg: Config, *, lr: float, seed: int, device: str = "cpu", rank: int = 0,
                    world_size: int = 1) -> TrainSettings:
    p = cfg.policy
    return TrainSettings(lr=lr, examples_per_step=p.sequences_per_batch, micro_examples=p.micro_sequences,
                         max_length=p.max_length, epochs=p.epochs, weight_decay=p.weight_decay,
                         precision=cfg.model.train_precision, seed=seed, device=device, rank=rank,
                         world_size=world_size, gradient_checkpointing=cfg.cluster.gradient_checkpointing,
                         trainable_layers=p.trainable_layers, compile=cfg.cluster.learner_compile)


class _Reloading:
    """Holds one model-serving object and the id of the weights it has loaded."""

    def __init__(self, build, pretrained_id: str):
        self._build, self._obj, self._loaded, self._pretrained_id = build, None, None, pretrained_id

    def get(self, weights: Weights):
        if self._obj is None:
            self._obj, self._loaded = self._build(), self._pretrained_id
        if weights.id != self._loaded:
            if weights.handle is None and hasattr(self._obj, "load_pretrained"):
                self._obj.load_pretrained()  # e.g. vLLM: reload in place rather than start an engine
            elif weights.handle is None:
                self._obj = self._build()
            else:
                self._obj.load_weights(weights.handle)
            self._loaded = weights.id
        return self._obj


class LocalSystem:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._generator = _Reloading(lambda: make_generator(cfg.generation.backend, cfg.model.policy,
                                                            **generator_kwargs(cfg)), "policy/init")
        self._scorer = _Reloading(lambda: RewardScorer(cfg.model.reward, **scorer_kwargs(cfg)), "rm/pretrained")

    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None) -> list[list[str]]:
        return self._generator.get(policy).generate(prompts, n, seed=seed, decoding=decoding)

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]:
        return self._scorer.get(rm).score(prompts, responses)

    def train_rm(self, init: Weights, pairs: list[RankedPair], *, lr, epochs, beta2, apo_weight, seed):
        settings = rm_settings(self.cfg, lr=lr, epochs=epochs, seed=seed, device=self.device)
        return train_reward_model(self.cfg.model.reward, init.handle, pairs, settings, beta2=beta2,
                                  apo_weight=apo_weight)

    def train_policy(self, init: Weights, examples: list[tuple], *, lr, seed):
        settings = policy_settings(self.cfg, lr=lr, seed=seed, device=self.device)
        return train_policy(self.cfg.model.policy, init.handle, examples, settings,
                            updater=self.cfg.policy.updater, dpo_beta=self.cfg.policy.dpo_beta)

    def save_weights(self, handle: Any, path: Path) -> None:
        tmp = Path(path).with_suffix(".pt.tmp")
        torch.save(handle, tmp)
        tmp.replace(path)

    def load_weights(self, path: Path) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)
