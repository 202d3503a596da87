"""Plain classes that serve a model version: a generator or a scorer that knows which
weights it holds, so every call can say which version it wants.

That makes the pool actors stateless from the caller's point of view: a restarted actor (after a
crash) comes back with the pretrained weights, sees the version mismatch on its next call and
reloads, so Ray may simply retry the call. The same classes serve ``InProcessSystem`` in one process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from apo_ray.config import Config, DecodingConfig
from apo_ray.game.store import load_checkpoint
from apo_ray.game.system import Generated, Weights
from apo_ray.models.generators import generator_from_config
from apo_ray.models.loading import isolated_rng
from apo_ray.models.lora import is_adapter
from apo_ray.models.scoring import scorer_from_config
from apo_ray.models.weights import PackedWeights, load_packed_into, unpack_state_dict

log = logging.getLogger(__name__)


def setup_process(cpus: float) -> None:
    """In every actor and learner process: progress lines at INFO (they reach `ray job logs`), and
    torch limited to the cores Ray gave this process (several actors share a node's cores)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def fetch_weights(weights: Weights) -> PackedWeights | dict[str, torch.Tensor] | None:
    """What to load for ``weights``: ``None`` (the pretrained weights), a state dict (in process),
    or the packed buffer from the object store (zero-copy on its node). When the object is lost
    (its owner, a learner process, died and was restarted) the version comes from its checkpoint."""
    handle = weights.handle
    if handle is None or isinstance(handle, (dict, PackedWeights)):
        return handle
    import ray

    try:
        return ray.get(handle)
    except ray.exceptions.ObjectLostError:  # OwnerDiedError is one
        if not weights.checkpoint:
            raise
        log.warning("%s: object store copy lost (its owner died); loading %s", weights.id, weights.checkpoint)
        return load_checkpoint(weights.checkpoint)


class VersionedModel:
    """A generator or scorer plus the id of the weights it holds; it reloads only for a new id.

    ``build()`` makes the object with the pretrained weights (lazily on first use unless
    ``eager``); the object must have ``load_weights(state_dict)`` and may have a ``model``
    (``torch.nn.Module``) that packed weights are copied into in place."""

    def __init__(self, build: Callable[[], Any], pretrained_id: str, *, eager: bool = False):
        self._build_unseeded, self._pretrained_id = build, pretrained_id
        self.obj = self._build() if eager else None
        self.loaded_id = pretrained_id if eager else None
        self.sync_seconds, self.sync_bytes = 0.0, 0  # what the latest ensure() spent loading

    def _build(self) -> Any:
        # Off the process's seeded streams: a build draws a random RM head, and vLLM reseeds the
        # process at engine start; when (and whether) that happens depends on the call order, so
        # in one process it would otherwise move a learner's or sampler's seeded draws.
        with isolated_rng():
            return self._build_unseeded()

    def ensure(self, weights: Weights) -> Any:
        """Load ``weights`` unless already held; returns the object serving them."""
        self.sync_seconds, self.sync_bytes = 0.0, 0
        if self.obj is not None and weights.id == self.loaded_id:
            return self.obj
        start = time.perf_counter()
        state = fetch_weights(weights)
        if state is None and self.obj is not None and hasattr(self.obj, "load_pretrained"):
            self.obj.load_pretrained()  # vLLM: reload in place rather than start a second engine
        elif state is None or self.obj is None:
            self.obj = self._build()
        if isinstance(state, PackedWeights):
            if is_adapter(state.names):  # a LoRA version: a few MB, applied as an adapter
                self.obj.load_weights(unpack_state_dict(state))
            elif hasattr(self.obj, "load_packed"):
                self.obj.load_packed(state)  # generators: in place (transformers) or via shared memory (vLLM)
            elif isinstance(getattr(self.obj, "model", None), torch.nn.Module):
                load_packed_into(self.obj.model, state)  # in place: one host->device copy
            else:
                self.obj.load_weights(unpack_state_dict(state))
            self.sync_bytes = state.total_bytes
        elif state is not None:
            self.obj.load_weights(state)
            if is_adapter(state):
                self.sync_bytes = sum(t.numel() * t.element_size() for t in state.values())
        self.loaded_id = weights.id
        self.sync_seconds = time.perf_counter() - start
        return self.obj


class GeneratorWorker:
    """The generator of a pool actor (or of ``InProcessSystem``)."""

    def __init__(self, cfg: Config, cpus: float | None = None, *, eager: bool = True):
        if cpus is not None:  # an actor: a share of the node's cores
            setup_process(cpus)
        self.model = VersionedModel(lambda: generator_from_config(cfg), "policy/init", eager=eager)

    def generate(self, weights: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None) -> Generated:
        """``n`` samples per prompt; ``decoding``: the settings of this use (None: the sampling ones)."""
        generator = self.model.ensure(weights)
        samples = generator.generate(prompts, n, seed=seed, decoding=decoding)
        stats = generator.last_stats
        return Generated(samples, {"sequences": stats.sequences, "new_tokens": stats.new_tokens,
                                   "seconds": stats.seconds, "sync_seconds": self.model.sync_seconds,
                                   "sync_bytes": self.model.sync_bytes, "pid": os.getpid()})

    def close(self) -> None:
        """Stop what the generator runs outside this process (vLLM's engine), before the actor goes."""
        close = getattr(self.model.obj, "close", None)
        if close is not None:
            close()


class ScorerWorker:
    """The reward scorer of a pool actor (or of ``InProcessSystem``)."""

    def __init__(self, cfg: Config, cpus: float | None = None, *, eager: bool = True):
        if cpus is not None:
            setup_process(cpus)
        self.model = VersionedModel(lambda: scorer_from_config(cfg), "rm/pretrained", eager=eager)

    def score(self, weights: Weights, prompts: list[str], responses: list[str]) -> list[float]:
        return self.model.ensure(weights).score(prompts, responses)
