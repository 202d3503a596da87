"""Plain classes that the Ray actors wrap (layer 2): a generator or scorer that tracks which weights
version it holds, so every call can say which version it wants.

That makes the actors stateless from the pool's point of view: a restarted actor (after a crash)
comes back with the pretrained weights, sees the version mismatch on its next call and reloads from
the object store, so Ray may simply retry the call.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from apo_ray.config import Config, DecodingConfig
from apo_ray.generation import make_generator
from apo_ray.local import generator_kwargs, scorer_kwargs
from apo_ray.scoring import RewardScorer


def setup_process(cpus: float) -> None:
    """In every actor and learner process: progress lines at INFO (they reach `ray job logs`), and
    torch limited to the cores Ray gave this process (several actors share a node's cores)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


class VersionedModel:
    """Holds a generator or a scorer plus the id of the weights it has loaded."""

    def __init__(self, build, pretrained_id: str):
        self._build = build
        self._pretrained_id = pretrained_id
        self.obj = build()
        self.loaded_id = pretrained_id
        self.sync_seconds = 0.0
        self.sync_bytes = 0

    def ensure(self, weights_id: str, ref_box: list) -> None:
        """Load ``weights_id`` unless already loaded. ``ref_box``: [ObjectRef of PackedWeights] or [None]
        (a list, so Ray hands the reference over instead of resolving it for every call)."""
        self.sync_seconds, self.sync_bytes = 0.0, 0  # per call: what this call spent loading
        if weights_id == self.loaded_id:
            return
        start = time.perf_counter()
        ref = ref_box[0]
        if ref is None and hasattr(self.obj, "load_pretrained"):
            self.obj.load_pretrained()  # e.g. vLLM: reload in place rather than start a new engine
        elif ref is None:
            self.obj = self._build()
        else:
            import ray

            from apo_ray.weights import load_packed_into

            packed = ray.get(ref)  # zero-copy view of the object store on this node
            if hasattr(self.obj, "load_packed"):
                self.obj.load_packed(packed)  # generators: in place (HF) or via shared memory (vLLM)
            else:
                load_packed_into(self.obj.model, packed)  # in place: one host->device copy
            self.sync_bytes = packed.total_bytes
        self.loaded_id = weights_id
        self.sync_seconds = time.perf_counter() - start


class GeneratorWorker:
    def __init__(self, cfg: Config, cpus: float = 1.0):
        setup_process(cpus)
        self.model = VersionedModel(
            lambda: make_generator(cfg.generation.backend, cfg.model.policy, **generator_kwargs(cfg)), "policy/init")

    def generate(self, weights_id: str, ref_box: list, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None, first_index: int = 0) -> dict[str, Any]:
        """Samples of ``prompts``, the shard of the caller's list that starts at ``first_index``."""
        self.model.ensure(weights_id, ref_box)
        samples = self.model.obj.generate(prompts, n, seed=seed, decoding=decoding, first_index=first_index)
        stats = self.model.obj.last_stats
        return {"samples": samples, "sequences": stats.sequences, "new_tokens": stats.new_tokens,
                "seconds": stats.seconds, "sync_seconds": self.model.sync_seconds,
                "sync_bytes": self.model.sync_bytes, "pid": os.getpid()}

    def close(self) -> None:
        """Stop what the generator runs outside this process (vLLM's engine), before the actor goes."""
        close = getattr(self.model.obj, "close", None)
        if close is not None:
            close()


class ScorerWorker:
    def __init__(self, cfg: Config, cpus: float = 1.0):
        setup_process(cpus)
        self.model = VersionedModel(lambda: RewardScorer(cfg.model.reward, **scorer_kwargs(cfg)), "rm/pretrained")

    def score(self, weights_id: str, ref_box: list, prompts: list[str], responses: list[str]) -> dict[str, Any]:
        self.model.ensure(weights_id, ref_box)
        scores = self.model.obj.score(prompts, responses)
        return {"scores": scores, "seconds": self.model.obj.last_seconds, "pid": os.getpid()}
