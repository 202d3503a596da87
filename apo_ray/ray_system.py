"""The Ray layer: pools of generator/scorer actors, Ray Train learners, object-store weights.

:class:`RaySystem` implements the :class:`apo_ray.game.GameSystem` protocol, so ``game.py``'s loop
runs unchanged on a cluster. Weights handles are ObjectRefs of :class:`apo_ray.weights.PackedWeights`
(one contiguous buffer; read zero-copy on the same node).

Ownership: an object ``ray.put`` by a Ray Train worker dies with that worker (and Ray >= 2.56 has no
``_owner=`` to hand it over). So rank 0 of a learner sends its packed weights to a long-lived
*mailbox* actor (the driver), which ``ray.put``s them itself and so owns them for the whole run.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from apo_ray.config import Config
from apo_ray.game import Weights
from apo_ray.training import RankedPair
from apo_ray.workers import GeneratorWorker, ScorerWorker

log = logging.getLogger(__name__)

# The only place where plain classes become actors (design.md, layer 3).
GeneratorActor = ray.remote(GeneratorWorker)
ScorerActor = ray.remote(ScorerWorker)


class ShardedPool:
    """N actors of one kind; a call is cut into contiguous shards, one per actor, results in order.

    Actors restart after a crash (``max_restarts``) and Ray retries the shard's call on the restarted
    actor (``max_task_retries``); the versioned-weights protocol of :mod:`apo_ray.workers` makes the
    retried call reload the right weights, so nothing is lost.
    """

    def __init__(self, actor_cls, cfg: Config, n: int, *, cpus: float, gpus: float, name: str, namespace: str | None,
                 max_restarts: int):
        self.name = name
        self.actors = [
            actor_cls.options(name=f"{name}-{i}", namespace=namespace, num_cpus=cpus, num_gpus=gpus,
                              max_restarts=max_restarts, max_task_retries=max_restarts, lifetime=None)
            .remote(cfg, cpus)
            for i in range(n)
        ]

    def map(self, method: str, items: list, make_args) -> list[dict]:
        """Split ``items`` into one contiguous shard per actor; ``make_args(shard, shard_no)`` gives
        the call's arguments. Returns the per-shard result dicts in shard order."""
        n = min(len(self.actors), max(len(items), 1))
        size = -(-len(items) // n)
        shards = [items[i * size:(i + 1) * size] for i in range(n)]
        refs = [getattr(self.actors[i], method).remote(*make_args(shard, i)) for i, shard in enumerate(shards)]
        return ray.get(refs)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _learner_loop(config: dict) -> None:
    """Runs on every Ray Train worker: one learner function over this rank's slice of each step."""
    import ray.train
    import ray.train.torch

    from apo_ray.training import TrainSettings, train_policy, train_reward_model
    from apo_ray.weights import pack_state_dict, unpack_state_dict
    from apo_ray.workers import setup_process

    ctx = ray.train.get_context()
    setup_process(config["cpus_per_worker"])
    device = str(ray.train.torch.get_device())
    init_ref = config["init"][0]
    init_state = unpack_state_dict(ray.get(init_ref), copy=True) if init_ref is not None else None
    data = ray.get(config["data"][0])
    settings = TrainSettings(**config["settings"], device=device, rank=ctx.get_world_rank(),
                             world_size=ctx.get_world_size())

    def prepare(model):
        if settings.strategy == "deepspeed":
            return model  # deepspeed.initialize wraps it in training._Stepper
        return ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy=config["parallel"])

    if config["kind"] == "rm":
        state, stats = train_reward_model(config["model"], init_state, data, settings, prepare_model=prepare,
                                          **config["loss"])
    else:
        state, stats = train_policy(config["model"], init_state, data, settings, prepare_model=prepare,
                                    **config["loss"])
    if ctx.get_world_rank() == 0:
        ray.get(config["mailbox"][0].deposit.remote(config["token"], pack_state_dict(state), stats))


