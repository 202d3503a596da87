"""Reward scorer: r_phi(x, y) for many (prompt, response) pairs, batched by length."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from apo_ray.models.loading import (
    encode_prompt_response,
    format_prompt,
    load_reward_model,
    load_tokenizer,
    pad_batch,
    reward_forward,
)
from apo_ray.models.lora import AdapterHost, is_adapter

if TYPE_CHECKING:
    from apo_ray.config import Config


class RewardScorer:
    def __init__(self, model: str, *, max_length: int = 512, score_batch: int = 32, dtype: str = "float32",
                 device: str | None = None, **_ignored):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.model_name, self.dtype = model, dtype
        self.model = load_reward_model(model, dtype=dtype, device=self.device).eval()
        self.adapter = AdapterHost(self.model)  # LoRA versions: served as adapters (+ head) on this model
        self.max_length = max_length
        self.score_batch = score_batch
        self.last_seconds = 0.0

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        if is_adapter(state_dict):
            self.adapter.load(state_dict)
            return
        self.adapter.check_full_state()
        self.model.load_state_dict(state_dict, strict=True)

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
        enc = [encode_prompt_response(self.tokenizer, formatted[p], r, self.max_length)
               for p, r in zip(prompts, responses)]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        scores = [0.0] * len(enc)
        for lo in range(0, len(order), self.score_batch):
            chunk = order[lo:lo + self.score_batch]
            batch = pad_batch([enc[i] for i in chunk], self.tokenizer.pad_token_id, side="right")
            rewards = reward_forward(self.model, batch["input_ids"].to(self.device),
                                     batch["attention_mask"].to(self.device))
            for i, r in zip(chunk, rewards.tolist()):
                scores[i] = r
        self.last_seconds = time.perf_counter() - start
        return scores


def scorer_from_config(cfg: Config) -> RewardScorer:
    """The scorer ``cfg.model.reward`` / ``cfg.rm`` describe, with the pretrained weights."""
    return RewardScorer(cfg.model.reward, max_length=cfg.rm.max_length, score_batch=cfg.rm.score_batch,
                        dtype=cfg.model.dtype)
