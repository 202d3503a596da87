"""The game's machinery in one process, no Ray: one generator, one scorer, learners as function calls.

Weights handles are CPU state dicts (``None`` = the pretrained weights). The generator and scorer
are the pool actors' plain classes (:mod:`apo_ray.runtime.workers`), built on first use and reloaded only
when a call asks for another version.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import Config, DecodingConfig
from apo_ray.game.store import load_checkpoint, write_checkpoint
from apo_ray.game.system import (
    Generated,
    Weights,
    generate_calls,
    in_input_order,
    merge_generated,
    score_calls,
)
from apo_ray.models.training import LearnerJob, run_job
from apo_ray.runtime.workers import GeneratorWorker, ScorerWorker


class InProcessSystem:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = GeneratorWorker(cfg, eager=False)
        self.scorer = ScorerWorker(cfg, eager=False)

    # The same seeded batches as RaySystem's pools, so a run gives the same samples in one process.
    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None) -> Generated:
        start = time.perf_counter()
        batches, calls = generate_calls(prompts, n, seed, decoding, self.cfg.generation.prompts_per_batch)
        parts = [self.generator.generate(policy, *call) for call in calls]
        return merge_generated(batches, parts, time.perf_counter() - start)

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]:
        batches, calls = score_calls(prompts, responses, self.cfg.rm.score_batch)
        return in_input_order(batches, [self.scorer.score(rm, *call) for call in calls])

    def train(self, job: LearnerJob, init: Weights, data: list) -> tuple[Any, dict]:
        # One process: the cluster's learner strategy (sharding over ranks) plays no part.
        job = dataclasses.replace(job, settings=dataclasses.replace(job.settings, strategy="ddp"))
        return run_job(job, init.handle, data, device=self.device)

    def save_weights(self, handle: Any, path: Path, **checkpoint) -> None:
        """``checkpoint``: what :func:`apo_ray.game.store.write_checkpoint` takes (base, trained...)."""
        write_checkpoint(path, handle, **checkpoint)

    def load_weights(self, path: Path) -> Any:
        return load_checkpoint(path)

    def resource_usage(self) -> dict[str, float]:
        """Nothing to report: versions are state dicts in this process (the game keeps only the
        live ones, as on Ray)."""
        return {}

    def shutdown(self) -> None:
        """Nothing to stop: the models go with the process."""
