"""Reward scorer: r_phi(x, y) for many (prompt, response) pairs, batched by length."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from apo_ray.models.frozen_cache import cached_reward_forward, prefix_cache_for, supports_prefix_cache
from apo_ray.models.loading import (
    encode_prompt_response,
    format_prompt,
    load_reward_model,
    load_tokenizer,
    pad_batch,
    reward_forward,
)
from apo_ray.models.lora import AdapterHost, is_adapter

log = logging.getLogger(__name__)

# A score call longer than this logs how far it is (a cold 3,900-pair test set takes ~12 min on 2 cores).
PROGRESS_EVERY_S = 30.0

if TYPE_CHECKING:
    from apo_ray.config import Config


class RewardScorer:
    def __init__(self, model: str, *, max_length: int = 512, score_batch: int = 32, dtype: str = "float32",
                 device: str | None = None, max_response_tokens: int | None = None,
                 trainable_layers: int | None = None, frozen_cache_mib: float = 0.0, **_ignored):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.model_name, self.dtype = model, dtype
        self.model = load_reward_model(model, dtype=dtype, device=self.device).eval()
        self.adapter = AdapterHost(self.model)  # LoRA versions: served as adapters (+ head) on this model
        self.max_length = max_length
        self.max_response_tokens = max_response_tokens  # the learners' budget: same cut when scored and trained
        self.score_batch = score_batch
        self.last_seconds = 0.0
        # RMs that train only their top `trainable_layers` blocks keep the lower ones pretrained: their
        # states per text are shared with every other RM (and learner) of the process.
        n_frozen = None if trainable_layers is None else self.model.config.num_hidden_layers - trainable_layers
        self.n_frozen = n_frozen if (n_frozen and frozen_cache_mib > 0 and supports_prefix_cache(self.model)) else None
        self.frozen_cache_mib = frozen_cache_mib
        self._refresh_cache()

    def _refresh_cache(self) -> None:
        """The cache of the frozen blocks now loaded (by their weights' fingerprint: an RM whose lower
        blocks were trained too gets its own, never another's states)."""
        self.prefix_cache = None if self.n_frozen is None else prefix_cache_for(
            self.model, self.n_frozen, f"{next(self.model.parameters()).dtype}/none", max_mib=self.frozen_cache_mib)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        if is_adapter(state_dict):
            self.adapter.load(state_dict)
            return
        self.adapter.check_full_state()
        self.model.load_state_dict(state_dict, strict=True)
        self._refresh_cache()

    def weights_changed(self) -> None:
        """Weights were copied into ``self.model`` in place (packed weights on Ray)."""
        self._refresh_cache()

    def load_pretrained(self) -> None:
        """Back to the pretrained RM: for free where versions are adapters, else a fresh model."""
        if self.adapter.peft is not None:
            self.adapter.use_base()
            return
        self.model = load_reward_model(self.model_name, dtype=self.dtype, device=self.device).eval()
        self.adapter = AdapterHost(self.model)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One float per (prompt, response), in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        start = time.perf_counter()
        formatted = {p: format_prompt(self.tokenizer, p) for p in set(prompts)}
        enc = [encode_prompt_response(self.tokenizer, formatted[p], r, self.max_length, self.max_response_tokens)
               for p, r in zip(prompts, responses)]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        scores = [0.0] * len(enc)
        last_log = start
        for lo in range(0, len(order), self.score_batch):
            if lo and time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                log.info("scoring: %d of %d texts, %.1f texts/s", lo, len(order), lo / (last_log - start))
            chunk = order[lo:lo + self.score_batch]
            batch = pad_batch([enc[i] for i in chunk], self.tokenizer.pad_token_id, side="right")
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            rewards = (reward_forward(self.model, ids, mask) if self.prefix_cache is None
                       else cached_reward_forward(self.model, ids, mask, self.prefix_cache))
            for i, r in zip(chunk, rewards.tolist()):
                scores[i] = r
        self.last_seconds = time.perf_counter() - start
        return scores


def scorer_from_config(cfg: Config) -> RewardScorer:
    """The scorer ``cfg.model.reward`` / ``cfg.rm`` describe, with the pretrained weights."""
    return RewardScorer(cfg.model.reward, max_length=cfg.rm.max_length, score_batch=cfg.rm.score_batch,
                        dtype=cfg.model.dtype, max_response_tokens=cfg.rm.max_response_tokens,
                        trainable_layers=cfg.rm.trainable_layers, frozen_cache_mib=cfg.rm.frozen_cache_mib)