class RaySystem:
    """GameSystem on Ray. ``mailbox``: a long-lived actor with ``deposit(token, packed, stats)`` and
    ``collect(token)`` (the driver), which owns every weights object of the run."""

    def __init__(self, cfg: Config, mailbox, *, namespace: str | None = None, storage_path: str | None = None):
        c = cfg.cluster
        self.cfg, self.mailbox = cfg, mailbox
        self.storage_path = storage_path or str(Path(cfg.run.output_dir) / "ray_train")
        self.generators = ShardedPool(GeneratorActor, cfg, c.num_generators, cpus=c.generator_cpus,
                                      gpus=c.generator_gpus, name="apo-generator", namespace=namespace,
                                      max_restarts=c.max_actor_restarts)
        self.scorers = ShardedPool(ScorerActor, cfg, c.num_scorers, cpus=c.scorer_cpus, gpus=c.scorer_gpus,
                                   name="apo-scorer", namespace=namespace, max_restarts=c.max_actor_restarts)
        self.last_generation: dict[str, float] = {}
        self.last_sync: dict[str, float] = {}

    # -- pools -------------------------------------------------------------------------------------
    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        start = time.perf_counter()
        results = self.generators.map(
            "generate", prompts, lambda shard, i: (policy.id, [policy.handle], shard, n, seed * 1009 + i))
        seconds = time.perf_counter() - start
        tokens = sum(r["new_tokens"] for r in results)
        self.last_generation = {"sequences": len(prompts) * n, "new_tokens": tokens, "seconds": seconds,
                                "samples_per_s": len(prompts) * n / max(seconds, 1e-9),
                                "tokens_per_s": tokens / max(seconds, 1e-9)}
        self.last_sync = {"seconds": sum(r["sync_seconds"] for r in results),
                          "bytes": sum(r["sync_bytes"] for r in results)}
        return [s for r in results for s in r["samples"]]

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]:
        pairs = list(zip(prompts, responses))
        results = self.scorers.map(
            "score", pairs, lambda shard, i: (rm.id, [rm.handle], [p for p, _ in shard], [r for _, r in shard]))
        return [s for r in results for s in r["scores"]]

    # -- learners ----------------------------------------------------------------------------------
    def _fit(self, kind: str, init: Weights, data: list, settings: dict, loss: dict) -> tuple[Any, dict]:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        c = self.cfg.cluster
        token = f"{kind}-{uuid.uuid4().hex[:8]}"
        model = self.cfg.model.reward if kind == "rm" else self.cfg.model.policy
        resources = {"CPU": c.learner_cpus} | ({"GPU": c.learner_gpus} if c.learner_use_gpu else {})
        trainer = TorchTrainer(
            _learner_loop,
            train_loop_config={"kind": kind, "model": model, "init": [init.handle], "data": [ray.put(data)],
                               "settings": settings, "loss": loss, "mailbox": [self.mailbox], "token": token,
                               "cpus_per_worker": c.learner_cpus,
                               "parallel": "fsdp" if c.learner_strategy == "fsdp" else "ddp"},
            scaling_config=ScalingConfig(num_workers=c.learner_workers, use_gpu=c.learner_use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if c.learner_use_gpu else "gloo"),
            run_config=RunConfig(name=token, storage_path=self.storage_path),
        )
        start = time.perf_counter()
        trainer.fit()
        ref, stats = ray.get(self.mailbox.collect.remote(token))[0]
        stats["fit_seconds"] = time.perf_counter() - start
        return ref, stats

    def _settings(self, section: str, lr: float, epochs: int, seed: int) -> dict:
        from apo_ray.local import policy_settings, rm_settings

        make = rm_settings if section == "rm" else policy_settings
        kwargs = {"lr": lr, "seed": seed} | ({"epochs": epochs} if section == "rm" else {})
        s = make(self.cfg, **kwargs)
        s.strategy = "deepspeed" if self.cfg.cluster.learner_strategy == "deepspeed" else "ddp"
        s.zero_stage = self.cfg.cluster.deepspeed_stage
        return {k: getattr(s, k) for k in ("lr", "examples_per_step", "micro_examples", "max_length", "epochs",
                                           "weight_decay", "precision", "seed", "gradient_checkpointing", "compile",
                                           "max_grad_norm", "strategy", "zero_stage", "log_every_steps")}

    def train_rm(self, init: Weights, pairs: list[RankedPair], *, lr, epochs, beta2, apo_weight, seed):
        return self._fit("rm", init, pairs, self._settings("rm", lr, epochs, seed),
                         {"beta2": beta2, "apo_weight": apo_weight})

    def train_policy(self, init: Weights, examples: list[tuple], *, lr, seed):
        return self._fit("policy", init, examples, self._settings("policy", lr, 1, seed),
                         {"updater": self.cfg.policy.updater, "dpo_beta": self.cfg.policy.dpo_beta})

    # -- checkpoints (disk is for resume only) -----------------------------------------------------
    def save_weights(self, handle: Any, path: Path) -> None:
        from apo_ray.weights import unpack_state_dict

        tmp = Path(path).with_suffix(".pt.tmp")
        torch.save(unpack_state_dict(ray.get(handle), copy=True), tmp)
        tmp.replace(path)

    def load_weights(self, path: Path) -> Any:
        from apo_ray.weights import pack_state_dict

        return ray.put(pack_state_dict(torch.load(path, map_location="cpu", weights_only=True)))

    def shutdown(self) -> None:
        self.generators.kill()
        self.scorers.kill()
