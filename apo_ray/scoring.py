"""Reward scorer (layer 2): r_phi(x, y) for many (prompt, response) pairs, batched by length."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from apo_ray.models import (
    encode_prompt_response,
    format_prompt,
    load_reward_model,
    load_tokenizer,
    pad_batch,
    reward_forward,
)

if TYPE_CHECKING:
    from apo_ray.config import Config


class RewardScorer:
    def __init__(self, model: str, *, max_length: int = 512, score_batch: int = 32, dtype: str = "float32",
                 device: str | None = None, max_response_tokens: int | None = None, **_ignored):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.model = load_reward_model(model, dtype=dtype, device=self.device).eval()
        self.max_length = max_length
        self.max_response_tokens = max_response_tokens  # the learners' budget: same cut when scored and trained
        self.score_batch = score_batch
        self.last_seconds = 0.0

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

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
                        dtype=cfg.model.dtype, max_response_tokens=cfg.rm.max_response_tokens)
